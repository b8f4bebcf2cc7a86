"""The reconciler: Snowflake's load history -> the ledger.

Each round it reads the deliveries (``state.deliveries``: stream batches, snapshot chunks,
backfill chunks alike) that are in S3 but not confirmed (``uploaded``, ``missing``), the pipe's
load history (``COPY_HISTORY`` on RAW_SALES, within its 14-day window) and
``SYSTEM$PIPE_STATUS``, and for each delivery:

- every object loaded, each with exactly the ledger's row count -> ``loaded``;
- an object failed or partially loaded, or loaded with another row count -> ``failed``, with
  Snowflake's first error (or the two counts);
- not all seen ``snowflake.missing_after_s`` after the upload -> the pipe is asked once to look
  again (``ALTER PIPE ... REFRESH PREFIX``, only within Snowflake's 7-day limit); not seen as long
  again after that -> ``missing``. A missing batch is still looked for and becomes ``loaded``
  if it shows up.

Quarantined objects (outside the pipe's folder) are not expected in the history. A paused or
stalled pipe is logged every round and kept for ``status`` and metrics.

It runs in the daemon's TaskGroup on its own ledger session and its own Snowflake session:
Snowflake being slow or unreachable slows reconciliation (backoff, one log line per failure)
and never stops or slows export. A daily completeness check (``reconcile.completeness``)
compares per-day totals of each table in Postgres with its current-state table.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from cdc_daemon.config import Settings, TableSettings
from cdc_daemon.errors import CdcError, TransientError
from cdc_daemon.ops.health import Heartbeats, Outages
from cdc_daemon.ops.metrics import Metrics
from cdc_daemon.reconcile.completeness import DayDifference, Scope, check_group
from cdc_daemon.state.ledger import Delivery, Status
from cdc_daemon.state.position import INT64_MIN
from cdc_daemon.state.report import group_ledgers
from cdc_daemon.state.store import Store
from cdc_daemon.warehouse.client import (
    LoadRecord,
    PipeStatus,
    StreamStatus,
    TaskStatus,
    Warehouse,
)
from cdc_daemon.warehouse.model import folder_of

log = structlog.get_logger()

HISTORY_DAYS = 14  # COPY_HISTORY's window
REFRESH_DAYS = 7  # ALTER PIPE ... REFRESH only sees files staged this recently
_HISTORY_OK = "loaded"
_HISTORY_FAILED = frozenset({"load_failed", "partially_loaded", "failed"})
# Only these are verdicts. COPY_HISTORY also reports "Load in progress" (with ROW_PARSED NULL
# and a partial ROW_COUNT), and may report statuses unknown to this code: none of these says
# anything yet about the file, which stays "not seen" (Snowflake: "COPY_HISTORY", the STATUS
# and ROW_PARSED columns).
_HISTORY_FINAL = _HISTORY_FAILED | {_HISTORY_OK}
_HISTORY_KNOWN = _HISTORY_FINAL | {"load_in_progress", "load_skipped"}


@dataclass
class Outcome:
    loaded: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)
    waiting: int = 0
    # Deliveries still awaiting Snowflake's confirmation after the round (waiting, refreshed
    # or missing).
    unconfirmed: int = 0
    pipes: list[PipeStatus] = field(default_factory=list)
    tasks: list[TaskStatus] = field(default_factory=list)
    streams: list[StreamStatus] = field(default_factory=list)

    @property
    def pipe(self) -> PipeStatus | None:
        """The first unhealthy pipe, else the first (one line for ``reconcile``)."""
        sick = [p for p in self.pipes if not p.healthy]
        pipes = sick or self.pipes
        return pipes[0] if pipes else None

    def health_json(self) -> dict[str, Any]:
        """The warehouse's side of this round: pipes, tasks, streams."""
        return {
            "pipes": [
                {
                    "name": pipe.name,
                    "state": pipe.execution_state,
                    "pending_files": pipe.pending_file_count,
                    "error": pipe.error,
                }
                for pipe in self.pipes
            ],
            "tasks": [
                {
                    "name": t.name,
                    "state": t.state,
                    "consecutive_failures": t.consecutive_failures,
                    "last_error": t.last_error,
                }
                for t in self.tasks
            ],
            "streams": [
                {
                    "name": stream.name,
                    "stale": stream.stale,
                    "stale_after": stream.stale_after.isoformat() if stream.stale_after else None,
                }
                for stream in self.streams
            ],
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "loaded": len(self.loaded),
            "failed": [{"batch_id": b, "error": e} for b, e in self.failed],
            "missing": [{"batch_id": b, "reason": r} for b, r in self.missing],
            "refreshed": self.refreshed,
            "waiting": self.waiting,
            "unconfirmed": self.unconfirmed,
            "pipes": [
                {
                    "name": pipe.name,
                    "execution_state": pipe.execution_state,
                    "pending_file_count": pipe.pending_file_count,
                    "last_ingested_at": pipe.last_ingested_at,
                    "error": pipe.error,
                }
                for pipe in self.pipes
            ],
        }


def judge(
    item: Delivery,
    history: dict[str, LoadRecord],
    prefix: str = "",
    landing: dict[str, tuple[str, frozenset[str]]] | None = None,
) -> tuple[Status | None, str | None, list[str]]:
    """(new status or None to keep waiting, the reason, the objects not seen yet, named
    relative to the bucket's ``prefix`` as the history names them). ``landing`` gives, per
    table folder, the landing table and its columns: an object loaded with a header column
    the table lacks is failed, since the by-name load skipped that column's values."""
    unseen: list[str] = []
    problems: list[str] = []
    for obj in item.objects:
        if obj.quarantine:
            continue
        name = obj.key.removeprefix(prefix)
        record = history.get(name)
        if record is None or record.status not in _HISTORY_FINAL or record.rows_parsed is None:
            unseen.append(name)
        elif record.status in _HISTORY_FAILED:
            problems.append(f"{name}: {record.status}: {record.first_error or 'no error given'}")
        elif record.rows_loaded != obj.rows:
            problems.append(
                f"{name}: Snowflake loaded {record.rows_loaded} rows, the ledger says {obj.rows}"
            )
        elif (mismatch := header_mismatch(name, obj.columns, landing or {})) is not None:
            problems.append(mismatch)
    if problems:
        return Status.FAILED, "; ".join(problems), unseen
    if unseen:
        return None, None, unseen
    return Status.LOADED, None, []


def header_mismatch(
    name: str, columns: tuple[str, ...], landing: dict[str, tuple[str, frozenset[str]]]
) -> str | None:
    """Why a loaded object's values did not all land, or None: its header names columns its
    landing table lacks. Snowflake loads by name (MATCH_BY_COLUMN_NAME) and does not load
    "additional non-matching columns" of a file, with status Loaded and the full row count
    (https://docs.snowflake.com/en/sql-reference/sql/copy-into-table)."""
    folder = folder_of(name)
    if not columns or folder not in landing:
        return None
    table, have = landing[folder]
    extra = [c for c in columns if c.upper() not in have]
    if not extra:
        return None
    return (
        f"{name}: header_mismatch: {table} has no column {', '.join(extra)}, so Snowflake's "
        "by-name load left those values out; add the column (cdc-daemon snowflake apply) "
        'and export the rows again (docs/operations.md, "A batch is failed")'
    )


def _best(records: list[LoadRecord]) -> dict[str, LoadRecord]:
    """One record per file: a successful load wins over a failed attempt, else the latest."""
    out: dict[str, LoadRecord] = {}
    epoch = datetime.min.replace(tzinfo=UTC)
    for record in sorted(records, key=lambda r: r.loaded_at or epoch):
        kept = out.get(record.file)
        if record.status == "load_skipped":
            continue
        if kept is None or kept.status != _HISTORY_OK or record.status == _HISTORY_OK:
            out[record.file] = record
    return out


class Reconciler:
    """The constructor does no I/O; ``run_once`` and ``run`` connect when needed."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        heartbeats: Heartbeats | None = None,
        warehouse: Warehouse | None = None,
        outages: Outages | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._heartbeats = heartbeats
        # Where a service down (Snowflake, its ledger session) is told, for /healthz.
        self._outages = outages
        self._down: set[str] = set()
        # Where the group's deliveries are in the ledger: the group's name (logical mode: the
        # stream's batches, the snapshot's chunks, repairs) and each table's (watermark mode's
        # batches and repairs, backfill chunks).
        self._ledgers = group_ledgers(settings)
        # The warehouse's health is the group's: ``status`` shows it under the group.
        self._group = settings.group
        self._prefix = settings.s3.prefix
        self._wh = warehouse
        self._store: Store | None = None
        self.last: Outcome | None = None
        self.last_completeness: list[DayDifference] | None = None
        self._last_completeness_at: float | None = None
        self._unknown_statuses: set[str] = set()  # logged once each
        self._health_unsaved = False

    async def _watch_tasks_and_stream(self, wh: Warehouse, outcome: Outcome, now: datetime) -> None:
        """The merge and cleanup tasks and the stream, every round: a suspended or failing
        task, or a stale stream, means loaded batches stop reaching SALES even though the load
        history says ``Loaded``. Logged every round while it lasts, and kept for the metrics."""
        outcome.tasks = await asyncio.to_thread(wh.tasks)
        streams = await asyncio.to_thread(wh.streams)
        for task in outcome.tasks:
            if self._metrics is not None:
                self._metrics.task(task.name, task.state == "started", task.consecutive_failures)
            if task.state != "started":
                log.error(
                    "task_not_running",
                    task=task.name,
                    state=task.state,
                    failures=task.consecutive_failures,
                    error=task.last_error,
                    hint=f"fix the cause, then ALTER TASK {task.name} RESUME",
                )
            elif task.consecutive_failures:
                log.warning(
                    "task_failing",
                    task=task.name,
                    failures=task.consecutive_failures,
                    error=task.last_error,
                )
        for name, stream in streams:
            if stream is None:
                log.error(
                    "stream_missing",
                    stream=name,
                    hint="its table's changes stop reaching the current-state table: "
                    "cdc-daemon snowflake apply creates it again",
                )
                continue
            outcome.streams.append(stream)
            self._watch_stream(stream, now)

    def _watch_stream(self, stream: StreamStatus, now: datetime) -> None:
        sf = self._settings.snowflake
        left = None if stream.stale_after is None else stream.stale_after - now
        if self._metrics is not None and left is not None:
            self._metrics.stream_stale_in(stream.name, left.total_seconds())
        if stream.stale:
            log.error(
                "stream_stale",
                stream=stream.name,
                hint="the stream can no longer be read: recreate it and reload the table",
            )
        elif left is not None and left <= timedelta(days=sf.stream_stale_warn_days):
            log.warning(
                "stream_stale_soon",
                stream=stream.name,
                stale_after=stream.stale_after.isoformat() if stream.stale_after else None,
                hint="the merge task has not read it for long: resume it or run it",
            )

    async def _save_health(self, store: Store, outcome: Outcome) -> None:
        """The pipe, tasks and stream as seen this round, for ``status``. A ledger made before
        this table existed (``init`` not run since) only loses that line, once logged."""
        try:
            await store.save_warehouse_health(self._group, outcome.health_json())
        except CdcError as exc:
            if not self._health_unsaved:
                self._health_unsaved = True
                log.warning("warehouse_health_not_saved", error=str(exc), hint="cdc-daemon init")

    def _note_unknown_statuses(self, records: list[LoadRecord]) -> None:
        """A load-history status this code does not know is no verdict (the file waits); it
        is logged once per status, so that a new Snowflake status is seen, not guessed at."""
        for record in records:
            status = record.status
            if status not in _HISTORY_KNOWN and status not in self._unknown_statuses:
                self._unknown_statuses.add(status)
                log.warning("load_status_unknown", status=status, file=record.file)

    async def _landing_columns(
        self, wh: Warehouse, items: list[Delivery], history: dict[str, LoadRecord]
    ) -> dict[str, tuple[str, frozenset[str]]]:
        """The landing tables' columns (folder -> (table, columns)), read only for the tables
        with an object this round may confirm."""
        folders = {
            folder_of(name)
            for item in items
            for obj in item.objects
            if obj.columns and (name := obj.key.removeprefix(self._prefix)) in history
        }
        out: dict[str, tuple[str, frozenset[str]]] = {}
        for n in wh.names:
            if n.folder in folders:
                # DESC TABLE: metadata, no warehouse needed.
                have = await asyncio.to_thread(wh.dialect.describe, wh, "TABLE", n.landing)
                if have is not None:
                    out[n.folder] = (n.landing, frozenset(c.upper() for c in have))
        return out

    async def _warehouse(self) -> Warehouse:
        if self._wh is None:
            self._wh = await asyncio.to_thread(Warehouse.of_group(self._settings).connect)
        return self._wh

    async def _ledger(self) -> Store:
        if self._store is None or self._store.broken:
            self._store = await Store.from_settings(self._settings)
        return self._store

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None
        if self._wh is not None:
            await asyncio.to_thread(self._wh.close)
            self._wh = None

    async def _drop_warehouse(self) -> None:
        """After a failure: the next round opens a new session."""
        if self._wh is not None:
            wh, self._wh = self._wh, None
            with contextlib.suppress(Exception):
                await asyncio.to_thread(wh.close)

    async def run_once(self, now: datetime | None = None) -> Outcome:
        now = now or datetime.now(UTC)
        sf = self._settings.snowflake
        store = await self._ledger()
        items = await store.unconfirmed(self._ledgers)
        wh = await self._warehouse()
        outcome = Outcome()
        outcome.pipes = await asyncio.to_thread(wh.pipe_statuses)
        for pipe in outcome.pipes:
            if self._metrics is not None:
                self._metrics.pipe(pipe.name, pipe.healthy, pipe.pending_file_count)
            if not pipe.healthy:
                log.warning(
                    "pipe_not_running",
                    pipe=pipe.name,
                    state=pipe.execution_state,
                    pending_files=pipe.pending_file_count,
                    error=pipe.error,
                )
        await self._watch_tasks_and_stream(wh, outcome, now)
        await self._save_health(store, outcome)
        if items:
            oldest = min(i.uploaded_at or now for i in items) - timedelta(hours=1)
            since = max(oldest, now - timedelta(days=HISTORY_DAYS))
            records = await asyncio.to_thread(wh.load_history, since)
            self._note_unknown_statuses(records)
            history = _best(records)
        else:
            history = {}
        landing = await self._landing_columns(wh, items, history)
        wait = timedelta(seconds=sf.missing_after_s)
        for item in items:
            uploaded_at = item.uploaded_at or now  # set on every delivery in S3
            new, reason, unseen = judge(item, history, self._prefix, landing)
            if new is not None:
                if await store.settle(item, new, reason):
                    if new is Status.LOADED:
                        outcome.loaded.append(item.name)
                    else:
                        outcome.failed.append((item.name, reason or ""))
                        log.error("batch_load_failed", batch_id=item.name, error=reason)
                continue
            if item.refreshed_at is None:
                if now - uploaded_at < wait:
                    outcome.waiting += 1
                    continue
                if now - uploaded_at < timedelta(days=REFRESH_DAYS):
                    for name in unseen:
                        await asyncio.to_thread(wh.refresh, name)
                    await store.mark_refreshed(item)
                    outcome.refreshed.append(item.name)
                    # The reconciler's own recovery (a notification lost, or a pipe behind):
                    # nothing for the operator yet; ``batch_missing`` is, if it does not help.
                    log.info(
                        "pipe_refresh_requested",
                        batch_id=item.name,
                        files=len(unseen),
                        first_files=unseen[:3],
                    )
                    continue
            elif now - item.refreshed_at < wait:
                outcome.waiting += 1
                continue
            if item.status is Status.MISSING:
                continue
            reason = (
                f"{len(unseen)} object(s) not in Snowflake's load history"
                f" {int((now - uploaded_at).total_seconds())} s after upload"
                + (", after a pipe refresh" if item.refreshed_at else ", too old to refresh")
                + f": {', '.join(unseen[:3])}"
            )
            if await store.settle(item, Status.MISSING, reason):
                outcome.missing.append((item.name, reason))
                log.error("batch_missing", batch_id=item.name, reason=reason)
        outcome.unconfirmed = len(items) - len(outcome.loaded) - len(outcome.failed)
        if self._metrics is not None:
            for name, batches in (
                ("loaded", outcome.loaded),
                ("failed", outcome.failed),
                ("missing", outcome.missing),
                ("refreshed", outcome.refreshed),
            ):
                if batches:
                    self._metrics.reconciled(name, len(batches))
        if outcome.loaded or outcome.failed or outcome.missing or outcome.refreshed:
            log.info(
                "reconciled",
                loaded=len(outcome.loaded),
                failed=len(outcome.failed),
                missing=len(outcome.missing),
                refreshed=len(outcome.refreshed),
                waiting=outcome.waiting,
            )
        self.last = outcome
        return outcome

    async def completeness(self) -> list[DayDifference]:
        """Days whose totals differ between PostgreSQL and a table's current-state table
        (``reconcile.completeness``), for every table of the group with a partition column,
        among the days it can judge: those none of whose objects is still waiting for Snowflake
        to confirm its load. In watermark mode only rows at or below the table's committed
        watermark are compared (the rest may not be exported yet); in logical mode only days
        that have objects (a day with none is not exported yet, nothing can be said of it)."""
        settings = self._settings
        mode = settings.capture.mode
        store = await self._ledger()

        async def scope_of(spec: TableSettings) -> Scope | None:
            ledger = settings.group if mode == "logical" else spec.qualified
            exported, waiting = await store.export_days(ledger, spec.qualified)
            if mode == "logical":
                return Scope(frozenset(exported), frozenset(waiting))
            low = (await store.position(ledger, mode)).state.low
            if low == INT64_MIN:
                return None  # nothing exported yet
            return Scope(frozenset(exported), frozenset(waiting), watermark=low)

        diffs = await check_group(settings, await self._warehouse(), scope_of)
        self.last_completeness = diffs
        return diffs

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds every ``reconcile_interval_s`` until ``stop``; failures back off (up to ten
        intervals) and are logged, never raised: export goes on whatever Snowflake does."""
        sf = self._settings.snowflake
        loop = asyncio.get_running_loop()
        failures = 0
        try:
            while not stop.is_set():
                # The loop is alive whatever Snowflake does: a failing round still beats, so
                # Snowflake being down never fails /healthz nor starves the watchdog.
                if self._heartbeats is not None:
                    self._heartbeats.beat("reconcile")
                delay = sf.reconcile_interval_s
                try:
                    await self.run_once()
                    due = self._last_completeness_at is None or (
                        loop.time() - self._last_completeness_at >= sf.completeness_interval_s
                    )
                    if due and self.last is not None and not self.last.waiting:
                        await self.completeness()
                        self._last_completeness_at = loop.time()
                    if failures:
                        log.info("reconcile_recovered", attempts=failures + 1)
                    failures = 0
                    while self._down and self._outages is not None:
                        self._outages.recovered(self._down.pop())
                except CdcError as exc:
                    failures += 1
                    outages = self._outages
                    if isinstance(exc, TransientError) and exc.unavailable and outages is not None:
                        service = exc.boundary or "snowflake"
                        self._down.add(service)
                        outages.failed(service, str(exc))
                    if self._metrics is not None:
                        self._metrics.retried("snowflake")
                    delay = min(sf.reconcile_interval_s * 2 ** (failures - 1), 10 * delay)
                    log.warning(
                        "reconcile_failed",
                        attempt=failures,
                        retry_in_s=round(delay, 1),
                        error=str(exc),
                        retriable=isinstance(exc, TransientError),
                    )
                    await self._drop_warehouse()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            if self._heartbeats is not None:
                self._heartbeats.forget("reconcile")
            await self.close()
