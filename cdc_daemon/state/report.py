"""Read-only views of the ledger for ``status`` and ``/metrics``: the stream's batches (the
view ``batches``: each with its delivery), backfill runs, positions, the group's tables.

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
        rows = await self._read(
            "SELECT status, count(*) AS n FROM {schema}.batches WHERE table_name = %s "
            "GROUP BY status",
            (table,),
        )
        return {str(r["status"]): int(r["n"]) for r in rows}

    async def totals(self, table: str) -> dict[str, int]:
        """Rows, objects and object bytes of the batches that reached S3."""
        rows = await self._read(
            "SELECT coalesce(sum(rows), 0) AS rows, "
            "coalesce(sum(jsonb_array_length(objects)), 0) AS objects, "
            "coalesce(sum(size), 0) AS bytes FROM {schema}.batches "
            "WHERE table_name = %s AND uploaded_at IS NOT NULL",
            (table,),
        )
        return {k: int(v) for k, v in rows[0].items()}

    async def last(self, table: str, column: str) -> dict[str, Any] | None:
        """The batch with the latest ``uploaded_at`` or ``loaded_at``."""
        assert column in ("uploaded_at", "loaded_at")
        rows = await self._read(
            f"SELECT batch_id, status, rows, {column} AS at FROM {{schema}}.batches "
            f"WHERE table_name = %s AND {column} IS NOT NULL ORDER BY {column} DESC, hi DESC "
            "LIMIT 1",
            (table,),
        )
        if not rows:
            return None
        row = rows[0]
        return {
            "batch_id": row["batch_id"],
            "status": row["status"],
            "rows": row["rows"],
            "at": _iso(row["at"]),
        }

    async def oldest_unreconciled(self, table: str) -> dict[str, Any] | None:
        rows = await self._read(
            "SELECT batch_id, status, uploaded_at, "
            "extract(epoch FROM now() - uploaded_at)::float8 AS age_s "
            "FROM {schema}.batches WHERE table_name = %s AND status = ANY(%s) "
            "AND uploaded_at IS NOT NULL ORDER BY uploaded_at, hi LIMIT 1",
            (table, list(UNRECONCILED)),
        )
        if not rows:
            return None
        row = rows[0]
        return {
            "batch_id": row["batch_id"],
            "status": row["status"],
            "uploaded_at": _iso(row["uploaded_at"]),
            "age_s": round(float(row["age_s"]), 3),
        }

    async def troubled(self, table: str, limit: int = 50) -> list[dict[str, Any]]:
        """Batches not where they should be: pending (with attempts), failed or missing, with
        the reason recorded for each; oldest first."""
        rows = await self._read(
            "SELECT batch_id, status, attempts, error, uploaded_at IS NOT NULL AS in_s3, "
            "updated_at FROM {schema}.batches WHERE table_name = %s "
            "AND status IN ('pending', 'failed', 'missing') ORDER BY hi, created_at LIMIT %s",
            (table, limit),
        )
        return [
            {
                "batch_id": r["batch_id"],
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
