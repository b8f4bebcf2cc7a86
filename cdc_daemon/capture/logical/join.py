"""A table that joins a running logical group: its existing rows are exported in chunks by
key while the group's stream goes on; no change is lost and none wins wrongly.

Why it is right, without buffering or watermark windows (compare DBLog and Debezium's
incremental snapshots, which deduplicate chunk rows against the stream in memory):

- when the table joins, the ledger records ``since`` = the group's position P and ``seq`` =
  the slot's ``restart_lsn`` R. From then on the stream keeps every change of the table
  committing at or after P (the publication includes the table before the daemon starts with
  it: ``init`` adds it, ``run`` refuses otherwise).
- every such change has an LSN at or after R: the slot must be able to decode, from R, every
  transaction that commits after its confirmed position (at most P). So the snapshot rows,
  which carry ``_cdc_seq`` = R, lose to every streamed change of the same key.
- each chunk ``(after, last]`` is read after P, in its own transaction. A key whose last change
  committed before P has that version in its chunk (and no streamed change); a key changed
  at or after P has its latest version streamed, with a higher ``_cdc_seq`` than any chunk's
  copy of it, whenever the chunk was read. A row deleted after P has its ``D`` streamed.
  Keys do not move between chunks (a key change is a delete and an insert, both streamed).

So "highest ``_cdc_seq`` per key wins, then drop ``D``" rebuilds the table whatever the
interleaving, also when a transaction on the table spans the snapshot, and a chunk may be
read again at any later time: after a crash the interrupted chunk is read again under its
next attempt's name (``state.joins.JoinChunk``).

The same holds for a new group: its slot is created without an exported snapshot, and every
table joins at the slot's consistent point with the slot's first restart_lsn. So the initial
snapshot is resumable chunk by chunk after a crash (an exported snapshot dies with its
connection: it could only be taken again whole), and parallel: a table's keys are cut into
``capture.snapshot_jobs`` ranges (``source.split_keys``), and up to that many chunks (of one
table's ranges, or of several tables) are copied at once, each on its own source session and
ledger session. Chunks run between the stream's batches (``capture.snapshot_chunk_rows`` rows
each), so the other tables wait at most one round of chunks.

A table that leaves the configuration is marked ``left``: its changes stop (``init`` drops
it from the publication), its objects and warehouse tables stay. Configured again, it joins
anew.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress
from dataclasses import replace

import psycopg
import structlog

from cdc_daemon.batch.spool import DaySpool
from cdc_daemon.capture.logical.keyless import copy_keyless
from cdc_daemon.capture.logical.partitions import Leaves, follow, read_leaves, table_name
from cdc_daemon.capture.logical.pgoutput import format_lsn
from cdc_daemon.capture.logical.snapshot import copy_chunk, split_keys
from cdc_daemon.capture.logical.source import LogicalSource
from cdc_daemon.capture.logical.tables import LogicalTable
from cdc_daemon.config import Settings
from cdc_daemon.errors import CdcError, SourceError, first_error
from cdc_daemon.ops.metrics import Metrics
from cdc_daemon.source.session import SourceSession
from cdc_daemon.source.validate import partition_problems
from cdc_daemon.state.deliveries import Deliveries
from cdc_daemon.state.joins import GroupTable, JoinChunk, Key, KeyRange, join_chunk_name
from cdc_daemon.state.store import Store
from cdc_daemon.unit import UnitOfWork, utc_now_iso

log = structlog.get_logger()


class JoinLedger:
    """``unit.Ledger`` for join chunks: the ``Store``'s join statements."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.table: GroupTable | None = None  # as the last commit left it

    @property
    def deliveries(self) -> Deliveries:
        return self.store

    async def intent(self, chunk: JoinChunk, /) -> None:
        await self.store.join_intent(chunk)

    async def advance(self, chunk: JoinChunk, /) -> None:
        self.table = await self.store.join_advance(chunk)


class _Job:
    """One of ``capture.snapshot_jobs``: its own source session and ledger session."""

    def __init__(self, settings: Settings) -> None:
        self.source = SourceSession(settings, "cdc-daemon-snapshot")
        self.store: Store | None = None
        self._settings = settings

    async def ledger(self) -> Store:
        if self.store is None or self.store.broken:
            if self.store is not None:
                with suppress(CdcError):
                    await self.store.close()
            self.store = await Store.from_settings(self._settings)
        return self.store

    def session(self) -> psycopg.Connection[tuple[object, ...]]:
        return self.source._session()

    async def close(self) -> None:
        self.source.close()
        if self.store is not None:
            with suppress(CdcError):
                await self.store.close()
            self.store = None


class Joiner:
    """The tables of the group as the ledger has them, and the snapshots of joining ones."""

    def __init__(
        self,
        settings: Settings,
        source: LogicalSource,
        unit: UnitOfWork,
        store: Store,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._source = source
        self._unit = unit
        self._store = store
        self._tables: dict[str, GroupTable] = {}
        self._waiting: set[str] = set()
        self._position = 0
        self._jobs = [_Job(settings) for _ in range(settings.capture.snapshot_jobs)]

    @property
    def group(self) -> str:
        return self._settings.group

    def member(self, name: str) -> bool:
        """Whether the ledger has ``name`` in the group (joining, streaming or failed)."""
        known = self._tables.get(name)
        return known is not None and known.status != "left"

    def replace_store(self, store: Store) -> None:
        self._store = store

    @property
    def joining(self) -> list[GroupTable]:
        """Configured tables in their snapshot."""
        configured = {t.qualified for t in self._source.tables}
        return [t for t in self._tables.values() if t.status == "joining" and t.table in configured]

    async def close(self) -> None:
        for job in self._jobs:
            await job.close()

    async def load(self, legacy: set[str]) -> set[str]:
        """Read the group's tables; returns the configured ones already in the group (their
        changes are the ones a redo of an earlier batch holds). ``legacy``: the tables a
        ledger without group rows (schema 2) exported."""
        self._tables = {t.table: t for t in await self._store.group_tables(self.group)}
        for member in self._tables.values():
            self._show(member)
        if not self._tables:
            for name in sorted(legacy):
                await self._set(GroupTable(name, "streaming"))
        configured = {t.qualified for t in self._source.tables}
        return {n for n, t in self._tables.items() if t.status != "left" and n in configured}

    async def start_all(self) -> None:
        """Every table streams (a group without an initial snapshot, or an old ledger's
        group whose exported snapshot was redone)."""
        for table in self._source.tables:
            await self._set(GroupTable(table.qualified, "streaming"))

    async def begin(self, position: int, restart_lsn: int) -> None:
        """A new group, its slot just created at ``position``: every table joins there (or
        streams, without an initial snapshot), whatever an unfinished first start left."""
        await self._store.forget_group(self.group)
        self._tables = {}
        await self.reconcile(position, restart_lsn)

    async def reconcile(self, position: int, restart_lsn: int) -> list[str]:
        """Bring the ledger's tables in line with the configuration at the group's position:
        a new table joins (``since`` = ``position``, ``seq`` = ``restart_lsn``), a table no
        longer configured leaves. Returns the tables that joined now."""
        configured = {t.qualified: t for t in self._source.tables}
        for name, reason in self._source.unavailable.items():
            await self.fail(name, reason, position)
        joined = []
        for name, table in configured.items():
            known = self._tables.get(name)
            if known is not None and known.status != "left":
                continue
            snapshot = self._settings.capture.initial_snapshot
            status = "joining" if snapshot else "streaming"
            # A table that was in the group before: its snapshot must beat its old objects.
            floor = None if known is None else known.since
            seq = restart_lsn if floor is None or restart_lsn > floor else None
            await self._set(GroupTable(name, status, position, seq, floor))
            await self._store.save_relation_columns(name, table.columns)
            self._source.accepted[name] = table.columns
            joined.append(name)
            log.info(
                "table_joined",
                group=self.group,
                table=name,
                since=format_lsn(position),
                seq=restart_lsn,
                snapshot=snapshot,
            )
        for name, known in list(self._tables.items()):
            if name in self._source.unavailable:
                continue
            if name not in configured and known.status != "left":
                # ``since`` now: the position when it left (every object of it lies below).
                await self._set(replace(known, status="left", since=position))
                log.info("table_left", group=self.group, table=name)
        return joined

    def active_oids(self) -> set[int]:
        """The tables whose changes the stream keeps: joining or streaming (not failed)."""
        keep = {n for n, t in self._tables.items() if t.status in ("joining", "streaming")}
        return {t.oid for t in self._source.tables if t.qualified in keep}

    async def fail(self, name: str, reason: str, position: int) -> None:
        """One table of the group fails: its changes from ``position`` on are not exported
        (the others go on) until ``resync --table`` and a restart export it again."""
        known = self._tables.get(name) or GroupTable(name, "streaming")
        if known.status == "failed" and known.error == reason:
            return
        # ``since``: every object of it lies below (the floor of its next snapshot).
        await self._set(replace(known, status="failed", since=position, error=reason))
        log.error("table_failed", group=self.group, table=name, error=reason)
        for table in self._source.tables:
            if table.qualified == name:
                self._source.deactivate(table.oid)

    async def _set(self, table: GroupTable) -> None:
        await self._store.set_group_table(self.group, table)
        self._tables[table.table] = table
        self._show(table)

    def _show(self, table: GroupTable) -> None:
        if self._metrics is not None:
            self._metrics.member(table.table, table.status)

    # -- the snapshot's chunks ----------------------------------------------------------------

    async def step(self, position: int, draining: bool = False) -> bool:
        """One round of chunks: up to ``snapshot_jobs`` at once, over the ranges of the
        joining tables in order; False when no table is joining (or, ``draining``, when the
        only ones left wait for their seq: an idle server may log nothing that moves the
        slot's restart_lsn, and ``--exit-when-idle`` must end). ``position``: the group's
        (every object of a table that fails now lies below it). Partitions attached or
        detached since the last round are noticed first (``follow_partitions``)."""
        await self.follow_partitions()
        if not self.joining:
            return False
        self._position = position
        work: list[tuple[GroupTable, int]] = []
        for state in self.joining:
            if state.seq is None:
                state = await self._choose_seq(state)
                if state.seq is None:
                    continue
            if not state.ranges:
                state = await self._split(state)
            work += [(state, i) for i, r in enumerate(state.ranges) if not r.done]
        if not work:
            return not draining  # a table waits for its seq (see _choose_seq)
        work = work[: len(self._jobs)]
        try:
            async with asyncio.TaskGroup() as group:
                for job, (state, part) in zip(self._jobs, work, strict=False):
                    group.create_task(self._chunk(job, state, part))
        except BaseExceptionGroup as failed:
            raise first_error(failed) from None
        finally:
            # As the commits left them (concurrent chunks of one table commit in turn).
            with suppress(CdcError):
                self._tables = {t.table: t for t in await self._store.group_tables(self.group)}
                for member in self._tables.values():
                    self._show(member)
        return True

    async def follow_partitions(self) -> None:
        """Each partitioned table's leaves against the ledger's: a partition attached with its
        rows or detached with them gets a range of its own (``capture.logical.partitions``)."""
        source = self._source
        for table in source.tables:
            state = self._tables.get(table.qualified)
            if not table.partitioned or state is None:
                continue
            if state.status not in ("joining", "streaming"):
                continue

            def read(root: int = table.oid) -> Leaves:
                return read_leaves(source._session(), root)

            leaves = await source.run(read)
            followed = follow(state, leaves)
            if followed is None:
                continue
            await self._set(followed.table)
            if followed.attached:
                # ATTACH gives the partition the root's primary key, but not a usable replica
                # identity if it had none: the application's deletes on it would fail, and
                # its deletes could arrive without the key (init checks the partitions it sees).
                def check(t: LogicalTable = table) -> list[str]:
                    return partition_problems(source._session(), t.oid, t.key, t.configured_key)

                for problem in await source.run(check):
                    log.warning("partition_problem", table=table.qualified, problem=problem)
            if followed.attached or followed.detached:
                log.info(
                    "partitions_changed",
                    group=self.group,
                    table=table.qualified,
                    attached=[leaves.names[o] for o in followed.attached],
                    detached=list(followed.detached),
                    floor=format_lsn(leaves.wal_lsn),
                )

    async def _split(self, state: GroupTable) -> GroupTable:
        table = self._table(state.table)
        source = self._source
        if table.keyless:
            cuts: list[Key] = []  # one consistent read of the whole table (capture.logical.keyless)
        else:
            cuts = await source.run(
                lambda: split_keys(source._session(), table, self._settings.capture.snapshot_jobs)
            )
        bounds = [None, *cuts, None]
        ranges = tuple(KeyRange(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1))
        split = replace(state, ranges=ranges)
        await self._set(split)
        return split

    def _table(self, name: str) -> LogicalTable:
        return next(t for t in self._source.tables if t.qualified == name)

    async def _choose_seq(self, state: GroupTable) -> GroupTable:
        """A rejoining table's snapshot seq: the slot's restart_lsn once it is past the
        table's ``floor`` (every streamed change from now on lies at or after it, every
        object of the earlier membership below it). The slot's restart_lsn moves as the
        group's position is confirmed past the server's running-transactions records
        (logged at checkpoints and every 15 s while the server writes WAL)."""
        source = self._source
        restart = (await source.run(source.slot_status)).restart_lsn
        assert state.floor is not None
        if restart <= state.floor:
            if state.table not in self._waiting:
                self._waiting.add(state.table)
                log.info(
                    "join_waiting",
                    group=self.group,
                    table=state.table,
                    restart_lsn=format_lsn(restart),
                    floor=format_lsn(state.floor),
                )
            await asyncio.sleep(self._settings.capture.poll_interval_s)
            return state
        chosen = replace(state, seq=restart)
        await self._set(chosen)
        return chosen

    async def _chunk(self, job: _Job, state: GroupTable, part: int) -> None:
        seq = state.seq
        assert seq is not None
        key_range = state.ranges[part]
        ledger = JoinLedger(await job.ledger())
        number = key_range.chunks
        attempts = await ledger.store.chunk_attempts(self.group, state.table, seq, part, number)
        attempt = attempts + 1
        table = self._table(state.table)
        limit = self._settings.capture.snapshot_chunk_rows
        started = time.monotonic()
        read_ts = utc_now_iso()
        spool = self._unit.new_spool(table.header, table.judge())
        try:
            try:
                if table.keyless:
                    await job.source.run(
                        lambda: _copy_keyless(job.session(), self._source, table, read_ts, spool)
                    )
                    last = None  # the whole table, in one chunk
                else:
                    last = await job.source.run(
                        lambda: _copy_range(
                            job.session(), table, key_range, limit, seq, read_ts, spool
                        )
                    )
            except SourceError as exc:
                if len(self._source.tables) == 1:
                    raise  # a group of one: the daemon stops, as it always did
                # This table cannot be read (dropped, privilege revoked): the others go on.
                await self.fail(state.table, str(exc), self._position)
                return
            days = await asyncio.to_thread(spool.finish)
            chunk = JoinChunk(
                group=self.group,
                table=state.table,
                part=part,
                chunk=number,
                attempt=attempt,
                seq=seq,
                after_key=key_range.start,
                last_key=last,
                read_ts=read_ts,
                objects=self._unit.objects(
                    state.table, join_chunk_name(seq, part, number, attempt), days
                ),
                done=last is None,
            )
            timings = await self._unit.deliver(chunk, ledger)
        finally:
            await asyncio.to_thread(spool.discard)
        assert ledger.table is not None
        self._unit.log_batch(
            chunk,
            started,
            timings,
            event="join_chunk_uploaded",
            part=part,
            chunk=number,
            attempt=attempt,
            done=chunk.done,
        )
        if ledger.table.status == "streaming":
            log.info(
                "table_snapshot_done",
                group=self.group,
                table=state.table,
                rows=ledger.table.rows,
                chunks=ledger.table.chunks,
            )


def _copy_keyless(
    conn: psycopg.Connection[tuple[object, ...]],
    source: LogicalSource,
    table: LogicalTable,
    read_ts: str,
    spool: DaySpool,
) -> None:
    """A keyless table's snapshot: the whole table in one consistent read, in one chunk."""
    rewrite = table.info.copy_hasher()
    consistent = copy_keyless(conn, source.replication, table.info, read_ts, spool, rewrite)
    log.info("keyless_snapshot_read", table=table.qualified, consistent=format_lsn(consistent))


def _copy_range(
    conn: psycopg.Connection[tuple[object, ...]],
    table: LogicalTable,
    key_range: KeyRange,
    limit: int,
    seq: int,
    read_ts: str,
    spool: DaySpool,
) -> Key | None:
    """The next chunk of ``key_range``: of the table, or of the partition the range reads."""
    partition = None
    within = None
    if key_range.partition is not None:
        found = table_name(conn, key_range.partition)
        if found is None:
            # Dropped since: an attached one's rows left the root with it (see
            # capture.logical.partitions); a detached one's keys cannot be read any more.
            log.warning(
                "partition_dropped",
                table=table.qualified,
                partition=key_range.partition,
                rows_kept=key_range.delete,
                fix="cdc-daemon resync --table " + table.qualified if key_range.delete else None,
            )
            return None
        partition, readable = found
        if not readable and not key_range.delete:
            # A role granted SELECT on the root only (deploy/postgres/cdc_role.sql) reads a
            # partition's rows through the root; a detached table must be granted to it.
            partition, within = None, key_range.partition
    return copy_chunk(
        conn,
        table,
        key_range.start,
        key_range.upper,
        limit,
        seq,
        read_ts,
        spool,
        partition,
        key_range.delete,
        within,
    )
