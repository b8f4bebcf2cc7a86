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
next attempt's name (``state.joins.JoinChunk``). Chunks run one at a time between the
stream's batches (``capture.snapshot_chunk_rows`` rows each), so the other tables wait at
most one chunk.

A table that leaves the configuration is marked ``left``: its changes stop (``init`` drops
it from the publication), its objects and warehouse tables stay. Configured again, it joins
anew.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import structlog

from cdc_daemon.capture.logical.pgoutput import format_lsn
from cdc_daemon.capture.logical.source import LogicalSource, LogicalTable
from cdc_daemon.config import Settings
from cdc_daemon.state.joins import GroupTable, JoinChunk, join_chunk_name
from cdc_daemon.state.store import Store
from cdc_daemon.unit import UnitOfWork, utc_now_iso

log = structlog.get_logger()


class JoinLedger:
    """``unit.Ledger`` for join chunks: the ``Store``'s join statements."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def record_pending(self, chunk: JoinChunk, /) -> None:
        await self.store.record_join_pending(chunk)

    async def commit_uploaded(self, chunk: JoinChunk, /) -> None:
        await self.store.commit_join_uploaded(chunk)


class Joiner:
    """The tables of the group as the ledger has them, and the snapshots of joining ones."""

    def __init__(
        self, settings: Settings, source: LogicalSource, unit: UnitOfWork, store: Store
    ) -> None:
        self._settings = settings
        self._source = source
        self._unit = unit
        self._ledger = JoinLedger(store)
        self._tables: dict[str, GroupTable] = {}
        self._waiting: set[str] = set()

    @property
    def group(self) -> str:
        return self._settings.group

    def replace_store(self, store: Store) -> None:
        self._ledger = JoinLedger(store)

    @property
    def joining(self) -> list[GroupTable]:
        return [t for t in self._tables.values() if t.status == "joining"]

    async def load(self, legacy: set[str]) -> set[str]:
        """Read the group's tables; returns the configured ones already in the group (their
        changes are the ones a redo of an earlier batch holds). ``legacy``: the tables a
        ledger from before groups existed exported (no group rows yet)."""
        store = self._ledger.store
        self._tables = {t.table: t for t in await store.group_tables(self.group)}
        if not self._tables:
            for name in sorted(legacy):
                await self._set(GroupTable(name, "streaming"))
        configured = {t.qualified for t in self._source.tables}
        return {n for n, t in self._tables.items() if t.status != "left" and n in configured}

    async def start_all(self) -> None:
        """A new group: every table is in its initial snapshot (or none was asked for)."""
        for table in self._source.tables:
            await self._set(GroupTable(table.qualified, "streaming"))

    async def reconcile(self, position: int, restart_lsn: int) -> list[str]:
        """Bring the ledger's tables in line with the configuration at the group's position:
        a new table joins (``since`` = ``position``, ``seq`` = ``restart_lsn``), a table no
        longer configured leaves. Returns the tables that joined now."""
        configured = {t.qualified: t for t in self._source.tables}
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
            await self._ledger.store.save_relation_columns(name, table.columns)
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
            if name not in configured and known.status != "left":
                # ``since`` now: the position when it left (every object of it lies below).
                await self._set(replace(known, status="left", since=position))
                log.info("table_left", group=self.group, table=name)
        return joined

    async def _set(self, table: GroupTable) -> None:
        await self._ledger.store.set_group_table(self.group, table)
        self._tables[table.table] = table

    async def step(self) -> bool:
        """One chunk of the first joining table; False when none is joining."""
        joining = self.joining
        if not joining:
            return False
        state = joining[0]
        if state.seq is None:
            state = await self._choose_seq(state)
            if state.seq is None:
                return True  # still waiting (see _choose_seq)
        table = next(t for t in self._source.tables if t.qualified == state.table)
        await self._chunk(table, state)
        return True

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

    async def _chunk(self, table: LogicalTable, state: GroupTable) -> None:
        assert state.seq is not None
        store = self._ledger.store
        seq = state.seq
        number = state.chunks
        attempt = await store.chunk_attempts(self.group, state.table, number) + 1
        limit = self._settings.capture.snapshot_chunk_rows
        started = time.monotonic()
        read_ts = utc_now_iso()
        spool = self._unit.new_spool(table.header)
        source = self._source
        try:
            last = await source.run(
                lambda: source.copy_chunk(table, state.after_key, limit, seq, read_ts, spool)
            )
            days = await asyncio.to_thread(spool.finish)
            chunk = JoinChunk(
                group=self.group,
                table=state.table,
                chunk=number,
                attempt=attempt,
                seq=seq,
                after_key=state.after_key,
                last_key=last,
                read_ts=read_ts,
                objects=self._unit.objects(
                    state.table, join_chunk_name(seq, number, attempt), days
                ),
                done=last is None,
            )
            timings = await self._unit.deliver(chunk, self._ledger)
        finally:
            await asyncio.to_thread(spool.discard)
        self._tables[state.table] = replace(
            state,
            status="streaming" if chunk.done else "joining",
            after_key=last,
            chunks=number + 1,
            rows=state.rows + chunk.rows,
        )
        self._unit.log_batch(
            chunk,
            started,
            timings,
            event="join_chunk_uploaded",
            chunk=number,
            attempt=attempt,
            done=chunk.done,
        )
        if chunk.done:
            log.info(
                "table_snapshot_done",
                group=self.group,
                table=state.table,
                rows=state.rows + chunk.rows,
                chunks=number + 1,
            )
