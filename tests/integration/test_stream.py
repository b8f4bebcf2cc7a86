"""Logical capture over the streaming replication protocol, against a real PostgreSQL: the
stream survives what a long-running session meets (a terminated walsender, a slow upload under
a short wal_sender_timeout, WAL written by others) without losing or doubling a change."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from cdc_daemon.cli import init
from cdc_daemon.local.services import LocalS3
from tests.helpers import (
    assert_rebuilt_equals_source,
    fetch_one,
    make_settings,
    running_daemon,
    wait_until,
)
from tests.integration.test_logical import SYNC, logical_settings, random_changes, sales

pytestmark = pytest.mark.usefixtures("drop_slots")

STREAM_PID = (
    "SELECT pid FROM pg_stat_replication WHERE application_name = 'cdc-daemon-stream'"
    " AND pid IN (SELECT active_pid FROM pg_replication_slots WHERE database = current_database())"
)


def stream_pid(dsn: str) -> int | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(STREAM_PID).fetchone()
    return int(row[0]) if row else None


def flush_lsn(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(fetch_one(conn.execute("SELECT pg_current_wal_flush_lsn() - '0/0'"))[0])


def ledger_at_least(dsn: str, lsn: int) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT high FROM cdc.positions WHERE table_name = 'public.ecommerce_sales'"
        ).fetchone()
    return row is not None and row[0] is not None and int(row[0]) >= lsn


def slot_confirmed(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(
            fetch_one(
                conn.execute(
                    "SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots"
                    " WHERE slot_name = 'cdc_public_ecommerce_sales'"
                )
            )[0]
        )


@pytest.fixture
def short_sender_timeout(pg_dsn: str) -> Iterator[None]:
    """wal_sender_timeout = 1s for the test (a server setting: reset afterwards)."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET wal_sender_timeout = '1s'")
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET wal_sender_timeout")
            conn.execute("SELECT pg_reload_conf()")


async def test_a_terminated_walsender_is_reconnected_and_nothing_is_lost(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The walsender serving the daemon's stream is terminated while changes flow: the daemon
    notices the broken stream, starts a new one at the ledger's position, and every change
    arrives: the objects rebuild the source exactly (a change read twice has one _cdc_seq)."""
    sales(pg_dsn, 50)
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path, heartbeat_s=0.2)
    assert await init(settings) == 0
    rng = random.Random(7)
    with capture_logs() as logs:
        async with running_daemon(settings):
            await wait_until(lambda: stream_pid(pg_dsn) is not None)
            random_changes(pg_dsn, rng, 5)
            first = stream_pid(pg_dsn)
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (first,))
            random_changes(pg_dsn, rng, 5)
            end = flush_lsn(pg_dsn)
            await wait_until(lambda: ledger_at_least(pg_dsn, end))
            assert stream_pid(pg_dsn) not in (None, first)
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    failures = [e for e in logs if e["event"] == "step_failed"]
    assert any("replication stream" in e["error"] for e in failures), failures
    assert any(e["event"] == "step_recovered" for e in logs)


@pytest.mark.usefixtures("short_sender_timeout")
async def test_status_updates_keep_the_stream_alive_while_a_batch_uploads(
    pg_dsn: str,
    s3_server: LocalS3,
    s3_proxy: Any,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    """With wal_sender_timeout = 1s, uploads held for 3 s each: nobody reads the stream while a
    batch uploads, yet the status updates sent meanwhile keep the walsender from dropping it:
    one stream for the whole run, and every change arrives."""
    sales(pg_dsn, 20)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        capture={"mode": "logical", "heartbeat_s": 0.2},
        batch={"max_rows": 500},
        s3={"endpoint_url": s3_proxy.endpoint_url},
    )
    assert await init(settings) == 0
    with capture_logs() as logs:
        async with running_daemon(settings):
            await wait_until(lambda: stream_pid(pg_dsn) is not None)
            first = stream_pid(pg_dsn)
            s3_proxy.delay_next(4, 3.0)
            random_changes(pg_dsn, random.Random(3), 4)
            end = flush_lsn(pg_dsn)
            await wait_until(lambda: ledger_at_least(pg_dsn, end))
            assert stream_pid(pg_dsn) == first
    assert s3_proxy.injected >= 1  # an upload was held past the timeout
    assert not [e for e in logs if e["event"] == "step_failed"]
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


async def test_wal_written_by_others_does_not_stay_pinned_by_an_idle_table(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The captured table is idle while another table takes writes: the keepalives' walEnd
    moves the position (ledger, then slot) past that WAL every heartbeat_s, so the slot
    holds none of it back, and no batch is written for it."""
    sales(pg_dsn, 10)
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path, heartbeat_s=0.2)
    assert await init(settings) == 0
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("CREATE TABLE other (id serial PRIMARY KEY, payload text)")
    with capture_logs() as logs:
        async with running_daemon(settings):
            await wait_until(lambda: stream_pid(pg_dsn) is not None)
            with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
                for _ in range(20):
                    conn.execute(
                        "INSERT INTO other (payload) SELECT repeat('x', 1000)"
                        " FROM generate_series(1, 200)"
                    )
            end = flush_lsn(pg_dsn)
            await wait_until(lambda: ledger_at_least(pg_dsn, end) and slot_confirmed(pg_dsn) >= end)
    batches = [e for e in logs if e["event"] == "batch_uploaded" and e["reason"] != "snapshot"]
    assert batches == []
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


async def test_wal_of_another_database_does_not_stay_pinned(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The source database is idle while another database of the cluster takes writes: the
    walsender reads that WAL too, its keepalives' walEnd passes it, and the slot moves past it
    every heartbeat_s: an idle source database pins no WAL."""
    sales(pg_dsn, 10)
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path, heartbeat_s=0.2)
    assert await init(settings) == 0
    other_db = f"{psycopg.conninfo.conninfo_to_dict(pg_dsn)['dbname']}_other"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{other_db}"')
    other_dsn = psycopg.conninfo.make_conninfo(pg_dsn, dbname=other_db)
    try:
        async with running_daemon(settings):
            await wait_until(lambda: stream_pid(pg_dsn) is not None)
            with psycopg.connect(other_dsn, autocommit=True, options=SYNC) as conn:
                conn.execute("CREATE TABLE t (payload text)")
                for _ in range(20):
                    conn.execute(
                        "INSERT INTO t SELECT repeat('x', 1000) FROM generate_series(1, 200)"
                    )
            end = flush_lsn(pg_dsn)
            await wait_until(lambda: ledger_at_least(pg_dsn, end) and slot_confirmed(pg_dsn) >= end)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{other_db}" WITH (FORCE)')
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


async def test_a_postgres_restart_is_waited_out_by_the_stream(
    pg_dsn: str, local_pg: Any, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The source server restarts under a streaming daemon: the stream breaks, the daemon
    reconnects (ledger, lock, a new stream at the ledger's position) and exports what was
    committed before and after, each change once: the objects rebuild the source."""
    if local_pg is None:
        pytest.skip("CDC_TEST_PG_DSN points at a server this test must not restart")
    sales(pg_dsn, 30)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        capture={"mode": "logical", "heartbeat_s": 0.2},
        batch={"max_rows": 500},
        daemon={"retry_max_wait_s": 0.5, "retry_attempts": 60},
    )
    assert await init(settings) == 0
    rng = random.Random(11)
    async with running_daemon(settings):
        await wait_until(lambda: stream_pid(pg_dsn) is not None)
        random_changes(pg_dsn, rng, 4)
        await asyncio.to_thread(local_pg.restart)
        random_changes(pg_dsn, rng, 4)
        end = flush_lsn(pg_dsn)
        await wait_until(lambda: ledger_at_least(pg_dsn, end))
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
