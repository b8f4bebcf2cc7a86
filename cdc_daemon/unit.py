"""The unit of work, written once for every exporter (watermark, logical, backfill):

    spool -> intent record -> upload -> shielded commit -> the canonical log line

1. the producer reads rows into spool files from ``UnitOfWork.new_spool`` (one per day) and
   names their objects with ``UnitOfWork.objects``;
2. ``record`` commits the intent record (exactly which rows, under which keys, with which
   ``_cdc_ts``, and the position to move to);
3. ``upload_and_commit`` uploads every object (S3 acknowledges each, checksummed), then, in
   one ledger transaction, marks the batch uploaded and moves the position. That commit is
   shielded from cancellation: once S3 has every object it is never abandoned half-way;
4. ``log_batch`` writes the one canonical line per batch (and feeds the metrics).

A crash before 2 leaves nothing behind. A crash between 2 and 3's commit leaves an intent
record: the next start redoes exactly that batch under exactly those keys, with the same
``_cdc_ts``, so the objects are byte-identical and one Snowpipe already loaded is harmless.

Every producer's batch is a delivery of the one confirmation ledger (``state.deliveries``):
the unit of work records and commits it there, whoever produced it, each time in one
transaction with the producer's own part (its ``Ledger``: ``state.store.Store`` for stream
batches, ``capture.logical.join.JoinLedger`` for snapshot chunks,
``state.backfill.BackfillLedger`` for backfill chunks). Retries are ``Retry``'s, one loop for
every boundary: outages are waited out, other transient errors get a few attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog

from cdc_daemon.batch.csv import CONTENT_ENCODINGS, ZstdPool, header_line
from cdc_daemon.batch.spool import DayObject, DaySpool, Judge
from cdc_daemon.config import DaemonSettings, Settings, crash_point_from_env
from cdc_daemon.errors import TransientError, first_error
from cdc_daemon.ops.health import Outages
from cdc_daemon.ops.metrics import Metrics
from cdc_daemon.sink.keys import object_key, quarantine_key
from cdc_daemon.sink.s3 import S3Sink
from cdc_daemon.state.deliveries import Deliveries
from cdc_daemon.state.ledger import BatchRecord, Delivery, ObjectRecord

if TYPE_CHECKING:
    from cdc_daemon.warehouse.evolve import SchemaGuard

log = structlog.get_logger()

# Where a test may make the process die (os._exit, like SIGKILL: no cleanup, no flush): after
# the intent record, after the uploads, after the commit. A backfill's and a join chunk's are
# prefixed (backfill_, join_).
STEPS = ("after_pending", "after_upload", "after_commit")
CRASH_POINTS = frozenset(STEPS) | frozenset(
    f"{p}_{step}" for p in ("backfill", "join", "repair") for step in STEPS
)

T = TypeVar("T")


class Batch(Protocol):
    """What the unit of work delivers: a stream batch, a snapshot chunk or a backfill chunk."""

    @property
    def delivery(self) -> Delivery: ...
    @property
    def table(self) -> str: ...
    @property
    def batch_id(self) -> str: ...
    @property
    def objects(self) -> tuple[ObjectRecord, ...]: ...
    @property
    def rows(self) -> int: ...
    @property
    def quarantined(self) -> int: ...
    @property
    def raw_bytes(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def checksum(self) -> str: ...


B = TypeVar("B", bound=Batch, contravariant=True)


class Ledger(Protocol[B]):
    """A producer's part of the ledger: what it writes in the transaction that records the
    delivery (``intent``) and in the one that commits it (``advance``: a position, a key
    range), on the session of ``deliveries``."""

    @property
    def deliveries(self) -> Deliveries: ...
    async def intent(self, batch: B, /) -> None: ...
    async def advance(self, batch: B, /) -> None: ...


def utc_now_iso() -> str:
    """The ``_cdc_ts`` of a batch read now."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class UnitOfWork:
    """Spool set-up, intent record, uploads, shielded commit, crash points and the canonical
    log line, for one exporter. ``crash_prefix`` names its crash points (``backfill_``)."""

    def __init__(
        self,
        settings: Settings,
        sink: S3Sink,
        metrics: Metrics | None = None,
        crash_prefix: str = "",
        guard: SchemaGuard | None = None,
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._metrics = metrics
        self._crash_prefix = crash_prefix
        # With a warehouse: a column an object names exists in Snowflake before its upload
        # (imported only then: the templates and the client cost start-up time).
        if guard is None and settings.snowflake.enabled:
            from cdc_daemon.warehouse.evolve import SchemaGuard

            guard = SchemaGuard(settings)
        self._guard = guard
        self._zstd_pool = ZstdPool(settings.batch.compression_level)
        self._crash_at = crash_point_from_env()
        if self._crash_at is not None and self._crash_at not in CRASH_POINTS:
            raise ValueError(f"unknown crash point {self._crash_at!r}")

    def for_producer(self, crash_prefix: str) -> UnitOfWork:
        """A unit for another producer of the same daemon (same sink and metrics), whose
        crash points carry ``crash_prefix``."""
        return UnitOfWork(self._settings, self._sink, self._metrics, crash_prefix, self._guard)

    def crash_point(self, step: str) -> None:
        if self._crash_at == self._crash_prefix + step:
            log.warning("crash_point_reached", point=self._crash_at)
            os._exit(70)

    # -- 1. spool -------------------------------------------------------------------------

    def new_spool(self, header: bytes | Sequence[str], judge: Judge | None = None) -> DaySpool:
        """Per-day spool files, compressed as configured; ``header`` is the CSV header (a
        line, or the column names); ``judge`` gives quarantined rows their warehouse form."""
        batch = self._settings.batch
        return DaySpool(
            batch.spool_dir,
            batch.compression,
            batch.compression_level,
            header if isinstance(header, bytes) else header_line(header),
            self._zstd_pool,
            judge,
        )

    def objects(self, table: str, name: str, days: list[DayObject]) -> tuple[ObjectRecord, ...]:
        """The objects of a finished spool, named ``name`` (quarantined rows apart; their
        warehouse form in each day's ``<name>-q`` object)."""
        settings = self._settings
        return tuple(
            ObjectRecord(
                key=(quarantine_key if d.quarantined else object_key)(
                    settings.s3.prefix,
                    table,
                    d.day,
                    name + "-q" if d.withheld else name,
                    settings.batch.compression,
                ),
                quarantine=d.day if d.quarantined else None,
                day=d.day,
                rows=d.rows,
                raw_bytes=d.raw_bytes,
                size=d.size,
                sha256=d.sha256,
                path=str(d.path),
                columns=d.columns,
            )
            for d in days
        )

    async def widen(self, tables: set[str]) -> None:
        """Snowflake's columns of ``tables`` (ledger keys) widened to the catalog's types
        (``SchemaGuard.widen``), when a warehouse is configured."""
        if self._guard is not None:
            await self._guard.widen(tables)

    # -- 2. intent record ---------------------------------------------------------------------

    async def record(self, batch: B, ledger: Ledger[B]) -> None:
        await ledger.deliveries.record(batch.delivery, lambda: ledger.intent(batch))
        self.crash_point("after_pending")

    # -- 3. upload, shielded commit -------------------------------------------------------

    async def upload_and_commit(self, batch: B, ledger: Ledger[B]) -> dict[str, float]:
        """Every object, then the commit, once the intent record is in. Returns the seconds
        spent uploading and committing."""
        started = time.monotonic()
        await self._upload(batch.batch_id, batch.objects)
        uploaded = time.monotonic()
        self.crash_point("after_upload")
        # Shielded: once S3 has every object, the commit must not be abandoned half-way by a
        # shutdown (it is one short transaction), nor its connection closed under it.
        commit = asyncio.ensure_future(
            ledger.deliveries.commit(batch.delivery, lambda: ledger.advance(batch))
        )
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            await asyncio.wait([commit])
            if not commit.cancelled():
                commit.exception()
            raise
        self.crash_point("after_commit")
        return {"upload_s": uploaded - started, "commit_s": time.monotonic() - uploaded}

    async def deliver(self, batch: B, ledger: Ledger[B]) -> dict[str, float]:
        """``record``, then ``upload_and_commit``."""
        await self.record(batch, ledger)
        return await self.upload_and_commit(batch, ledger)

    async def _upload(self, name: str, objects: tuple[ObjectRecord, ...]) -> None:
        """Every object from its spool file, ``s3.max_concurrency`` at a time; S3 checks each
        one's SHA-256. The first failure is raised (the others are cancelled)."""
        settings = self._settings
        if self._guard is not None:
            await self._guard(objects)
        limit = asyncio.Semaphore(settings.s3.max_concurrency)

        async def upload(obj: ObjectRecord) -> None:
            async with limit:
                await self._sink.upload_file(
                    obj.key,
                    Path(obj.path),
                    {"batch-id": name, "rows": str(obj.rows), "sha256": obj.sha256},
                    CONTENT_ENCODINGS[settings.batch.compression],
                    obj.sha256,
                )

        try:
            async with asyncio.TaskGroup() as group:
                for obj in objects:
                    group.create_task(upload(obj))
        except BaseExceptionGroup as failed:
            raise first_error(failed) from None

    # -- redo -----------------------------------------------------------------------------

    def check_redo(
        self, batch: Batch, checksum_before: str | None, rows_before: int | None, **fields: Any
    ) -> None:
        """A redo found other bytes than the first attempt (rows changed in place, deleted or
        arrived between the attempts): the keys stay the same, so it is only worth a line."""
        if checksum_before and checksum_before != batch.checksum:
            log.warning(
                "batch_changed_on_redo",
                table=batch.table,
                batch_id=batch.batch_id,
                rows_before=rows_before,
                rows_now=batch.rows,
                **fields,
            )

    # -- 4. the canonical line ------------------------------------------------------------

    def log_batch(
        self,
        batch: Batch,
        started: float,
        timings: dict[str, float],
        event: str = "batch_uploaded",
        waiting_since: float | None = None,
        behind: int = 0,
        quiet: bool = False,
        **fields: Any,
    ) -> None:
        """The one line per batch (and one more when rows were quarantined). ``fields`` are
        the producer's own (range, reason, run id, ...); ``quiet`` logs it at debug level."""
        done = time.monotonic()
        lag = done - (started if waiting_since is None else waiting_since)
        if self._metrics is not None:
            self._metrics.batch_committed(
                rows=batch.rows,
                raw_bytes=batch.raw_bytes,
                size=batch.size,
                objects=len(batch.objects),
                quarantined=batch.quarantined,
                seconds=done - started,
                lag_s=lag,
                behind=behind,
            )
        if batch.quarantined:
            log.warning(
                "rows_quarantined",
                table=batch.table,
                batch_id=batch.batch_id,
                reasons={o.quarantine: o.rows for o in batch.objects if o.quarantine},
                keys=[o.key for o in batch.objects if o.quarantine],
            )
        (log.debug if quiet else log.info)(
            event,
            table=batch.table,
            batch_id=batch.batch_id,
            **fields,
            rows=batch.rows,
            quarantined=batch.quarantined,
            bytes=batch.raw_bytes,
            compressed_bytes=batch.size,
            objects=len(batch.objects),
            seconds=round(done - started, 3),
            **{k: round(v, 3) for k, v in timings.items()},
            lag_s=round(lag, 3),
            behind=max(behind, 0),
        )


async def redo_pending(
    ledger_pending: Sequence[BatchRecord], redo: Callable[[BatchRecord], Awaitable[None]]
) -> None:
    """Redo, first, every batch an earlier run left with an intent record only."""
    for pending in ledger_pending:
        log.warning(
            "batch_redone",
            table=pending.table,
            batch_id=pending.batch_id,
            attempts=pending.attempts + 1,
        )
        await redo(pending)


class Retry:
    """The one retry loop. A ``TransientError`` (what a retry can fix) is retried with capped
    exponential backoff and jitter: an outage (``unavailable``: the service refuses, does
    not answer, answers 5xx or throttles) for as long as it lasts (``daemon.outage_max_s``,
    0: no end), any other up to ``daemon.retry_attempts`` attempts. Each failed attempt gets
    one ``<name>_failed`` line (``attempt``: the attempts of this run of failures, as the
    pending batch counts them) and is noted on the batch (``note``); a recovery gets one
    ``<name>_recovered`` line. ``prepare`` runs before every attempt (a heartbeat, a reconnect
    of a broken ledger session). ``outages`` learns which service is down (an outage) and
    since when.

    With ``stop`` set (a shutdown), no new attempt starts: the last error is raised at once,
    and the backoff wait ends with it. Otherwise the last error is raised on giving up."""

    # The first wait; each further one doubles, up to daemon.retry_max_wait_s.
    FIRST_WAIT_S = 0.1

    def __init__(
        self,
        daemon: DaemonSettings,
        metrics: Metrics | None = None,
        outages: Outages | None = None,
    ) -> None:
        self._daemon = daemon
        self._metrics = metrics
        self._outages = outages

    def wait_s(self, failures: int) -> float:
        """The wait after ``failures`` failed attempts in a row: doubling from
        ``FIRST_WAIT_S``, capped, the upper half jittered so that daemons restarted together
        do not retry in step."""
        doubled = self.FIRST_WAIT_S * 2.0 ** min(failures - 1, 32)
        capped = min(self._daemon.retry_max_wait_s, doubled)
        return capped / 2 + random.uniform(0, capped / 2)  # noqa: S311 - jitter, not a secret

    def gives_up(self, exc: TransientError, failures: int, bounded: int, down_s: float) -> bool:
        """After ``failures`` failed attempts in a row over ``down_s`` seconds, ``bounded`` of
        them not outages: an outage past ``outage_max_s`` (and ``retry_attempts``), or the
        ``retry_attempts``-th other error. The two are counted apart: the first answers of a
        service coming back may be other transient errors (a replication slot still held by
        the walsender of before the outage)."""
        daemon = self._daemon
        if not exc.unavailable:
            return bounded >= daemon.retry_attempts
        limit = daemon.outage_max_s
        return limit > 0 and down_s >= limit and failures >= daemon.retry_attempts

    async def run(
        self,
        step: Callable[[], Awaitable[T]],
        name: str,
        note: Callable[[TransientError], Awaitable[None]],
        prepare: Callable[[], Awaitable[None]] | None = None,
        stop: asyncio.Event | None = None,
        **fields: Any,
    ) -> T:
        failures = bounded = 0
        first_failed = 0.0
        down: set[str] = set()
        while True:
            try:
                if prepare is not None:
                    await prepare()
                result = await step()
            except TransientError as exc:
                now = time.monotonic()
                if not failures:
                    first_failed = now
                failures += 1
                bounded += not exc.unavailable
                service = exc.boundary or "unknown"
                # Only an outage is a service down (/healthz); a statement timeout is not.
                outage = None
                if exc.unavailable:
                    down.add(service)
                    if self._outages is not None:
                        outage = self._outages.failed(service, str(exc))
                stopping = stop is not None and stop.is_set()
                giving_up = stopping or self.gives_up(exc, failures, bounded, now - first_failed)
                wait = 0.0 if giving_up else self.wait_s(failures)
                log.warning(
                    f"{name}_failed",
                    **fields,
                    service=service,
                    attempt=failures,
                    **self._limit(exc),
                    **({"down_since": outage.as_json(outage.since)["since"]} if outage else {}),
                    retry_in_s=round(wait, 2) if not giving_up else None,
                    error=str(exc),
                )
                await note(exc)
                if giving_up:
                    raise
                if self._metrics is not None:
                    self._metrics.retried(exc.boundary)
                if stop is None:
                    await asyncio.sleep(wait)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), wait)
                    if stop.is_set():
                        raise
                continue
            if failures:
                if self._outages is not None:
                    for service in down:
                        self._outages.recovered(service)
                log.info(
                    f"{name}_recovered",
                    **fields,
                    services=sorted(down),
                    attempts=failures + 1,
                    down_s=round(time.monotonic() - first_failed, 1),
                )
            return result

    def _limit(self, exc: TransientError) -> dict[str, Any]:
        """What bounds the retries of ``exc``, for the log line."""
        daemon = self._daemon
        if not exc.unavailable:
            return {"of": daemon.retry_attempts}
        return {"outage_max_s": daemon.outage_max_s} if daemon.outage_max_s else {}
