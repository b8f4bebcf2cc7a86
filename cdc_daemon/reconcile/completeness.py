"""The completeness check: per day, the same totals in PostgreSQL and in each table's
current-state table in Snowflake (``warehouse.daytotals``: rows, and per column the non-NULL
values, exact sums of numbers, total text length, true values).

Any table with a partition column is checked; a table without one is not (its days are those of
the commits or reads, which the source cannot recount). Only the days the ledger says can be
judged are compared (``Scope``): a day with an object Snowflake has not confirmed yet is left
for a later check, and in watermark mode only the rows at or below the committed watermark
count (the rest may not be exported yet).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
import structlog

from cdc_daemon.config import PostgresSettings, Settings, TableSettings
from cdc_daemon.errors import from_psycopg
from cdc_daemon.warehouse.client import Warehouse
from cdc_daemon.warehouse.daytotals import DayTotals
from cdc_daemon.warehouse.model import Names, from_catalog, names

log = structlog.get_logger()

Totals = tuple[Decimal, ...]  # the row count, then each measure


@dataclass(frozen=True)
class Scope:
    """What the ledger lets the check judge of one table: the days with an object
    (``exported``), those with one not yet confirmed loaded (``waiting``), and in watermark
    mode the committed watermark (only rows at or below it are compared; every day with rows
    is judged, since an exported day may have no object of its own yet)."""

    exported: frozenset[str]
    waiting: frozenset[str]
    watermark: int | None = None


@dataclass(frozen=True)
class DayDifference:
    """A day whose totals differ: both row counts, and the measures that differ (e.g.
    ``sum(quantity)``, ``count(description)``)."""

    table: str
    day: str
    source_rows: int
    warehouse_rows: int
    differing: tuple[str, ...]

    def line(self) -> str:
        """The day as ``reconcile --once --completeness`` prints it."""
        return (
            f"{self.table} {self.day}  rows {self.source_rows} vs {self.warehouse_rows},"
            f" differing: {', '.join(self.differing) or 'rows only'}"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "day": self.day,
            "source_rows": self.source_rows,
            "warehouse_rows": self.warehouse_rows,
            "differing": list(self.differing),
        }


ScopeOf = Callable[[TableSettings], Awaitable[Scope | None]]


async def check_group(settings: Settings, wh: Warehouse, scope_of: ScopeOf) -> list[DayDifference]:
    """Every table of the group that has a partition column; ``scope_of`` reads a table's
    scope from the ledger (None: nothing of it can be judged yet)."""
    found: list[DayDifference] = []
    logical = settings.capture.mode == "logical"
    for spec, n in zip(settings.table_specs, names(settings), strict=True):
        if spec.partition_column is None:
            continue
        scope = await scope_of(spec)
        if scope is None:
            continue
        found += await check_table(settings.postgres, wh, spec, n, scope, logical=logical)
    return found


async def check_table(
    pg: PostgresSettings,
    wh: Warehouse,
    spec: TableSettings,
    n: Names,
    scope: Scope,
    *,
    logical: bool = False,
) -> list[DayDifference]:
    """One table: its days whose totals differ, among those ``scope`` lets it judge. Logs a
    ``day_incomplete`` line per such day and one ``completeness_checked`` line."""
    assert spec.partition_column is not None
    totals, source = await asyncio.to_thread(_source_totals, pg, spec, n, scope, logical)
    rows = await asyncio.to_thread(wh.query, totals.warehouse_query(scope.watermark))
    width = range(len(totals.measures))
    warehouse = {
        _day(r["DAY"]): (_number(r["N"]), *(_number(r[f"M{i}"]) for i in width)) for r in rows
    }
    days = source.keys() | warehouse.keys()
    judged = {
        d
        for d in days
        if d not in scope.waiting and (scope.watermark is not None or d in scope.exported)
    }
    zero: Totals = (Decimal(0),) * (1 + len(totals.measures))
    labels = [m.label for m in totals.measures]
    found = []
    for day in sorted(judged):
        mine, theirs = source.get(day, zero), warehouse.get(day, zero)
        if mine == theirs:
            continue
        differing = tuple(
            label for label, a, b in zip(labels, mine[1:], theirs[1:], strict=True) if a != b
        )
        found.append(DayDifference(n.source, day, int(mine[0]), int(theirs[0]), differing))
    for d in found:
        log.warning(
            "day_incomplete",
            table=d.table,
            day=d.day,
            source_rows=d.source_rows,
            warehouse_rows=d.warehouse_rows,
            differing=list(d.differing),
        )
    log.info(
        "completeness_checked",
        table=n.source,
        days=len(judged),
        differing=len(found),
        not_judged_yet=len(days - judged),
    )
    return found


def _source_totals(
    pg: PostgresSettings, spec: TableSettings, n: Names, scope: Scope, logical: bool
) -> tuple[DayTotals, dict[str, Totals]]:
    assert spec.partition_column is not None
    try:
        with psycopg.connect(
            pg.dsn.get_secret_value(),
            connect_timeout=max(1, int(pg.connect_timeout_s)),
            options="-c TimeZone=UTC",
        ) as conn:
            table = from_catalog(conn, n, spec.key, logical=logical, spec=spec)
            watermark = None
            if scope.watermark is not None:
                keys = [c.source for c in table.key]
                watermark = spec.watermark_column or (keys[0] if len(keys) == 1 else None)
            totals = DayTotals.of(table, spec.partition_column, watermark)
            query, params = totals.source_query(scope.watermark)
            rows = conn.execute(query, params or None).fetchall()
    except psycopg.Error as exc:
        raise from_psycopg(exc, f"totalling {n.source} per day") from None
    return totals, {_day(r[0]): tuple(_number(v) for v in r[1:]) for r in rows}


def _day(value: object) -> str:
    """The day as both sides name it: ``YYYY-MM-DD`` (rows with no partition value: ``none``)."""
    return "none" if value is None else str(value)[:10]


def _number(value: object) -> Decimal:
    # Decimal compares 1.50 and 1.5 equal: the two sides' scales need not agree.
    return Decimal(str(value))
