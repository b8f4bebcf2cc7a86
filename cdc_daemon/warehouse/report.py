"""``cdc-daemon report --out FILE`` (and ``demo --report``): one HTML page from any
configured warehouse, real or local, through the Snowflake connector. Per table of the group:
its rows in the source and in the warehouse and when it last merged, and, for a table with a
partition column, its rows per UTC day on both sides with the days that differ called out
(the per-day counts of ``warehouse.daytotals``). Callers may add charts of their own (the demo
adds the sample's models). Charts are SVG (pygal), inline, so the page opens offline."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from cdc_daemon.config import PostgresSettings, Settings, SnowflakeSettings
from cdc_daemon.errors import from_psycopg
from cdc_daemon.state.verify import VerifyState
from cdc_daemon.warehouse.daytotals import DayTotals
from cdc_daemon.warehouse.model import WarehouseTable, read_catalog

Query = Callable[[str], list[dict[str, Any]]]

# The source's series and the warehouse's: colours far apart, the warehouse's drawn dashed
# over the source's, so that equal lines stay visible as two.
_SOURCE_COLOUR = "#1f77b4"
_WAREHOUSE_COLOUR = "#d62728"


@dataclass(frozen=True)
class ReportTable:
    """A table of the group as the report shows it: its warehouse form and, when it has one,
    the source column whose UTC day partitions it."""

    table: WarehouseTable
    partition: str | None


@dataclass(frozen=True)
class DayCounts:
    """Rows per UTC day in the source and in the warehouse."""

    source: dict[str, int]
    warehouse: dict[str, int]

    @property
    def days(self) -> list[str]:
        return sorted(self.source.keys() | self.warehouse.keys())

    @property
    def differing(self) -> list[str]:
        return [d for d in self.days if self.source.get(d, 0) != self.warehouse.get(d, 0)]


def _when(value: Any) -> str:
    """A time to the second, in UTC; ``never`` for none."""
    if value is None:
        return "never"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value)


def report_tables(settings: Settings) -> list[ReportTable]:
    """The group's tables, read from the source's catalog, with their partition columns."""
    partitions = {spec.qualified: spec.partition_column for spec in settings.table_specs}
    return [ReportTable(t, partitions.get(t.names.source)) for t in read_catalog(settings)]


def chart(kind: str, title: str, colours: Sequence[str] = (), **options: Any) -> Any:
    """A pygal chart in the report's look."""
    import pygal  # type: ignore[import-untyped]
    from pygal.style import CleanStyle  # type: ignore[import-untyped]

    style = CleanStyle(colors=tuple(colours)) if colours else CleanStyle
    factory = getattr(pygal, kind)
    return factory(
        title=title,
        style=style,
        width=900,
        height=380,
        disable_xml_declaration=True,
        explicit_size=True,
        js=(),  # no tooltip script from the web: the page opens offline
        **options,
    )


def day_counts(query: Query, conn: psycopg.Connection[Any], t: ReportTable) -> DayCounts | None:
    """Rows per day on both sides, or None for a table without a partition column."""
    if t.partition is None:
        return None
    totals = DayTotals.of(t.table, t.partition)
    totals = DayTotals(totals.table, totals.partition, None, ())
    text, params = totals.source_query(None)
    source = {str(day): int(n) for day, n in conn.execute(text, params)}
    warehouse = {str(r["DAY"]): int(r["N"]) for r in query(totals.warehouse_query(None))}
    return DayCounts(source, warehouse)


def _day_chart(t: ReportTable, counts: DayCounts) -> Any:
    days = counts.days
    differing = counts.differing
    if differing:
        verdict = f"differ on {len(differing)} of {len(days)} days"
    else:
        verdict = f"equal on all {len(days)} days"
    name = t.table.names.name
    per_day = chart(
        "Line",
        f"{t.table.names.table}: rows per day of {t.partition} (UTC), source and {name}: {verdict}",
        colours=(_SOURCE_COLOUR, _WAREHOUSE_COLOUR),
        x_label_rotation=30,
        show_minor_x_labels=False,
        dots_size=1,
        y_title="rows",
        truncate_legend=-1,
        include_x_axis=True,  # the rows axis from zero: a day's share is not exaggerated
    )
    per_day.x_labels = days
    per_day.x_labels_major = days[:: max(1, len(days) // 12)]
    per_day.add(
        "source (PostgreSQL)", [counts.source.get(d, 0) for d in days], stroke_style={"width": 3}
    )
    per_day.add(
        f"{name} (warehouse)",
        [counts.warehouse.get(d, 0) for d in days],
        stroke_style={"width": 2, "dasharray": "6, 4"},
    )
    return per_day


def _differing_list(counts: DayCounts) -> str:
    differing = counts.differing
    if not differing:
        return ""
    items = "".join(
        f"<li>{html.escape(d)}: source {counts.source.get(d, 0)}, warehouse "
        f"{counts.warehouse.get(d, 0)}</li>"
        for d in differing[:50]
    )
    more = f"<li>... and {len(differing) - 50} more</li>" if len(differing) > 50 else ""
    return f"<p class='bad'>Days that differ:</p><ul>{items}{more}</ul>"


def _verification(states: Sequence[VerifyState]) -> str:
    """The continuous verification per table: its last full pass, the current one's progress
    and the keys the last slice left differing."""
    if not states:
        return (
            "<h2>Verification</h2><p>No continuous verification has run yet (it runs in the "
            "daemon every <code>verify.interval_s</code>; <code>cdc-daemon verify</code> runs "
            "it on demand).</p>"
        )
    rows = []
    for s in states:
        differing = (
            f"<b class='bad'>{len(s.differing)} key(s)</b>: "
            + html.escape(", ".join(str(k) for k in s.differing[:5]))
            if s.differing
            else "none"
        )
        last = s.last_pass_at.strftime("%Y-%m-%d %H:%M UTC") if s.last_pass_at else "not yet"
        checked = s.checked_at.strftime("%Y-%m-%d %H:%M UTC") if s.checked_at else "never"
        rows.append(
            f"<tr><td>{html.escape(s.table)}</td><td>{last}</td><td>{s.rows_verified}</td>"
            f"<td>{checked}</td><td>{differing}</td></tr>"
        )
    return (
        "<h2>Verification</h2><table><tr><th>table</th><th>last full pass</th>"
        "<th>rows verified this pass</th><th>last slice</th><th>differing</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _deliveries(deliveries: Sequence[dict[str, Any]]) -> str:
    """The latest deliveries with their state and lag: read to upload, upload to load."""
    if not deliveries:
        return ""

    def secs(v: float | None) -> str:
        return "" if v is None else f"{v:.1f} s"

    rows = "".join(
        f"<tr><td>{html.escape(str(d['created_at'])[:19].replace('T', ' '))}</td>"
        f"<td>{html.escape(d['producer'])}</td>"
        f"<td>{html.escape(d['table'])}</td><td>{html.escape(d['name'])}</td>"
        f"<td>{d['rows']}</td>"
        f"<td{' class=bad' if d['status'] in ('failed', 'missing') else ''}>"
        f"{html.escape(d['status'])}</td><td>{secs(d['upload_s'])}</td>"
        f"<td>{secs(d['load_s'])}</td></tr>"
        for d in deliveries
    )
    return (
        "<h2>Latest deliveries</h2><table><tr><th>read</th><th>producer</th><th>table</th>"
        "<th>batch</th><th>rows</th><th>state</th><th>read to S3</th><th>S3 to loaded</th>"
        "</tr>" + rows + "</table>"
    )


def write_report(
    path: Path,
    query: Query,
    pg: PostgresSettings,
    sf: SnowflakeSettings,
    tables: Sequence[ReportTable],
    summary: Sequence[str],
    charts: Sequence[Any] = (),
    verification: Sequence[VerifyState] = (),
    deliveries: Sequence[dict[str, Any]] = (),
) -> None:
    """The page on ``tables``, from ``query`` (a warehouse session's) and the source database;
    ``charts`` (pygal charts) follow the tables' own; ``verification``: the continuous
    verification's state per table (``state.verify``)."""
    rows = []
    sections = []
    try:
        with psycopg.connect(pg.dsn.get_secret_value()) as conn:
            conn.execute("SET TimeZone = 'UTC'")
            for t in tables:
                n = t.table.names
                (source,) = conn.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(n.table.sql())
                ).fetchone() or (0,)
                (got,) = query(
                    f"SELECT COUNT_IF({t.table.live}) AS N, MAX(_MERGED_AT) AS LAST FROM {n.name}"
                )
                equal = "equal" if int(source) == int(got["N"]) else "<b class='bad'>differ</b>"
                rows.append(
                    f"<tr><td>{html.escape(str(n.table))}</td><td>{html.escape(n.name)}</td>"
                    f"<td>{int(source)}</td><td>{int(got['N'])}</td><td>{equal}</td>"
                    f"<td>{html.escape(_when(got['LAST']))}</td></tr>"
                )
                counts = day_counts(query, conn, t)
                if counts is not None:
                    svg = _day_chart(t, counts).render(is_unicode=True)
                    sections.append(f"<figure>{svg}</figure>{_differing_list(counts)}")
    except psycopg.Error as exc:
        raise from_psycopg(exc, "counting the source tables' rows for the report") from None
    table = (
        "<h2>Tables</h2><table><tr><th>source</th><th>Snowflake</th><th>source rows</th>"
        "<th>Snowflake rows</th><th>rows</th><th>last merged</th></tr>" + "".join(rows) + "</table>"
    )
    body = "\n".join(
        [_verification(verification), _deliveries(deliveries)]
        + sections
        + [f"<figure>{c.render(is_unicode=True)}</figure>" for c in charts]
    )
    items = "".join(f"<li>{html.escape(line)}</li>" for line in summary)
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<title>cdc-daemon report</title>"
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
        "figure{margin:1.5em 0}li{font-family:monospace}td,th{padding:0 .8em;text-align:left}"
        ".bad{color:#b00}</style></head><body>"
        "<h1>cdc-daemon: the group in the warehouse</h1>"
        f"<p>PostgreSQL &rarr; S3 &rarr; Snowpipe &rarr; landing tables &rarr; tasks &rarr;"
        f" current-state tables and models in {html.escape(sf.database)}."
        f"{html.escape(sf.schema_)}. Generated {generated}.</p>"
        f"<ul>{items}</ul>{table}{body}</body></html>",
        encoding="utf-8",
    )
