"""The ledger in Postgres: schema ``cdc`` (configurable), created by ``cdc-daemon init``.

- ``positions``: the committed watermark of each table. It only moves in the transaction that
  marks a batch ``uploaded``, after S3 acknowledged every object of that batch.
- ``batches``: one row per batch, keyed by (table, batch_id).

The store's session also holds the single-instance advisory lock for the table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from cdc_daemon.config import Settings
from cdc_daemon.errors import AlreadyRunningError, StateError, from_psycopg
from cdc_daemon.state.backfill import BACKFILL_DDL
from cdc_daemon.state.joins import JOINS_DDL, GroupTable, JoinChunk, KeyRange, join_chunk_name
from cdc_daemon.state.ledger import BatchRecord, ObjectRecord, Status, can_move
from cdc_daemon.state.position import INT64_MIN, CaptureState
from cdc_daemon.state.session import LedgerSession, advisory_key

# 2: backfill_runs, backfill_chunks (state.backfill). 3: group_tables, join_chunks (joins).
SCHEMA_VERSION = 3

_DDL = """
CREATE TABLE IF NOT EXISTS {schema}.meta (
    key text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS {schema}.positions (
    table_name text PRIMARY KEY,
    mode text NOT NULL,
    low bigint,
    high bigint,
    state jsonb NOT NULL DEFAULT '{{}}',
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {schema}.batches (
    table_name text NOT NULL,
    batch_id text NOT NULL,
    lo bigint NOT NULL,
    hi bigint NOT NULL,
    status text NOT NULL
        CHECK (status IN ('pending', 'uploaded', 'loaded', 'failed', 'missing')),
    rows bigint NOT NULL,
    raw_bytes bigint NOT NULL,
    size bigint NOT NULL,
    objects jsonb NOT NULL,
    checksum text NOT NULL,
    read_ts text NOT NULL,
    spec jsonb NOT NULL,
    attempts integer NOT NULL DEFAULT 1,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    uploaded_at timestamptz,
    loaded_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, batch_id)
);
-- Logical capture: the column list last exported per table (to detect schema changes).
-- What the reconciler last saw of the warehouse (pipe, tasks, stream), for `status`.
CREATE TABLE IF NOT EXISTS {schema}.warehouse_health (
    table_name text PRIMARY KEY,
    checked_at timestamptz NOT NULL,
    health jsonb NOT NULL
);
-- The columns each landing table in Snowflake is known to have (warehouse.evolve): an object
-- naming only these is uploaded without asking Snowflake (which may be unreachable).
CREATE TABLE IF NOT EXISTS {schema}.warehouse_columns (
    table_name text PRIMARY KEY,
    columns text[] NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {schema}.relations (
    table_name text PRIMARY KEY,
    columns jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS batches_status ON {schema}.batches (table_name, status);
-- The reconciler: when it asked Snowpipe to look again (ALTER PIPE ... REFRESH), once.
ALTER TABLE {schema}.batches ADD COLUMN IF NOT EXISTS refreshed_at timestamptz;
INSERT INTO {schema}.meta (key, value) VALUES ('schema_version', '1')
    ON CONFLICT (key) DO NOTHING;
"""


# A batch whose objects are not all in S3 yet.
_UNFINISHED = "(status = 'pending' OR (status = 'failed' AND uploaded_at IS NULL))"


def _group_table(r: dict[str, Any]) -> GroupTable:
    return GroupTable(
        r["table_name"],
        r["status"],
        r["since"],
        r["seq"],
        r["floor"],
        tuple(KeyRange.from_json(x) for x in r["ranges"]),
        r["chunks"],
        r["rows"],
        r["error"],
    )


def lock_key(table: str) -> int:
    """The advisory lock key of one table's daemon."""
    return advisory_key(f"cdc-daemon:{table}")


@dataclass(frozen=True)
class Position:
    table: str
    state: CaptureState

    @property
    def position(self) -> int | None:
        """The watermark: every row with an id at or below it is exported and final."""
        return None if self.state.low == INT64_MIN else self.state.low


class Store(LedgerSession):
    """Async ledger access. ``connect()`` is the factory that does I/O."""

    @classmethod
    async def connect(cls, dsn: str, schema: str, connect_timeout_s: float = 10) -> Store:
        return await cls.open(dsn, schema, "cdc-daemon-ledger", connect_timeout_s)

    @classmethod
    async def from_settings(cls, settings: Settings) -> Store:
        return await cls.open_for(settings, "cdc-daemon-ledger")

    @property
    def backend_pid(self) -> int:
        """The server process of this session (the one holding the lock)."""
        return self._conn.info.backend_pid

    async def init_schema(self) -> None:
        try:
            async with self._conn.transaction():
                # CREATE SCHEMA IF NOT EXISTS still needs CREATE on the database: skip it when
                # an administrator made the schema for the daemon's role (deploy/postgres/).
                found = await self._conn.execute(
                    "SELECT 1 FROM pg_namespace WHERE nspname = %s", (self._schema_name,)
                )
                if await found.fetchone() is None:
                    await self._conn.execute(self._q("CREATE SCHEMA {schema}"))
                await self._conn.execute(self._q(_DDL))
                await self._conn.execute(self._q(BACKFILL_DDL))
                await self._conn.execute(self._q(JOINS_DDL))
                await self._conn.execute(
                    self._q(
                        "UPDATE {schema}.meta SET value = %s WHERE key = 'schema_version' "
                        "AND value::int < %s"
                    ),
                    (str(SCHEMA_VERSION), SCHEMA_VERSION),
                )
        except psycopg.Error as exc:
            doing = f"cannot create the ledger schema {self._schema_name}"
            raise from_psycopg(exc, doing) from None

    async def check_schema(self, logical: bool = False) -> None:
        await self._require_tables(
            ("positions", "batches"),
            f"the ledger schema {self._schema_name!r} does not exist: run `cdc-daemon init`",
        )
        if logical:
            await self._require_tables(
                ("group_tables", "join_chunks"),
                f"the ledger schema {self._schema_name!r} predates table groups: run "
                "`cdc-daemon init` (it adds their tables)",
            )

    async def try_lock(self, table: str) -> None:
        """Session-level: held as long as this connection lives, released if the process dies."""
        rows = await self._fetch(
            "taking the single-instance lock",
            sql.SQL("SELECT pg_try_advisory_lock(%s) AS ok"),
            (lock_key(table),),
        )
        if not rows[0]["ok"]:
            raise AlreadyRunningError(
                f"another cdc-daemon is already running for {table} (it holds the lock)"
            )

    async def position(self, table: str, mode: str) -> Position:
        rows = await self._fetch(
            "reading the watermark",
            self._q(
                "INSERT INTO {schema}.positions (table_name, mode) VALUES (%s, %s) "
                "ON CONFLICT (table_name) DO UPDATE SET mode = {schema}.positions.mode "
                "RETURNING state, mode"
            ),
            (table, mode),
        )
        if rows[0]["mode"] != mode:
            raise StateError(
                f"{table} was captured in {rows[0]['mode']!r} mode; it cannot switch to {mode!r}"
            )
        return Position(table, CaptureState.from_json(rows[0]["state"]))

    async def positions(self) -> list[Position]:
        rows = await self._fetch(
            "reading positions",
            self._q("SELECT table_name, state FROM {schema}.positions ORDER BY table_name"),
        )
        return [Position(r["table_name"], CaptureState.from_json(r["state"])) for r in rows]

    async def pending(self, table: str) -> list[BatchRecord]:
        """Batches with an intent record but no upload yet (pending, or failed earlier)."""
        rows = await self._fetch(
            "reading pending batches",
            self._q(
                "SELECT * FROM {schema}.batches WHERE table_name = %s AND "
                + _UNFINISHED
                + " ORDER BY hi, created_at"
            ),
            (table,),
        )
        return [_record(r) for r in rows]

    async def record_pending(self, batch: BatchRecord) -> None:
        """The intent record, written before any upload of this batch."""
        await self._fetch(
            "recording a batch",
            self._q(
                "INSERT INTO {schema}.batches (table_name, batch_id, lo, hi, status, rows, "
                "raw_bytes, size, objects, checksum, read_ts, spec, attempts) "
                "VALUES (%s, %s, %s, %s, 'pending', %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (table_name, batch_id) DO UPDATE SET "
                "attempts = {schema}.batches.attempts + 1, updated_at = now(), "
                "rows = EXCLUDED.rows, raw_bytes = EXCLUDED.raw_bytes, size = EXCLUDED.size, "
                "objects = EXCLUDED.objects, checksum = EXCLUDED.checksum, status = 'pending' "
                "WHERE "
                + _UNFINISHED.replace("status", "{schema}.batches.status").replace(
                    "uploaded_at", "{schema}.batches.uploaded_at"
                )
            ),
            (
                batch.table,
                batch.batch_id,
                batch.lo,
                batch.hi,
                batch.rows,
                batch.raw_bytes,
                batch.size,
                json.dumps([o.as_json() for o in batch.objects]),
                batch.checksum,
                batch.read_ts,
                json.dumps(batch.spec_json()),
                batch.attempts,
            ),
        )

    async def note_failure(self, table: str, error: str) -> int:
        """Record a failed attempt (and why) on the table's pending batch, if there is one."""
        rows = await self._fetch(
            "recording a failed attempt",
            self._q(
                "UPDATE {schema}.batches SET attempts = attempts + 1, error = %s, "
                "updated_at = now() WHERE table_name = %s AND status = 'pending' "
                "RETURNING batch_id"
            ),
            (error, table),
        )
        return len(rows)

    async def mark_failed(self, table: str, error: str) -> list[str]:
        """Retries are exhausted: the pending batch becomes ``failed``, with the reason. It is
        still redone first at the next start (its rows are not lost, only late)."""
        rows = await self._fetch(
            "marking a batch failed",
            self._q(
                "UPDATE {schema}.batches SET status = 'failed', error = %s, updated_at = now() "
                "WHERE table_name = %s AND status = 'pending' RETURNING batch_id"
            ),
            (error, table),
        )
        return [str(r["batch_id"]) for r in rows]

    async def commit_uploaded(self, batch: BatchRecord) -> None:
        """Mark the batch uploaded and move the position to its ``state_after``, atomically.
        The compare-and-set on the old high refuses a move that another process (or a stale
        retry) already made."""
        try:
            async with self._conn.transaction():
                await self._move(batch.table, batch.lo, batch.state_after)
                cur = await self._conn.execute(
                    self._q(
                        "UPDATE {schema}.batches SET status = 'uploaded', uploaded_at = now(), "
                        "updated_at = now(), error = NULL "
                        "WHERE table_name = %s AND batch_id = %s AND " + _UNFINISHED
                    ),
                    (batch.table, batch.batch_id),
                )
                if cur.rowcount != 1:
                    raise StateError(f"batch {batch.batch_id} is not pending any more")
        except psycopg.Error as exc:
            raise from_psycopg(exc, "committing a batch") from None

    async def commit_position(self, table: str, before: CaptureState, after: CaptureState) -> None:
        """Move the position without a batch: fences retired and empty gaps forgotten."""
        try:
            async with self._conn.transaction():
                await self._move(table, before.high, after)
        except psycopg.Error as exc:
            raise from_psycopg(exc, "moving the position") from None

    async def _move(self, table: str, high_before: int, after: CaptureState) -> None:
        cur = await self._conn.execute(
            self._q(
                "UPDATE {schema}.positions SET low = %s, high = %s, state = %s, "
                "updated_at = now() WHERE table_name = %s AND coalesce(high, %s) = %s"
            ),
            (after.low, after.high, json.dumps(after.to_json()), table, INT64_MIN, high_before),
        )
        if cur.rowcount != 1:
            raise StateError(
                f"the position of {table} is no longer {high_before}: another process moved it"
            )

    # -- the tables of a logical group (state.joins) ------------------------------------------

    async def group_tables(self, group: str) -> list[GroupTable]:
        rows = await self._fetch(
            "reading the group's tables",
            self._q(
                "SELECT * FROM {schema}.group_tables WHERE group_name = %s ORDER BY table_name"
            ),
            (group,),
        )
        return [_group_table(r) for r in rows]

    async def set_group_table(self, group: str, table: GroupTable) -> None:
        """Record a table's state (joining with its ``since``/``seq``/ranges, streaming,
        left)."""
        await self._fetch(
            "recording a table of the group",
            self._q(
                "INSERT INTO {schema}.group_tables (group_name, table_name, status, since, seq,"
                " floor, ranges, chunks, rows, error)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (group_name, table_name) DO UPDATE SET status = EXCLUDED.status,"
                " since = EXCLUDED.since, seq = EXCLUDED.seq, floor = EXCLUDED.floor,"
                " ranges = EXCLUDED.ranges, chunks = EXCLUDED.chunks, rows = EXCLUDED.rows,"
                " error = EXCLUDED.error, updated_at = now()"
            ),
            (
                group,
                table.table,
                table.status,
                table.since,
                table.seq,
                table.floor,
                json.dumps([r.as_json() for r in table.ranges]),
                table.chunks,
                table.rows,
                table.error,
            ),
        )

    async def forget_group(self, group: str) -> None:
        """A new slot for the group (first start, teardown): its tables start over."""
        await self._fetch(
            "forgetting the group's tables",
            self._q("DELETE FROM {schema}.group_tables WHERE group_name = %s RETURNING 1"),
            (group,),
        )

    async def chunk_attempts(self, group: str, table: str, seq: int, part: int, chunk: int) -> int:
        rows = await self._fetch(
            "reading a join chunk",
            self._q(
                "SELECT attempt FROM {schema}.join_chunks WHERE group_name = %s"
                " AND table_name = %s AND seq = %s AND part = %s AND chunk = %s"
            ),
            (group, table, seq, part, chunk),
        )
        return int(rows[0]["attempt"]) if rows else 0

    async def record_join_pending(self, chunk: JoinChunk) -> None:
        """The intent record of a join chunk (which keys, which objects)."""
        await self._fetch(
            "recording a join chunk",
            self._q(
                "INSERT INTO {schema}.join_chunks (group_name, table_name, seq, part, chunk,"
                " attempt, status, after_key, last_key, rows, raw_bytes, size, objects, checksum,"
                " read_ts) VALUES (%s, %s, %s, %s, %s, %s, 'pending', %s, %s, %s, %s, %s, %s, %s,"
                " %s) ON CONFLICT (group_name, table_name, seq, part, chunk) DO UPDATE SET"
                " attempt = EXCLUDED.attempt, last_key = EXCLUDED.last_key, rows = EXCLUDED.rows,"
                " raw_bytes = EXCLUDED.raw_bytes, size = EXCLUDED.size,"
                " objects = EXCLUDED.objects, checksum = EXCLUDED.checksum,"
                " read_ts = EXCLUDED.read_ts WHERE {schema}.join_chunks.status = 'pending'"
            ),
            (
                chunk.group,
                chunk.table,
                chunk.seq,
                chunk.part,
                chunk.chunk,
                chunk.attempt,
                None if chunk.after_key is None else json.dumps(list(chunk.after_key)),
                None if chunk.last_key is None else json.dumps(list(chunk.last_key)),
                chunk.rows,
                chunk.raw_bytes,
                chunk.size,
                json.dumps([o.as_json() for o in chunk.objects]),
                chunk.checksum,
                chunk.read_ts,
            ),
        )

    async def commit_join_uploaded(self, chunk: JoinChunk) -> GroupTable:
        """Mark the chunk uploaded and move its range's resume key past it (the range done
        after its last chunk; the table streaming once every range is), atomically; refused
        when the range stands elsewhere (another process moved it). Returns the table."""
        try:
            async with self._conn.transaction():
                cur = await self._conn.execute(
                    self._q(
                        "UPDATE {schema}.join_chunks SET status = 'uploaded', uploaded_at = now()"
                        " WHERE group_name = %s AND table_name = %s AND seq = %s AND part = %s"
                        " AND chunk = %s AND status = 'pending'"
                    ),
                    (chunk.group, chunk.table, chunk.seq, chunk.part, chunk.chunk),
                )
                if cur.rowcount != 1:
                    raise StateError(f"join chunk {chunk.batch_id} is not pending any more")
                cur = await self._conn.execute(
                    self._q(
                        "SELECT * FROM {schema}.group_tables WHERE group_name = %s"
                        " AND table_name = %s AND status = 'joining' FOR UPDATE"
                    ),
                    (chunk.group, chunk.table),
                )
                row = await cur.fetchone()
                table = None if row is None else _group_table(row)
                ranges = () if table is None else table.ranges
                if table is None or not (
                    0 <= chunk.part < len(ranges)
                    and ranges[chunk.part].start == chunk.after_key
                    and ranges[chunk.part].chunks == chunk.chunk
                ):
                    raise StateError(
                        f"the snapshot of {chunk.table} no longer stands where chunk "
                        f"{chunk.part}/{chunk.chunk} began: another process moved it"
                    )
                moved = replace(
                    ranges[chunk.part],
                    after=chunk.last_key
                    if chunk.last_key is not None
                    else ranges[chunk.part].after,
                    chunks=chunk.chunk + 1,
                    done=chunk.done,
                )
                new_ranges = (*ranges[: chunk.part], moved, *ranges[chunk.part + 1 :])
                table = replace(
                    table,
                    ranges=new_ranges,
                    status="streaming" if all(r.done for r in new_ranges) else "joining",
                    chunks=table.chunks + 1,
                    rows=table.rows + chunk.rows,
                )
                await self._conn.execute(
                    self._q(
                        "UPDATE {schema}.group_tables SET ranges = %s, status = %s, chunks = %s,"
                        " rows = %s, updated_at = now() WHERE group_name = %s AND table_name = %s"
                    ),
                    (
                        json.dumps([r.as_json() for r in table.ranges]),
                        table.status,
                        table.chunks,
                        table.rows,
                        chunk.group,
                        chunk.table,
                    ),
                )
                return table
        except psycopg.Error as exc:
            raise from_psycopg(exc, "committing a join chunk") from None

    async def relation_columns(self, table: str) -> list[list[Any]] | None:
        """Logical capture: the column list of the last exported batch, if any."""
        rows = await self._fetch(
            "reading the column list",
            self._q("SELECT columns FROM {schema}.relations WHERE table_name = %s"),
            (table,),
        )
        return list(rows[0]["columns"]) if rows else None

    async def save_relation_columns(self, table: str, columns: Sequence[Sequence[Any]]) -> None:
        await self._fetch(
            "saving the column list",
            self._q(
                "INSERT INTO {schema}.relations (table_name, columns) VALUES (%s, %s) "
                "ON CONFLICT (table_name) DO UPDATE SET columns = EXCLUDED.columns, "
                "updated_at = now()"
            ),
            (table, json.dumps([list(c) for c in columns])),
        )

    async def forget_position(self, table: str) -> None:
        """Teardown of a logical pipeline: the next run starts with a new slot and snapshot.
        The batches stay (their keys hold the slot's LSNs and never collide)."""
        for name in ("positions", "relations"):
            await self._fetch(
                "forgetting the position",
                self._q("DELETE FROM {schema}." + name + " WHERE table_name = %s"),
                (table,),
            )

    async def export_days(self, ledger: str, table: str | None = None) -> tuple[set[str], set[str]]:
        """(days with an object of a batch, backfill chunk or snapshot chunk of ``table``, days
        with one not yet confirmed loaded): what the completeness check may judge. ``ledger``:
        where the batches are recorded (a logical group's name; default the table's).
        Quarantined objects do not count."""
        table = table or ledger
        rows = await self._fetch(
            "reading the days of the exported objects",
            self._q(
                "SELECT o->>'day' AS day, bool_and(x.loaded) AS loaded FROM ("
                " SELECT b.objects, b.status = 'loaded' AS loaded FROM {schema}.batches b"
                " WHERE b.table_name = %s"
                " UNION ALL SELECT c.objects, c.status = 'uploaded'"
                " AND coalesce(c.load_status, '') = 'loaded'"
                " FROM {schema}.backfill_chunks c JOIN {schema}.backfill_runs r USING (run_id)"
                " WHERE r.table_name = %s AND c.objects IS NOT NULL"
                " UNION ALL SELECT j.objects, j.status = 'uploaded'"
                " AND coalesce(j.load_status, '') = 'loaded'"
                " FROM {schema}.join_chunks j WHERE j.group_name = %s AND j.table_name = %s"
                ") x, jsonb_array_elements(x.objects) o"
                " WHERE o->>'quarantine' IS NULL GROUP BY 1"
            ),
            (ledger, table, ledger, table),
        )
        days = {str(r["day"]) for r in rows}
        return days, {str(r["day"]) for r in rows if not r["loaded"]}

    async def save_warehouse_health(self, table: str, health: dict[str, Any]) -> None:
        await self._fetch(
            "saving the warehouse's health",
            self._q(
                "INSERT INTO {schema}.warehouse_health VALUES (%s, now(), %s)"
                " ON CONFLICT (table_name) DO UPDATE SET checked_at = now(),"
                " health = EXCLUDED.health RETURNING table_name"
            ),
            (table, json.dumps(health)),
        )

    async def status_counts(self, table: str) -> dict[str, int]:
        rows = await self._fetch(
            "reading batch counts",
            self._q(
                "SELECT status, count(*) AS n FROM {schema}.batches WHERE table_name = %s "
                "GROUP BY status"
            ),
            (table,),
        )
        return {str(r["status"]): int(r["n"]) for r in rows}

    async def batches(self, table: str) -> list[BatchRecord]:
        rows = await self._fetch(
            "reading batches",
            self._q("SELECT * FROM {schema}.batches WHERE table_name = %s ORDER BY hi"),
            (table,),
        )
        return [_record(r) for r in rows]

    # -- the reconciler's side ---------------------------------------------------------------
    async def unreconciled(self, table: str) -> list[Unreconciled]:
        """Batches in S3 whose load Snowflake has not confirmed yet (uploaded or missing)."""
        rows = await self._fetch(
            "reading unreconciled batches",
            self._q(
                "SELECT * FROM {schema}.batches WHERE table_name = %s"
                " AND status IN ('uploaded', 'missing') ORDER BY uploaded_at, hi"
            ),
            (table,),
        )
        return [Unreconciled(_record(r), r["uploaded_at"], r.get("refreshed_at")) for r in rows]

    async def reconcile(
        self, table: str, batch_id: str, old: Status, new: Status, error: str | None = None
    ) -> bool:
        """Move one batch ``old -> new`` (compare-and-set); False if it was not ``old``."""
        if not can_move(old, new):
            raise StateError(f"a batch cannot move from {old} to {new}")
        rows = await self._fetch(
            "recording a reconciliation",
            self._q(
                "UPDATE {schema}.batches SET status = %s, error = %s, updated_at = now(),"
                " loaded_at = CASE WHEN %s = 'loaded' THEN now() ELSE loaded_at END"
                " WHERE table_name = %s AND batch_id = %s AND status = %s RETURNING batch_id"
            ),
            (new.value, error, new.value, table, batch_id, old.value),
        )
        return bool(rows)

    async def mark_refreshed(self, table: str, batch_id: str) -> None:
        await self._fetch(
            "recording a pipe refresh",
            self._q(
                "UPDATE {schema}.batches SET refreshed_at = now(), updated_at = now()"
                " WHERE table_name = %s AND batch_id = %s"
            ),
            (table, batch_id),
        )

    async def unreconciled_chunks(self, table: str) -> list[Unreconciled]:
        """Backfill chunks in S3 whose load Snowflake has not confirmed yet."""
        rows = await self._fetch(
            "reading unreconciled backfill chunks",
            self._q(
                "SELECT c.run_id, c.day, c.objects, c.read_ts, c.uploaded_at, c.refreshed_at,"
                " coalesce(c.load_status, 'uploaded') AS load_status"
                " FROM {schema}.backfill_chunks c JOIN {schema}.backfill_runs r USING (run_id)"
                " WHERE r.table_name = %s AND c.status = 'uploaded'"
                " AND coalesce(c.load_status, 'uploaded') IN ('uploaded', 'missing')"
                " ORDER BY c.uploaded_at"
            ),
            (table,),
        )
        return [
            Unreconciled(
                BatchRecord(
                    table=table,
                    batch_id=f"backfill-{r['run_id']}-{r['day']}",
                    lo=0,
                    hi=0,
                    read_ts=r["read_ts"] or "",
                    objects=tuple(ObjectRecord(**o) for o in r["objects"] or []),
                    status=Status(r["load_status"]),
                ),
                r["uploaded_at"],
                r["refreshed_at"],
                chunk=(str(r["run_id"]), str(r["day"])),
            )
            for r in rows
        ]

    async def unreconciled_join_chunks(self, group: str, table: str) -> list[Unreconciled]:
        """A logical group's snapshot chunks of ``table`` in S3 whose load Snowflake has not
        confirmed yet."""
        rows = await self._fetch(
            "reading unreconciled snapshot chunks",
            self._q(
                "SELECT *, coalesce(load_status, 'uploaded') AS load FROM {schema}.join_chunks"
                " WHERE group_name = %s AND table_name = %s AND status = 'uploaded'"
                " AND coalesce(load_status, 'uploaded') IN ('uploaded', 'missing')"
                " ORDER BY uploaded_at"
            ),
            (group, table),
        )
        return [
            Unreconciled(
                BatchRecord(
                    table=table,
                    batch_id=join_chunk_name(r["seq"], r["part"], r["chunk"], r["attempt"]),
                    lo=0,
                    hi=0,
                    read_ts=r["read_ts"],
                    objects=tuple(ObjectRecord(**o) for o in r["objects"]),
                    status=Status(r["load"]),
                ),
                r["uploaded_at"],
                r["refreshed_at"],
                join_chunk=(group, table, r["seq"], r["part"], r["chunk"]),
            )
            for r in rows
        ]

    async def reconcile_join_chunk(
        self, key: tuple[str, str, int, int, int], old: Status, new: Status, error: str | None
    ) -> bool:
        rows = await self._fetch(
            "recording a snapshot chunk's reconciliation",
            self._q(
                "UPDATE {schema}.join_chunks SET load_status = %s, load_error = %s,"
                " loaded_at = CASE WHEN %s = 'loaded' THEN now() ELSE loaded_at END"
                " WHERE group_name = %s AND table_name = %s AND seq = %s AND part = %s"
                " AND chunk = %s AND status = 'uploaded'"
                " AND coalesce(load_status, 'uploaded') = %s RETURNING chunk"
            ),
            (new.value, error, new.value, *key, old.value),
        )
        return bool(rows)

    async def mark_join_chunk_refreshed(self, key: tuple[str, str, int, int, int]) -> None:
        await self._fetch(
            "recording a pipe refresh",
            self._q(
                "UPDATE {schema}.join_chunks SET refreshed_at = now() WHERE group_name = %s"
                " AND table_name = %s AND seq = %s AND part = %s AND chunk = %s RETURNING chunk"
            ),
            key,
        )

    async def reconcile_chunk(
        self, chunk: tuple[str, str], old: Status, new: Status, error: str | None = None
    ) -> bool:
        rows = await self._fetch(
            "recording a backfill chunk's reconciliation",
            self._q(
                "UPDATE {schema}.backfill_chunks SET load_status = %s, load_error = %s,"
                " loaded_at = CASE WHEN %s = 'loaded' THEN now() ELSE loaded_at END"
                " WHERE run_id = %s AND day = %s::date AND status = 'uploaded'"
                " AND coalesce(load_status, 'uploaded') = %s RETURNING run_id"
            ),
            (new.value, error, new.value, chunk[0], chunk[1], old.value),
        )
        return bool(rows)

    async def mark_chunk_refreshed(self, chunk: tuple[str, str]) -> None:
        await self._fetch(
            "recording a pipe refresh",
            self._q(
                "UPDATE {schema}.backfill_chunks SET refreshed_at = now()"
                " WHERE run_id = %s AND day = %s::date"
            ),
            chunk,
        )


@dataclass(frozen=True)
class Unreconciled:
    batch: BatchRecord
    uploaded_at: datetime
    refreshed_at: datetime | None
    # A backfill chunk (run id, day) rather than a batch of the daemon's.
    chunk: tuple[str, str] | None = None
    # A logical group's snapshot chunk (group, table, seq, part, chunk).
    join_chunk: tuple[str, str, int, int, int] | None = None


def _record(row: dict[str, Any]) -> BatchRecord:
    return BatchRecord(
        table=row["table_name"],
        batch_id=row["batch_id"],
        lo=row["lo"],
        hi=row["hi"],
        read_ts=row["read_ts"],
        gaps=tuple((a, b) for a, b in row["spec"]["gaps"]),
        caught=tuple((a, b) for a, b in row["spec"]["caught"]),
        state_after=CaptureState.from_json(row["spec"]["state_after"]),
        objects=tuple(ObjectRecord(**o) for o in row["objects"]),
        status=Status(row["status"]),
        attempts=row["attempts"],
        error=row["error"],
    )
