"""Every log line at warning or error asks the operator to act: each of the reconciler's is
provoked here, and a healthy run of a ``shop`` group (three tables, the local warehouse's pipes
and merge tasks running alongside) emits none of them."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from cdc_daemon.cli import init
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.reconcile.reconciler import Reconciler
from cdc_daemon.warehouse.client import Warehouse
from cdc_daemon.warehouse.sql import Statement
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, running_daemon, wait_until
from tests.integration.test_status_counts import SHOP, SYNC, create_shop, shop_settings

pytestmark = pytest.mark.usefixtures("drop_slots")

LOUD = ("warning", "error", "critical")


def loud(logs: Sequence[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e.get("log_level") in LOUD]


def make_shop(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, workdir: Path, mode: str
) -> LocalWarehouse:
    create_shop(pg_dsn)
    if mode == "logical":
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for t in SHOP:
                conn.execute(f"ALTER TABLE {t} REPLICA IDENTITY FULL")
    return start_warehouse(shop_settings(pg_dsn, s3_server, bucket, tmp_path, mode), workdir)


@pytest.fixture
def watermark_shop(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> Iterator[LocalWarehouse]:
    wh = make_shop(pg_dsn, s3_server, bucket, tmp_path, warehouse_dir, "watermark")
    yield wh
    wh.stop()


@pytest.fixture
def logical_shop(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> Iterator[LocalWarehouse]:
    wh = make_shop(pg_dsn, s3_server, bucket, tmp_path, warehouse_dir, "logical")
    yield wh
    wh.stop()


def test_the_merge_task_never_makes_a_stream_look_missing(watermark_shop: LocalWarehouse) -> None:
    """SHOW STREAMS (the reconciler's session) lists every stream at every moment while the
    merge tasks run and read their streams (the task runner, in another session): a stream's
    read never removes it for an instant, as in Snowflake, where it always exists."""
    stop = threading.Event()

    def merge_tasks() -> None:
        while not stop.is_set():
            watermark_shop.run_tasks()

    runner = threading.Thread(target=merge_tasks)
    wh = Warehouse.of_group(watermark_shop.settings).connect()
    runner.start()
    try:
        seen: list[tuple[str, Any]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            seen += wh.streams()
    finally:
        stop.set()
        runner.join()
        wh.close()
    assert len(seen) > 100
    assert [name for name, status in seen if status is None] == []


async def test_stream_missing_is_logged_only_for_a_stream_that_is_gone(
    watermark_shop: LocalWarehouse,
) -> None:
    """A dropped stream is an error naming it and the fix (``stream_missing``), every round;
    the other streams, and a round before the drop, log nothing at warning or error."""
    settings = watermark_shop.settings
    assert await init(settings) == 0
    reconciler = Reconciler(settings)
    try:
        with capture_logs() as logs:
            await reconciler.run_once()
        assert loud(logs) == []
        watermark_shop.drop_stream("RAW_ORDERS_STREAM")
        with capture_logs() as logs:
            outcome = await reconciler.run_once()
        (missing,) = loud(logs)
        assert (missing["event"], missing["log_level"]) == ("stream_missing", "error")
        assert missing["stream"] == "RAW_ORDERS_STREAM"
        assert "snowflake apply" in missing["hint"]
        assert sorted(s.name for s in outcome.streams) == [
            "RAW_CUSTOMERS_STREAM",
            "RAW_ORDER_LINES_STREAM",
        ]
    finally:
        await reconciler.close()


async def test_a_refresh_is_the_reconcilers_own_business_a_missing_batch_is_not(
    watermark_shop: LocalWarehouse, s3_client: Any
) -> None:
    """Objects not in the load history after missing_after_s: the reconciler asks the pipe to
    look again, logged at info with the number of files and at most three names (the
    operator has nothing to do yet); still not loaded after as long again, the batch is
    ``missing``, an error naming it. Nothing else is logged at warning or error."""
    settings = watermark_shop.settings
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    watermark_shop.drop_notifications()
    bucket = settings.s3.bucket
    for item in s3_client.list_objects_v2(Bucket=bucket, Prefix="shop.orders/")["Contents"]:
        s3_client.delete_object(Bucket=bucket, Key=item["Key"])
    reconciler = Reconciler(settings)
    try:
        with capture_logs() as logs:
            await reconciler.run_once(now=datetime.now(UTC) + timedelta(seconds=61))
        refreshes = [e for e in logs if e["event"] == "pipe_refresh_requested"]
        assert len(refreshes) == 3
        assert {e["log_level"] for e in refreshes} == {"info"}
        orders = next(e for e in refreshes if e["batch_id"] == "start-00000000000000000030")
        assert orders["files"] == 3
        assert len(orders["first_files"]) <= 3
        assert loud(logs) == []
        watermark_shop.pump_until_quiet()
        with capture_logs() as logs:
            await reconciler.run_once(now=datetime.now(UTC) + timedelta(seconds=122))
        assert [(e["event"], e["log_level"]) for e in loud(logs)] == [("batch_missing", "error")]
    finally:
        await reconciler.close()


async def test_a_healthy_run_logs_nothing_at_warning_or_error(
    logical_shop: LocalWarehouse, pg_dsn: str
) -> None:
    """A logical group of three tables, its snapshot then inserts, updates and deletes, with
    the pipes and merge tasks running and the reconciler confirming every delivery: no line
    at warning or error, from the daemon or the reconciler."""
    settings = logical_shop.settings.model_copy(
        update={
            "snowflake": logical_shop.settings.snowflake.model_copy(
                update={"reconcile_interval_s": 0.2}
            )
        }
    )
    assert await init(settings) == 0
    stop = threading.Event()
    pump = threading.Thread(target=logical_shop.pump_forever, args=(stop, 0.05))

    def confirmed(deliveries: int) -> Callable[[], bool]:
        def check() -> bool:
            with psycopg.connect(pg_dsn) as conn:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE status <> 'loaded'), count(*)"
                    " FROM cdc.deliveries"
                ).fetchone()
            return row is not None and row[0] == 0 and row[1] >= deliveries

        return check

    with capture_logs() as logs:
        pump.start()
        try:
            async with running_daemon(settings):
                await wait_until(confirmed(3), 120)  # the snapshot: a chunk per table
                with psycopg.connect(pg_dsn, options=SYNC, autocommit=True) as conn:
                    conn.execute("INSERT INTO shop.customers (name) VALUES ('new')")
                    conn.execute("UPDATE shop.orders SET amount = amount + 1 WHERE id < 5")
                    conn.execute("DELETE FROM shop.order_lines WHERE id > 55")
                await wait_until(confirmed(4), 120)  # and the stream's batch
                await asyncio.sleep(2)  # more reconciler rounds while the tasks run
        finally:
            stop.set()
            pump.join()
    assert [e["event"] for e in logs if e["event"] == "reconciled"]
    assert loud(logs) == []


async def test_a_paused_pipe_a_short_load_and_a_ledger_without_health_are_reported(
    watermark_shop: LocalWarehouse, s3_client: Any, pg_dsn: str
) -> None:
    """A paused pipe is a warning naming it (``pipe_not_running``) and no other pipe; an
    object Snowflake loaded with fewer rows than the ledger recorded fails its batch, an error
    naming it (``batch_load_failed``); a ledger without the table of the warehouse's health
    (``init`` not run since) is a warning once (``warehouse_health_not_saved``), not every
    round. The other batches are confirmed with nothing logged at warning or error."""
    settings = watermark_shop.settings
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    bucket = settings.s3.bucket
    (item,) = s3_client.list_objects_v2(Bucket=bucket, Prefix="shop.customers/")["Contents"]
    body = gzip.decompress(s3_client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
    short = body[: body.rstrip(b"\n").rfind(b"\n") + 1]
    s3_client.put_object(Bucket=bucket, Key=item["Key"], Body=gzip.compress(short))
    watermark_shop.pump_until_quiet()
    reconciler = Reconciler(settings)
    try:
        with capture_logs() as logs:
            outcome = await reconciler.run_once()
        assert [(e["event"], e["log_level"], e["batch_id"]) for e in loud(logs)] == [
            ("batch_load_failed", "error", "start-00000000000000000012")
        ]
        assert len(outcome.loaded) == 2
        watermark_shop.wh.dialect.execute_ddl(
            watermark_shop.wh,
            Statement("50_pipe.sql", "ALTER PIPE RAW_ORDERS_PIPE SET PIPE_EXECUTION_PAUSED = TRUE"),
        )
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE cdc.warehouse_health")
        events = []
        for _ in range(2):
            with capture_logs() as logs:
                await reconciler.run_once()
            events += [(e["event"], e["log_level"], e.get("pipe")) for e in loud(logs)]
        assert events == [
            ("pipe_not_running", "warning", "RAW_ORDERS_PIPE"),
            ("warehouse_health_not_saved", "warning", None),
            ("pipe_not_running", "warning", "RAW_ORDERS_PIPE"),
        ]
    finally:
        await reconciler.close()
