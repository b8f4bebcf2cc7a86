"""Read-only views of the ledger for ``status``, ``/metrics`` and the demo's summary: every
delivery whatever produced it (stream batches, snapshot chunks, backfill chunks), counted by
producer, status and table (``exported``); backfill runs, positions, the group's tables.

On a session of its own, never the daemon's ledger session: that one holds the single-instance
lock and runs the commit transactions, and a query slipped in between could land inside one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from cdc_daemon.config import Settings
from cdc_daemon.errors import CdcError
from cdc_daemon.state.session import LedgerSession
from cdc_daemon.state.store import lock_key

# Uploaded to S3, not yet confirmed in the warehouse (the reconciler's work).
UNRECONCILED = ("uploaded", "missing")
# What a producer's deliveries are called where a person reads them.
PRODUCER_NAMES = {
    "join": "snapshot chunks",
    "batch": "stream batches",
    "backfill": "backfill chunks",
}


def group_ledgers(settings: Settings) -> list[str]:
    """Where a configuration's deliveries are recorded: the group's name (logical mode: the
    stream's batches and the snapshot's chunks) and each table's (watermark mode's batches,
    backfill chunks). The reconciler confirms these; ``status`` and the demo count them."""
    return list(dict.fromkeys([settings.ledger_name, *(t.qualified for t in settings.table_specs)]))


def _names(ledgers: str | Sequence[str]) -> list[str]:
    return [ledgers] if isinstance(ledgers, str) else list(dict.fromkeys(ledgers))


def _figures() -> dict[str, Any]:
    return {"deliveries": {}, "rows": 0, "objects": 0, "bytes": 0}


def lock_columns(table: str) -> tuple[int, int]:
    """The (classid, objid) under which pg_locks shows the table's bigint advisory lock: the
    key's high and low 32 bits, unsigned (with objsubid = 1)."""
    key = lock_key(table) & 0xFFFF_FFFF_FFFF_FFFF
    return key >> 32, key & 0xFFFF_FFFF


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


class LedgerReader(LedgerSession):
    @classmethod
    async def connect(cls, settings: Settings, application_name: str) -> LedgerReader:
        return await cls.open_for(settings, application_name)

    async def _read(self, query: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return await self._fetch("reading the ledger", self._q(query), params)

    async def backfill_runs(self, table: str, limit: int = 5) -> list[dict[str, Any]]:
        """The latest backfill runs of the table, with their chunks' progress."""
        rows = await self._read(
            "SELECT r.run_id, r.day_from::text AS day_from, r.day_to::text AS day_to, r.status,"
            " r.error, count(c.day) AS days,"
            " count(c.day) FILTER (WHERE d.uploaded_at IS NOT NULL) AS days_done,"
            " count(c.day) FILTER (WHERE d.status = 'loaded') AS days_loaded,"
            " coalesce(sum(d.rows), 0) AS rows"
            " FROM {schema}.backfill_runs r LEFT JOIN {schema}.backfill_chunks c USING (run_id)"
            " LEFT JOIN {schema}.deliveries d"
            " ON d.producer = 'backfill' AND d.producer_id = c.delivery"
            " WHERE r.table_name = %s GROUP BY r.run_id ORDER BY r.created_at DESC LIMIT %s",
            (table, limit),
        )
        return [
            {
                k: (int(v) if k in ("days", "days_done", "days_loaded", "rows") else v)
                for k, v in r.items()
            }
            for r in rows
        ]

    async def exported(self, ledgers: str | Sequence[str], prefix: str) -> dict[str, Any]:
        """What the ``ledgers`` hold, whoever produced it: deliveries by status, and the rows,
        objects and bytes (compressed, as in S3) of those in S3; in total, per producer
        (``batch``, ``join``, ``backfill``) and per table (its ledger key; the objects of a
        stream batch of a logical group are each their table's; deliveries in S3 only).
        ``prefix``: the bucket's, before each object's table folder."""
        ledgers = _names(ledgers)
        by_producer = await self._read(
            "SELECT producer, status, count(*) AS n,"
            " coalesce(sum(rows) FILTER (WHERE uploaded_at IS NOT NULL), 0) AS rows,"
            " coalesce(sum(jsonb_array_length(objects))"
            " FILTER (WHERE uploaded_at IS NOT NULL), 0) AS objects,"
            " coalesce(sum(size) FILTER (WHERE uploaded_at IS NOT NULL), 0) AS bytes"
            " FROM {schema}.deliveries WHERE ledger = ANY(%s) GROUP BY producer, status",
            (ledgers,),
        )
        # An object's table is its folder: <prefix><table key>/dt=..., or for a quarantined
        # one <prefix>_quarantine/<table key>/reason=... (sink.keys).
        by_table = await self._read(
            "SELECT split_part(substr(o->>'key', length(%s) + CASE WHEN o->>'quarantine'"
            " IS NULL THEN 1 ELSE 13 END), '/', 1) AS folder, d.status, count(*) AS objects,"
            " count(DISTINCT (d.producer, d.producer_id)) AS n,"
            " coalesce(sum((o->>'rows')::int8), 0) AS rows,"
            " coalesce(sum((o->>'size')::int8), 0) AS bytes"
            " FROM {schema}.deliveries d, jsonb_array_elements(d.objects) o"
            " WHERE d.ledger = ANY(%s) AND d.uploaded_at IS NOT NULL GROUP BY 1, 2",
            (prefix, ledgers),
        )
        total = _figures()
        producers: dict[str, dict[str, Any]] = {}
        for r in by_producer:
            mine = producers.setdefault(str(r["producer"]), _figures())
            for figures in (total, mine):
                status = str(r["status"])
                figures["deliveries"][status] = figures["deliveries"].get(status, 0) + int(r["n"])
                for k in ("rows", "objects", "bytes"):
                    figures[k] += int(r[k])
        tables: dict[str, dict[str, Any]] = {}
        for r in by_table:
            mine = tables.setdefault(str(r["folder"]), _figures())
            status = str(r["status"])
            mine["deliveries"][status] = mine["deliveries"].get(status, 0) + int(r["n"])
            for k in ("rows", "objects", "bytes"):
                mine[k] += int(r[k])
        return {
            **total,
            # In the order they come: a group's snapshot, its stream, backfills.
            "producers": dict(
                sorted(producers.items(), key=lambda kv: [*PRODUCER_NAMES, kv[0]].index(kv[0]))
            ),
            "tables": dict(sorted(tables.items())),
        }

    async def warehouse_health(self, table: str) -> dict[str, Any] | None:
        """What the reconciler last saw of the warehouse, with when (None: never, or a ledger
        older than the table that keeps it)."""
        try:
            rows = await self._read(
                "SELECT checked_at, health FROM {schema}.warehouse_health WHERE table_name = %s",
                (table,),
            )
        except CdcError:
            return None
        if not rows:
            return None
        return {"checked_at": rows[0]["checked_at"].isoformat(), **rows[0]["health"]}

    async def ping(self) -> None:
        await self._read("SELECT 1 AS ok")

    async def positions(self) -> list[dict[str, Any]]:
        return await self._read(
            "SELECT table_name, mode, low, high, updated_at FROM {schema}.positions "
            "ORDER BY table_name"
        )

    async def counts(self, table: str) -> dict[str, int]:
        """The stream's batches by status (the metrics' gauges)."""
        rows = await self._read(
            "SELECT status, count(*) AS n FROM {schema}.batches WHERE table_name = %s "
            "GROUP BY status",
            (table,),
        )
        return {str(r["status"]): int(r["n"]) for r in rows}

    async def last(self, ledgers: str | Sequence[str], column: str) -> dict[str, Any] | None:
        """The delivery (of any producer) with the latest ``uploaded_at`` or ``loaded_at``."""
        assert column in ("uploaded_at", "loaded_at")
        rows = await self._read(
            f"SELECT name, producer, status, rows, table_name, {column} AS at"
            " FROM {schema}.deliveries "
            f"WHERE ledger = ANY(%s) AND {column} IS NOT NULL ORDER BY {column} DESC, name DESC "
            "LIMIT 1",
            (_names(ledgers),),
        )
        if not rows:
            return None
        row = rows[0]
        return {
            "batch_id": row["name"],
            "producer": row["producer"],
            "table": row["table_name"],
            "status": row["status"],
            "rows": row["rows"],
            "at": _iso(row["at"]),
        }

    async def recent(self, ledgers: str | Sequence[str], limit: int = 15) -> list[dict[str, Any]]:
        """The latest deliveries of any producer, newest first, with the seconds from their
        read to their upload and from their upload to Snowflake's confirmed load."""
        rows = await self._read(
            "SELECT name, producer, table_name, status, rows, created_at, uploaded_at,"
            " loaded_at, extract(epoch FROM uploaded_at - created_at) AS upload_s,"
            " extract(epoch FROM loaded_at - uploaded_at) AS load_s"
            " FROM {schema}.deliveries WHERE ledger = ANY(%s)"
            " ORDER BY created_at DESC, name DESC LIMIT %s",
            (_names(ledgers), limit),
        )
        return [
            {
                "name": r["name"],
                "producer": r["producer"],
                "table": r["table_name"],
                "status": r["status"],
                "rows": r["rows"],
                "created_at": _iso(r["created_at"]),
                "upload_s": None if r["upload_s"] is None else float(r["upload_s"]),
                "load_s": None if r["load_s"] is None else float(r["load_s"]),
            }
            for r in rows
        ]

    async def oldest_unreconciled(self, ledgers: str | Sequence[str]) -> dict[str, Any] | None:
        rows = await self._read(
            "SELECT name, producer, status, table_name, uploaded_at, "
            "extract(epoch FROM now() - uploaded_at)::float8 AS age_s "
            "FROM {schema}.deliveries WHERE ledger = ANY(%s) AND status = ANY(%s) "
            "AND uploaded_at IS NOT NULL ORDER BY uploaded_at, name LIMIT 1",
            (_names(ledgers), list(UNRECONCILED)),
        )
        if not rows:
            return None
        row = rows[0]
        return {
            "batch_id": row["name"],
            "producer": row["producer"],
            "table": row["table_name"],
            "status": row["status"],
            "uploaded_at": _iso(row["uploaded_at"]),
            "age_s": round(float(row["age_s"]), 3),
        }

    async def troubled(self, ledgers: str | Sequence[str], limit: int = 50) -> list[dict[str, Any]]:
        """Deliveries (of any producer) not where they should be: pending (with attempts),
        failed or missing, with the reason recorded for each; oldest first."""
        rows = await self._read(
            "SELECT name, producer, status, attempts, error, uploaded_at IS NOT NULL AS in_s3, "
            "updated_at FROM {schema}.deliveries WHERE ledger = ANY(%s) "
            "AND status IN ('pending', 'failed', 'missing') ORDER BY created_at, name LIMIT %s",
            (_names(ledgers), limit),
        )
        return [
            {
                "batch_id": r["name"],
                "producer": r["producer"],
                "status": r["status"],
                "attempts": r["attempts"],
                "in_s3": r["in_s3"],
                "error": r["error"],
                "updated_at": _iso(r["updated_at"]),
            }
            for r in rows
        ]

    async def group_tables(self, group: str) -> list[dict[str, Any]]:
        """A logical group's tables (``state.joins``): streaming, joining (with its snapshot's
        progress) or left; empty for a ledger from before groups (or watermark mode)."""
        try:
            rows = await self._read(
                "SELECT table_name, status, chunks, rows, error, updated_at"
                " FROM {schema}.group_tables"
                " WHERE group_name = %s ORDER BY table_name",
                (group,),
            )
        except CdcError:
            return []
        return [
            {
                "table": r["table_name"],
                "status": r["status"],
                "chunks": r["chunks"],
                "rows": r["rows"],
                "error": r["error"],
                "updated_at": _iso(r["updated_at"]),
            }
            for r in rows
        ]

    async def lock_holder(self, table: str) -> dict[str, Any] | None:
        """The session holding the table's lock (a running daemon), if any. pg_locks shows
        only this database's locks: the lock is taken on the ledger's session, as here."""
        classid, objid = lock_columns(table)
        rows = await self._read(
            "SELECT l.pid, a.application_name, a.client_addr::text AS client_addr, "
            "a.backend_start FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.classid = %s::oid AND l.objid = %s::oid",
            (classid, objid),
        )
        if not rows:
            return None
        row = rows[0]
        return {
            "pid": row["pid"],
            "application_name": row["application_name"],
            "client_addr": row["client_addr"],
            "since": _iso(row["backend_start"]),
        }


async def recent_deliveries(settings: Settings, limit: int = 15) -> list[dict[str, Any]]:
    """``LedgerReader.recent`` over the group's ledgers, on a session of its own."""
    reader = await LedgerReader.connect(settings, "cdc-daemon-report")
    try:
        return await reader.recent(group_ledgers(settings), limit)
    finally:
        await reader.close()
