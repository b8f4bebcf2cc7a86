"""``cdc-daemon demo --report PATH``: one HTML page with charts from the warehouse tables --
rows per day in the source and in SALES, revenue by country, top products, cancellations per
month -- the view a BI dashboard on these tables gives. Charts are SVG (pygal), inline, so the
page opens offline."""

from __future__ import annotations

import html
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from cdc_daemon.local.warehouse import LocalWarehouse


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


def write_report(path: Path, warehouse: LocalWarehouse, dsn: str, summary: list[str]) -> None:
    days_source: dict[str, int] = {}
    with psycopg.connect(dsn) as conn:
        for day, n in conn.execute(
            "SELECT to_char(invoice_date AT TIME ZONE 'UTC', 'YYYY-MM-DD'), count(*)"
            " FROM ecommerce_sales GROUP BY 1 ORDER BY 1"
        ):
            days_source[str(day)] = int(n)
    days_sales = {
        str(r["DAY"]): int(r["N"])
        for r in warehouse.query(
            "SELECT TO_DATE(INVOICE_DATE) AS DAY, COUNT(*) AS N FROM SALES GROUP BY 1"
        )
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

    countries = warehouse.query(
        "SELECT COUNTRY, SUM(AMOUNT)::NUMBER(38, 2) AS REVENUE FROM INVOICES"
        " GROUP BY COUNTRY ORDER BY REVENUE DESC LIMIT 12"
    )
    by_country = _chart("HorizontalBar", "Revenue by country (top 12, from INVOICES)")
    for row in reversed(countries):
        by_country.add(str(row["COUNTRY"]), float(row["REVENUE"] or 0))

    products = warehouse.query(
        "SELECT STOCK_CODE, DESCRIPTION, QUANTITY FROM PRODUCTS ORDER BY QUANTITY DESC LIMIT 10"
    )
    top = _chart("HorizontalBar", "Top products by quantity (from PRODUCTS)")
    for row in reversed(products):
        top.add(f"{row['STOCK_CODE']} {row['DESCRIPTION'] or ''}"[:40], int(row["QUANTITY"]))

    months = warehouse.query(
        "SELECT DATE_TRUNC('MONTH', INVOICE_DATE) AS MONTH, COUNT(*) AS INVOICES,"
        " SUM(CASE WHEN IS_CANCELLATION THEN 1 ELSE 0 END) AS CANCELLED"
        " FROM INVOICES GROUP BY 1 ORDER BY 1"
    )
    cancellations = _chart("Bar", "Invoices and cancellations per month (from INVOICES)")
    cancellations.x_labels = [str(r["MONTH"])[:7] for r in months]
    cancellations.add("invoices", [int(r["INVOICES"]) for r in months])
    cancellations.add("cancellations", [int(r["CANCELLED"]) for r in months])

    charts = [per_day, by_country, top, cancellations]
    body = "\n".join(f"<figure>{c.render(is_unicode=True)}</figure>" for c in charts)
    items = "".join(f"<li>{html.escape(line)}</li>" for line in summary)
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<title>cdc-daemon demo report</title>"
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
        "figure{margin:1.5em 0}li{font-family:monospace}</style></head><body>"
        "<h1>cdc-daemon: ecommerce_sales in the warehouse</h1>"
        f"<p>PostgreSQL &rarr; S3 &rarr; Snowpipe &rarr; RAW_SALES &rarr; tasks &rarr; SALES,"
        f" INVOICES, PRODUCTS (local warehouse). Generated {generated}.</p>"
        f"<ul>{items}</ul>{body}</body></html>",
        encoding="utf-8",
    )
