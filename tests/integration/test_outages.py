"""Outages of S3 and PostgreSQL under the default retry limits (only the waits shortened): the
daemon waits them out, says what is down and since when, resumes within seconds of the
service's return, loses and doubles nothing, marks no batch failed, and leaves no spool folder
behind."""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]  # boto3 ships no type hints
import psycopg
import pytest
from structlog.testing import capture_logs

from cdc_daemon.cli import init
from cdc_daemon.config import DaemonSettings
from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalPostgres, LocalS3, free_port
from tests.fix_warehouse import start_warehouse
from tests.helpers import (
    assert_rebuilt_equals_source,
    make_settings,
    object_bodies,
    running_daemon,
    wait_until,
)
from tests.integration.test_logical import random_changes, sales
from tests.integration.test_stream import flush_lsn, ledger_at_least, stream_pid

DEFAULT_ATTEMPTS = DaemonSettings().retry_attempts


def own_bucket(s3_client: Any) -> str:
    """A bucket of this test's own: moto's state is shared by every server of the process, so
    a name another test used would hold that test's objects too."""
    name = f"outage-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


def exported_rows(s3_client: Any, bucket: str) -> int:
    return sum(b.count(b"\n") - 1 for b in object_bodies(s3_client, bucket).values())


def attempts_failed(logs: list[MutableMapping[str, Any]]) -> int:
    return sum(e["event"] == "step_failed" for e in logs)


def spool_folders(spool_dir: Path) -> list[str]:
    return sorted(p.name for p in spool_dir.glob("cdc-batch-*"))


def batches(dsn: str) -> list[tuple[str, int, int, str | None]]:
    """(status, rows, attempts, error) of every stream batch, in order."""
    with psycopg.connect(dsn) as conn:
        return [
            (str(s), int(r), int(a), e)
            for s, r, a, e in conn.execute(
                "SELECT status, rows, attempts, error FROM cdc.batches ORDER BY hi"
            ).fetchall()
        ]


def pending(dsn: str) -> tuple[int, str | None] | None:
    """(attempts, error) of the pending batch, if there is one."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT attempts, error FROM cdc.batches WHERE status = 'pending'"
        ).fetchone()
    return None if row is None else (int(row[0]), row[1])


def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as answer:
        return answer.code, json.loads(answer.read())


def stop_postgres(server: LocalPostgres) -> None:
    """Stop the cluster, keeping its folder (``restart`` starts it again, with its options)."""
    server._pg_ctl("-m", "fast", "-w", "stop")


async def test_an_s3_outage_is_waited_out_with_the_default_limits(
    pg_dsn: str, tmp_path: Path
) -> None:
    """S3 goes away for longer than the default ``retry_attempts`` (8) lasts: the daemon
    keeps the batch pending (the position does not move) and keeps retrying; /healthz answers
    200 ``degraded`` naming S3 and since when, /readyz 503, the pending batch's reason says S3
    is unavailable since when. Once S3 is back the batch lands within seconds, the log's
    attempt count and the ledger's agree, every row is in S3 exactly once, no batch is
    failed, the daemon stops with 0, and no spool folder is left behind."""
    own = LocalS3().start()
    client = boto3.client("s3", endpoint_url=own.endpoint_url, region_name="us-east-1")
    bucket = own_bucket(client)
    port = free_port()
    spool = tmp_path / "spool"
    spool.mkdir()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 10, days=1)
    settings = make_settings(
        pg_dsn,
        own,
        bucket,
        spool,
        daemon={"retry_max_wait_s": 0.5},
        http={"address": f"127.0.0.1:{port}"},
    )
    assert settings.daemon.retry_attempts == DEFAULT_ATTEMPTS
    assert settings.daemon.outage_max_s == 0
    try:
        with capture_logs() as logs:
            async with running_daemon(settings) as daemon:
                await wait_until(lambda: exported_rows(client, bucket) == 10)
                own.stop()
                with psycopg.connect(pg_dsn, autocommit=True) as conn:
                    generate_sales(conn, 20, days=1)
                await wait_until(lambda: (pending(pg_dsn) or (0, None))[1] is not None)
                status, health = await asyncio.to_thread(get, port, "/healthz")
                assert (status, health["status"], list(health["down"])) == (200, "degraded", ["s3"])
                since = health["down"]["s3"]["since"]
                ready, readiness = await asyncio.to_thread(get, port, "/readyz")
                assert (ready, list(readiness["down"])) == (503, ["s3"])
                # Each attempt takes a few seconds (botocore's own retries, then the backoff).
                await wait_until(
                    lambda: (pending(pg_dsn) or (0, None))[0] > DEFAULT_ATTEMPTS + 1, seconds=120
                )
                assert not daemon.done()
                found = pending(pg_dsn)
                assert found is not None
                _, error = found
                assert error is not None
                assert error.startswith(f"s3 unavailable since {since}: ")
                with psycopg.connect(pg_dsn) as conn:
                    assert conn.execute("SELECT high FROM cdc.positions").fetchone() == (10,)
                # moto keeps its state in the process: the restarted server has the bucket.
                own = LocalS3(port=own.port).start()
                back_at = time.monotonic()
                await wait_until(lambda: exported_rows(client, bucket) == 30)
                assert time.monotonic() - back_at < 10  # within seconds of its return
                await wait_until(lambda: get(port, "/healthz")[1]["status"] == "ok", seconds=5)
                assert (await asyncio.to_thread(get, port, "/healthz"))[1]["down"] == {}
        rows = exported_rows(client, bucket)
    finally:
        own.stop()
    failed = [e for e in logs if e["event"] == "step_failed"]
    recovered = [e for e in logs if e["event"] == "step_recovered"]
    assert len(failed) > DEFAULT_ATTEMPTS
    assert {e["service"] for e in failed} == {"s3"}
    assert [e["attempt"] for e in failed] == list(range(1, len(failed) + 1))
    assert [e["attempts"] for e in recovered] == [len(failed) + 1]
    # The batch that waited: attempted once per failure, plus the one that landed.
    assert batches(pg_dsn) == [("uploaded", 10, 1, None), ("uploaded", 20, len(failed) + 1, None)]
    assert rows == 30  # exactly once: no row twice
    assert spool_folders(spool) == []


async def test_a_postgres_outage_is_waited_out_with_the_default_limits(
    pg_dsn: str,
    local_pg: LocalPostgres | None,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    """PostgreSQL (source and ledger) stops for longer than the default ``retry_attempts``
    lasts, then starts again: the daemon waits it out (/healthz says postgres is down),
    reconnects, takes its lock again and exports what was committed before and after, each
    row once; no batch is failed and no spool folder is left behind."""
    if local_pg is None:
        pytest.skip("CDC_TEST_PG_DSN points at a server this test must not stop")
    port = free_port()
    spool = tmp_path / "spool"
    spool.mkdir()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 50, days=1)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        spool,
        daemon={"retry_max_wait_s": 0.5},
        http={"address": f"127.0.0.1:{port}"},
    )
    with capture_logs() as logs:
        async with running_daemon(settings) as daemon:
            await wait_until(lambda: exported_rows(s3_client, bucket) == 50)
            await asyncio.to_thread(stop_postgres, local_pg)
            try:

                def postgres_down() -> bool:
                    return "postgres" in get(port, "/healthz")[1]["down"]

                await wait_until(postgres_down)
                await wait_until(lambda: attempts_failed(logs) > DEFAULT_ATTEMPTS, seconds=40)
                assert not daemon.done()
            finally:
                await asyncio.to_thread(local_pg.restart)
            back_at = time.monotonic()
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                generate_sales(conn, 25, days=1)
            await wait_until(lambda: exported_rows(s3_client, bucket) == 75)
            assert time.monotonic() - back_at < 15
            assert (await asyncio.to_thread(get, port, "/healthz"))[1]["down"] == {}
    failures = [e for e in logs if e["event"] == "step_failed"]
    assert len(failures) > DEFAULT_ATTEMPTS
    assert "postgres" in {e["service"] for e in failures}
    assert {s for s, *_ in batches(pg_dsn)} == {"uploaded"}
    assert exported_rows(s3_client, bucket) == 75  # exactly once
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    assert spool_folders(spool) == []


@pytest.mark.usefixtures("drop_slots")
async def test_a_postgres_restart_is_waited_out_in_logical_mode_with_the_defaults(
    pg_dsn: str,
    local_pg: LocalPostgres | None,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    """Logical mode, default retry limits: PostgreSQL stops under the streaming daemon for
    longer than ``retry_attempts`` lasts and starts again; the stream is opened again at the
    ledger's position and every change committed before and after lands once (the objects
    rebuild the source); no batch is failed, no spool folder is left."""
    if local_pg is None:
        pytest.skip("CDC_TEST_PG_DSN points at a server this test must not stop")
    spool = tmp_path / "spool"
    spool.mkdir()
    sales(pg_dsn, 30)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        spool,
        capture={"mode": "logical", "heartbeat_s": 0.2},
        batch={"max_rows": 500},
        daemon={"retry_max_wait_s": 0.5},
    )
    assert await init(settings) == 0
    rng = random.Random(29)
    with capture_logs() as logs:
        async with running_daemon(settings) as daemon:
            await wait_until(lambda: stream_pid(pg_dsn) is not None)
            random_changes(pg_dsn, rng, 4)
            await asyncio.to_thread(stop_postgres, local_pg)
            try:
                await wait_until(lambda: attempts_failed(logs) > DEFAULT_ATTEMPTS, seconds=40)
                assert not daemon.done()
            finally:
                await asyncio.to_thread(local_pg.restart)
            random_changes(pg_dsn, rng, 4)
            end = flush_lsn(pg_dsn)
            await wait_until(lambda: ledger_at_least(pg_dsn, end))
    assert {s for s, *_ in batches(pg_dsn)} <= {"uploaded", "loaded"}
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    assert spool_folders(spool) == []


async def test_a_stop_during_an_outage_is_prompt_and_loses_nothing(
    pg_dsn: str, tmp_path: Path
) -> None:
    """SIGTERM while S3 is down: the daemon does not wait for S3 (nor for the whole grace
    period): it stops within seconds with 0, the batch stays pending with its reason, the
    position unmoved, and no spool folder is left. Started again once S3 is back, it redoes
    that batch first: every row lands exactly once."""
    own = LocalS3().start()
    client = boto3.client("s3", endpoint_url=own.endpoint_url, region_name="us-east-1")
    bucket = own_bucket(client)
    spool = tmp_path / "spool"
    spool.mkdir()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 10, days=1)
    settings = make_settings(pg_dsn, own, bucket, spool, daemon={"shutdown_grace_s": 60})
    try:
        async with running_daemon(settings) as daemon:
            await wait_until(lambda: exported_rows(client, bucket) == 10)
            own.stop()
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                generate_sales(conn, 20, days=1)
            await wait_until(lambda: (pending(pg_dsn) or (0, None))[0] >= 3, seconds=60)
            started = time.monotonic()
            assert await daemon.stopped(30) == 0
            assert time.monotonic() - started < 15  # an attempt under way ends; no new one
        found = pending(pg_dsn)
        assert found is not None
        assert found[1] is not None
        assert found[1].startswith("s3 unavailable since ")
        with psycopg.connect(pg_dsn) as conn:
            assert conn.execute("SELECT high FROM cdc.positions").fetchone() == (10,)
        assert spool_folders(spool) == []
        own = LocalS3(port=own.port).start()
        async with running_daemon(settings):
            await wait_until(lambda: exported_rows(client, bucket) == 30)
        rows = exported_rows(client, bucket)
    finally:
        own.stop()
    assert rows == 30
    assert [s for s, *_ in batches(pg_dsn)] == ["uploaded", "uploaded"]
    assert spool_folders(spool) == []


@pytest.mark.usefixtures("drop_slots")
async def test_an_s3_outage_is_waited_out_in_logical_mode_with_the_defaults(
    pg_dsn: str, tmp_path: Path
) -> None:
    """Logical mode, default retry limits: S3 goes away while changes stream in, for longer
    than ``retry_attempts`` lasts. The batch stays pending (the slot is not advanced past
    it), each attempt reads it again from the slot, and once S3 is back every change lands
    once (the objects rebuild the source); the log's attempts and the ledger's agree, no batch
    is failed, no spool folder is left."""
    own = LocalS3().start()
    client = boto3.client("s3", endpoint_url=own.endpoint_url, region_name="us-east-1")
    bucket = own_bucket(client)
    spool = tmp_path / "spool"
    spool.mkdir()
    sales(pg_dsn, 30)
    settings = make_settings(
        pg_dsn,
        own,
        bucket,
        spool,
        capture={"mode": "logical", "heartbeat_s": 0.2},
        batch={"max_rows": 500},
        daemon={"retry_max_wait_s": 0.5},
    )
    assert await init(settings) == 0
    rng = random.Random(2929)
    try:
        with capture_logs() as logs:
            async with running_daemon(settings) as daemon:
                await wait_until(lambda: stream_pid(pg_dsn) is not None)
                random_changes(pg_dsn, rng, 4)
                await wait_until(lambda: ledger_at_least(pg_dsn, flush_lsn(pg_dsn)))
                own.stop()
                random_changes(pg_dsn, rng, 6)
                await wait_until(
                    lambda: (pending(pg_dsn) or (0, None))[0] > DEFAULT_ATTEMPTS + 1, seconds=120
                )
                assert not daemon.done()
                own = LocalS3(port=own.port).start()
                end = flush_lsn(pg_dsn)
                await wait_until(lambda: ledger_at_least(pg_dsn, end))
            assert_rebuilt_equals_source(pg_dsn, client, bucket)
    finally:
        own.stop()
    failed = [e for e in logs if e["event"] == "step_failed"]
    recovered = [e for e in logs if e["event"] == "step_recovered"]
    assert len(failed) > DEFAULT_ATTEMPTS
    assert {e["service"] for e in failed} == {"s3"}
    assert [e["attempts"] for e in recovered] == [len(failed) + 1]
    statuses = batches(pg_dsn)
    assert {s for s, *_ in statuses} == {"uploaded"}
    assert max(a for _, _, a, _ in statuses) == len(failed) + 1
    assert spool_folders(spool) == []


async def test_a_snowflake_outage_is_named_by_healthz_and_ends_with_it(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> None:
    """Snowflake refuses connections while the daemon runs: export goes on (every batch
    uploaded), /healthz answers 200 ``degraded`` naming snowflake and since when; once the
    warehouse is up, the reconciler confirms every batch and snowflake is no longer down."""
    sf_port, http_port = free_port(), free_port()
    database = f"T_OUT_{uuid.uuid4().hex[:8].upper()}"
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        batch={"max_rows": 1_000},
        http={"address": f"127.0.0.1:{http_port}"},
        snowflake={
            "account": "fakesnow",
            "user": "fake",
            "password": "snow",
            "host": "127.0.0.1",
            "port": sf_port,
            "protocol": "http",
            "dialect": "emulator",
            "database": database,
            "login_timeout_s": 1,
            "query_timeout_s": 5,
            "socket_timeout_s": 1,
            "reconcile_interval_s": 0.2,
            "missing_after_s": 1,
        },
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 2_000, days=2)

    def statuses() -> set[str]:
        return {s for s, *_ in batches(pg_dsn)}

    def snowflake_down() -> bool:
        return "snowflake" in get(http_port, "/healthz")[1]["down"]

    wh = None
    try:
        async with running_daemon(settings):
            await wait_until(lambda: statuses() == {"uploaded"})
            await wait_until(snowflake_down)
            status, health = await asyncio.to_thread(get, http_port, "/healthz")
            assert (status, health["status"]) == (200, "degraded")
            assert health["down"]["snowflake"]["since"].endswith("Z")
            wh = start_warehouse(settings, warehouse_dir, port=sf_port, database=database)
            started = wh
            await wait_until(lambda: (started.pump(), statuses() == {"loaded"})[1], seconds=120)
            await wait_until(lambda: not snowflake_down(), seconds=30)
    finally:
        if wh is not None:
            wh.stop()
