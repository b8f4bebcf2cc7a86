"""The backfill ledger: one row per backfill run, one per chunk (a day of the partition column).

    chunk: planned --read, intent recorded--> pending --every object in S3--> uploaded
    run:   running --every chunk uploaded--> done;  running --error or signal--> failed

A run is resumable while it is not ``done``: uploaded chunks are skipped, a pending chunk is
read again with its recorded ``_cdc_ts`` (and seq basis) and uploaded under the same keys, a
planned chunk is read for the first time. Keys depend only on the run id and the day, so a redo
overwrites, never adds. These tables never touch ``positions``: a backfill does not move the
live watermark. The run's own advisory lock (``run_lock_key``) keeps two processes off one run;
the daemon's lock is never taken.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from typing import Any

import psycopg
from psycopg import sql

from cdc_daemon.config import Settings
from cdc_daemon.errors import AlreadyRunningError, StateError, from_psycopg
from cdc_daemon.state.ledger import ObjectRecord, ObjectTotals
from cdc_daemon.state.session import LedgerSession, advisory_key

# Run by ``Store.init_schema`` (``cdc-daemon init``), after the base tables; idempotent.
BACKFILL_DDL = """
CREATE TABLE IF NOT EXISTS {schema}.backfill_runs (
    run_id text PRIMARY KEY,
    table_name text NOT NULL,
    day_from date NOT NULL,
    day_to date NOT NULL CHECK (day_to > day_from),
    fingerprint text NOT NULL,
    config jsonb NOT NULL,
    status text NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    jobs integer NOT NULL,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX IF NOT EXISTS backfill_runs_range
    ON {schema}.backfill_runs (table_name, day_from, day_to, fingerprint);
CREATE TABLE IF NOT EXISTS {schema}.backfill_chunks (
    run_id text NOT NULL REFERENCES {schema}.backfill_runs ON DELETE CASCADE,
    day date NOT NULL,
    status text NOT NULL CHECK (status IN ('planned', 'pending', 'uploaded')),
    rows_estimate bigint NOT NULL,
    rows bigint,
    raw_bytes bigint,
    size bigint,
    objects jsonb,
    checksum text,
    read_ts text,
    seq_basis bigint,
    attempts integer NOT NULL DEFAULT 0,
    error text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    uploaded_at timestamptz,
    PRIMARY KEY (run_id, day)
);
-- The reconciler's view of a chunk in S3: NULL (not confirmed yet), loaded, failed, missing.
ALTER TABLE {schema}.backfill_chunks ADD COLUMN IF NOT EXISTS load_status text;
ALTER TABLE {schema}.backfill_chunks ADD COLUMN IF NOT EXISTS load_error text;
ALTER TABLE {schema}.backfill_chunks ADD COLUMN IF NOT EXISTS loaded_at timestamptz;
ALTER TABLE {schema}.backfill_chunks ADD COLUMN IF NOT EXISTS refreshed_at timestamptz;
"""


def run_lock_key(run_id: str) -> int:
    """The advisory lock key of one backfill run (never the daemon's key)."""
    return advisory_key(f"cdc-daemon-backfill:{run_id}")


@dataclass(frozen=True)
class Chunk:
    day: date
    status: str
    rows_estimate: int
    read_ts: str | None = None
    seq_basis: int | None = None
    checksum: str | None = None
    rows: int | None = None
    objects: int = 0
    attempts: int = 0


def chunk_name(run_id: str, day: date) -> str:
    """The object name of a chunk (``backfill-...``): never a live batch id, which starts with
    digits or ``start``, and never the name of another run's chunk."""
    return f"backfill-{run_id}-{day.isoformat()}"


@dataclass(frozen=True)
class ChunkRecord(ObjectTotals):
    """A chunk as the unit of work delivers it: one day of a run, read at ``read_ts``."""

    table: str
    run_id: str
    day: date
    read_ts: str
    objects: tuple[ObjectRecord, ...]

    @property
    def batch_id(self) -> str:
        return chunk_name(self.run_id, self.day)


@dataclass(frozen=True)
class Run:
    run_id: str
    table: str
    day_from: date
    day_to: date
    fingerprint: str
    status: str
    chunks: tuple[Chunk, ...]

    @property
    def done(self) -> list[Chunk]:
        return [c for c in self.chunks if c.status == "uploaded"]


class BackfillLedger(LedgerSession):
    """Async access to the backfill tables, on a session of its own (which also holds the
    run's lock). ``connect()`` is the factory that does I/O."""

    @classmethod
    async def connect(cls, settings: Settings) -> BackfillLedger:
        return await cls.open_for(settings, "cdc-daemon-backfill-ledger")

    async def check_schema(self) -> None:
        await self._require_tables(
            ("backfill_runs", "backfill_chunks"),
            f"the ledger schema {self._schema_name!r} has no backfill tables: "
            "run `cdc-daemon init` (it creates or upgrades the ledger)",
        )

    async def unfinished(
        self, table: str, day_from: date, day_to: date, fingerprint: str | None = None
    ) -> list[Run]:
        """Runs of exactly this range that are not done, newest first (one fingerprint, or
        all of them when None)."""
        rows = await self._fetch(
            "reading backfill runs",
            self._q(
                "SELECT run_id FROM {schema}.backfill_runs WHERE table_name = %s AND "
                "day_from = %s AND day_to = %s AND status <> 'done' "
                "AND (%s::text IS NULL OR fingerprint = %s) ORDER BY created_at DESC"
            ),
            (table, day_from, day_to, fingerprint, fingerprint),
        )
        return [await self.run(str(r["run_id"])) for r in rows]

    async def run(self, run_id: str) -> Run:
        runs = await self._fetch(
            "reading a backfill run",
            self._q("SELECT * FROM {schema}.backfill_runs WHERE run_id = %s"),
            (run_id,),
        )
        if not runs:
            raise StateError(f"backfill run {run_id} does not exist")
        chunks = await self._fetch(
            "reading backfill chunks",
            self._q(
                "SELECT day, status, rows_estimate, read_ts, seq_basis, checksum, rows, "
                "coalesce(jsonb_array_length(objects), 0) AS objects, attempts "
                "FROM {schema}.backfill_chunks WHERE run_id = %s ORDER BY day"
            ),
            (run_id,),
        )
        r = runs[0]
        return Run(
            run_id=run_id,
            table=r["table_name"],
            day_from=r["day_from"],
            day_to=r["day_to"],
            fingerprint=r["fingerprint"],
            status=r["status"],
            chunks=tuple(Chunk(**c) for c in chunks),
        )

    async def create_run(
        self,
        run_id: str,
        table: str,
        day_from: date,
        day_to: date,
        fingerprint: str,
        config: dict[str, Any],
        jobs: int,
        days: list[tuple[date, int]],
    ) -> Run:
        """The run and all its chunks (``planned``), in one transaction."""
        try:
            async with self._conn.transaction():
                await self._conn.execute(
                    self._q(
                        "INSERT INTO {schema}.backfill_runs (run_id, table_name, day_from, "
                        "day_to, fingerprint, config, status, jobs) "
                        "VALUES (%s, %s, %s, %s, %s, %s, 'running', %s)"
                    ),
                    (run_id, table, day_from, day_to, fingerprint, json.dumps(config), jobs),
                )
                async with self._conn.cursor() as cur:
                    await cur.executemany(
                        self._q(
                            "INSERT INTO {schema}.backfill_chunks (run_id, day, status, "
                            "rows_estimate) VALUES (%s, %s, 'planned', %s)"
                        ),
                        [(run_id, day, rows) for day, rows in days],
                    )
        except psycopg.Error as exc:
            raise from_psycopg(exc, "recording a backfill run") from None
        return await self.run(run_id)

    async def try_lock(self, run_id: str) -> None:
        """Session-level: held while this connection lives, released if the process dies."""
        rows = await self._fetch(
            "taking the backfill run's lock",
            sql.SQL("SELECT pg_try_advisory_lock(%s) AS ok"),
            (run_lock_key(run_id),),
        )
        if not rows[0]["ok"]:
            raise AlreadyRunningError(
                f"backfill run {run_id} is already running in another process"
            )

    async def set_run_status(self, run_id: str, status: str, jobs: int, error: str | None) -> None:
        await self._fetch(
            "updating a backfill run",
            self._q(
                "UPDATE {schema}.backfill_runs SET status = %s, error = %s, jobs = %s, "
                "updated_at = now(), finished_at = CASE WHEN %s = 'done' THEN now() END "
                "WHERE run_id = %s"
            ),
            (status, error, jobs, status, run_id),
        )

    async def record_pending(self, chunk: ChunkRecord) -> None:
        """The chunk's intent record, written before any of its objects goes to S3."""
        rows = await self._fetch(
            "recording a backfill chunk",
            self._q(
                "UPDATE {schema}.backfill_chunks SET status = 'pending', read_ts = %s, "
                "seq_basis = %s, objects = %s, checksum = %s, rows = %s, raw_bytes = %s, "
                "size = %s, attempts = attempts + 1, error = NULL, updated_at = now() "
                "WHERE run_id = %s AND day = %s AND status <> 'uploaded' RETURNING day"
            ),
            (
                chunk.read_ts,
                None,
                json.dumps([o.as_json() for o in chunk.objects]),
                chunk.checksum,
                chunk.rows,
                chunk.raw_bytes,
                chunk.size,
                chunk.run_id,
                chunk.day,
            ),
        )
        if not rows:
            raise StateError(f"backfill chunk {chunk.run_id}/{chunk.day} is already uploaded")

    async def note_failure(self, run_id: str, day: date, error: str) -> None:
        await self._fetch(
            "recording a failed attempt",
            self._q(
                "UPDATE {schema}.backfill_chunks SET error = %s, updated_at = now() "
                "WHERE run_id = %s AND day = %s"
            ),
            (error, run_id, day),
        )

    async def commit_uploaded(self, chunk: ChunkRecord) -> None:
        run_id, day = chunk.run_id, chunk.day
        rows = await self._fetch(
            "committing a backfill chunk",
            self._q(
                "UPDATE {schema}.backfill_chunks SET status = 'uploaded', uploaded_at = now(), "
                "updated_at = now() WHERE run_id = %s AND day = %s AND status = 'pending' "
                "RETURNING day"
            ),
            (run_id, day),
        )
        if not rows:
            raise StateError(f"backfill chunk {run_id}/{day} is not pending any more")
