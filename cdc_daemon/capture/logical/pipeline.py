"""The logical producer: stream -> spool -> intent record -> upload -> ledger commit -> slot
advance. How positions, the snapshot hand-over, TOAST and schema changes work is in
``capture.logical.source``; the intent record, uploads, commit, crash points and the log line
are ``unit.UnitOfWork``'s, as for every exporter.

Batches run one after another on one stream: the next batch is read once the previous one is
committed and confirmed (while it uploads, nobody reads, and a keepalive thread answers the
walsender).

The initial snapshot cannot be re-read after a crash (its exported snapshot dies with the
connection), so its spool files are kept, named by their sha256, in
``<spool_dir>/cdc-snapshot-<slot>-<lsn>/`` until the batch is committed: a crash after its
intent record re-uploads those very files. If they are gone (another machine, a cleaned /tmp),
the daemon stops with what to do.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import structlog

from cdc_daemon.batch.policy import BatchPolicy, Limits
from cdc_daemon.batch.spool import DayObject, DaySpool
from cdc_daemon.capture.logical.join import Joiner
from cdc_daemon.capture.logical.pgoutput import format_lsn
from cdc_daemon.capture.logical.reader import ReadResult
from cdc_daemon.capture.logical.source import LogicalSource, SlotStatus
from cdc_daemon.config import Settings
from cdc_daemon.errors import SourceError
from cdc_daemon.ops.metrics import Metrics
from cdc_daemon.source.values import QuarantineJudge
from cdc_daemon.state.ledger import BatchRecord, batch_id
from cdc_daemon.state.position import INT64_MIN, CaptureState
from cdc_daemon.state.store import Store
from cdc_daemon.unit import UnitOfWork, redo_pending, utc_now_iso

log = structlog.get_logger()

# How often a lag above capture.max_lag_bytes is logged again.
_LAG_WARN_EVERY_S = 60.0


class LogicalPipeline:
    """The logical producer: whole transactions from the slot, handed to the unit of work."""

    def __init__(
        self,
        settings: Settings,
        source: LogicalSource,
        unit: UnitOfWork,
        store: Store,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._logical = source
        self._unit = unit
        self._store = store
        self._metrics = metrics
        self.policy = BatchPolicy.of(settings.batch)
        self._joiner = Joiner(settings, source, unit.for_producer("join_"), store, metrics)
        self._pos: int | None = None  # the ledger's position (an LSN); INT64_MIN: none yet
        self._read_pos = 0  # where the stream stands (at or past the ledger's position)
        self._last_move = -float("inf")  # the first idle pass of a start moves the slot
        self._lag_warned = -_LAG_WARN_EVERY_S

    @property
    def table(self) -> str:
        """The group (its ledger records: one position, the batches of every table)."""
        return self._settings.group

    @property
    def ledger_names(self) -> tuple[str, ...]:
        return (self.table,)

    @property
    def position(self) -> int | None:
        return None if self._pos in (None, INT64_MIN) else self._pos

    def replace_store(self, store: Store) -> None:
        self._store = store
        self._joiner.replace_store(store)

    async def close(self) -> None:
        """The snapshot jobs' sessions."""
        await self._joiner.close()

    async def drain(self) -> None:
        """Batches run one after another (see the module docstring): nothing is in flight."""

    async def step(self, draining: bool) -> bool:
        try:
            if self._pos is None:
                await self._start()
            worked = await self._pass(draining)
            # A joining table's next chunk, between two batches of the stream.
            assert self._pos is not None
            return await self._joiner.step(self._pos, draining) or worked
        except BaseException:
            self._pos = None  # start over from the ledger
            self._read_pos = 0
            # And on a new stream. Closing this one also lets a server shut down: a stopping
            # walsender waits until the client has confirmed everything it sent, which a
            # daemon that cannot reach its ledger (a restart refuses new sessions) never does.
            await asyncio.to_thread(self._logical.close_stream)
            raise

    # -- start: redo, snapshot ----------------------------------------------------------------

    async def _start(self) -> None:
        store = self._store
        source = self._logical
        if not await source.run(source.publication_exists):
            raise SourceError(
                f"publication {source.publication} does not exist: run `cdc-daemon init`"
            )
        problems = await source.run(source.check_publication)
        if problems:
            raise SourceError("; ".join(problems))
        # The column list exported last, before any redo: a redo compares against it, not
        # against what a failed attempt of this process read.
        source.accepted = {}
        for table in source.tables:
            saved = await store.relation_columns(table.qualified)
            if saved is not None:
                source.accepted[table.qualified] = tuple(
                    (str(n), int(o), int(m)) for n, o, m in saved
                )
        # A redo holds the changes of the tables that were in the group when it was recorded.
        known = await self._joiner.load(set(source.accepted))
        # A configured table that cannot be read and never was in the group is a mistake in the
        # configuration (a typo, a table not made yet): refused before the ledger changes, or
        # the table it replaced would leave the group and it would be marked failed.
        strangers = {n: r for n, r in source.unavailable.items() if not self._joiner.member(n)}
        if strangers:
            raise SourceError(
                "; ".join(strangers.values())
                + ": fix the name in [[tables]] (or create the table), then `cdc-daemon init`"
            )
        source.active = {t.oid for t in source.tables if t.qualified in known}
        source.active &= self._joiner.active_oids()
        await redo_pending(await store.pending(self.table), self._redo)
        state = (await store.position(self.table, "logical")).state
        source.active = None
        if state.high == INT64_MIN:
            await self._begin()
        else:
            self._pos = state.high
            status = await source.run(lambda: self._sync_slot(state.high))
            await self._joiner.reconcile(state.high, status.restart_lsn)
        source.active = self._joiner.active_oids()

    async def _begin(self) -> None:
        """No position yet: create the slot; every table joins at its consistent point (its
        rows are then exported in chunks, see ``capture.logical.join``), or streams from
        there without an initial snapshot."""
        source = self._logical
        status = await source.run(source.slot_status)
        if status.exists:
            # Left by a first start that died before it recorded its position: nothing of it
            # reached S3, so it is dropped and made again.
            log.warning("slot_recreated", table=self.table, slot=source.slot)
            await source.run(
                lambda: source._guard(
                    "dropping the unfinished slot",
                    lambda c: c.execute("SELECT pg_drop_replication_slot(%s)", (source.slot,)),
                )
            )
        lsn = await source.run(source.create_slot)
        restart = (await source.run(source.slot_status)).restart_lsn
        # The tables first: a crash before the position is recorded starts over from here.
        await self._joiner.begin(lsn, restart)
        await self._store.commit_position(self.table, CaptureState(), CaptureState(lsn, lsn))
        await self._save_catalog_columns()
        self._pos = lsn
        log.info(
            "slot_created",
            table=self.table,
            tables=[t.qualified for t in source.tables],
            slot=source.slot,
            lsn=format_lsn(lsn),
            seq=restart,
            snapshot=self._settings.capture.initial_snapshot,
        )

    def _snapshot_dir(self, lsn: int) -> Path:
        base = self._settings.batch.spool_dir or Path(tempfile.gettempdir())
        return base / f"cdc-snapshot-{self._logical.slot}-{lsn}"

    async def _redo(self, pending: BatchRecord) -> None:
        source = self._logical
        started = time.monotonic()
        if pending.lo == INT64_MIN:
            # The snapshot: upload the very files it was spooled to (see the module docstring).
            keep = self._snapshot_dir(pending.hi)
            objects = []
            for obj in pending.objects:
                path = keep / obj.sha256
                if not await asyncio.to_thread(_file_has_sha256, path, obj.sha256):
                    raise SourceError(
                        f"the initial snapshot of {self.table} was interrupted during its upload "
                        f"and its spool files ({keep}) are gone: run `cdc-daemon teardown --yes`, "
                        f"delete the objects of batch {pending.batch_id} from S3, then `init` "
                        "and `run` again"
                    )
                objects.append(replace(obj, path=str(path)))
            batch = replace(pending, objects=tuple(objects))
            timings = await self._unit.deliver(batch, self._store)
            await self._save_catalog_columns()
            await self._joiner.start_all()
            shutil.rmtree(keep, ignore_errors=True)
            self._log_batch(batch, started, timings, "redo")
            return
        await source.run(lambda: self._sync_slot(pending.lo))
        result = await source.run(
            lambda: source.read(pending.lo, self._new_spool, redo_end=pending.hi)
        )
        try:
            await self._failed(result, pending.hi)
            batch = await self._batch_of(result, pending.read_ts)
            self._unit.check_redo(batch, pending.checksum, pending.rows)
            await self._unit.record(batch, self._store)
            timings = await self._commit_batch(batch)
        finally:
            await self._discard(result)
        self._log_batch(batch, started, timings, "redo")

    # -- one pass -----------------------------------------------------------------------------

    def _sync_slot(self, position: int) -> SlotStatus:
        """The slot must exist, be valid, and stand at most at the ledger's position; one left
        behind (a crash between the ledger commit and the advance) is moved up to it."""
        source = self._logical
        status = source.slot_status()
        if not status.exists:
            raise SourceError(
                f"replication slot {source.slot} is gone: changes of {self.table} after "
                f"{format_lsn(position)} cannot be recovered; re-initialise the pipeline "
                "(cdc-daemon teardown --yes, init, run) and reload the warehouse table"
            )
        if status.wal_status == "lost":
            raise SourceError(
                f"replication slot {source.slot} was invalidated (wal_status lost, "
                "max_slot_wal_keep_size): changes were removed before they were exported; "
                "re-initialise the pipeline (cdc-daemon teardown --yes, init, run)"
            )
        if status.confirmed_flush > position:
            raise SourceError(
                f"replication slot {source.slot} stands at {format_lsn(status.confirmed_flush)}, "
                f"past the exported position {format_lsn(position)}: something else consumed "
                "changes; re-initialise the pipeline (cdc-daemon teardown --yes, init, run)"
            )
        if status.confirmed_flush < position:
            source.advance(position)
        return status

    async def _pass(self, draining: bool) -> bool:
        settings = self._settings
        source = self._logical
        pos = self._pos
        assert pos is not None
        # The stream may stand past the ledger's position: a stretch of WAL with nothing of
        # the table in it is confirmed only every heartbeat_s (the ledger is not written for
        # every keepalive).
        start = max(pos, self._read_pos)
        status = await source.run(lambda: self._sync_slot(pos))
        self._watch_lag(status)
        started = time.monotonic()
        read_ts = utc_now_iso()
        batch = settings.batch
        limits = Limits(self.policy.max_rows, batch.max_bytes, batch.max_days)
        result = await source.run(
            lambda: source.read(
                start,
                self._new_spool,
                limits,
                batch.max_age_s,
                # A snapshot in progress: its next chunks wait for no idle stream.
                0.0 if self._joiner.joining else settings.capture.poll_interval_s,
                status.flush_lsn if draining else None,
                confirmed=pos,
            )
        )
        try:
            # Before the intent record: a crash after it redoes the batch without the failed
            # table, whose objects then all lie below this position (its next snapshot's floor).
            await self._failed(result, max(pos, result.hi or pos))
            if result.hi is None or result.hi <= pos:
                return False
            if result.rows == 0:
                # Nothing of the table commits before hi: the position moves there every
                # heartbeat_s (ledger, then slot), so that the slot holds no WAL back.
                self._read_pos = result.hi
                if time.monotonic() - self._last_move >= settings.capture.heartbeat_s:
                    await self._store.commit_position(
                        self.table, CaptureState(pos, pos), CaptureState(result.hi, result.hi)
                    )
                    await source.run(lambda: source.advance(result.hi or 0))
                    self._pos = result.hi
                    self._last_move = time.monotonic()
                    log.debug("slot_moved", table=self.table, lsn=format_lsn(result.hi))
                return False
            # The batch covers [pos, hi): nothing of the table commits in [pos, start).
            result.lo = pos
            record = await self._batch_of(result, read_ts)
            if source.widened:
                # Before the intent record, so that no object with a wider value is uploaded
                # (a redo included) while Snowflake's column is narrower: a failure here leaves
                # nothing recorded, and the stream that starts again brings the Relation back.
                await self._unit.widen(set(source.widened))
                source.widened.clear()
            timings = {
                "extract_s": time.monotonic() - started,
                "compress_s": sum(g.spool.compress_s for g in result.generations),
            }
            await self._unit.record(record, self._store)
            timings |= await self._commit_batch(record)
        finally:
            await self._discard(result)
        self._pos = self._read_pos = record.hi
        self.policy.learn(record.rows, record.raw_bytes)
        reason = "max_bytes_or_days" if result.cut else "max_age_or_drain"
        self._log_batch(record, started, timings, reason)
        return True

    async def _failed(self, result: ReadResult, position: int) -> None:
        """Tables that failed during a read, once what was read before is committed."""
        for name, reason in result.failed.items():
            await self._joiner.fail(name, reason, position)

    async def _commit_batch(self, batch: BatchRecord) -> dict[str, float]:
        """Upload, commit in the ledger, then (only then) advance the slot."""
        timings = await self._unit.upload_and_commit(batch, self._store)
        for name, columns in self._logical.accepted.items():
            await self._store.save_relation_columns(name, columns)
        await self._logical.run(lambda: self._logical.advance(batch.hi))
        self._last_move = time.monotonic()
        return timings

    def _watch_lag(self, status: SlotStatus) -> None:
        structlog.contextvars.bind_contextvars(slot_lag_bytes=status.lag_bytes)
        if self._metrics is not None:
            self._metrics.slot_lag(status.lag_bytes)
        limit = self._settings.capture.max_lag_bytes
        now = time.monotonic()
        if status.lag_bytes > limit and now - self._lag_warned >= _LAG_WARN_EVERY_S:
            self._lag_warned = now
            log.warning(
                "slot_lag_high",
                table=self.table,
                slot=self._logical.slot,
                slot_lag_bytes=status.lag_bytes,
                max_lag_bytes=limit,
            )

    # -- batches ------------------------------------------------------------------------------

    def _log_batch(
        self, batch: BatchRecord, started: float, timings: dict[str, float], reason: str
    ) -> None:
        self._unit.log_batch(
            batch,
            started,
            timings,
            range=[batch.lo if batch.lo != INT64_MIN else None, batch.hi],
            late_rows=0,
            reason=reason,
        )

    def _new_spool(self, header: list[str], judge: QuarantineJudge) -> DaySpool:
        return self._unit.new_spool(header, judge)

    async def _discard(self, result: ReadResult) -> None:
        for generation in result.generations:
            await asyncio.to_thread(generation.spool.discard)

    async def _save_catalog_columns(self) -> None:
        """After the snapshot (or a slot without one): the catalog's column lists are the
        accepted ones."""
        source = self._logical
        for table in source.tables:
            await self._store.save_relation_columns(table.qualified, table.columns)
            source.accepted[table.qualified] = table.columns

    async def _batch_of(self, result: ReadResult, read_ts: str) -> BatchRecord:
        days = [
            (g.table.qualified, g.number, await asyncio.to_thread(g.spool.finish))
            for g in result.generations
        ]
        assert result.hi is not None
        return self._record(result.lo, result.hi, read_ts, days)

    def _record(
        self, lo: int, hi: int, read_ts: str, generations: list[tuple[str, int, list[DayObject]]]
    ) -> BatchRecord:
        """A batch of whole transactions committing in ``[lo, hi)``, of any tables of the
        group; each table's objects are named ``<batch_id>`` (its first column list) and
        ``<batch_id>-s<n>`` (later ones), under the table's folder."""
        bid = batch_id(lo, hi)
        objects = tuple(
            record
            for table, n, days in generations
            for record in self._unit.objects(table, bid if n == 0 else f"{bid}-s{n}", days)
        )
        return BatchRecord(
            table=self.table,
            batch_id=bid,
            lo=lo,
            hi=hi,
            read_ts=read_ts,
            state_after=CaptureState(hi, hi),
            objects=objects,
        )


def _file_has_sha256(path: Path, sha256: str) -> bool:
    if not path.is_file():
        return False
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == sha256
