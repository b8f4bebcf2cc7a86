"""The ledger in Postgres: schema ``cdc`` (configurable), created (or upgraded) by
``cdc-daemon init``.

- ``positions``: the committed watermark of each table. It only moves in the transaction that
  marks a batch ``uploaded``, after S3 acknowledged every object of that batch.
- ``deliveries`` (``state.deliveries``): the objects of every unit of work and their state.
- ``stream_batches``: a stream batch's own part, keyed by (table, batch_id): its range and the
  position it moves to; the view ``batches`` shows each with its delivery.
- ``group_tables``, ``join_chunks`` (``state.joins``), ``backfill_runs``, ``backfill_chunks``
  (``state.backfill``): the producers' own parts.

The store's session also holds the single-instance advisory lock for the table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from psycopg import sql

from cdc_daemon.config import Settings
from cdc_daemon.errors import ConfigError, StateError
from cdc_daemon.state.backfill import BACKFILL_DDL, chunk_id, chunk_name
from cdc_daemon.state.deliveries import DELIVERIES_DDL, UNFINISHED, Deliveries, delivery_row
from cdc_daemon.state.joins import (
    JOINS_DDL,
    GroupTable,
    JoinChunk,
    KeyRange,
    join_chunk_id,
    join_chunk_name,
)
from cdc_daemon.state.ledger import BatchRecord, Delivery, ObjectRecord, Producer, Status
from cdc_daemon.state.position import INT64_MIN, CaptureState
from cdc_daemon.state.session import advisory_key
from cdc_daemon.state.verify import VERIFY_DDL

# 2: backfill_runs, backfill_chunks (state.backfill). 3: group_tables, join_chunks (joins).
# 4: deliveries, for every producer (state.deliveries); batches became stream_batches.
# 5: deliveries' producer repair (its check constraint replaced), verify_state and hash_salts
# (added by CREATE TABLE IF NOT EXISTS: nothing to move). 6: group_tables.partitions (added by
# ADD COLUMN IF NOT EXISTS in JOINS_DDL: NULL, "not looked at yet", is right for every row).
SCHEMA_VERSION = 6

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
CREATE TABLE IF NOT EXISTS {schema}.stream_batches (
    table_name text NOT NULL,
    batch_id text NOT NULL,
    lo bigint NOT NULL,
    hi bigint NOT NULL,
    spec jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
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
-- hash_columns: the fingerprint of the salt each table's values were hashed with
-- (source.hashing.Hasher.fingerprint): another salt is refused until the table is resynced.
CREATE TABLE IF NOT EXISTS {schema}.hash_salts (
    group_name text NOT NULL,
    table_name text NOT NULL,
    fingerprint text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, table_name)
);
INSERT INTO {schema}.meta (key, value) VALUES ('schema_version', '1')
    ON CONFLICT (key) DO NOTHING;
"""

# The stream batches with their delivery, as ``status``, the metrics and the reports read them.
_BATCHES_VIEW = """
CREATE OR REPLACE VIEW {schema}.batches AS
SELECT b.table_name, b.batch_id, b.lo, b.hi, d.status, d.rows, d.raw_bytes, d.size, d.objects,
    d.checksum, d.read_ts, b.spec, d.attempts, d.error, d.created_at, d.uploaded_at,
    d.loaded_at, d.updated_at, d.refreshed_at
FROM {schema}.stream_batches b JOIN {schema}.deliveries d
    ON d.ledger = b.table_name AND d.producer = 'batch' AND d.producer_id = b.batch_id;
"""


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
        None if r.get("partitions") is None else tuple(int(p) for p in r["partitions"]),
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


class Store(Deliveries):
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
        async with self.transaction(f"cannot create the ledger schema {self._schema_name}"):
            # CREATE SCHEMA IF NOT EXISTS still needs CREATE on the database: skip it when
            # an administrator made the schema for the daemon's role (deploy/postgres/).
            found = await self._conn.execute(
                "SELECT 1 FROM pg_namespace WHERE nspname = %s", (self._schema_name,)
            )
            if await found.fetchone() is None:
                await self._conn.execute(self._q("CREATE SCHEMA {schema}"))
            await self._conn.execute(self._q(_DDL))
            await self._conn.execute(self._q(DELIVERIES_DDL))
            await self._conn.execute(self._q(BACKFILL_DDL))
            await self._conn.execute(self._q(JOINS_DDL))
            await self._conn.execute(self._q(VERIFY_DDL))
            await self._upgrade()
            await self._conn.execute(self._q(_BATCHES_VIEW))
            await self._conn.execute(
                self._q(
                    "UPDATE {schema}.meta SET value = %s WHERE key = 'schema_version' "
                    "AND value::int < %s"
                ),
                (str(SCHEMA_VERSION), SCHEMA_VERSION),
            )

    async def _columns(self, table: str) -> set[str]:
        """The columns of the ledger's table ``table`` (none for a view)."""
        rows = await self._fetch(
            "reading the ledger",
            sql.SQL(
                "SELECT c.column_name FROM information_schema.columns c"
                " JOIN information_schema.tables t USING (table_schema, table_name)"
                " WHERE t.table_type = 'BASE TABLE' AND c.table_schema = %s AND c.table_name = %s"
            ),
            (self._schema_name, table),
        )
        return {str(r["column_name"]) for r in rows}

    async def _upgrade(self) -> None:
        """A ledger of schema 3 or older, in ``init_schema``'s transaction: the objects and
        states of its batches, snapshot chunks and backfill chunks move to ``deliveries``;
        each producer's table keeps its own part (``batches`` becomes ``stream_batches``)."""
        moved: list[tuple[Any, ...]] = []
        if "status" in await self._columns("batches"):
            for r in await self._fetch("reading the batches", self._q(_OLD_BATCHES)):
                d = Delivery(
                    ledger=r["table_name"],
                    producer=Producer.BATCH,
                    producer_id=r["batch_id"],
                    name=r["batch_id"],
                    table=r["table_name"],
                    read_ts=r["read_ts"],
                    objects=_objects(r["objects"]),
                    status=Status(r["status"]),
                    attempts=r["attempts"],
                    error=r["error"],
                )
                moved.append(delivery_row(d, **_times(r)))
            await self._conn.execute(
                self._q(
                    "INSERT INTO {schema}.stream_batches (table_name, batch_id, lo, hi, spec,"
                    " created_at) SELECT table_name, batch_id, lo, hi, spec, created_at"
                    " FROM {schema}.batches; DROP TABLE {schema}.batches"
                )
            )
        if "status" in await self._columns("join_chunks"):
            for r in await self._fetch("reading the join chunks", self._q(_OLD_JOIN_CHUNKS)):
                d = Delivery(
                    ledger=r["group_name"],
                    producer=Producer.JOIN,
                    producer_id=join_chunk_id(r["table_name"], r["seq"], r["part"], r["chunk"]),
                    name=join_chunk_name(r["seq"], r["part"], r["chunk"], r["attempt"]),
                    table=r["table_name"],
                    read_ts=r["read_ts"],
                    objects=_objects(r["objects"]),
                    status=Status(r["load_status"] or r["status"]),
                    attempts=r["attempt"],
                    error=r["load_error"],
                )
                moved.append(delivery_row(d, **_times(r)))
            await self._conn.execute(self._q(_OLD_JOIN_CHUNKS_DROP))
        if "objects" in await self._columns("backfill_chunks"):
            await self._conn.execute(
                self._q("ALTER TABLE {schema}.backfill_chunks ADD COLUMN delivery text")
            )
            for r in await self._fetch("reading the backfill chunks", self._q(_OLD_CHUNKS)):
                await self._conn.execute(
                    self._q(
                        "UPDATE {schema}.backfill_chunks SET delivery = %s"
                        " WHERE run_id = %s AND day = %s"
                    ),
                    (chunk_id(r["run_id"], r["day"]), r["run_id"], r["day"]),
                )
                if r["status"] == "planned":
                    continue
                d = Delivery(
                    ledger=r["table_name"],
                    producer=Producer.BACKFILL,
                    producer_id=chunk_id(r["run_id"], r["day"]),
                    name=chunk_name(r["run_id"], r["day"]),
                    table=r["table_name"],
                    read_ts=r["read_ts"],
                    objects=_objects(r["objects"]),
                    status=Status(r["load_status"] or r["status"]),
                    attempts=r["attempts"],
                    error=r["load_error"] or r["error"],
                )
                moved.append(delivery_row(d, **_times(r)))
            await self._conn.execute(self._q(_OLD_CHUNKS_DROP))
        if moved:
            await self.insert_rows(moved)
        # Schema 4: deliveries knew no repair producer.
        found = await self._fetch(
            "reading the ledger",
            sql.SQL(
                "SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint"
                " WHERE conrelid = to_regclass(%s) AND conname = 'deliveries_producer_check'"
            ),
            (f"{self._schema_name}.deliveries",),
        )
        if found and "repair" not in str(found[0]["def"]):
            await self._conn.execute(
                self._q(
                    "ALTER TABLE {schema}.deliveries DROP CONSTRAINT deliveries_producer_check;"
                    " ALTER TABLE {schema}.deliveries ADD CONSTRAINT deliveries_producer_check"
                    " CHECK (producer IN ('batch', 'join', 'backfill', 'repair'))"
                )
            )

    async def check_schema(self, logical: bool = False) -> None:
        await self._require_tables(
            ("positions", "stream_batches", "deliveries"),
            f"the ledger schema {self._schema_name!r} does not exist or predates the deliveries"
            " table: run `cdc-daemon init` (it creates or upgrades the ledger)",
        )
        if logical:
            await self._require_tables(
                ("group_tables", "join_chunks"),
                f"the ledger schema {self._schema_name!r} predates table groups: run "
                "`cdc-daemon init` (it adds their tables)",
            )
            if "partitions" not in await self._columns("group_tables"):
                raise StateError(
                    f"the ledger schema {self._schema_name!r} predates partitioned tables in "
                    "logical mode: run `cdc-daemon init` (it adds group_tables.partitions)"
                )

    async def check_salts(self, settings: Settings, fingerprint: str | None) -> None:
        """Each table with hash_columns keeps the salt its values were first hashed with
        (``fingerprint``: the salt's now; the first one is recorded): a value hashed with
        another salt would no longer equal, join or merge by a hashed key onto the same value
        in the warehouse, so another salt is a ConfigError saying so."""
        if fingerprint is None:
            return
        for spec in settings.table_specs:
            if not spec.hash_columns:
                continue
            if await self.hold_salt(settings.group, spec.qualified, fingerprint) is None:
                continue
            again = (
                f"cdc-daemon resync --table {spec.qualified} (after emptying its warehouse table)"
                if settings.capture.mode == "logical"
                else "capturing it again from the start into an empty warehouse table"
            )
            raise ConfigError(
                f"{spec.qualified}: the salt of its hash_columns is not the one its values were "
                "hashed with so far (the ledger keeps the salt's fingerprint), so the same value "
                "would get another hash in the warehouse and no longer match: restore the "
                f"previous salt, or export the table again by {again}"
            )

    async def hold_salt(self, group: str, table: str, fingerprint: str) -> str | None:
        """Record ``fingerprint`` as the salt of ``table``'s hash_columns unless one is
        recorded: returns the one recorded before when it differs (None: the same, or new)."""
        await self._require_tables(
            ("hash_salts",),
            f"the ledger schema {self._schema_name!r} predates hash_columns: run "
            "`cdc-daemon init` (it adds their table)",
        )
        rows = await self._fetch(
            "recording the salt's fingerprint",
            self._q(
                "INSERT INTO {schema}.hash_salts (group_name, table_name, fingerprint)"
                " VALUES (%s, %s, %s) ON CONFLICT (group_name, table_name)"
                " DO UPDATE SET group_name = excluded.group_name RETURNING fingerprint"
            ),
            (group, table, fingerprint),
        )
        recorded = str(rows[0]["fingerprint"])
        return None if recorded == fingerprint else recorded

    async def forget_salt(self, group: str, table: str | None = None) -> None:
        """A table exported again (resync; every table at teardown): its next start records
        the salt it is hashed with from then on."""
        if not (await self._columns("hash_salts")):
            return  # a ledger from before hash_columns
        await self._fetch(
            "forgetting the salt's fingerprint",
            self._q(
                "DELETE FROM {schema}.hash_salts WHERE group_name = %s"
                " AND (%s::text IS NULL OR table_name = %s) RETURNING 1"
            ),
            (group, table, table),
        )

    async def try_lock(self, table: str) -> None:
        """The single-instance lock of ``table``'s daemon, for as long as this session lives."""
        await self._try_lock(
            lock_key(table),
            "taking the single-instance lock",
            f"another cdc-daemon is already running for {table} (it holds the lock)",
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
                + UNFINISHED
                + " ORDER BY hi, created_at"
            ),
            (table,),
        )
        return [_record(r) for r in rows]

    # -- ``unit.Ledger`` for stream batches: their own part of the intent record and commit --

    @property
    def deliveries(self) -> Deliveries:
        return self

    async def intent(self, batch: BatchRecord, /) -> None:
        """The batch's range, and the position it moves to (kept from its first record: a
        redo is the same batch)."""
        await self._fetch(
            "recording a batch",
            self._q(
                "INSERT INTO {schema}.stream_batches (table_name, batch_id, lo, hi, spec)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (table_name, batch_id) DO NOTHING"
            ),
            (batch.table, batch.batch_id, batch.lo, batch.hi, json.dumps(batch.spec_json())),
        )

    async def advance(self, batch: BatchRecord, /) -> None:
        """Move the position to the batch's ``state_after``. The compare-and-set on the old
        high refuses a move that another process (or a stale retry) already made."""
        await self._move(batch.table, batch.lo, batch.state_after)

    async def mark_failed(self, table: str, error: str) -> list[str]:
        """Retries are exhausted: the pending batch becomes ``failed``, with the reason. It is
        still redone first at the next start (its rows are not lost, only late)."""
        return await self.fail_pending(table, Producer.BATCH, error)

    async def commit_position(self, table: str, before: CaptureState, after: CaptureState) -> None:
        """Move the position without a batch: fences retired and empty gaps forgotten."""
        async with self.transaction("moving the position"):
            await self._move(table, before.high, after)

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
                " floor, ranges, chunks, rows, error, partitions)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (group_name, table_name) DO UPDATE SET status = EXCLUDED.status,"
                " since = EXCLUDED.since, seq = EXCLUDED.seq, floor = EXCLUDED.floor,"
                " ranges = EXCLUDED.ranges, chunks = EXCLUDED.chunks, rows = EXCLUDED.rows,"
                " error = EXCLUDED.error, partitions = EXCLUDED.partitions, updated_at = now()"
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
                None if table.partitions is None else json.dumps(list(table.partitions)),
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

    async def join_intent(self, chunk: JoinChunk) -> None:
        """A join chunk's own part of its intent record: which keys, which attempt."""
        await self._fetch(
            "recording a join chunk",
            self._q(
                "INSERT INTO {schema}.join_chunks (group_name, table_name, seq, part, chunk,"
                " attempt, after_key, last_key) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (group_name, table_name, seq, part, chunk) DO UPDATE SET"
                " attempt = EXCLUDED.attempt, last_key = EXCLUDED.last_key"
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
            ),
        )

    async def join_advance(self, chunk: JoinChunk) -> GroupTable:
        """Move the chunk's range's resume key past it (the range done after its last chunk;
        the table streaming once every range is); refused when the range stands elsewhere
        (another process moved it). Returns the table. Runs in the commit's transaction."""
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
            after=chunk.last_key if chunk.last_key is not None else ranges[chunk.part].after,
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

    async def status_counts(self, ledger: str) -> dict[str, int]:
        """The ledger's deliveries by status, whoever produced them (stream batches, snapshot
        and join chunks, backfills, repairs), as ``status`` counts them."""
        rows = await self._fetch(
            "reading delivery counts",
            self._q(
                "SELECT status, count(*) AS n FROM {schema}.deliveries WHERE ledger = %s "
                "GROUP BY status"
            ),
            (ledger,),
        )
        return {str(r["status"]): int(r["n"]) for r in rows}

    async def batches(self, table: str) -> list[BatchRecord]:
        rows = await self._fetch(
            "reading batches",
            self._q("SELECT * FROM {schema}.batches WHERE table_name = %s ORDER BY hi"),
            (table,),
        )
        return [_record(r) for r in rows]


# Schema 3 and older: what moves to ``deliveries`` (columns added by later versions of that
# schema read as NULL where an older ledger lacks them).
_OLD_BATCHES = "SELECT * FROM {schema}.batches"
_OLD_JOIN_CHUNKS = (
    "SELECT j.*, to_jsonb(j)->>'load_status' AS load_status,"
    " to_jsonb(j)->>'load_error' AS load_error FROM {schema}.join_chunks j"
)
_OLD_CHUNKS = (
    "SELECT c.*, r.table_name, to_jsonb(c)->>'load_status' AS load_status,"
    " to_jsonb(c)->>'load_error' AS load_error"
    " FROM {schema}.backfill_chunks c JOIN {schema}.backfill_runs r USING (run_id)"
)
_OLD_JOIN_CHUNKS_DROP = (
    "ALTER TABLE {schema}.join_chunks DROP COLUMN status, DROP COLUMN rows,"
    " DROP COLUMN raw_bytes, DROP COLUMN size, DROP COLUMN objects, DROP COLUMN checksum,"
    " DROP COLUMN read_ts, DROP COLUMN uploaded_at, DROP COLUMN IF EXISTS load_status,"
    " DROP COLUMN IF EXISTS load_error, DROP COLUMN IF EXISTS loaded_at,"
    " DROP COLUMN IF EXISTS refreshed_at"
)
_OLD_CHUNKS_DROP = (
    "ALTER TABLE {schema}.backfill_chunks ALTER COLUMN delivery SET NOT NULL,"
    " DROP COLUMN status, DROP COLUMN rows, DROP COLUMN raw_bytes, DROP COLUMN size,"
    " DROP COLUMN objects, DROP COLUMN checksum, DROP COLUMN read_ts, DROP COLUMN attempts,"
    " DROP COLUMN error, DROP COLUMN updated_at, DROP COLUMN uploaded_at,"
    " DROP COLUMN IF EXISTS load_status, DROP COLUMN IF EXISTS load_error,"
    " DROP COLUMN IF EXISTS loaded_at, DROP COLUMN IF EXISTS refreshed_at"
)
_TIMES = ("created_at", "uploaded_at", "loaded_at", "refreshed_at", "updated_at")


def _times(row: dict[str, Any]) -> dict[str, Any]:
    """The timestamps an old ledger's row has (``delivery_row``'s ``times``)."""
    return {t: row.get(t) for t in _TIMES}


def _objects(objects: list[dict[str, Any]] | None) -> tuple[ObjectRecord, ...]:
    return tuple(ObjectRecord(**o) for o in objects or [])


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
        objects=_objects(row["objects"]),
        status=Status(row["status"]),
        attempts=row["attempts"],
        error=row["error"],
    )
