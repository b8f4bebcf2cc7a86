"""A ledger written by schema 3 (three confirmation ledgers: ``batches``, ``join_chunks``,
``backfill_chunks``) upgraded in place by ``init`` to the one ledger of deliveries."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
from psycopg.rows import dict_row

from cdc_daemon.config import Settings, load_settings
from cdc_daemon.errors import StateError
from cdc_daemon.reconcile.reconciler import Reconciler
from cdc_daemon.state.backfill import BackfillLedger
from cdc_daemon.state.joins import join_chunk_name
from cdc_daemon.state.ledger import Status, batch_id
from cdc_daemon.state.store import SCHEMA_VERSION, Store
from cdc_daemon.warehouse.client import LoadRecord, PipeStatus, Warehouse

V3 = Path(__file__).parent / "data" / "ledger_v3.sql"
TABLE = "public.ecommerce_sales"
GROUP = "shop"


def rows(dsn: str, query: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return conn.execute(query).fetchall()


@pytest.fixture
def v3_ledger(pg_dsn: str) -> str:
    """The database of ``pg_dsn`` with the schema-3 ledger of ``data/ledger_v3.sql``."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(V3.read_text())
        conn.execute("SELECT pg_catalog.set_config('search_path', 'public', false)")
    return pg_dsn


@dataclass
class LoadedWarehouse:
    """A warehouse whose pipe loaded every object it is told of (``loaded``), with the row
    count the ledger has: what the reconciler reads of Snowflake, and nothing else."""

    loaded: dict[str, int]
    names: list[Any] = field(default_factory=list)

    def pipe_statuses(self) -> list[PipeStatus]:
        return []

    def tasks(self) -> list[Any]:
        return []

    def streams(self) -> list[Any]:
        return []

    def load_history(self, since: datetime) -> list[LoadRecord]:
        at = datetime.now(UTC)
        return [LoadRecord(f, "loaded", n, n, None, at) for f, n in self.loaded.items()]

    def refresh(self, name: str) -> None:
        raise AssertionError(f"{name} was loaded: no refresh is needed")

    def close(self) -> None:
        pass


def settings(dsn: str, **capture: Any) -> Settings:
    return load_settings(
        None,
        postgres={"dsn": dsn, "table": TABLE},
        capture={"partition_column": "invoice_date", **capture},
        s3={"bucket": "b", "prefix": "raw"},
    )


async def test_a_schema_3_ledger_is_upgraded_in_place_and_loses_nothing(v3_ledger: str) -> None:
    """``init`` upgrades a schema-3 ledger: every stream batch, snapshot chunk and backfill
    chunk, pending or in S3, becomes a delivery with the same objects, counts, checksum,
    ``_cdc_ts``, attempts, error, status and times; the producers' tables keep their own part
    (a batch's range and spec, a chunk's keys and attempt, a backfill day's estimate); the
    version is the current one, and a second ``init`` changes nothing."""
    dsn = v3_ledger
    batches = rows(dsn, "SELECT * FROM cdc.batches ORDER BY batch_id")
    joins = rows(dsn, "SELECT * FROM cdc.join_chunks ORDER BY part, chunk")
    chunks = rows(dsn, "SELECT * FROM cdc.backfill_chunks ORDER BY day")
    assert {b["status"] for b in batches} == {"loaded", "uploaded", "missing", "pending"}
    assert {(j["status"], j["load_status"]) for j in joins} == {
        ("uploaded", "loaded"),
        ("uploaded", None),
        ("pending", None),
    }
    assert [(c["status"], c["load_status"]) for c in chunks] == [
        ("uploaded", "loaded"),
        ("uploaded", None),
        ("pending", None),
        ("planned", None),
    ]

    store = await Store.connect(dsn, "cdc")
    try:
        await store.init_schema()
        await store.check_schema(logical=True)
        upgraded = rows(dsn, "SELECT * FROM cdc.deliveries ORDER BY producer, producer_id")
        await store.init_schema()
        assert rows(dsn, "SELECT * FROM cdc.deliveries ORDER BY producer, producer_id") == upgraded
        pending = await store.pending(TABLE)
    finally:
        await store.close()
    assert rows(dsn, "SELECT value FROM cdc.meta") == [{"value": str(SCHEMA_VERSION)}]
    assert SCHEMA_VERSION == 6
    # Schema 5 adds hash_salts (hash_columns), empty until a table hashes a column.
    assert rows(dsn, "SELECT * FROM cdc.hash_salts") == []
    # Schema 6 adds group_tables.partitions: NULL (leaves not looked at yet) for every table.
    assert rows(dsn, "SELECT DISTINCT partitions FROM cdc.group_tables") in (
        [],
        [{"partitions": None}],
    )

    # Stream batches: the view ``batches`` shows every column as it was.
    assert rows(dsn, "SELECT * FROM cdc.batches ORDER BY batch_id") == batches
    assert len(rows(dsn, "SELECT * FROM cdc.stream_batches")) == len(batches)
    (redo,) = pending
    (was,) = [b for b in batches if b["status"] == "pending"]
    assert (redo.batch_id, redo.lo, redo.hi, redo.read_ts) == (
        batch_id(300, 400),
        300,
        400,
        was["read_ts"],
    )
    assert (redo.attempts, redo.error, redo.state_after.low) == (3, "SlowDown", 400)
    assert [o.as_json() for o in redo.objects] == was["objects"]

    # Snapshot chunks: their delivery has what the chunk had; the chunk keeps its keys.
    delivered = {d["name"]: d for d in upgraded if d["producer"] == "join"}
    assert len(delivered) == len(joins)
    for j in joins:
        d = delivered[join_chunk_name(j["seq"], j["part"], j["chunk"], j["attempt"])]
        assert (d["ledger"], d["table_name"], d["status"], d["attempts"]) == (
            j["group_name"],
            j["table_name"],
            j["load_status"] or j["status"],
            j["attempt"],
        )
        for column in ("rows", "raw_bytes", "size", "objects", "checksum", "read_ts"):
            assert d[column] == j[column], column
        for column in ("created_at", "uploaded_at", "loaded_at", "refreshed_at"):
            assert d[column] == j[column], column
    assert rows(dsn, "SELECT * FROM cdc.join_chunks ORDER BY part, chunk") == [
        {k: j[k] for k in ("group_name", "table_name", "seq", "part", "chunk", "attempt")}
        | {"after_key": j["after_key"], "last_key": j["last_key"], "created_at": j["created_at"]}
        for j in joins
    ]

    # Backfill chunks: the run reads as it did; the planned day has no delivery yet.
    ledger = await BackfillLedger.open(dsn, "cdc", "test")
    try:
        run = await ledger.run("r1")
    finally:
        await ledger.close()
    assert [
        (c.day, c.status, c.rows_estimate, c.read_ts, c.checksum, c.rows, c.objects, c.attempts)
        for c in run.chunks
    ] == [
        (
            c["day"],
            c["status"],
            c["rows_estimate"],
            c["read_ts"],
            c["checksum"],
            c["rows"],
            len(c["objects"] or []),
            c["attempts"],
        )
        for c in chunks
    ]
    backfilled = [d for d in upgraded if d["producer"] == "backfill"]
    assert [(d["status"], d["error"], d["loaded_at"] is not None) for d in backfilled] == [
        ("loaded", None, True),
        ("uploaded", None, False),
        ("pending", "SlowDown", False),
    ]
    for d, c in zip(backfilled, chunks, strict=False):
        for column in ("rows", "raw_bytes", "size", "objects", "checksum", "read_ts"):
            assert d[column] == c[column], column
        assert d["uploaded_at"] == c["uploaded_at"]


async def test_the_reconciler_confirms_an_upgraded_ledger(v3_ledger: str) -> None:
    """After the upgrade, one reconciler path confirms the deliveries in S3 of every producer
    (stream batches and backfill chunks of the table; in logical mode the group's snapshot
    chunks too), and the pending ones complete through the unit of work's path: the batch's
    commit moves the position to its spec's, the backfill chunk's has no position to move."""
    dsn = v3_ledger
    store = await Store.connect(dsn, "cdc")
    try:
        await store.init_schema()
        in_s3 = rows(
            dsn,
            "SELECT producer, name, ledger, objects FROM cdc.deliveries"
            " WHERE status IN ('uploaded', 'missing')",
        )
        loaded = {
            o["key"].removeprefix("raw/"): o["rows"]
            for d in in_s3
            for o in d["objects"]
            if not o["quarantine"]
        }
        for config, ledger_name in (
            (settings(dsn), TABLE),
            (settings(dsn, mode="logical", group=GROUP), GROUP),
        ):
            warehouse = cast(Warehouse, LoadedWarehouse(loaded))
            reconciler = Reconciler(config, warehouse=warehouse)
            try:
                outcome = await reconciler.run_once()
            finally:
                await reconciler.close()
            assert sorted(outcome.loaded) == sorted(
                d["name"] for d in in_s3 if d["ledger"] == ledger_name
            )
        confirmed = "SELECT DISTINCT status FROM cdc.deliveries WHERE uploaded_at IS NOT NULL"
        assert rows(dsn, confirmed) == [{"status": "loaded"}]

        (batch,) = await store.pending(TABLE)
        await store.record(batch.delivery, lambda: store.intent(batch))
        await store.commit(batch.delivery, lambda: store.advance(batch))
        assert (await store.position(TABLE, "watermark")).position == 400
    finally:
        await store.close()
    ledger = await BackfillLedger.open(dsn, "cdc", "test")
    try:
        run = await ledger.run("r1")
        (chunk,) = [c for c in run.chunks if c.status == "pending"]
        assert chunk.day == date(2011, 1, 3)
    finally:
        await ledger.close()
    statuses = rows(dsn, "SELECT status, count(*) AS n FROM cdc.batches GROUP BY 1")
    assert {r["status"]: r["n"] for r in statuses} == {"loaded": 3, "uploaded": 1}
    assert Status.LOADED.value == "loaded"


# A delivery of the repair producer, which a schema-4 ledger's check constraint refuses.
REPAIR_DELIVERY = (
    "INSERT INTO cdc.deliveries (ledger, producer, producer_id, name, table_name, status, rows,"
    " raw_bytes, size, objects, checksum, read_ts) VALUES ('t', 'repair', 'r/t', 'repair-r', 't',"
    " 'pending', 0, 0, 0, '[]', '', '2026-01-01T00:00:00Z')"
)


async def test_a_schema_4_ledger_accepts_repair_deliveries_after_init(pg_dsn: str) -> None:
    """A schema-4 ledger (its deliveries know the producers batch, join and backfill) gains
    the repair producer at ``init`` (schema 5), its deliveries untouched; a second ``init``
    changes nothing."""
    store = await Store.connect(pg_dsn, "cdc")
    try:
        await store.init_schema()
    finally:
        await store.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "ALTER TABLE cdc.deliveries DROP CONSTRAINT deliveries_producer_check;"
            " ALTER TABLE cdc.deliveries ADD CONSTRAINT deliveries_producer_check"
            " CHECK (producer IN ('batch', 'join', 'backfill'));"
            " UPDATE cdc.meta SET value = '4' WHERE key = 'schema_version'"
        )
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(REPAIR_DELIVERY)
    for _ in range(2):
        store = await Store.connect(pg_dsn, "cdc")
        try:
            await store.init_schema()
        finally:
            await store.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(REPAIR_DELIVERY)
    assert rows(pg_dsn, "SELECT value FROM cdc.meta") == [{"value": str(SCHEMA_VERSION)}]


async def test_a_schema_5_ledger_gets_group_partitions_at_init(pg_dsn: str) -> None:
    """A schema 5 ledger (group_tables without ``partitions``): a logical start refuses it with
    the command that fixes it; ``init`` adds the column, NULL for the tables already there
    (their other state untouched), and a second ``init`` changes nothing."""
    store = await Store.connect(pg_dsn, "cdc")
    try:
        await store.init_schema()
    finally:
        await store.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "ALTER TABLE cdc.group_tables DROP COLUMN partitions;"
            " UPDATE cdc.meta SET value = '5' WHERE key = 'schema_version';"
            " INSERT INTO cdc.group_tables (group_name, table_name, status, since, seq)"
            " VALUES ('shop', 'public.t', 'streaming', 100, 90)"
        )
    store = await Store.connect(pg_dsn, "cdc")
    try:
        with pytest.raises(StateError, match="cdc-daemon init"):
            await store.check_schema(logical=True)
        for _ in range(2):
            await store.init_schema()
        await store.check_schema(logical=True)
        (table,) = await store.group_tables("shop")
    finally:
        await store.close()
    assert (table.status, table.since, table.seq, table.partitions) == ("streaming", 100, 90, None)
    assert rows(pg_dsn, "SELECT value FROM cdc.meta") == [{"value": str(SCHEMA_VERSION)}]
