"""Postgres -> daemon -> S3 (moto) -> SQS -> pipe stand-in -> RAW_SALES -> tasks -> SALES,
INVOICES, PRODUCTS in the local warehouse (the real connector against fakesnow), and the
reconciler that confirms every batch from the load history."""

from __future__ import annotations

import gzip
import json
import random
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from cdc_daemon.capture.backfill import parse_request, run_backfill
from cdc_daemon.cli import init
from cdc_daemon.cli import status as status_command
from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3, free_port
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.ops.status import collect, render
from cdc_daemon.reconcile.reconciler import Reconciler
from cdc_daemon.state.ledger import Status
from cdc_daemon.state.store import Store
from cdc_daemon.warehouse.evolve import record_columns
from tests.fix_warehouse import start_warehouse
from tests.helpers import (
    export_until_idle,
    init_ledger,
    make_settings,
    running_daemon,
    wait_until,
)
from tests.warehouse_checks import assert_warehouse_equals_source

TABLE = "public.ecommerce_sales"
# Logical mode reads flushed WAL: writers commit synchronously (see test_logical.py).
SYNC = "-c synchronous_commit=on"


def _runs(dsn: str) -> list[tuple[str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT run_id FROM cdc.backfill_runs").fetchall()


async def statuses(settings: Any) -> dict[str, Status]:
    store = await Store.from_settings(settings)
    try:
        return {b.batch_id: b.status for b in await store.batches(TABLE)}
    finally:
        await store.close()


@pytest.fixture
def warehouse(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> Any:
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        batch={"max_rows": 1_500},
        snowflake={"missing_after_s": 60},
    )
    wh = start_warehouse(settings, warehouse_dir)
    yield wh
    wh.stop()


async def test_watermark_export_arrives_in_sales_invoices_products(
    pg_dsn: str, warehouse: LocalWarehouse
) -> None:
    """Every row of the source is in SALES; INVOICES and PRODUCTS equal the aggregates Postgres
    computes from the source; every batch is `loaded`; no day differs, and a row lost in SALES
    is reported on its day with the totals it was in."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 5_000, days=20)
    assert await export_until_idle(warehouse.settings) == 0
    warehouse.pump_until_quiet()
    assert_warehouse_equals_source(pg_dsn, warehouse)
    reconciler = Reconciler(warehouse.settings)
    try:
        outcome = await reconciler.run_once()
        assert outcome.pipe is not None
        assert outcome.pipe.healthy
        assert len(outcome.loaded) == 4
        assert set((await statuses(warehouse.settings)).values()) == {Status.LOADED}
        assert await reconciler.completeness() == []
        # A row lost in the warehouse: its day is reported, with both counts and the totals
        # the row was in (its quantity and unit price among them).
        warehouse.query("DELETE FROM SALES WHERE ID = 100")
        (day,) = await reconciler.completeness()
        with psycopg.connect(pg_dsn) as conn:
            expected = conn.execute(
                "SELECT to_char(invoice_date AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
                " FROM ecommerce_sales WHERE id = 100"
            ).fetchone()
        assert expected is not None
        assert (day.table, day.day) == (TABLE, expected[0])
        assert day.source_rows == day.warehouse_rows + 1
        assert {"count(id)", "sum(quantity)", "sum(unit_price)"} <= set(day.differing)
    finally:
        await reconciler.close()


async def test_more_rows_and_a_second_merge_keep_aggregates_right(
    pg_dsn: str, warehouse: LocalWarehouse
) -> None:
    """Rows of invoices and products already merged arrive in a later batch: only the touched
    keys are recomputed, and they come out right; loading the same objects again (a second
    notification, a refresh) changes nothing."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 4_000, days=8)
    assert await export_until_idle(warehouse.settings) == 0
    warehouse.pump_until_quiet()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ecommerce_sales (invoice_no, stock_code, description, quantity,"
            " invoice_date, unit_price, customer_id, country)"
            " SELECT invoice_no, stock_code, 'NEW ' || coalesce(description, ''), quantity + 1,"
            " invoice_date + interval '1 hour', unit_price, customer_id, country"
            " FROM ecommerce_sales WHERE id % 7 = 0"
        )
    assert await export_until_idle(warehouse.settings) == 0
    warehouse.pump_until_quiet()
    warehouse.wh.refresh(
        "public.ecommerce_sales/dt="
    )  # every object again: all skipped as already loaded
    warehouse.pump_until_quiet()
    assert_warehouse_equals_source(pg_dsn, warehouse)


async def test_an_object_loaded_short_is_failed(
    pg_dsn: str, warehouse: LocalWarehouse, s3_client: Any
) -> None:
    """An object that lost its last row before Snowpipe loaded it: the reconciler finds fewer
    rows in the load history than the ledger recorded and marks that batch failed, saying so;
    every other batch is marked loaded."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 3_000, days=5)
    settings = warehouse.settings
    assert await export_until_idle(settings) == 0
    # One object loses its last line before Snowpipe reads it.
    key = next(
        o["Key"]
        for o in s3_client.list_objects_v2(Bucket=settings.s3.bucket)["Contents"]
        if o["Key"].endswith(".csv.gz")
    )
    body = gzip.decompress(s3_client.get_object(Bucket=settings.s3.bucket, Key=key)["Body"].read())
    short = body[: body.rstrip(b"\n").rfind(b"\n") + 1]
    s3_client.put_object(Bucket=settings.s3.bucket, Key=key, Body=gzip.compress(short))
    warehouse.pump_until_quiet()
    reconciler = Reconciler(settings)
    try:
        outcome = await reconciler.run_once()
    finally:
        await reconciler.close()
    (failed,) = outcome.failed
    assert "rows, the ledger says" in failed[1]
    after = await statuses(settings)
    assert after[failed[0]] is Status.FAILED
    assert sum(s is Status.LOADED for s in after.values()) == len(after) - 1


async def test_an_object_naming_a_column_the_landing_table_lacks_is_failed_with_why(
    pg_dsn: str, warehouse: LocalWarehouse
) -> None:
    """A column dropped from RAW_SALES by hand while the ledger still records it: the pipe
    loads the next objects by name, leaving that column out with status Loaded and the full
    row count (as Snowflake does). The reconciler does not confirm them: each such batch is
    failed with a header_mismatch naming the table and the column, while the batches loaded
    before the drop stay loaded."""
    settings = warehouse.settings
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 1_000, days=2)
    assert await export_until_idle(settings) == 0
    warehouse.pump_until_quiet()
    reconciler = Reconciler(settings)
    try:
        first = await reconciler.run_once()
        assert first.loaded
        assert not first.failed
        record_columns(settings, warehouse.tables[0])  # the ledger: every column applied
        warehouse.query("ALTER TABLE RAW_SALES DROP COLUMN DESCRIPTION")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            generate_sales(conn, 1_000, days=2, seed=0.7)
        assert await export_until_idle(settings) == 0
        warehouse.pump_until_quiet()
        second = await reconciler.run_once()
    finally:
        await reconciler.close()
    assert second.failed
    assert not second.loaded
    for _, reason in second.failed:
        assert "header_mismatch: RAW_SALES has no column description" in reason
    after = await statuses(settings)
    assert {after[b] for b in first.loaded} == {Status.LOADED}
    assert {after[b] for b, _ in second.failed} == {Status.FAILED}


async def test_a_load_in_progress_keeps_its_batch_waiting_until_loaded(
    pg_dsn: str, warehouse: LocalWarehouse
) -> None:
    """COPY_HISTORY shows each file as "Load in progress" (a partial ROW_COUNT, ROW_PARSED
    NULL) before "Loaded": the real reconciler fails no batch for the partial count and keeps
    them waiting, then marks every batch loaded once the history says Loaded."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 2_000, days=3)
    settings = warehouse.settings
    assert await export_until_idle(settings) == 0
    warehouse.load_rounds = 2
    assert warehouse.ingest() > 0
    history = warehouse.query("SELECT DISTINCT STATUS FROM _EMU_COPY_HISTORY")
    assert [r["STATUS"] for r in history] == ["Load in progress"]
    reconciler = Reconciler(settings)
    try:
        during = await reconciler.run_once()
        assert during.failed == []
        assert during.loaded == []
        assert during.waiting == len(await statuses(settings))
        warehouse.pump_until_quiet()
        after = await reconciler.run_once()
    finally:
        await reconciler.close()
    assert after.failed == []
    assert set((await statuses(settings)).values()) == {Status.LOADED}


async def test_lost_notifications_are_refreshed_once_then_missing(
    pg_dsn: str, warehouse: LocalWarehouse, s3_client: Any
) -> None:
    """Notifications lost: after missing_after_s the reconciler asks the pipe to refresh the
    batch's objects (once) and they load. An object gone from S3 stays unseen: `missing`."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 3_000, days=3)
    settings = warehouse.settings
    assert await export_until_idle(settings) == 0
    warehouse.drop_notifications()
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=settings.s3.bucket)["Contents"]]
    gone = max(keys)
    s3_client.delete_object(Bucket=settings.s3.bucket, Key=gone)
    reconciler = Reconciler(settings)
    later = datetime.now(UTC) + timedelta(seconds=61)
    try:
        first = await reconciler.run_once()
        assert (first.loaded, first.refreshed, first.waiting) == ([], [], 2)
        second = await reconciler.run_once(now=later)
        assert len(second.refreshed) == 2
        warehouse.pump_until_quiet()
        third = await reconciler.run_once()
        assert len(third.loaded) == 1
        assert third.waiting == 1
        fourth = await reconciler.run_once(now=datetime.now(UTC) + timedelta(seconds=61))
        assert fourth.refreshed == []  # only once
        (missing,) = fourth.missing
        assert gone.rsplit("/", 2)[-2] in missing[1]
    finally:
        await reconciler.close()
    assert sorted(map(str, (await statuses(settings)).values())) == ["loaded", "missing"]


async def test_applying_the_sql_again_changes_nothing(
    pg_dsn: str, warehouse: LocalWarehouse
) -> None:
    """Applying snowflake/ again to a warehouse that has loaded batches reloads nothing and loses
    nothing: RAW_SALES keeps its row count and the final tables still equal the source."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 2_000, days=4)
    assert await export_until_idle(warehouse.settings) == 0
    warehouse.pump_until_quiet()
    before = warehouse.query("SELECT COUNT(*) AS N FROM RAW_SALES")
    warehouse.apply()
    warehouse.pump_until_quiet()
    assert warehouse.query("SELECT COUNT(*) AS N FROM RAW_SALES") == before
    assert_warehouse_equals_source(pg_dsn, warehouse)


@pytest.mark.parametrize("outage", ["refused", "silent"])
async def test_snowflake_down_never_stops_export(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    tmp_path: Path,
    warehouse_dir: Path,
    outage: str,
) -> None:
    """The daemon runs with Snowflake unreachable (connections refused, or accepted and never
    answered: timeouts): every batch is exported all the same, the reconciler logs its
    failures and backs off. When Snowflake comes back (with the S3 notifications of those
    objects lost), the reconciler has the pipe refresh them and confirms every batch."""
    port = free_port()
    silent = socket.create_server(("127.0.0.1", port)) if outage == "silent" else None
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        batch={"max_rows": 1_000},
        snowflake={
            "account": "fakesnow",
            "user": "fake",
            "password": "snow",
            "host": "127.0.0.1",
            "port": port,
            "protocol": "http",
            "dialect": "emulator",
            "database": f"T_DOWN_{outage.upper()}",
            "login_timeout_s": 1,
            "query_timeout_s": 5,
            "socket_timeout_s": 1,
            "reconcile_interval_s": 0.2,
            "missing_after_s": 1,
        },
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 3_000, days=3)

    def ledger() -> dict[str, str]:
        with psycopg.connect(pg_dsn) as conn:
            return dict(conn.execute("SELECT batch_id, status FROM cdc.batches").fetchall())

    wh: LocalWarehouse | None = None
    try:
        with capture_logs() as logs:
            async with running_daemon(settings):
                await wait_until(lambda: len(ledger()) == 3 and "pending" not in ledger().values())
                await wait_until(
                    lambda: sum(e["event"] == "reconcile_failed" for e in logs) >= 2, seconds=60
                )
                assert set(ledger().values()) == {"uploaded"}
                if silent is not None:
                    silent.close()
                started = start_warehouse(
                    settings, warehouse_dir, port=port, database=f"T_DOWN_{outage.upper()}"
                )
                wh = started
                await wait_until(
                    lambda: (started.pump(), set(ledger().values()) == {"loaded"})[1], seconds=120
                )
                assert_warehouse_equals_source(pg_dsn, started)
    finally:
        # After the daemon stopped (it reconciles until then); the silent socket too, if
        # the test failed before it made way for the warehouse.
        if silent is not None:
            silent.close()
        if wh is not None:
            wh.stop()
    events = [e["event"] for e in logs]
    assert "reconcile_recovered" in events
    assert "pipe_refresh_requested" in events


async def test_a_backfill_refreshes_rows_updated_in_place(
    pg_dsn: str, warehouse: LocalWarehouse
) -> None:
    """Watermark capture cannot see an update in place; a backfill of the day re-reads the row
    at the same _cdc_seq and a later _cdc_ts, and the merge takes the later read: SALES,
    INVOICES and PRODUCTS equal the source again."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 3_000, days=6)
    assert await export_until_idle(warehouse.settings) == 0
    warehouse.pump_until_quiet()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        (day,) = conn.execute(
            "UPDATE ecommerce_sales SET quantity = quantity + 100, description = 'FIXED'"
            " WHERE id IN (10, 11) RETURNING (invoice_date AT TIME ZONE 'UTC')::date"
        ).fetchone() or (None,)
    assert day is not None
    request = parse_request(str(day), str(day + timedelta(days=1)), jobs="1")
    assert await run_backfill(warehouse.settings, request) == 0
    warehouse.pump_until_quiet()
    assert_warehouse_equals_source(pg_dsn, warehouse)
    # The reconciler confirms the backfill's chunk as it does the daemon's batches.
    reconciler = Reconciler(warehouse.settings)
    try:
        outcome = await reconciler.run_once()
    finally:
        await reconciler.close()
    assert [b for b in outcome.loaded if b.startswith("backfill-")] == [
        f"backfill-{run}-{day}" for (run,) in _runs(pg_dsn)
    ]
    (shown,) = (await collect(warehouse.settings))[TABLE]["backfill_runs"]
    assert (shown["days_done"], shown["days_loaded"]) == (1, 1)


@pytest.mark.usefixtures("drop_slots")
async def test_logical_inserts_updates_deletes_arrive_in_sales(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    tmp_path: Path,
    warehouse_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Logical mode: the initial snapshot, then random inserts, updates (of the quantity, of the
    invoice, of the day: a row moves to another day's object) and deletes in many transactions.
    SALES equals the source, INVOICES and PRODUCTS its aggregates, every batch is `loaded`.
    (The sales table has TOASTable columns: logical mode requires REPLICA IDENTITY FULL.)"""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 3_000, days=6)
        conn.execute("ALTER TABLE ecommerce_sales REPLICA IDENTITY FULL")
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        capture={"mode": "logical"},
        batch={"max_rows": 500},
        snowflake={"missing_after_s": 60},
    )
    wh = start_warehouse(settings, warehouse_dir)
    try:
        assert await init(wh.settings) == 0
        assert await export_until_idle(wh.settings) == 0  # the initial snapshot
        rng = random.Random(7)
        with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
            for _ in range(60):
                with conn.transaction():
                    ids = rng.sample(range(1, 3_001), 8)
                    conn.execute(
                        "UPDATE ecommerce_sales SET quantity = quantity + 1,"
                        " description = 'CHANGED ' || id WHERE id = ANY(%s)",
                        (ids[:3],),
                    )
                    conn.execute(
                        "UPDATE ecommerce_sales SET invoice_date = invoice_date + interval '2 days'"
                        " WHERE id = %s",
                        (ids[3],),
                    )
                    conn.execute(
                        "UPDATE ecommerce_sales SET invoice_no = 'C' || invoice_no WHERE id = %s",
                        (ids[4],),
                    )
                    conn.execute("DELETE FROM ecommerce_sales WHERE id = ANY(%s)", (ids[5:7],))
                    conn.execute(
                        "INSERT INTO ecommerce_sales (invoice_no, stock_code, description,"
                        " quantity, invoice_date, unit_price, customer_id, country)"
                        " SELECT invoice_no, stock_code, 'COPY', 2, invoice_date, unit_price,"
                        " customer_id, country FROM ecommerce_sales WHERE id = %s",
                        (ids[7],),
                    )
        assert await export_until_idle(wh.settings) == 0
        wh.pump_until_quiet()
        ops = {r["OP"] for r in wh.query("SELECT DISTINCT _CDC_OP AS OP FROM RAW_SALES")}
        assert ops == {"I", "U", "D"}
        assert_warehouse_equals_source(pg_dsn, wh)
        reconciler = Reconciler(wh.settings)
        try:
            await reconciler.run_once()
        finally:
            await reconciler.close()
        assert set((await statuses(wh.settings)).values()) == {Status.LOADED}
        with psycopg.connect(pg_dsn) as conn:
            chunks = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE status = 'loaded')"
                " FROM cdc.deliveries WHERE producer = 'join'"
            ).fetchone()
        # The snapshot's chunks are reconciled too.
        assert chunks is not None
        assert chunks[0] > 0
        assert chunks[0] == chunks[1]
        # `status` in logical mode: the slot's lag, the batches as the ledger has them.
        capsys.readouterr()
        assert await status_command(wh.settings, as_json=True) == 0
        shown = json.loads(capsys.readouterr().out)[TABLE]
        assert shown["mode"] == "logical"
        assert shown["behind"]["slot_lag_bytes"] is not None
        # Every delivery: the stream's batches and the snapshot's chunks.
        stream = len(await statuses(wh.settings))
        assert shown["producers"]["batch"]["deliveries"]["loaded"] == stream
        assert shown["batches"]["loaded"] == stream + chunks[0]
    finally:
        wh.stop()


async def test_completeness_judges_only_days_whose_objects_are_confirmed_loaded(
    pg_dsn: str, warehouse: LocalWarehouse
) -> None:
    """A day whose objects Snowflake has not confirmed yet is not judged (no ``day_incomplete``
    for a load still on its way); once the reconciler has marked them loaded, each day with
    rows missing from SALES is reported, one day_incomplete line per day."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 2_000, days=5)
    assert await export_until_idle(warehouse.settings) == 0
    warehouse.pump_until_quiet()
    # Rows removed from SALES on two days (three rows of one day, one of the other).
    days = warehouse.query(
        "SELECT TO_DATE(INVOICE_DATE) AS D, MIN(ID) AS LO, MAX(ID) AS HI FROM SALES"
        " GROUP BY 1 ORDER BY 1 LIMIT 2"
    )
    first, second = days
    warehouse.query(
        f"DELETE FROM SALES WHERE ID IN (SELECT ID FROM SALES WHERE TO_DATE(INVOICE_DATE) ="
        f" '{first['D']}' ORDER BY ID LIMIT 3) OR ID = {int(second['HI'])}"
    )
    reconciler = Reconciler(warehouse.settings)
    try:
        with capture_logs() as logs:
            assert await reconciler.completeness() == []
        assert not [e for e in logs if e["event"] == "day_incomplete"]
        (checked,) = [e for e in logs if e["event"] == "completeness_checked"]
        assert checked["days"] == 0
        assert checked["not_judged_yet"] > 0
        await reconciler.run_once()
        assert set((await statuses(warehouse.settings)).values()) == {Status.LOADED}
        with capture_logs() as logs:
            found = await reconciler.completeness()
        assert [(d.day, d.source_rows - d.warehouse_rows) for d in found] == [
            (str(first["D"]), 3),
            (str(second["D"]), 1),
        ]
        # One line per day.
        lines = [e["day"] for e in logs if e["event"] == "day_incomplete"]
        assert lines == [str(first["D"]), str(second["D"])]
    finally:
        await reconciler.close()


async def test_a_failing_merge_task_is_suspended_and_reported(
    pg_dsn: str, warehouse: LocalWarehouse
) -> None:
    """A merge that fails ten runs in a row is suspended (SUSPEND_TASK_AFTER_NUM_FAILURES) and
    SALES stops changing while the load history keeps saying ``Loaded``: the reconciler reports
    the task as failing, then as not running, with its last error, in the log and in
    ``status``; resumed and fixed, it is healthy again."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 500, days=2)
    assert await export_until_idle(warehouse.settings) == 0
    warehouse.ingest()
    warehouse.query("ALTER TABLE SALES_TOUCHED RENAME TO SALES_TOUCHED_GONE")
    merge = "MERGE_SALES"
    reconciler = Reconciler(warehouse.settings)
    try:
        warehouse.run_tasks()
        with capture_logs() as logs:
            outcome = await reconciler.run_once()
        (task,) = [t for t in outcome.tasks if t.name == merge]
        assert (task.state, task.consecutive_failures) == ("started", 1)
        assert task.last_error is not None
        assert [e["event"] for e in logs if e.get("task") == merge] == ["task_failing"]
        for _ in range(9):
            warehouse.run_tasks()
        with capture_logs() as logs:
            outcome = await reconciler.run_once()
        (task,) = [t for t in outcome.tasks if t.name == merge]
        assert (task.state, task.consecutive_failures) == ("suspended", 10)
        (event,) = [e for e in logs if e.get("task") == merge]
        assert event["event"] == "task_not_running"
        # status shows it too, from what the reconciler saved in the ledger
        report = (await collect(warehouse.settings))[TABLE]
        (saved,) = [t for t in report["warehouse"]["tasks"] if t["name"] == merge]
        assert (saved["state"], saved["consecutive_failures"]) == ("suspended", 10)
        assert f"task {merge}" in render({TABLE: report})
        assert "suspended, 10 failed run(s) in a row" in render({TABLE: report})
        assert warehouse.run_tasks() == 0  # suspended: no run at all
        assert warehouse.query("SELECT COUNT(*) AS N FROM SALES")[0]["N"] == 0
        warehouse.query("ALTER TABLE SALES_TOUCHED_GONE RENAME TO SALES_TOUCHED")
        warehouse.resume_task(merge)
        assert warehouse.run_tasks() == 500
        outcome = await reconciler.run_once()
        assert all(t.healthy for t in outcome.tasks)
    finally:
        await reconciler.close()


async def test_a_stream_near_or_past_staleness_is_reported(warehouse: LocalWarehouse) -> None:
    """A stream that will go stale within snowflake.stream_stale_warn_days is warned about
    (``stream_stale_soon``); a stale one is an error (``stream_stale``); a stream read recently
    is neither."""
    await init_ledger(warehouse.settings)
    reconciler = Reconciler(warehouse.settings)
    try:
        with capture_logs() as logs:
            await reconciler.run_once()
        assert not [e for e in logs if str(e["event"]).startswith("stream_")]
        now = datetime.now(UTC)
        warehouse.age_stream(now + timedelta(days=1))
        with capture_logs() as logs:
            await reconciler.run_once()
        assert [e["event"] for e in logs if str(e["event"]).startswith("stream_")] == [
            "stream_stale_soon"
        ]
        warehouse.age_stream(now - timedelta(minutes=1))
        with capture_logs() as logs:
            outcome = await reconciler.run_once()
        assert outcome.streams
        assert outcome.streams[0].stale
        assert [e["event"] for e in logs if str(e["event"]).startswith("stream_")] == [
            "stream_stale"
        ]
    finally:
        await reconciler.close()
