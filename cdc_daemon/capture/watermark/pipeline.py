"""The watermark pipeline's unit of work: pass -> intent record -> upload -> commit.

Commit order, and why a crash anywhere loses nothing:
1. one pass reads, in one snapshot, the rows that filled earlier gaps and the new range, into
   local spool files, one per day (``source.watermark``, ``source.fence``);
2. the intent record (``pending``: exactly which ids, keys, row counts, ``_cdc_ts``, and the
   capture state to move to) is committed;
3. every object is uploaded; S3 acknowledges each;
4. one transaction marks the batch ``uploaded`` and moves the capture state (shielded from
   cancellation).
A crash before 2 leaves nothing behind. A crash between 2 and 4 leaves a pending record: the
next start redoes exactly that range under exactly those keys, with the same ``_cdc_ts``, so the
objects are byte-identical and an object that Snowpipe already loaded is harmless.

Steps 3-4 of one batch run in the background while the next pass reads (step 1); the next
intent record is written only after the previous batch committed, so at most one batch is ever
pending and positions move in order.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import structlog

from cdc_daemon.batch.csv import CONTENT_ENCODINGS, ZstdPool
from cdc_daemon.batch.policy import BatchPolicy, Limits
from cdc_daemon.batch.spool import BLOCK_ROWS, DayObject, DaySpool
from cdc_daemon.capture.watermark.source import BatchSpec, Scan, WatermarkSource
from cdc_daemon.config import Settings, crash_point_from_env
from cdc_daemon.errors import first_error
from cdc_daemon.ops.metrics import Metrics
from cdc_daemon.sink.keys import object_key, quarantine_key
from cdc_daemon.sink.s3 import S3Sink
from cdc_daemon.state.ledger import BatchRecord, ObjectRecord, batch_id
from cdc_daemon.state.position import INT64_MIN, CaptureState
from cdc_daemon.state.store import Store

log = structlog.get_logger()

# Where a test may make the process die (os._exit, like SIGKILL: no cleanup, no flush).
CRASH_POINTS = ("after_pending", "after_upload", "after_commit")

T = TypeVar("T")


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


async def in_thread(fn: Callable[[], T], cancel: Callable[[], None]) -> T:
    """Run blocking source work in a thread; on cancellation, interrupt the query (``cancel``)
    and wait for the thread to let go of its spool before the cancellation goes on."""
    future = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.to_thread(cancel)
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what matters now
        raise


def object_records(
    settings: Settings, table: str, batch: str, days: list[DayObject]
) -> tuple[ObjectRecord, ...]:
    """The objects of a finished spool, named for ``batch`` (quarantined rows apart)."""
    return tuple(
        ObjectRecord(
            key=(quarantine_key if d.quarantined else object_key)(
                settings.s3.prefix, table, d.day, batch, settings.batch.compression
            ),
            quarantine=d.day if d.quarantined else None,
            day=d.day,
            rows=d.rows,
            raw_bytes=d.raw_bytes,
            size=d.size,
            sha256=d.sha256,
            path=str(d.path),
        )
        for d in days
    )


async def upload_objects(
    sink: S3Sink, settings: Settings, batch: str, objects: tuple[ObjectRecord, ...]
) -> None:
    """Upload every object from its spool file, ``s3.max_concurrency`` at a time; S3 checks
    each one's SHA-256. The first failure is raised (the others are cancelled)."""
    limit = asyncio.Semaphore(settings.s3.max_concurrency)

    async def upload(obj: ObjectRecord) -> None:
        async with limit:
            await sink.upload_file(
                obj.key,
                Path(obj.path),
                {"batch-id": batch, "rows": str(obj.rows), "sha256": obj.sha256},
                CONTENT_ENCODINGS[settings.batch.compression],
                obj.sha256,
            )

    try:
        async with asyncio.TaskGroup() as group:
            for obj in objects:
                group.create_task(upload(obj))
    except BaseExceptionGroup as failed:
        raise first_error(failed) from None


class WatermarkPipeline:
    def __init__(
        self,
        settings: Settings,
        source: WatermarkSource,
        sink: S3Sink,
        store: Store,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._source = source
        self._sink = sink
        self._store = store
        batch = settings.batch
        self.policy = BatchPolicy(batch.max_rows, batch.max_bytes, batch.max_age_s)
        self._state: CaptureState | None = None
        self._waiting_since: float | None = None
        self._reason: str | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._zstd_pool = ZstdPool(batch.compression_level)
        self._crash_at = crash_point_from_env()
        if self._crash_at is not None and self._crash_at not in CRASH_POINTS:
            raise ValueError(f"unknown crash point {self._crash_at!r}")

    def _crash_point(self, name: str) -> None:
        if self._crash_at == name:
            log.warning("crash_point_reached", point=name)
            os._exit(70)

    @property
    def table(self) -> str:
        return self._source.table.qualified

    def replace_store(self, store: Store) -> None:
        self._store = store

    @property
    def position(self) -> int | None:
        """Every row with an id at or below this is exported and final."""
        if self._state is None or self._state.low == INT64_MIN:
            return None
        return self._state.low

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        return await in_thread(fn, self._source.cancel)

    async def _redo_pending(self) -> None:
        """Redo, first, every batch an earlier run left with an intent record only."""
        for pending in await self._store.pending(self.table):
            log.warning(
                "batch_redone",
                table=self.table,
                batch_id=pending.batch_id,
                attempts=pending.attempts + 1,
            )
            await self._redo(pending)

    async def step(self, draining: bool) -> bool:
        """Do one unit of work. False when there was nothing to do (idle)."""
        try:
            if self._state is None:
                # (Re)start: from the ledger, after redoing whatever was left pending.
                await self._redo_pending()
                self._state = (await self._store.position(self.table, "watermark")).state
            return await self._pass(draining)
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
            result = await self._in_thread(
                lambda: self._source.run_pass(state, limits, read_ts, spool, self._decide(draining))
            )
            if result.spec is None:
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
            await self._store.record_pending(batch)
            self._crash_point("after_pending")
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
                more = await self._upload_and_commit(batch)
            finally:
                await asyncio.to_thread(spool.discard)
            self._log_batch(batch, started, waiting_since, timings | more, reason, behind)

        # Uploads overlap the next pass's read: S3 I/O in the event loop, COPY in a thread.
        self._inflight = asyncio.create_task(upload_in_background())
        return True

    async def _redo(self, pending: BatchRecord) -> None:
        spec = BatchSpec(pending.lo, pending.hi, pending.gaps, pending.caught)
        started = time.monotonic()
        spool = self._spool()
        try:
            await self._in_thread(lambda: self._source.redo(spec, pending.read_ts, spool))
            batch = self._batch(
                spec, pending.read_ts, pending.state_after, await self._finish(spool)
            )
            if batch.checksum != pending.checksum:
                # Rows of the batch were changed in place or deleted since the first attempt.
                # Watermark capture does not see such changes; the keys stay the same.
                log.warning(
                    "batch_changed_on_redo",
                    table=self.table,
                    batch_id=batch.batch_id,
                    rows_before=pending.rows,
                    rows_now=batch.rows,
                )
            timings = {"extract_s": time.monotonic() - started}
            await self._store.record_pending(batch)
            timings |= await self._upload_and_commit(batch)
        finally:
            await asyncio.to_thread(spool.discard)
        self._log_batch(batch, started, started, timings, "redo", behind=0)

    def _spool(self) -> DaySpool:
        batch = self._settings.batch
        return DaySpool(
            batch.spool_dir,
            batch.compression,
            batch.compression_level,
            self._source.header,
            self._zstd_pool,
        )

    async def _finish(self, spool: DaySpool) -> list[DayObject]:
        return await asyncio.to_thread(spool.finish)

    def _batch(
        self, spec: BatchSpec, read_ts: str, after: CaptureState, days: list[DayObject]
    ) -> BatchRecord:
        settings = self._settings
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
            objects=object_records(settings, self.table, bid, days),
        )

    async def _upload_and_commit(self, batch: BatchRecord) -> dict[str, float]:
        """Every object, then the position (see the module docstring), once the intent record
        is committed. Returns the seconds spent uploading and committing."""
        settings = self._settings
        started = time.monotonic()
        await upload_objects(self._sink, settings, batch.batch_id, batch.objects)
        uploaded = time.monotonic()
        self._crash_point("after_upload")
        # Shielded: once S3 has every object, the commit must not be abandoned half-way by a
        # shutdown (it is one short transaction), nor its connection closed under it.
        commit = asyncio.ensure_future(self._store.commit_uploaded(batch))
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            await asyncio.wait([commit])
            if not commit.cancelled():
                commit.exception()
            raise
        self._crash_point("after_commit")
        return {"upload_s": uploaded - started, "commit_s": time.monotonic() - uploaded}

    def _log_batch(
        self,
        batch: BatchRecord,
        started: float,
        waiting_since: float,
        timings: dict[str, float],
        reason: str,
        behind: int,
    ) -> None:
        """The one canonical line per batch (and one more when rows were quarantined)."""
        done = time.monotonic()
        if self._metrics is not None:
            self._metrics.batch_committed(
                rows=batch.rows,
                raw_bytes=batch.raw_bytes,
                size=batch.size,
                objects=len(batch.objects),
                quarantined=batch.quarantined,
                seconds=done - started,
                lag_s=done - waiting_since,
                behind=behind,
            )
        if batch.quarantined:
            log.warning(
                "rows_quarantined",
                table=self.table,
                batch_id=batch.batch_id,
                reasons={o.quarantine: o.rows for o in batch.objects if o.quarantine},
                keys=[o.key for o in batch.objects if o.quarantine],
            )
        log.info(
            "batch_uploaded",
            table=self.table,
            batch_id=batch.batch_id,
            range=[batch.lo if batch.lo != INT64_MIN else None, batch.hi],
            late_rows=sum(b - a + 1 for a, b in batch.caught),
            reason=reason,
            rows=batch.rows,
            quarantined=batch.quarantined,
            bytes=batch.raw_bytes,
            compressed_bytes=batch.size,
            objects=len(batch.objects),
            seconds=round(done - started, 3),
            **{k: round(v, 3) for k, v in timings.items()},
            lag_s=round(done - waiting_since, 3),
            behind=max(behind, 0),
        )
