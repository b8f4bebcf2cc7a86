"""``cdc-daemon report --out FILE`` (and ``demo --report``): one HTML page from any
configured warehouse, real or local, through the Snowflake connector: per table of the group
its rows in the source and in Snowflake and when it last merged; and on the seed's model (when
the group holds ``SALES``) rows per day in the source and in SALES, revenue by country, top
products, invoices and cancellations per month -- the view a BI dashboard on these tables
gives. Charts are SVG (pygal), inline, so the page opens offline."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from cdc_daemon.config import PostgresSettings, SnowflakeSettings
from cdc_daemon.errors import from_psycopg
from cdc_daemon.names import TableName
from cdc_daemon.warehouse.model import Names

Query = Callable[[str], list[dict[str, Any]]]


def _chart(kind: str, title: str, **options: Any) -> Any:
    import pygal  # type: ignore[import-untyped]
    from pygal.style import CleanStyle  # type: ignore[import-untyped]

    factory = getattr(pygal, kind)
    return factory(
        title=title,
        style=CleanStyle,
        width=900,
        height=380,
        disable_xml_declaration=True,
        explicit_size=True,
        **options,
    )


def _tables(
    query: Query, pg: PostgresSettings, tables: Sequence[Names]
) -> tuple[str, dict[str, TableName]]:
    """The per-table section (rows in the source, in Snowflake, last merge), and the source
    table of SALES if the group has it."""
    rows = []
    seed: dict[str, TableName] = {}
    try:
        with psycopg.connect(pg.dsn.get_secret_value()) as conn:
            for n in tables:
                (source,) = conn.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(n.table.sql())
                ).fetchone() or (0,)
                (got,) = query(f"SELECT COUNT(*) AS N, MAX(_MERGED_AT) AS LAST FROM {n.name}")
                rows.append(
                    f"<tr><td>{html.escape(str(n.table))}</td><td>{html.escape(n.name)}</td>"
                    f"<td>{int(source)}</td><td>{int(got['N'])}</td>"
                    f"<td>{html.escape(str(got['LAST'] or 'never'))}</td></tr>"
                )
                if n.name == "SALES":
                    seed["source"] = n.table
    except psycopg.Error as exc:
        raise from_psycopg(exc, "counting the source tables' rows for the report") from None
    table = (
        "<h2>Tables</h2><table><tr><th>source</th><th>Snowflake</th><th>source rows</th>"
        "<th>Snowflake rows</th><th>last merged</th></tr>" + "".join(rows) + "</table>"
    )
    return table, seed


def write_report(
    path: Path,
    query: Query,
    pg: PostgresSettings,
    sf: SnowflakeSettings,
    tables: Sequence[Names],
    summary: list[str],
) -> None:
    """The page on ``tables``, from ``query`` (a warehouse session's) and the source database."""
    section, seed = _tables(query, pg, tables)
    charts = _seed_charts(query, pg, seed["source"]) if seed else []
    body = "\n".join(f"<figure>{c.render(is_unicode=True)}</figure>" for c in charts)
    items = "".join(f"<li>{html.escape(line)}</li>" for line in summary)
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<title>cdc-daemon report</title>"
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
        "figure{margin:1.5em 0}li{font-family:monospace}td,th{padding:0 .8em;text-align:left}"
        "</style></head><body>"
        "<h1>cdc-daemon: the group in the warehouse</h1>"
        f"<p>PostgreSQL &rarr; S3 &rarr; Snowpipe &rarr; landing tables &rarr; tasks &rarr;"
        f" current-state tables and models in {html.escape(sf.database)}."
        f"{html.escape(sf.schema_)}. Generated {generated}.</p>"
        f"<ul>{items}</ul>{section}{body}</body></html>",
        encoding="utf-8",
    )


def _seed_charts(query: Query, pg: PostgresSettings, source: TableName) -> list[Any]:
    days_source: dict[str, int] = {}
    try:
        with psycopg.connect(pg.dsn.get_secret_value()) as conn:
            for day, n in conn.execute(
                sql.SQL(
                    "SELECT to_char(invoice_date AT TIME ZONE 'UTC', 'YYYY-MM-DD'), count(*)"
                    " FROM {} GROUP BY 1 ORDER BY 1"
                ).format(source.sql())
            ):
                days_source[str(day)] = int(n)
    except psycopg.Error as exc:
        raise from_psycopg(exc, "counting the source's rows per day for the report") from None
    days_sales = {
        str(r["DAY"]): int(r["N"])
        for r in query("SELECT TO_DATE(INVOICE_DATE) AS DAY, COUNT(*) AS N FROM SALES GROUP BY 1")
    }
    days = sorted(days_source.keys() | days_sales.keys())
    per_day = _chart(
        "Line",
        "Rows per day: source (Postgres) and SALES (warehouse)",
        x_label_rotation=30,
        show_minor_x_labels=False,
        dots_size=1,
    )
    per_day.x_labels = days
    per_day.x_labels_major = days[:: max(1, len(days) // 12)]
    per_day.add("source", [days_source.get(d, 0) for d in days])
    per_day.add("SALES", [days_sales.get(d, 0) for d in days])

    countries = query(
        "SELECT COUNTRY, SUM(AMOUNT)::NUMBER(38, 2) AS REVENUE FROM INVOICES"
        " GROUP BY COUNTRY ORDER BY REVENUE DESC LIMIT 12"
    )
    by_country = _chart("HorizontalBar", "Revenue by country (top 12, from INVOICES)")
    for row in reversed(countries):
        by_country.add(str(row["COUNTRY"]), float(row["REVENUE"] or 0))

    products = query(
        "SELECT STOCK_CODE, DESCRIPTION, QUANTITY FROM PRODUCTS ORDER BY QUANTITY DESC LIMIT 10"
    )
    top = _chart("HorizontalBar", "Top products by quantity (from PRODUCTS)")
    for row in reversed(products):
        top.add(f"{row['STOCK_CODE']} {row['DESCRIPTION'] or ''}"[:40], int(row["QUANTITY"]))

    months = query(
        "SELECT DATE_TRUNC('MONTH', INVOICE_DATE) AS MONTH, COUNT(*) AS INVOICES,"
        " SUM(CASE WHEN IS_CANCELLATION THEN 1 ELSE 0 END) AS CANCELLED"
        " FROM INVOICES GROUP BY 1 ORDER BY 1"
    )
    cancellations = _chart("Bar", "Invoices and cancellations per month (from INVOICES)")
    cancellations.x_labels = [str(r["MONTH"])[:7] for r in months]
    cancellations.add("invoices", [int(r["INVOICES"]) for r in months])
    cancellations.add("cancellations", [int(r["CANCELLED"]) for r in months])

    return [per_day, by_country, top, cancellations]
