"""The daemon as a process: crash and restart, signals, the single-instance lock, user errors."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import psycopg

from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3
from tests.e2e.daemon import cli, daemon_process, stop_daemon, wait_for_event, write_config
from tests.helpers import assert_rebuilt_equals_source, object_bodies


def raw_objects(s3_client: Any, bucket: str) -> dict[str, bytes]:
    out = {}
    for item in s3_client.list_objects_v2(Bucket=bucket).get("Contents", []):
        out[item["Key"]] = s3_client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return out


def test_crash_between_upload_and_commit(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """Killed after S3 acknowledged a batch but before the ledger commit: the restart redoes
    the same range under the same keys with byte-identical objects; no row lost or doubled."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 3000, days=2)
    config = write_config(tmp_path, pg_dsn, s3_server, bucket, batch={"max_rows": 1000})
    assert cli(config, "init").returncode == 0

    crashed = cli(config, "run", "--exit-when-idle", CDCTEST_CRASH_AT="after_upload")
    assert crashed.returncode == 70, crashed.stderr
    first = raw_objects(s3_client, bucket)
    assert first
    assert all("start-00000000000000001000" in k for k in first)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT status FROM cdc.batches").fetchall() == [("pending",)]

    again = cli(config, "run", "--exit-when-idle")
    assert again.returncode == 0, again.stderr
    events = [json.loads(line) for line in again.stdout.splitlines()]
    assert any(e["event"] == "batch_redone" for e in events)
    after = raw_objects(s3_client, bucket)
    assert {k: after[k] for k in first} == first  # same keys, same bytes
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT status, count(*), sum(rows) FROM cdc.batches GROUP BY 1")
        assert rows.fetchall() == [("uploaded", 3, 3000)]
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    status = cli(config, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)["public.ecommerce_sales"]
    assert report["watermark"] == 3000
    assert report["batches"] == {"uploaded": 3}
    assert report["rows"] == 3000


def test_crash_after_intent_before_upload(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """Killed after the intent record, before any upload: the restart uploads that batch."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 500, days=2)
    config = write_config(tmp_path, pg_dsn, s3_server, bucket)
    assert cli(config, "init").returncode == 0
    assert cli(config, "run", "--exit-when-idle", CDCTEST_CRASH_AT="after_pending").returncode == 70
    assert raw_objects(s3_client, bucket) == {}
    assert cli(config, "run", "--exit-when-idle").returncode == 0
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


def test_sigterm_stops_gracefully_and_second_instance_is_refused(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A running daemon exports new rows as they come; a second daemon for the same table exits
    with a clear message; SIGTERM stops the first with exit 0 and everything exported."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 100, days=1)
    config = write_config(tmp_path, pg_dsn, s3_server, bucket)
    assert cli(config, "init").returncode == 0
    with daemon_process(config) as daemon:
        wait_for_event(daemon, "batch_uploaded")
        second = cli(config, "run")
        assert second.returncode == 5
        assert "already running" in second.stderr
        assert "Traceback" not in second.stderr
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            generate_sales(conn, 50, days=1)
        wait_for_event(daemon, "batch_uploaded")
        out, err = stop_daemon(daemon)
    assert daemon.returncode == 0, err
    assert '"daemon_stopped"' in out
    assert sum(b.count(b"\n") - 1 for b in object_bodies(s3_client, bucket).values()) == 150


def test_user_errors_are_one_sentence(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """Missing ledger, missing table, missing bucket, unreachable server: one line on stderr,
    a distinct non-zero exit code, no traceback."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 1)
    cases: list[tuple[dict[str, dict[str, Any]], int, str]] = [
        ({}, 4, "run `cdc-daemon init`"),
        ({"postgres": {"table": 'public."no; DROP TABLE x"'}}, 3, "does not exist"),
        ({"s3": {"bucket": "no-such-bucket"}}, 7, "bucket does not exist"),
        (
            {"postgres": {"dsn": "postgresql://u:pw-marker@127.0.0.1:1/x", "connect_timeout_s": 2}},
            6,
            "cannot connect",
        ),
    ]
    for extra, code, message in cases:
        config = write_config(tmp_path, pg_dsn, s3_server, bucket, **extra)
        if code != 4:
            cli(config, "init")
        result = cli(config, "run")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == code, (extra, result.stderr)
        assert len(lines) == 1, lines
        assert message in lines[0], lines
        assert "pw-marker" not in result.stderr + result.stdout


def test_shutdown_abandons_a_long_batch_within_grace(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """SIGTERM in the middle of a large batch with a short grace period: the daemon cancels the
    batch and exits 0 promptly; the next run exports everything, nothing lost or doubled. A
    second SIGTERM does not wait for any grace at all."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 400_000, days=1)
    config = write_config(
        tmp_path,
        pg_dsn,
        s3_server,
        bucket,
        batch={"max_rows": 1_000_000},
        daemon={"shutdown_grace_s": 0.2},
    )
    assert cli(config, "init").returncode == 0
    with daemon_process(config) as daemon:
        wait_for_event(daemon, "daemon_started")
        started = time.monotonic()
        out, err = stop_daemon(daemon)
    assert daemon.returncode == 0, err
    assert time.monotonic() - started < 10
    assert '"batch_abandoned"' in out
    assert cli(config, "run", "--exit-when-idle").returncode == 0
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)

    patient = write_config(tmp_path, pg_dsn, s3_server, bucket, daemon={"shutdown_grace_s": 60})
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 400_000, days=1)
    with daemon_process(patient) as daemon:
        wait_for_event(daemon, "daemon_started")
        daemon.send_signal(signal.SIGTERM)
        # The first signal is handled (not merged with the second): this one is the operator's
        # second.
        wait_for_event(daemon, "shutdown_requested")
        stop_daemon(daemon)
    assert daemon.returncode == 128 + signal.SIGTERM


def test_crash_after_commit_needs_no_redo(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """Killed right after the ledger commit: nothing is pending, nothing is uploaded twice."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 300, days=1)
    config = write_config(tmp_path, pg_dsn, s3_server, bucket)
    assert cli(config, "init").returncode == 0
    assert cli(config, "run", "--exit-when-idle", CDCTEST_CRASH_AT="after_commit").returncode == 70
    first = raw_objects(s3_client, bucket)
    again = cli(config, "run", "--exit-when-idle")
    assert again.returncode == 0, again.stderr
    assert "batch_redone" not in again.stdout
    assert raw_objects(s3_client, bucket) == first
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


def test_statement_timeout_fails_clearly_and_loses_nothing(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A statement timeout too short for the export: retried, then one clear line and a
    non-zero exit, with the position unmoved; with a sane timeout the next run exports all."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 400_000, days=2)
        conn.execute("VACUUM ANALYZE ecommerce_sales")
    sane = write_config(tmp_path, pg_dsn, s3_server, bucket)
    assert cli(sane, "init").returncode == 0
    # Long enough for the catalog and planning queries, too short for the COPY of 400k rows.
    tight = write_config(
        tmp_path,
        pg_dsn,
        s3_server,
        bucket,
        postgres={"statement_timeout_s": 0.15},
        daemon={"retry_attempts": 3, "retry_max_wait_s": 0.1},
    )
    failed = cli(tight, "run", "--exit-when-idle")
    assert failed.returncode == 6, failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    assert "cancel" in failed.stderr
    assert failed.stdout.count('"step_failed"') == 3
    assert raw_objects(s3_client, bucket) == {}
    sane = write_config(tmp_path, pg_dsn, s3_server, bucket)
    assert cli(sane, "run", "--exit-when-idle").returncode == 0
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


def test_cached_sequence_is_refused(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """A watermark sequence with CACHE > 1 hands out ids out of order across sessions, which
    would let a late row slip past a retired fence: refused with the fix in one sentence."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 1)
        conn.execute("ALTER SEQUENCE ecommerce_sales_id_seq CACHE 20")
    config = write_config(tmp_path, pg_dsn, s3_server, bucket)
    result = cli(config, "init")
    assert result.returncode == 3, result.stderr
    assert "CACHE 20" in result.stderr
    assert "ALTER SEQUENCE" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
