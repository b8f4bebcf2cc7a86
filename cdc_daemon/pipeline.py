"""The watermark pipeline's unit of work: fence -> plan -> extract -> upload -> commit.

Commit order, and why a crash anywhere loses nothing:
1. the batch is extracted into local spool files, one per day; its range ``(lo, hi]`` is final;
2. the intent record (``pending``: range, keys, row counts, ``_cdc_ts``) is committed;
3. every object is uploaded; S3 acknowledges each;
4. one transaction marks the batch ``uploaded`` and moves the watermark to ``hi`` (shielded
   from cancellation).
A crash before 2 leaves nothing behind. A crash between 2 and 4 leaves a pending record: the
next start redoes exactly that range under exactly those keys, with the same ``_cdc_ts``, so the
objects are byte-identical and an object that Snowpipe already loaded is harmless.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import structlog

from cdc_daemon.batching import BatchPolicy
from cdc_daemon.config import Settings
from cdc_daemon.sink.csv import CONTENT_ENCODINGS
from cdc_daemon.sink.s3 import S3Sink
from cdc_daemon.sink.spool import DaySpool
from cdc_daemon.source.watermark import Extract, Fence, Limits, WatermarkSource
from cdc_daemon.state.ledger import BatchRecord, ObjectRecord, batch_id, object_key
from cdc_daemon.state.store import Store

log = structlog.get_logger()

T = TypeVar("T")

# Days of data in one batch: one compressor and file each, so this bounds memory and open files.
MAX_DAYS_PER_BATCH = 64


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class WatermarkPipeline:
    def __init__(
        self, settings: Settings, source: WatermarkSource, sink: S3Sink, store: Store
    ) -> None:
        self._settings = settings
        self._source = source
        self._sink = sink
        self._store = store
        batch = settings.batch
        self.policy = BatchPolicy(batch.max_rows, batch.max_bytes, batch.max_age_s)
        self._lo: int | None = None
        self._waiting_since: float | None = None
        self._started = False

    @property
    def table(self) -> str:
        return self._source.table.qualified

    def replace_store(self, store: Store) -> None:
        self._store = store

    @property
    def position(self) -> int | None:
        return self._lo

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        """Run blocking source work in a thread; on cancellation, interrupt the query and wait
        for the thread to let go of the spool before the cancellation goes on."""
        future = asyncio.ensure_future(asyncio.to_thread(fn))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.to_thread(self._source.cancel)
            await asyncio.wait([future])
            raise

    async def step(self, draining: bool) -> bool:
        """Do one unit of work. False when there was nothing to do (idle)."""
        if not self._started:
            self._lo = (await self._store.position(self.table, "watermark")).position
            self._started = True
        for pending in await self._store.pending(self.table):
            log.warning(
                "batch_redone",
                table=self.table,
                batch_id=pending.batch_id,
                attempts=pending.attempts + 1,
            )
            await self._export(pending.lo, pending.hi, "redo", redo=pending)
            return True
        fence = await self._in_thread(self._source.fence)
        if fence.high is None or (self._lo is not None and fence.high <= self._lo):
            self._waiting_since = None
            return False
        await self._wait_for(fence)
        plan = await self._in_thread(
            lambda: self._source.plan(self._lo, fence.high or 0, self.policy.max_rows)
        )
        if plan.rows == 0 or plan.hi is None:
            self._waiting_since = None
            return False
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
        reason = self.policy.flush_reason(plan.rows, now - self._waiting_since, draining)
        if reason is None:
            return False
        await self._export(self._lo, plan.hi, reason, behind=fence.high - plan.hi)
        return True

    async def _wait_for(self, fence: Fence) -> None:
        """Wait until every transaction open at the fence has ended (see source.watermark)."""
        started = time.monotonic()
        delay = 0.02
        logged = False
        holders = fence.holders
        while holders:
            holders = await self._in_thread(lambda: self._source.fence_holders(fence))
            if not holders:
                break
            waited = time.monotonic() - started
            if not logged and waited >= self._settings.capture.fence_log_after_s:
                log.warning(
                    "fence_waiting",
                    table=self.table,
                    seconds=round(waited, 1),
                    transactions=list(holders)[:10],
                )
                logged = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._settings.capture.poll_interval_s)
        if logged:
            log.info(
                "fence_released", table=self.table, seconds=round(time.monotonic() - started, 1)
            )

    async def _export(
        self,
        lo: int | None,
        hi: int,
        reason: str,
        redo: BatchRecord | None = None,
        behind: int = 0,
    ) -> None:
        settings = self._settings
        started = time.monotonic()
        waiting_since = self._waiting_since or started
        read_ts = redo.read_ts if redo else utc_now_iso()
        spool = DaySpool(
            settings.batch.spool_dir,
            settings.batch.compression,
            settings.batch.compression_level,
            self._source.header,
        )
        try:
            limits = None if redo else Limits(settings.batch.max_bytes, MAX_DAYS_PER_BATCH)
            extract: Extract = await self._in_thread(
                lambda: self._source.extract(lo, hi, read_ts, spool, limits)
            )
            days = await asyncio.to_thread(spool.finish)
            extracted = time.monotonic()
            bid = batch_id(lo, extract.hi)
            batch = BatchRecord(
                table=self.table,
                batch_id=bid,
                lo=lo,
                hi=extract.hi,
                read_ts=read_ts,
                objects=tuple(
                    ObjectRecord(
                        key=object_key(
                            settings.s3.prefix, self.table, d.day, bid, settings.batch.compression
                        ),
                        day=d.day,
                        rows=d.rows,
                        raw_bytes=d.raw_bytes,
                        size=d.size,
                        sha256=d.sha256,
                    )
                    for d in days
                ),
            )
            if redo is not None and redo.checksum != batch.checksum:
                # Rows of the range changed in place or were deleted since the first attempt.
                # Watermark capture does not see such changes; the keys stay the same.
                log.warning(
                    "batch_changed_on_redo",
                    table=self.table,
                    batch_id=bid,
                    rows_before=redo.rows,
                    rows_now=batch.rows,
                )
            await self._store.record_pending(batch)
            paths = {d.day: d.path for d in days}
            limit = asyncio.Semaphore(settings.s3.max_concurrency)

            async def upload(obj: ObjectRecord) -> None:
                async with limit:
                    await self._sink.upload_file(
                        obj.key,
                        paths[obj.day],
                        {"batch-id": bid, "rows": str(obj.rows), "sha256": obj.sha256},
                        CONTENT_ENCODINGS[settings.batch.compression],
                    )

            async with asyncio.TaskGroup() as group:
                for obj in batch.objects:
                    group.create_task(upload(obj))
            uploaded = time.monotonic()
            # Shielded: once S3 has every object, the watermark commit must not be abandoned
            # half-way by a shutdown (it is one short transaction).
            await asyncio.shield(self._store.commit_uploaded(batch))
        finally:
            await asyncio.to_thread(spool.discard)
        self._lo = extract.hi
        if not extract.cut:
            self._waiting_since = None
        self.policy.learn(batch.rows, batch.raw_bytes)
        done = time.monotonic()
        log.info(
            "batch_uploaded",
            table=self.table,
            batch_id=bid,
            range=[lo, extract.hi],
            reason="max_bytes_or_days" if extract.cut else reason,
            rows=batch.rows,
            bytes=batch.raw_bytes,
            compressed_bytes=batch.size,
            objects=len(batch.objects),
            seconds=round(done - started, 3),
            extract_s=round(extracted - started, 3),
            upload_s=round(uploaded - extracted, 3),
            lag_s=round(done - waiting_since, 3),
            behind=max(behind, 0),
        )
