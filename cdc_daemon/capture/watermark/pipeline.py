"""The watermark producer: pass -> intent record -> upload -> commit.

Commit order, and why a crash anywhere loses nothing:
1. one pass reads, in one snapshot, the rows that filled earlier gaps and the new range, into
   local spool files, one per day (``capture.watermark.source``, ``capture.watermark.fence``);
2. the intent record (``pending``: exactly which ids, keys, row counts, ``_cdc_ts``, and the
   capture state to move to) is committed;
3. every object is uploaded; S3 acknowledges each;
4. one transaction marks the batch ``uploaded`` and moves the capture state (shielded from
   cancellation).
A crash before 2 leaves nothing behind. A crash between 2 and 4 leaves a pending record: the
next start redoes exactly that range under exactly those keys, with the same ``_cdc_ts``, so the
objects are byte-identical and an object that Snowpipe already loaded is harmless.

Steps 2-4 are ``unit.UnitOfWork``'s, as for every exporter. Steps 3-4 of one batch run in the
background while the next pass reads (step 1); the next intent record is written only after the
previous batch committed, so at most one batch is ever pending and positions move in order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

import structlog

from cdc_daemon.batch.policy import BatchPolicy, Limits
from cdc_daemon.batch.spool import BLOCK_ROWS, DayObject, DaySpool
from cdc_daemon.capture.watermark.source import BatchSpec, Scan, WatermarkSource
from cdc_daemon.config import Settings
from cdc_daemon.errors import CdcError, SourceError
from cdc_daemon.ops.metrics import Metrics
from cdc_daemon.state.ledger import BatchRecord, batch_id
from cdc_daemon.state.position import INT64_MIN, CaptureState
from cdc_daemon.state.store import Store
from cdc_daemon.unit import UnitOfWork, redo_pending, utc_now_iso

log = structlog.get_logger()

T = TypeVar("T")

# SQLSTATE classes of a source error that concerns the table read, not the server: 42 (an
# undefined table or column, a revoked privilege, an operator a retyped column lacks), 22 (a
# value that cannot be read or encoded). Class 28 (authentication) or 3D (no such database)
# would fail every table alike: those stop the daemon as before.
_TABLE_SQLSTATE_CLASSES = ("42", "22")


class TableUnreadableError(SourceError):
    """The table itself cannot be read any more (dropped, a privilege revoked, a column retyped
    so that its values cannot be read, a value that cannot be encoded): no retry fixes it, and
    no other table is concerned. A watermark group marks the table failed and goes on."""


def table_failure(exc: BaseException) -> bool:
    """Whether ``exc``, raised while reading one table, is that table's alone and final (an
    outage or any retriable error is not: the retry loop waits it out)."""
    if not isinstance(exc, CdcError) or exc.retriable:
        return False
    if isinstance(exc, TableUnreadableError):
        return True
    if exc.sqlstate is not None:
        return exc.sqlstate.startswith(_TABLE_SQLSTATE_CLASSES)
    # The capture's own refusals of what it read (the table no longer exists, an id held
    # twice), raised without a driver error.
    return isinstance(exc, SourceError)


class WatermarkPipeline:
    """The watermark producer: passes over the table, handed to the unit of work."""

    def __init__(
        self,
        settings: Settings,
        source: WatermarkSource,
        unit: UnitOfWork,
        store: Store,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._source = source
        self._unit = unit
        self._store = store
        self._metrics = metrics
        self.policy = BatchPolicy.of(settings.batch)
        self._state: CaptureState | None = None
        self._waiting_since: float | None = None
        self._reason: str | None = None
        self._inflight: asyncio.Task[None] | None = None

    @property
    def table(self) -> str:
        # A table that could not be read at the start (a failed one) has no catalog entry:
        # it goes by its configured name.
        return self._source.table.qualified if self._source.described else self._settings.table

    @property
    def ledger_names(self) -> tuple[str, ...]:
        return (self.table,)

    def replace_store(self, store: Store) -> None:
        self._store = store

    @property
    def position(self) -> int | None:
        """Every row with an id at or below this is exported and final."""
        if self._state is None or self._state.low == INT64_MIN:
            return None
        return self._state.low

    async def step(self, draining: bool) -> bool:
        """Do one unit of work. False when there was nothing to do (idle)."""
        try:
            if self._state is None:
                # (Re)start: from the ledger, after redoing whatever was left pending.
                await redo_pending(await self._store.pending(self.table), self._redo)
                self._state = (await self._store.position(self.table, "watermark")).state
            return await self._pass(draining)
        except TableUnreadableError:
            # What was read before is good: its upload finishes and commits before the table
            # is set aside (the next start reads from the ledger's position).
            self._state = None
            await self.drain()
            raise
        except BaseException:
            # The in-memory position may have run ahead of the ledger: start over from the
            # ledger, once the batch uploading in the background (if any) has stopped.
            self._state = None
            task, self._inflight = self._inflight, None
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
                if not task.cancelled():
                    task.exception()
            raise

    async def drain(self) -> None:
        """Wait for the batch uploading in the background; its failure is raised here."""
        task, self._inflight = self._inflight, None
        if task is not None:
            await task

    def _decide(self, draining: bool) -> Callable[[Scan], bool]:
        def decide(scan: Scan) -> bool:
            now = time.monotonic()
            if self._waiting_since is None:
                self._waiting_since = now
            self._reason = self.policy.flush_reason(scan.rows, now - self._waiting_since, draining)
            return self._reason is not None

        return decide

    async def _pass(self, draining: bool) -> bool:
        settings = self._settings
        state = self._state
        assert state is not None
        started = time.monotonic()
        read_ts = utc_now_iso()
        spool = self._spool()
        limits = Limits(
            self.policy.max_rows,
            settings.batch.max_bytes,
            settings.batch.max_days,
            # Check max_bytes about 16 times per batch-worth of rows, at most every block.
            block_rows=int(
                max(16, min(BLOCK_ROWS, settings.batch.max_bytes / self.policy.row_bytes / 16))
            ),
        )
        try:
            result = await self._read(
                lambda: self._source.run_pass(state, limits, read_ts, spool, self._decide(draining))
            )
            if result.spec is None:
                await asyncio.to_thread(spool.discard)
                await self.drain()
                if result.state != state and result.state.low != state.low:
                    await self._store.commit_position(self.table, state, result.state)
                    self._state = result.state
                if not result.waiting:
                    self._waiting_since = None
                    if self._metrics is not None:
                        self._metrics.caught_up()
                return False
            batch = self._batch(result.spec, read_ts, result.state, await self._finish(spool))
            timings = {"extract_s": time.monotonic() - started, "compress_s": spool.compress_s}
            # The previous batch (uploading while this one was read) commits first: positions
            # move in order, and at most one batch is ever pending.
            await self.drain()
            await self._unit.record(batch, self._store)
        except BaseException:
            await asyncio.to_thread(spool.discard)
            raise
        waiting_since = self._waiting_since or started
        self._state = result.state
        if not result.cut:
            self._waiting_since = None
        self.policy.learn(batch.rows, batch.raw_bytes)
        reason = "max_bytes_or_days" if result.cut else self._reason or ""
        behind = result.high_seen - batch.hi

        async def upload_in_background() -> None:
            try:
                more = await self._unit.upload_and_commit(batch, self._store)
            finally:
                await asyncio.to_thread(spool.discard)
            self._log_batch(batch, started, timings | more, reason, waiting_since, behind)

        # Uploads overlap the next pass's read: S3 I/O in the event loop, COPY in a thread.
        self._inflight = asyncio.create_task(upload_in_background())
        # A task cancelled before it ran never reaches its ``finally``: its spool goes here (a
        # no-op once that ``finally`` discarded it).
        self._inflight.add_done_callback(lambda _: spool.discard())
        return True

    async def _read(self, fn: Callable[[], T]) -> T:
        """``fn`` on the table's source session; an error that is this table's alone (see
        ``table_failure``) raised as ``TableUnreadableError``."""
        try:
            return await self._source.run(fn)
        except CdcError as exc:
            if table_failure(exc) and not isinstance(exc, TableUnreadableError):
                raise TableUnreadableError(str(exc)).at("postgres") from exc
            raise

    async def _redo(self, pending: BatchRecord) -> None:
        spec = BatchSpec(pending.lo, pending.hi, pending.gaps, pending.caught)
        started = time.monotonic()
        spool = self._spool()
        try:
            await self._read(lambda: self._source.redo(spec, pending.read_ts, spool))
            batch = self._batch(
                spec, pending.read_ts, pending.state_after, await self._finish(spool)
            )
            self._unit.check_redo(batch, pending.checksum, pending.rows)
            timings = {"extract_s": time.monotonic() - started}
            timings |= await self._unit.deliver(batch, self._store)
        finally:
            await asyncio.to_thread(spool.discard)
        self._log_batch(batch, started, timings, "redo")

    def _spool(self) -> DaySpool:
        table = self._source.table
        return self._unit.new_spool(self._source.header, table.judge((table.watermark.name,)))

    async def _finish(self, spool: DaySpool) -> list[DayObject]:
        return await asyncio.to_thread(spool.finish)

    def _batch(
        self, spec: BatchSpec, read_ts: str, after: CaptureState, days: list[DayObject]
    ) -> BatchRecord:
        bid = batch_id(spec.lo, spec.hi, spec.caught)
        return BatchRecord(
            table=self.table,
            batch_id=bid,
            lo=spec.lo,
            hi=spec.hi,
            read_ts=read_ts,
            gaps=spec.gaps,
            caught=spec.caught,
            state_after=after,
            objects=self._unit.objects(self.table, bid, days),
        )

    def _log_batch(
        self,
        batch: BatchRecord,
        started: float,
        timings: dict[str, float],
        reason: str,
        waiting_since: float | None = None,
        behind: int = 0,
    ) -> None:
        self._unit.log_batch(
            batch,
            started,
            timings,
            waiting_since=waiting_since,
            behind=behind,
            range=[batch.lo if batch.lo != INT64_MIN else None, batch.hi],
            late_rows=sum(b - a + 1 for a, b in batch.caught),
            reason=reason,
        )
