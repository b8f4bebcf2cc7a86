"""Faults while the daemon runs: lost connections, S3 down, hostile text. Nothing is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]  # boto3 ships no type hints
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_daemon.errors import TransientError
from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3
from tests.helpers import (
    assert_rebuilt_equals_source,
    export_until_idle,
    fetch_one,
    make_settings,
    object_bodies,
    running_daemon,
    wait_until,
)


def exported_rows(s3_client: Any, bucket: str) -> int:
    return sum(b.count(b"\n") - 1 for b in object_bodies(s3_client, bucket).values())


def pending_attempts(dsn: str) -> int:
    """The attempts recorded on the pending batch (1 for its intent record, one more for each
    failed try), 0 while there is none."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT max(attempts) FROM cdc.batches WHERE status = 'pending'")
        found = row.fetchone()
    return int(found[0]) if found and found[0] is not None else 0


async def test_terminated_connections_are_retried(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """pg_terminate_backend on every daemon session: it reconnects (and takes its lock again),
    keeps exporting, and nothing is lost."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 100, days=1)
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path, daemon={"retry_max_wait_s": 0.5})
    async with running_daemon(settings):
        await wait_until(lambda: exported_rows(s3_client, bucket) == 100)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name LIKE 'cdc-daemon%%' AND datname = current_database())"
                " k"
            ).fetchone()
            assert killed is not None
            assert killed[0] >= 2
            generate_sales(conn, 50, days=1)
        await wait_until(lambda: exported_rows(s3_client, bucket) == 150)
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


async def test_s3_outage_is_waited_out(
    pg_dsn: str, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The S3 server goes away while rows arrive and comes back: the batch stays pending (the
    watermark does not move), is retried with backoff, and lands once S3 is back."""
    own = LocalS3().start()
    client = boto3.client("s3", endpoint_url=own.endpoint_url, region_name="us-east-1")
    client.create_bucket(Bucket="outage")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 10, days=1)
    settings = make_settings(
        pg_dsn,
        own,
        "outage",
        tmp_path,
        daemon={"retry_max_wait_s": 0.5, "retry_attempts": 100},
    )
    try:
        async with running_daemon(settings) as daemon:
            await wait_until(lambda: exported_rows(client, "outage") == 10)
            own.stop()
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                generate_sales(conn, 20, days=1)
            # The intent record, then two failed uploads noted on it: retried, still pending.
            await wait_until(lambda: pending_attempts(pg_dsn) >= 3)
            assert not daemon.done()
            with psycopg.connect(pg_dsn) as conn:
                pending = conn.execute("SELECT count(*) FROM cdc.batches WHERE status = 'pending'")
                assert pending.fetchone() == (1,)
                assert conn.execute("SELECT high FROM cdc.positions").fetchone() == (10,)
            # moto keeps its state in the process, so the restarted server still has the bucket.
            own = LocalS3(port=own.port).start()
            await wait_until(lambda: exported_rows(client, "outage") == 30)
    finally:
        own.stop()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT status, sum(rows) FROM cdc.batches GROUP BY 1").fetchall() == [
            ("uploaded", 30)
        ]


text_values = st.one_of(
    st.none(),
    st.just(""),
    st.text(
        alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
        max_size=60,
    ),
    st.sampled_from(['"', '""', ",", "\r\n", "\n", "\r", "\\", "\t", "NULL", "\\N", " a "]),
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(values=st.lists(st.tuples(text_values, text_values), min_size=1, max_size=20))
async def test_hostile_text_survives(
    values: list[tuple[str | None, str | None]],
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    """Any text (quotes, commas, CR/LF, backslashes, tabs, any plane of Unicode, empty vs
    NULL) in a nullable and a NOT NULL column comes back from the objects unchanged. Each
    example adds rows and re-exports; the whole table is compared every time."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 0)
        conn.execute("ALTER TABLE ecommerce_sales ALTER COLUMN country DROP NOT NULL")
        for description, country in values:
            conn.execute(
                "INSERT INTO ecommerce_sales (invoice_no, stock_code, description, quantity,"
                " invoice_date, unit_price, country) VALUES ('1', 'S', %s, 1, now(), 1, %s)",
                (description, country),
            )
    await export_until_idle(make_settings(pg_dsn, s3_server, bucket, tmp_path))
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


async def test_s3_errors_and_timeouts_are_retried(
    pg_dsn: str, s3_server: LocalS3, s3_proxy: Any, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """S3 answering 503 SlowDown, 500 InternalError and not answering at all (timeouts): the
    daemon retries with backoff, records the failed attempts on the pending batch, recovers,
    and every row lands exactly once."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 100, days=1)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        s3={"endpoint_url": s3_proxy.endpoint_url, "timeout_s": 1},
        daemon={"retry_max_wait_s": 0.2, "retry_attempts": 50},
    )
    s3_proxy.fail_next(3, 503, "SlowDown")  # even the startup check is retried
    async with running_daemon(settings):
        await wait_until(lambda: exported_rows(s3_client, bucket) == 100, seconds=60)
        s3_proxy.fail_next(6, 503, "SlowDown")
        s3_proxy.fail_next(6, 500, "InternalError")
        s3_proxy.delay_next(4, 3.0)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            generate_sales(conn, 100, days=1)
        await wait_until(lambda: exported_rows(s3_client, bucket) == 200, seconds=120)
    assert s3_proxy.injected == 19
    with psycopg.connect(pg_dsn) as conn:
        attempts, error = fetch_one(
            conn.execute(
                "SELECT attempts, error FROM cdc.batches WHERE status = 'uploaded' ORDER BY hi DESC"
            )
        )
    assert attempts > 1  # the failed attempts were recorded on the batch
    assert error is None  # and cleared when it finally committed
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


async def test_postgres_restart_is_waited_out(
    pg_dsn: str, local_pg: Any, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The source server restarts under the running daemon: it reconnects, takes its lock
    again, and exports what was committed before and after."""
    if local_pg is None:
        pytest.skip("CDC_TEST_PG_DSN points at a server this test must not restart")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 50, days=1)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        daemon={"retry_max_wait_s": 0.5, "retry_attempts": 60},
    )
    async with running_daemon(settings):
        await wait_until(lambda: exported_rows(s3_client, bucket) == 50)
        await asyncio.to_thread(local_pg.restart)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            generate_sales(conn, 25, days=1)
        await wait_until(lambda: exported_rows(s3_client, bucket) == 75)
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


async def test_persistent_failure_marks_the_batch_failed_then_recovers(
    pg_dsn: str, s3_server: LocalS3, s3_proxy: Any, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """S3 keeps failing past the retry limit (an outage, so ``outage_max_s``: by default one
    is waited out): the daemon marks the batch failed with S3's answer and exits with the
    error; the position does not move. Started again once S3 is healthy, it redoes that batch
    first and nothing is lost."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 50, days=1)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        s3={"endpoint_url": s3_proxy.endpoint_url},
        daemon={"retry_max_wait_s": 0.05, "retry_attempts": 3, "outage_max_s": 0.5},
    )
    async with running_daemon(settings) as daemon:
        await wait_until(lambda: exported_rows(s3_client, bucket) == 50)
        s3_proxy.fail_next(1000, 503, "SlowDown")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            generate_sales(conn, 30, days=1)
        with pytest.raises(TransientError, match="SlowDown"):
            await daemon.ended(60)
    with psycopg.connect(pg_dsn) as conn:
        failed = conn.execute(
            "SELECT status, error, attempts FROM cdc.batches WHERE status <> 'uploaded'"
        ).fetchall()
        high = conn.execute("SELECT high FROM cdc.positions").fetchone()
    assert len(failed) == 1
    assert failed[0][0] == "failed"
    assert "SlowDown" in failed[0][1]
    assert failed[0][2] >= 3
    assert high == (50,)
    s3_proxy.failures.clear()
    async with running_daemon(settings):
        await wait_until(lambda: exported_rows(s3_client, bucket) == 80)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT DISTINCT status FROM cdc.batches").fetchall() == [("uploaded",)]
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
