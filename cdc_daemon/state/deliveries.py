"""The confirmation ledger: ``deliveries``, one row per unit of work of any producer (stream
batch, snapshot chunk, backfill chunk), with its objects and its state (``state.ledger``).

The unit of work writes it through ``Deliveries.record`` (the intent record) and
``Deliveries.commit`` (uploaded), each in one transaction with what the producer keeps of its
own (a batch's range and the position it moves, a snapshot chunk's key range, a backfill
chunk); the reconciler reads and settles it through ``unconfirmed``, ``settle`` and
``mark_refreshed``, whoever produced it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from cdc_daemon.errors import StateError
from cdc_daemon.state.ledger import Delivery, ObjectRecord, Producer, Status, can_move
from cdc_daemon.state.session import LedgerSession

# Run by ``Store.init_schema`` (``cdc-daemon init``), before the producers' tables; idempotent.
DELIVERIES_DDL = """
CREATE TABLE IF NOT EXISTS {schema}.deliveries (
    ledger text NOT NULL,
    producer text NOT NULL CHECK (producer IN ('batch', 'join', 'backfill', 'repair')),
    producer_id text NOT NULL,
    name text NOT NULL,
    table_name text NOT NULL,
    status text NOT NULL
        CHECK (status IN ('pending', 'uploaded', 'loaded', 'failed', 'missing')),
    rows bigint NOT NULL,
    raw_bytes bigint NOT NULL,
    size bigint NOT NULL,
    objects jsonb NOT NULL,
    checksum text NOT NULL,
    read_ts text NOT NULL,
    attempts integer NOT NULL DEFAULT 1,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    uploaded_at timestamptz,
    loaded_at timestamptz,
    refreshed_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (ledger, producer, producer_id)
);
CREATE INDEX IF NOT EXISTS deliveries_status ON {schema}.deliveries (ledger, status);
"""

# Not all of its objects are in S3 yet: pending, or failed before its upload.
UNFINISHED = "(status = 'pending' OR (status = 'failed' AND uploaded_at IS NULL))"

_COLUMNS = (
    "ledger, producer, producer_id, name, table_name, status, rows, raw_bytes, size, objects,"
    " checksum, read_ts, attempts, error, created_at, uploaded_at, loaded_at, refreshed_at,"
    " updated_at"
)
_KEY = "ledger = %s AND producer = %s AND producer_id = %s"


def delivery_row(d: Delivery, **times: Any) -> tuple[Any, ...]:
    """The columns of ``_COLUMNS`` for ``d`` (``times``: created_at, uploaded_at, ...)."""
    return (
        d.ledger,
        d.producer.value,
        d.producer_id,
        d.name,
        d.table,
        d.status.value,
        d.rows,
        d.raw_bytes,
        d.size,
        json.dumps([o.as_json() for o in d.objects]),
        d.checksum,
        d.read_ts,
        d.attempts,
        d.error,
        times.get("created_at"),
        times.get("uploaded_at"),
        times.get("loaded_at"),
        times.get("refreshed_at"),
        times.get("updated_at"),
    )


def _delivery(r: dict[str, Any]) -> Delivery:
    return Delivery(
        ledger=r["ledger"],
        producer=Producer(r["producer"]),
        producer_id=r["producer_id"],
        name=r["name"],
        table=r["table_name"],
        read_ts=r["read_ts"],
        objects=tuple(ObjectRecord(**o) for o in r["objects"]),
        status=Status(r["status"]),
        attempts=r["attempts"],
        error=r["error"],
        uploaded_at=r["uploaded_at"],
        refreshed_at=r["refreshed_at"],
    )


def _key(d: Delivery) -> tuple[str, str, str]:
    return d.ledger, d.producer.value, d.producer_id


class Deliveries(LedgerSession):
    """The confirmation ledger's statements, on a ledger session (the daemon's ``Store``, the
    backfill's ledger)."""

    async def insert_rows(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Deliveries as ``delivery_row`` gives them (the schema's upgrade)."""
        async with self._conn.cursor() as cur:
            await cur.executemany(
                self._q(
                    f"INSERT INTO {{schema}}.deliveries ({_COLUMNS}) VALUES ("
                    + ", ".join(["%s"] * 14)
                    + ", coalesce(%s, now()), %s, %s, %s, coalesce(%s, now()))"
                ),
                rows,
            )

    async def record(self, delivery: Delivery, intent: Callable[[], Awaitable[object]]) -> None:
        """The intent record: the delivery ``pending`` with its objects (again, with one more
        attempt, for a redo of one not in S3 yet) and the producer's own ``intent``, in one
        transaction. Refused for a delivery already in S3. A redo keeps the reason the last
        attempt failed until the delivery commits: ``status`` shows it while retries go on."""
        async with self.transaction(f"recording {delivery.name}"):
            cur = await self._conn.execute(
                self._q(
                    "INSERT INTO {schema}.deliveries (ledger, producer, producer_id, name,"
                    " table_name, status, rows, raw_bytes, size, objects, checksum, read_ts,"
                    " attempts) VALUES (%s, %s, %s, %s, %s, 'pending', %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (ledger, producer, producer_id) DO UPDATE SET"
                    " attempts = {schema}.deliveries.attempts + 1, updated_at = now(),"
                    " name = EXCLUDED.name, rows = EXCLUDED.rows, raw_bytes = EXCLUDED.raw_bytes,"
                    " size = EXCLUDED.size, objects = EXCLUDED.objects,"
                    " checksum = EXCLUDED.checksum, read_ts = EXCLUDED.read_ts,"
                    " status = 'pending' WHERE "
                    + UNFINISHED.replace("status", "{schema}.deliveries.status").replace(
                        "uploaded_at", "{schema}.deliveries.uploaded_at"
                    )
                ),
                (
                    *_key(delivery),
                    delivery.name,
                    delivery.table,
                    delivery.rows,
                    delivery.raw_bytes,
                    delivery.size,
                    json.dumps([o.as_json() for o in delivery.objects]),
                    delivery.checksum,
                    delivery.read_ts,
                    delivery.attempts,
                ),
            )
            if cur.rowcount != 1:
                raise StateError(f"{delivery.name} is already uploaded")
            await intent()

    async def commit(self, delivery: Delivery, advance: Callable[[], Awaitable[object]]) -> None:
        """Every object is in S3: the producer's ``advance`` (a position, a key range) and the
        delivery ``uploaded``, atomically."""
        async with self.transaction(f"committing {delivery.name}"):
            await advance()
            cur = await self._conn.execute(
                self._q(
                    "UPDATE {schema}.deliveries SET status = 'uploaded', uploaded_at = now(),"
                    " updated_at = now(), error = NULL WHERE " + _KEY + " AND " + UNFINISHED
                ),
                _key(delivery),
            )
            if cur.rowcount != 1:
                raise StateError(f"{delivery.name} is not pending any more")

    async def note_attempt_failed(
        self,
        ledger: str,
        producer: Producer,
        error: str,
        producer_id: str | None = None,
        counted: bool = True,
    ) -> int:
        """Record why an attempt failed on the ledger's pending deliveries of ``producer`` (one,
        with ``producer_id``), ``counted`` as one more attempt (not where the next attempt
        records the intent again, which counts it). Returns how many."""
        rows = await self._fetch(
            "recording a failed attempt",
            self._q(
                "UPDATE {schema}.deliveries SET attempts = attempts + %s, error = %s,"
                " updated_at = now() WHERE ledger = %s AND producer = %s"
                " AND (%s::text IS NULL OR producer_id = %s) AND status = 'pending'"
                " RETURNING name"
            ),
            (int(counted), error, ledger, producer.value, producer_id, producer_id),
        )
        return len(rows)

    async def fail_pending(self, ledger: str, producer: Producer, error: str) -> list[str]:
        """Retries are exhausted: the ledger's pending deliveries of ``producer`` become
        ``failed``, with the reason. Each is still redone first at the next start (its rows
        are not lost, only late)."""
        rows = await self._fetch(
            "marking a delivery failed",
            self._q(
                "UPDATE {schema}.deliveries SET status = 'failed', error = %s, updated_at = now()"
                " WHERE ledger = %s AND producer = %s AND status = 'pending' RETURNING name"
            ),
            (error, ledger, producer.value),
        )
        return [str(r["name"]) for r in rows]

    # -- the reconciler's side ---------------------------------------------------------------

    async def unconfirmed(self, ledgers: Sequence[str]) -> list[Delivery]:
        """Deliveries of ``ledgers`` in S3 whose load Snowflake has not confirmed yet
        (uploaded or missing), oldest first."""
        rows = await self._fetch(
            "reading the deliveries awaiting confirmation",
            self._q(
                "SELECT * FROM {schema}.deliveries WHERE ledger = ANY(%s)"
                " AND status IN ('uploaded', 'missing') ORDER BY uploaded_at, name"
            ),
            (list(dict.fromkeys(ledgers)),),
        )
        return [_delivery(r) for r in rows]

    async def settle(self, delivery: Delivery, new: Status, error: str | None = None) -> bool:
        """Move a delivery from its status to ``new`` (compare-and-set); False if it moved
        meanwhile."""
        if not can_move(delivery.status, new):
            raise StateError(f"a delivery cannot move from {delivery.status} to {new}")
        rows = await self._fetch(
            "recording a reconciliation",
            self._q(
                "UPDATE {schema}.deliveries SET status = %s, error = %s, updated_at = now(),"
                " loaded_at = CASE WHEN %s = 'loaded' THEN now() ELSE loaded_at END"
                " WHERE " + _KEY + " AND status = %s RETURNING name"
            ),
            (new.value, error, new.value, *_key(delivery), delivery.status.value),
        )
        return bool(rows)

    async def mark_refreshed(self, delivery: Delivery) -> None:
        """The pipe was asked to look again for the delivery's objects (once)."""
        await self._fetch(
            "recording a pipe refresh",
            self._q(
                "UPDATE {schema}.deliveries SET refreshed_at = now(), updated_at = now()"
                " WHERE " + _KEY + " RETURNING name"
            ),
            _key(delivery),
        )

    async def export_days(self, ledger: str, table: str | None = None) -> tuple[set[str], set[str]]:
        """(days with an object of ``table``'s deliveries, days with one not yet confirmed
        loaded): what the completeness check may judge. ``ledger``: where the stream's batches
        are recorded (a logical group's name; default the table's). Quarantined objects do not
        count."""
        table = table or ledger
        rows = await self._fetch(
            "reading the days of the exported objects",
            self._q(
                "SELECT o->>'day' AS day, bool_and(d.status = 'loaded') AS loaded"
                " FROM {schema}.deliveries d, jsonb_array_elements(d.objects) o"
                " WHERE (d.ledger, d.table_name) IN ((%s, %s), (%s, %s), (%s, %s))"
                " AND o->>'quarantine' IS NULL GROUP BY 1"
            ),
            (ledger, ledger, ledger, table, table, table),
        )
        days = {str(r["day"]) for r in rows}
        return days, {str(r["day"]) for r in rows if not r["loaded"]}
