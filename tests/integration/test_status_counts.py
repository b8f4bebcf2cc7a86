"""``status`` and the demo's summary count what the group exported, whoever produced it, on a
``shop`` schema of three tables in watermark and in logical mode through the local warehouse."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from cdc_daemon.capture.backfill import parse_request, run_backfill
from cdc_daemon.cli import init, reconcile_once
from cdc_daemon.config import Settings
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.ops.status import collect, render
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, make_settings

pytestmark = pytest.mark.usefixtures("drop_slots")

SYNC = "-c synchronous_commit=on"
SHOP = ("shop.customers", "shop.orders", "shop.order_lines")


def create_shop(dsn: str) -> None:
    """Three tables: 12 customers, 30 orders over 3 days, 60 order lines (no date column)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA shop")
        conn.execute(
            "CREATE TABLE shop.customers (id bigserial PRIMARY KEY, name text,"
            " joined_at timestamptz NOT NULL DEFAULT '2024-01-01')"
        )
        conn.execute(
            "CREATE TABLE shop.orders (id bigserial PRIMARY KEY, customer_id bigint,"
            " amount numeric(12, 2), ordered_at timestamptz NOT NULL)"
        )
        conn.execute(
            "CREATE TABLE shop.order_lines (id bigserial PRIMARY KEY, order_id bigint,"
            " sku text, quantity int)"
        )
        conn.execute(
            "INSERT INTO shop.customers (name) SELECT 'c' || g FROM generate_series(1, 12) g"
        )
        conn.execute(
            "INSERT INTO shop.orders (customer_id, amount, ordered_at) SELECT g % 12 + 1, g * 1.5,"
            " '2024-03-01'::timestamptz + (g % 3) * interval '1 day' FROM generate_series(1, 30) g"
        )
        conn.execute(
            "INSERT INTO shop.order_lines (order_id, sku, quantity) SELECT g % 30 + 1,"
            " 'sku' || g, g FROM generate_series(1, 60) g"
        )


def shop_settings(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, mode: str
) -> Settings:
    return make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[
            {"name": "shop.customers", "partition_column": "joined_at"},
            {"name": "shop.orders", "partition_column": "ordered_at"},
            {"name": "shop.order_lines"},
        ],
        # One snapshot range per table: with more, a table autovacuum has analyzed meanwhile
        # (its 60 rows pass the analyze threshold) would be cut in two and add a chunk.
        capture={"mode": mode, "group": "shop", "snapshot_jobs": 1},
        batch={"max_rows": 1000},
        snowflake={"missing_after_s": 60},
    )


@pytest.fixture(params=["watermark", "logical"])
def shop(
    request: pytest.FixtureRequest,
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    tmp_path: Path,
    warehouse_dir: Path,
) -> Iterator[LocalWarehouse]:
    create_shop(pg_dsn)
    if request.param == "logical":
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for t in SHOP:
                conn.execute(f"ALTER TABLE {t} REPLICA IDENTITY FULL")
    settings = shop_settings(pg_dsn, s3_server, bucket, tmp_path, request.param)
    wh = start_warehouse(settings, warehouse_dir)
    yield wh
    wh.stop()


def s3_objects(s3_client: Any, bucket: str) -> dict[str, int]:
    """Objects per table folder in the bucket."""
    out: dict[str, int] = {}
    for item in s3_client.list_objects_v2(Bucket=bucket).get("Contents", []):
        folder = item["Key"].split("/", 1)[0]
        out[folder] = out.get(folder, 0) + 1
    return out


async def test_status_counts_every_object_and_row_the_group_exported(
    shop: LocalWarehouse, pg_dsn: str, s3_client: Any
) -> None:
    """After the first export (watermark batches, or a logical group's snapshot chunks), one
    more change (a stream batch) and in watermark mode a backfill of one day of one table:
    ``status --json`` counts every delivery by status and
    every row and object in S3, in total, per producer and per table, equal to the source's
    rows and the bucket's objects; the human form heads the group with its own name, says
    how far behind it is with no ``?`` or ``None`` (bytes of WAL in logical mode), and shows
    the warehouse as the exit round of ``--exit-when-idle`` saw it."""
    settings = shop.settings
    logical = settings.capture.mode == "logical"
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with psycopg.connect(pg_dsn, options=SYNC, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO shop.orders (customer_id, amount, ordered_at) VALUES (1, 2, now())"
        )
    assert await export_until_idle(settings) == 0
    backfilled = 0
    if not logical:
        # A backfill of one day of orders: its chunk counts with the table's batches.
        orders = settings.for_table(settings.table_specs[1])
        request = parse_request("2024-03-01", "2024-03-02", jobs="1")
        assert await run_backfill(orders, request, io.StringIO()) == 0
    report = await collect(settings, slot=settings.slot_name if logical else None)
    json.dumps(report)  # what `status --json` prints
    if not logical:
        (run,) = report["shop.orders"]["backfill_runs"]
        backfilled = run["rows"]
        assert backfilled == 10
        assert report["shop.orders"]["producers"]["backfill"]["rows"] == backfilled
    objects = s3_objects(s3_client, settings.s3.bucket)
    rows = {"shop.customers": 12, "shop.orders": 31 + backfilled, "shop.order_lines": 60}
    entries = [report["shop"]] if logical else [report[t] for t in SHOP]
    assert sum(t["rows"] for t in entries) == sum(rows.values())
    assert sum(t["objects"] for t in entries) == sum(objects.values())
    tables = {k: v for t in entries for k, v in t["exported_tables"].items()}
    assert {k: v["rows"] for k, v in tables.items()} == rows
    assert {k: v["objects"] for k, v in tables.items()} == objects
    assert all(t["batches"] == {"uploaded": sum(t["batches"].values())} for t in entries)
    if logical:
        (shop_report,) = entries
        producers = shop_report["producers"]
        assert set(producers) == {"batch", "join"}
        assert producers["join"]["rows"] == 102  # the snapshot: every row there was
        assert producers["join"]["deliveries"] == {"uploaded": 3}  # a chunk per table
        assert producers["batch"]["rows"] == 1
        assert shop_report["behind"]["slot_lag_bytes"] is not None
        assert "slot_lag_s" in shop_report["behind"]  # None: no consumer connected now
    else:
        assert [t["behind"]["rows"] for t in entries] == [0, 0, 0]
    text = render(report)
    print(text)
    assert "None" not in text
    assert "?" not in text
    assert text.splitlines()[0] == (
        "shop  (logical mode)" if logical else "shop  (watermark mode, 3 tables)"
    )
    assert "not checked yet" not in text
    assert ("snapshot chunks" if logical else "backfill chunks") in text
    if logical:
        assert "of WAL" in text or "caught up" in text


async def test_exit_when_idle_reconciles_once_before_it_exits(
    shop: LocalWarehouse, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``run --exit-when-idle`` with a warehouse: its last act is a reconciler round. Run
    before Snowpipe loaded anything, it says in one line how many deliveries await
    confirmation and how to check; run again once the objects are loaded, it confirms every
    delivery of every table (each table's ledger in watermark mode, the group's in logical
    mode) and says nothing of the kind, and ``status`` and ``reconcile --once`` count them all
    loaded."""
    settings = shop.settings
    logical = settings.capture.mode == "logical"
    assert await init(settings) == 0
    with capture_logs() as logs:
        assert await export_until_idle(settings) == 0
    (waiting,) = [e for e in logs if e["event"] == "batches_awaiting_confirmation"]
    # Every delivery of the run (a loaded machine may cut the logical snapshot in more chunks).
    with psycopg.connect(pg_dsn) as conn:
        (uploaded,) = conn.execute(
            "SELECT count(*) FROM cdc.deliveries WHERE status = 'uploaded'"
        ).fetchone() or (0,)
    assert waiting["batches"] == uploaded >= 3
    assert "cdc-daemon reconcile --once" in waiting["hint"]
    assert not [e for e in logs if e.get("log_level") in ("warning", "error")]
    shop.pump_until_quiet()
    with capture_logs() as logs:
        assert await export_until_idle(settings) == 0
    assert not [e for e in logs if e["event"] == "batches_awaiting_confirmation"]
    report = await collect(settings, slot=settings.slot_name if logical else None)
    entries = [report["shop"]] if logical else [report[t] for t in SHOP]
    assert [t["batches"] for t in entries] == (
        [{"loaded": uploaded}] if logical else [{"loaded": 1}] * 3
    )
    assert f"uploaded 0  loaded {uploaded}" in render(report)
    # ``reconcile --once`` counts the same deliveries (the snapshot's chunks too).
    capsys.readouterr()
    assert await reconcile_once(settings, False, True) == 0
    counted = json.loads(capsys.readouterr().out)["batches"]
    assert sum(c.get("loaded", 0) for c in counted.values()) == uploaded
