"""The backfill ledger: one row per backfill run, one per chunk (a day of the partition column).

    chunk: planned --read, intent recorded--> pending --every object in S3--> uploaded
           (pending and after: the states of its delivery, ``state.ledger``)
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

from cdc_daemon.config import Settings
from cdc_daemon.errors import StateError
from cdc_daemon.state.deliveries import Deliveries
from cdc_daemon.state.ledger import Delivery, ObjectRecord, ObjectTotals, Producer
from cdc_daemon.state.session import advisory_key

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
-- A chunk's own part, one per day of the run (``delivery``: its delivery's ``producer_id`` in
-- ``state.deliveries``, which has its objects and their state once it is read).
CREATE TABLE IF NOT EXISTS {schema}.backfill_chunks (
    run_id text NOT NULL REFERENCES {schema}.backfill_runs ON DELETE CASCADE,
    day date NOT NULL,
    delivery text NOT NULL,
    rows_estimate bigint NOT NULL,
    seq_basis bigint,
    PRIMARY KEY (run_id, day)
);
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


def chunk_id(run_id: str, day: date) -> str:
    """A chunk's delivery among the backfill's (``producer_id``)."""
    return f"{run_id}/{day.isoformat()}"


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
    ledger: str = ""  # whose reconciler confirms it (a logical group's); empty: the table's

    @property
    def batch_id(self) -> str:
        return chunk_name(self.run_id, self.day)

    @property
    def delivery(self) -> Delivery:
        return Delivery(
            ledger=self.ledger or self.table,
            producer=Producer.BACKFILL,
            producer_id=chunk_id(self.run_id, self.day),
            name=self.batch_id,
            table=self.table,
            read_ts=self.read_ts,
            objects=self.objects,
        )


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


class BackfillLedger(Deliveries):
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
        # A chunk is planned until its intent record (a delivery), pending until in S3.
        chunks = await self._fetch(
            "reading backfill chunks",
            self._q(
                "SELECT c.day, CASE WHEN d.status IS NULL THEN 'planned'"
                " WHEN d.uploaded_at IS NULL THEN 'pending' ELSE 'uploaded' END AS status,"
                " c.rows_estimate, d.read_ts, c.seq_basis, d.checksum, d.rows,"
                " coalesce(jsonb_array_length(d.objects), 0) AS objects,"
                " coalesce(d.attempts, 0) AS attempts"
                " FROM {schema}.backfill_chunks c JOIN {schema}.backfill_runs r USING (run_id)"
                " LEFT JOIN {schema}.deliveries d"
                " ON d.producer = 'backfill' AND d.producer_id = c.delivery"
                " WHERE c.run_id = %s ORDER BY c.day"
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
        async with self.transaction("recording a backfill run"):
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
                        "INSERT INTO {schema}.backfill_chunks (run_id, day, delivery, "
                        "rows_estimate) VALUES (%s, %s, %s, %s)"
                    ),
                    [(run_id, day, chunk_id(run_id, day), rows) for day, rows in days],
                )
        return await self.run(run_id)

    async def try_lock(self, run_id: str) -> None:
        """The run's lock, for as long as this session lives (never the daemon's)."""
        await self._try_lock(
            run_lock_key(run_id),
            "taking the backfill run's lock",
            f"backfill run {run_id} is already running in another process",
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

    # -- ``unit.Ledger``: the chunk's own part of its intent record and of its commit --------

    @property
    def deliveries(self) -> Deliveries:
        return self

    async def intent(self, chunk: ChunkRecord, /) -> None:
        """Only a planned day of the run is delivered."""
        rows = await self._fetch(
            "recording a backfill chunk",
            self._q("SELECT day FROM {schema}.backfill_chunks WHERE run_id = %s AND day = %s"),
            (chunk.run_id, chunk.day),
        )
        if not rows:
            raise StateError(f"backfill run {chunk.run_id} has no chunk {chunk.day}")

    async def advance(self, chunk: ChunkRecord, /) -> None:
        """Nothing moves: a backfill never touches a position."""
