"""Schema evolution: a column added in the source reaches Snowflake before the first object
holding it can load.

The pipes load by column name and a file column the landing table lacks is not loaded
(Snowflake: "COPY INTO <table>", MATCH_BY_COLUMN_NAME), so an object whose header names a new
column must not be uploaded before the column exists. The daemon applies the change itself
(``SchemaGuard``, called by the unit of work before every upload): adding a column is additive
and idempotent (``ALTER TABLE ... ADD COLUMN IF NOT EXISTS``) and needs no judgement, while
holding the uploads for an operator would stop the whole group's export for a routine change.
For each table whose objects name a column its landing table lacks, it reads the table's
columns from the catalog, adds every missing one to the landing, current-state and work
tables (types from ``model.sf_type``), and re-creates the table's merge task so that it
merges the new column (``CREATE OR ALTER TASK``, between ``SUSPEND`` and ``RESUME``). A
failure (Snowflake unreachable, no privilege) fails the upload, which is retried; nothing is
uploaded meanwhile, so nothing loads without its column.

A dropped column stays in Snowflake: new objects do not name it, and the by-name load gives
NULL (its old values stay in the rows that had them).

A widened column (``model.retype_problem``: a longer or unbounded varchar, a larger integer,
a larger numeric precision at the same scale) is followed: its values keep their text, so the
rows in Snowflake stay right. Most widenings map to the same Snowflake type (VARCHAR is
unbounded); the others are a larger NUMBER precision, which ``ALTER COLUMN ... SET DATA TYPE``
makes in place (``model.widens_in_place``), on every table holding the column, before the
first batch holding the new type is recorded (``SchemaGuard.widen``, from the logical capture).
Any other retyped column stops its table (``capture.logical.reader``).
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

from cdc_daemon.config import Settings
from cdc_daemon.errors import CdcError, TransientError
from cdc_daemon.state.columns import warehouse_columns
from cdc_daemon.state.ledger import ObjectRecord
from cdc_daemon.warehouse import sql
from cdc_daemon.warehouse.client import Warehouse
from cdc_daemon.warehouse.model import (
    DAEMON_COLUMNS,
    Names,
    WarehouseTable,
    folder_of,
    names,
    read_catalog,
)
from cdc_daemon.warehouse.plan import Plan, Staged, apply_plan, make_plan, widen_statement

log = structlog.get_logger()


def widen_table(wh: Warehouse, t: WarehouseTable) -> list[str]:
    """Widen the table's columns whose Snowflake type is a narrower one of the catalog's, in
    every table holding them (``typed_tables``). Returns ``TABLE.COLUMN`` of each column
    widened."""
    widened: list[str] = []
    for table, landing, columns in t.typed_tables():
        have = wh.dialect.describe(wh, "TABLE", table) or {}
        for c in columns:
            want = c.type.landing if landing else c.type.final
            alter = widen_statement(table, c.q, have.get(c.name, ("", False))[0], want)
            if alter is not None:
                wh.dialect.execute_ddl(wh, sql.Statement("40_tables.sql", alter))
                widened.append(f"{table}.{c.name}")
    if widened:
        log.warning("warehouse_columns_widened", table=t.names.name, columns=widened)
    return widened


def evolve_table(wh: Warehouse, t: WarehouseTable) -> list[str]:
    """Add the table's columns Snowflake lacks to its landing, current-state and work tables
    (and the daemon's ``_CDC_QUARANTINED``), and widen those of a narrower type
    (``widen_table``). Returns the columns added (upper case)."""
    n = t.names
    added: list[str] = []
    widen_table(wh, t)
    for table, landing in t.column_tables():
        have = set(wh.columns(table))
        wanted = [(c.name, c.q, c.type.landing if landing else c.type.final) for c in t.columns]
        # The daemon's column of quarantined rows (docs/design.md, "Quarantine"), which a
        # warehouse made before it existed lacks: the first -q object adds it.
        wanted.append(("_CDC_QUARANTINED", "_CDC_QUARANTINED", "VARCHAR"))
        # The current-state table's change metadata (and _CDC_DELETED_AT with soft deletes),
        # which the merge task re-created below sets: a warehouse made before them lacks them.
        wanted += [(name, name, kind) for name, kind in t.own_columns(table)]
        for name, quoted, kind in wanted:
            if name not in have:
                wh.dialect.execute_ddl(
                    wh,
                    sql.Statement(
                        "evolve", f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {quoted} {kind}"
                    ),
                )
                if landing:
                    added.append(name)
    if added:
        log.warning("warehouse_columns_added", table=n.name, columns=added)
    return added


def apply_sql(
    wh: Warehouse,
    settings: Settings,
    tables: list[WarehouseTable],
    *,
    stage_url_override: str | None = None,
    staged: Staged | None = None,
    plan_only: bool = False,
) -> Plan:
    """``snowflake/`` for ``tables`` (``snowflake apply``, the local warehouse): what differs
    from what exists (``warehouse.plan``), made so unless ``plan_only``. ``staged`` lists the
    bucket, for refreshing a recreated pipe."""
    plan = make_plan(wh, settings, tables, stage_url_override=stage_url_override)
    if not plan_only:
        apply_plan(wh, plan, staged)
    return plan


def apply_tasks(wh: Warehouse, settings: Settings, t: WarehouseTable) -> None:
    """The table's task statements again (the merge names every column)."""
    for stmt in sql.statements(settings, [t]):
        if stmt.file == "70_tasks.sql":
            wh.dialect.task_ddl(wh, stmt)


def header_of(path: Path) -> list[str]:
    """An object's header line (its column names), from its spool file."""
    raw = path.open("rb")
    try:
        stream: Any = raw
        if path.name.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=raw)
        elif path.name.endswith(".zst"):
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(raw)
        text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
        return next(csv.reader(text), [])
    finally:
        raw.close()


def ledger_columns(settings: Settings, n: Names, columns: set[str] | None = None) -> set[str]:
    """The landing table's known columns from the ledger (saving ``columns`` instead)."""
    return warehouse_columns(settings, n.landing, columns)


def record_columns(settings: Settings, t: WarehouseTable) -> None:
    """After ``snowflake apply``: the landing table has every column of the catalog."""
    names_ = {c.name for c in t.columns} | set(DAEMON_COLUMNS)
    ledger_columns(settings, t.names, ledger_columns(settings, t.names) | names_)


class SchemaGuard:
    """Before an upload: every column the objects' headers name exists in their table's
    landing table. Its own warehouse session, opened when first needed."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._names = {n.folder: n for n in names(settings)}
        self._known: dict[str, set[str]] = {}  # landing table -> its columns (upper case)
        self._wh: Warehouse | None = None

    async def __call__(self, objects: tuple[ObjectRecord, ...]) -> None:
        prefix = self._settings.s3.prefix
        for obj in objects:
            if obj.quarantine or not obj.path:
                continue
            folder = folder_of(obj.key.removeprefix(prefix))
            n = self._names.get(folder)
            if n is None:
                continue
            columns: Sequence[str] = obj.columns or await asyncio.to_thread(
                header_of, Path(obj.path)
            )
            header = {h.upper() for h in columns}
            known = self._known.get(n.landing)
            if known is not None and header <= known:
                continue
            await asyncio.to_thread(self._ensure, n, header)

    def _ledger(self, n: Names, columns: set[str] | None = None) -> set[str]:
        return ledger_columns(self._settings, n, columns)

    def _ensure(self, n: Names, header: set[str]) -> None:
        recorded = self._ledger(n)
        if header <= recorded:
            self._known[n.landing] = recorded
            return
        for attempt in range(3):
            try:
                self._verify(n, header)
                return
            except TransientError as exc:
                if n.landing in self._known or recorded:
                    raise
                if attempt == 2:
                    # Never verified, and Snowflake cannot say now: the first objects' columns
                    # are taken as what `snowflake apply` created (logged); a column added
                    # later is held for Snowflake as above. A restart verifies again.
                    log.warning(
                        "warehouse_columns_assumed",
                        table=n.landing,
                        columns=sorted(header),
                        error=str(exc),
                    )
                    self._known[n.landing] = header
                    return
                time.sleep(1.0)

    async def widen(self, tables: set[str]) -> None:
        """Bring Snowflake's columns of ``tables`` (ledger keys) to the catalog's types where
        the catalog's are wider: after the logical capture followed a widened column, before
        the batch holding it is recorded. A failure is raised (the batch is read again)."""
        await asyncio.to_thread(self._widen, tables)

    def _widen(self, tables: set[str]) -> None:
        # Only these tables: another of the group that cannot be read (dropped, failed) must
        # not hold them.
        for t in read_catalog(self._settings, tables):
            with self._held(t.names, "its columns were widened in the source"):
                widen_table(self._connect(), t)

    def _connect(self) -> Warehouse:
        if self._wh is None:
            self._wh = Warehouse.of_group(self._settings).connect()
        return self._wh

    @contextmanager
    def _held(self, n: Names, what: str) -> Iterator[None]:
        """A warehouse error as the retried error that holds the table's uploads."""
        try:
            yield
        except CdcError as exc:
            self.close()
            held = TransientError(
                f"{n.source}: {what}, and Snowflake could not follow ({exc}); nothing of this "
                "table is uploaded until it does"
            )
            # Snowflake down: an outage the retries wait out, like the service's own error.
            if isinstance(exc, TransientError) and exc.unavailable:
                held.outage()
            raise held.at(exc.boundary or "snowflake") from None

    def _verify(self, n: Names, header: set[str]) -> None:
        with self._held(n, f"its objects name a column {n.landing} lacks"):
            wh = self._connect()
            have = set(wh.columns(n.landing))
            if not header <= have:
                (t,) = [x for x in read_catalog(self._settings) if x.names == n]
                evolve_table(wh, t)
                apply_tasks(wh, self._settings, t)
                have = set(wh.columns(n.landing))
                lost = sorted(header - have)
                if lost:
                    # Dropped from the source between the read and now: its values in this
                    # object are not loaded (the by-name load skips a column the table lacks).
                    log.warning("columns_not_in_catalog", table=n.name, columns=lost)
            self._known[n.landing] = self._ledger(n, have)

    def close(self) -> None:
        if self._wh is not None:
            self._wh.close()
            self._wh = None
