"""``cdc-daemon backfill`` as a process: killed and resumed, and beside a running daemon."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3
from tests.e2e.daemon import cli, daemon_process, start, write_config
from tests.helpers import differences, object_bodies, rebuild
from tests.integration.test_backfill import KEY, range_table


def events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def backfill_objects(s3_client: Any, bucket: str) -> dict[str, bytes]:
    return {k: v for k, v in object_bodies(s3_client, bucket).items() if "/backfill-" in k}


def assert_backfill_equals_range(
    dsn: str, bodies: dict[str, bytes], first: str, end: str, days: int
) -> None:
    """One object per day, of one run, holding each source row of the range exactly once."""
    matches = [KEY.match(k) for k in bodies]
    assert all(matches), list(bodies)
    assert len({m.group(1) for m in matches if m}) == days == len(bodies)
    assert len({m.group(2) for m in matches if m}) == 1
    expected = range_table(dsn, first, end)
    rebuild(dsn, bodies, table="range_src")
    assert differences(dsn, "range_src") == (expected, expected, 0, 0)
    with psycopg.connect(dsn) as conn:
        raw = conn.execute("SELECT count(*), count(DISTINCT id) FROM range_src_raw").fetchone()
    assert raw == (expected, expected)


def chunk_states(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return dict(
            conn.execute(
                # A chunk is planned until its intent record, pending until in S3.
                "SELECT CASE WHEN d.uploaded_at IS NOT NULL THEN 'uploaded'"
                " WHEN d.status IS NOT NULL THEN 'pending' ELSE 'planned' END, count(*)"
                " FROM cdc.backfill_chunks c LEFT JOIN cdc.deliveries d"
                " ON d.producer = 'backfill' AND d.producer_id = c.delivery GROUP BY 1"
            ).fetchall()
        )


@pytest.mark.parametrize("point", ["backfill_after_pending", "backfill_after_upload"])
def test_interrupted_chunk_is_redone_under_the_same_key(
    point: str,
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    """A crash after a chunk's intent record (before or after its upload) leaves it pending;
    the same command resumes the run, redoes that chunk under the same key with the same
    _cdc_ts (byte-identical object) and does the rest: no second object, no missing row."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 3000, days=6)
    config = write_config(tmp_path, pg_dsn, s3_server, bucket)
    assert cli(config, "init").returncode == 0
    args = ("--from", "2010-12-01", "--to", "2010-12-07", "--jobs", "1")
    crashed = cli(config, "backfill", *args, CDCTEST_CRASH_AT=point)
    assert crashed.returncode == 70, crashed.stderr
    assert chunk_states(pg_dsn) == {"pending": 1, "planned": 5}
    first = backfill_objects(s3_client, bucket)
    assert len(first) == (1 if point == "backfill_after_upload" else 0)

    resumed = cli(config, "backfill", *args)
    assert resumed.returncode == 0, resumed.stderr
    lines = events(resumed.stdout)
    start_line = next(e for e in lines if e["event"] == "backfill_resumed")
    assert start_line["days_done"] == 0
    chunks = [e for e in lines if e["event"] == "backfill_chunk_uploaded"]
    assert [c["redo"] for c in chunks] == [True] + [False] * 5
    assert chunk_states(pg_dsn) == {"uploaded": 6}
    final = backfill_objects(s3_client, bucket)
    for key, body in first.items():
        assert final[key] == body  # the same key, the same bytes
    assert_backfill_equals_range(pg_dsn, final, "2010-12-01", "2010-12-07", 6)


def test_sigkill_then_resume_has_no_gap_and_no_duplicate(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """SIGKILL in the middle of a parallel run; the same command again resumes it (finished
    chunks skipped, unfinished ones redone): every row of the range exactly once, one object
    per day, all under the one run's keys."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 150_000, days=30)
    config = write_config(tmp_path, pg_dsn, s3_server, bucket)
    assert cli(config, "init").returncode == 0
    args = ("--from", "2010-12-01", "--to", "2010-12-31", "--jobs", "2")
    proc = start(config, *args, command="backfill")
    assert proc.stdout is not None
    uploaded = 0
    for line in proc.stdout:
        if '"backfill_chunk_uploaded"' in line:
            uploaded += 1
            if uploaded == 3:
                proc.send_signal(signal.SIGKILL)
                break
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    states = chunk_states(pg_dsn)
    assert 3 <= states.get("uploaded", 0) < 30, states

    resumed = cli(config, "backfill", *args, "--progress-interval", "0.05", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    lines = events(resumed.stdout)
    start_line = next(e for e in lines if e["event"] == "backfill_resumed")
    assert start_line["days_done"] == states["uploaded"]
    # Not on a terminal: periodic progress lines with rows, rate and ETA.
    progress = [e for e in lines if e["event"] == "backfill_progress"]
    assert progress, lines
    assert {"rows", "rows_estimate", "rows_per_s", "eta_s", "chunks_done", "chunks"} <= set(
        progress[-1]
    )
    assert progress[-1]["rows_estimate"] == range_table(pg_dsn, "2010-12-01", "2010-12-31")
    chunks = [e for e in lines if e["event"] == "backfill_chunk_uploaded"]
    assert len(chunks) == 30 - states["uploaded"]
    assert sum(c["redo"] for c in chunks) == states.get("pending", 0)
    assert any(e["event"] == "backfill_finished" for e in lines)
    assert chunk_states(pg_dsn) == {"uploaded": 30}
    assert_backfill_equals_range(
        pg_dsn, backfill_objects(s3_client, bucket), "2010-12-01", "2010-12-31", 30
    )


def test_sigterm_stops_a_run_that_resumes(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """SIGTERM: the chunks in flight are cancelled (their queries too), the run is marked
    failed as interrupted, the exit is 143 with one sentence; the same command finishes it."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 150_000, days=30)
    config = write_config(tmp_path, pg_dsn, s3_server, bucket)
    assert cli(config, "init").returncode == 0
    args = ("--from", "2010-12-01", "--to", "2010-12-31", "--jobs", "2")
    proc = start(config, *args, command="backfill")
    assert proc.stdout is not None
    for line in proc.stdout:
        if '"backfill_chunk_uploaded"' in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert (
        err == "cdc-daemon: the backfill was interrupted: run the same command again to resume it\n"
    )
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT status, error FROM cdc.backfill_runs").fetchone() == (
            "failed",
            "interrupted",
        )
        # Nothing of the run is left running on the source.
        assert conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'cdc-daemon%%'"
        ).fetchone() == (0,)
    assert cli(config, "backfill", *args).returncode == 0
    assert chunk_states(pg_dsn) == {"uploaded": 30}
    assert_backfill_equals_range(
        pg_dsn, backfill_objects(s3_client, bucket), "2010-12-01", "2010-12-31", 30
    )


def test_backfill_beside_a_running_daemon(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """While the daemon runs and exports rows that a writer keeps inserting (today's, and some
    dated inside the backfilled days), a backfill of those days runs to the end (it neither
    waits for nor takes the daemon's lock); the daemon keeps exporting throughout, its
    watermark ends at the last id and its objects alone still rebuild the whole table. The
    backfill holds every row of its days that existed when it started, each equal to the
    source row and once; live and backfill objects together rebuild the table exactly."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 60_000, days=30)
    config = write_config(tmp_path, pg_dsn, s3_server, bucket)
    assert cli(config, "init").returncode == 0
    with daemon_process(config) as daemon:
        daemon_lines: list[str] = []
        assert daemon.stdout is not None
        out = daemon.stdout
        reader = threading.Thread(target=lambda: daemon_lines.extend(out), daemon=True)
        reader.start()

        stop = threading.Event()

        def writer() -> None:
            # A few rows per commit, all the time: today's, and one in a backfilled day.
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                while not stop.is_set():
                    conn.execute(
                        "INSERT INTO ecommerce_sales (invoice_no, stock_code, description,"
                        " quantity, invoice_date, unit_price, customer_id, country)"
                        " SELECT 'W' || g, 'S', 'live row', g, CASE WHEN g = 1 THEN"
                        " timestamptz '2010-12-10 12:00+00' ELSE now() END, 1.5, NULL, 'UK'"
                        " FROM generate_series(1, 5) g"
                    )
                    time.sleep(0.01)

        def batches() -> int:
            with psycopg.connect(pg_dsn) as conn:
                row = conn.execute("SELECT count(*) FROM cdc.batches").fetchone()
            return int(row[0]) if row else 0

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            deadline = time.monotonic() + 60
            while batches() < 3:
                assert time.monotonic() < deadline, daemon_lines
                time.sleep(0.1)
            before = batches()
            with psycopg.connect(pg_dsn) as conn:
                first_max = conn.execute("SELECT max(id) FROM ecommerce_sales").fetchone()
            assert first_max is not None
            run = cli(
                config,
                "backfill",
                "--from",
                "2010-12-05",
                "--to",
                "2010-12-25",
                "--jobs",
                "3",
                timeout=300,
            )
            assert run.returncode == 0, run.stderr
            assert batches() > before  # the daemon exported the writer's rows meanwhile
            assert daemon.poll() is None  # and still runs, holding its lock
        finally:
            stop.set()
            thread.join()
        with psycopg.connect(pg_dsn) as conn:
            last = conn.execute("SELECT max(id) FROM ecommerce_sales").fetchone()
        deadline = time.monotonic() + 60
        while True:
            with psycopg.connect(pg_dsn) as conn:
                position = conn.execute("SELECT low FROM cdc.positions").fetchone()
            if position == last:
                break
            assert time.monotonic() < deadline, (position, last)
            time.sleep(0.1)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        reader.join(timeout=10)
    logged = [json.loads(line) for line in daemon_lines if line.startswith("{")]
    assert not [e for e in logged if e.get("level") in ("warning", "error")], logged

    bodies = object_bodies(s3_client, bucket)
    live = {k: v for k, v in bodies.items() if "/backfill-" not in k}
    rebuild(pg_dsn, live)
    source, rebuilt, missing, extra = differences(pg_dsn)
    assert (missing, extra) == (0, 0)
    assert source == rebuilt
    with psycopg.connect(pg_dsn) as conn:
        keys = conn.execute(
            "SELECT count(*) FROM cdc.batches, jsonb_array_elements(objects) o"
            " WHERE o->>'key' LIKE '%%backfill%%' OR status <> 'uploaded'"
        ).fetchone()
    assert keys == (0,)

    backfilled = {k: v for k, v in bodies.items() if "/backfill-" in k}
    matches = [KEY.match(k) for k in backfilled]
    assert all(matches)
    assert len({m.group(1) for m in matches if m}) == 20 == len(backfilled)
    range_table(pg_dsn, "2010-12-05", "2010-12-25")
    rebuild(pg_dsn, backfilled, table="range_src")
    with psycopg.connect(pg_dsn) as conn:
        raw = conn.execute("SELECT count(*), count(DISTINCT id) FROM range_src_raw").fetchone()
        late = conn.execute(
            "SELECT count(*) FROM range_src WHERE id > %s", (first_max[0],)
        ).fetchone()
        not_backfilled = conn.execute(
            "SELECT count(*) FROM range_src s WHERE s.id <= %s AND NOT EXISTS"
            " (SELECT 1 FROM range_src_rebuilt r WHERE r.id = s.id)",
            (first_max[0],),
        ).fetchone()
    assert raw is not None
    assert raw[0] == raw[1]  # no row twice
    assert late is not None
    assert late[0] > 0  # the writer did insert into a backfilled day meanwhile
    assert not_backfilled == (0,)
    assert differences(pg_dsn, "range_src")[3] == 0  # each backfilled row equals its source row
    rebuild(pg_dsn, bodies)
    source, rebuilt, missing_all, extra_all = differences(pg_dsn)
    assert (source, missing_all, extra_all) == (rebuilt, 0, 0)
