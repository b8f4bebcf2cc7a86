"""A partitioned table in logical mode as a process: the daemon dies in the middle of the
snapshot of a partition attached with its rows, and of the deletes of one detached with its
rows; the next starts finish them, and the root rebuilt from the objects equals the source
(no row lost, none left behind)."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from cdc_daemon.local.services import LocalS3
from tests.e2e.daemon import cli, daemon_process, stop_daemon, write_config
from tests.integration.test_partitions import (
    ROOT,
    assert_root_rebuilt,
    create_events,
    execute,
    status,
)

pytestmark = pytest.mark.usefixtures("drop_slots")


def setup(pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path) -> Path:
    create_events(pg_dsn)
    config = write_config(
        tmp_path,
        pg_dsn,
        s3_server,
        bucket,
        tables=[{"name": ROOT, "partition_column": "ts"}],
        capture={
            "mode": "logical",
            "group": "parts",
            "poll_interval_s": 0.05,
            "snapshot_chunk_rows": 40,
        },
        batch={"max_rows": 100},
    )
    done = cli(config, "init")
    assert done.returncode == 0, done.stderr
    done = cli(config, "run", "--exit-when-idle")
    assert done.returncode == 0, done.stderr
    return config


def attach_april(pg_dsn: str) -> None:
    execute(
        pg_dsn,
        "CREATE TABLE sales.events_2026_04 (LIKE sales.events)",
        "INSERT INTO sales.events_2026_04 SELECT 9000 + g, timestamptz '2026-04-01 00:00+00'"
        " + g * interval '1 hour', g, 'april' FROM generate_series(1, 200) g",
        "ALTER TABLE sales.events ATTACH PARTITION sales.events_2026_04"
        " FOR VALUES FROM ('2026-04-01') TO ('2026-05-01')",
    )


def run_until_streaming(config: Path, pg_dsn: str, crash_at: str | None = None) -> int:
    """Runs (``--exit-when-idle``) until the root streams again, a CHECKPOINT between them
    (the partition's seq waits for the slot's restart_lsn); the first exit code that is not
    0 ends it (the crash point ``crash_at`` reached), else 0."""
    env = {} if crash_at is None else {"CDCTEST_CRASH_AT": crash_at}
    for _ in range(30):
        done = cli(config, "run", "--exit-when-idle", timeout=120, **env)
        if done.returncode != 0:
            return done.returncode
        if status(pg_dsn) == "streaming":
            return 0
        execute(pg_dsn, "CHECKPOINT")
    raise AssertionError(f"{ROOT} is still {status(pg_dsn)}")


@pytest.mark.parametrize("point", ["after_pending", "after_upload", "after_commit"])
def test_crash_points_in_partition_snapshots(
    point: str, pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The daemon exits (70) right after a chunk's intent record, its upload or its ledger
    commit: in the snapshot of a partition attached with 200 rows (chunks of 40), then in the
    deletes of a partition detached with its rows, while the application changes rows of
    both partitions meanwhile. The next runs redo or go on, and the root rebuilds exactly."""
    config = setup(pg_dsn, s3_server, bucket, tmp_path)
    attach_april(pg_dsn)
    assert run_until_streaming(config, pg_dsn, f"join_{point}") == 70
    execute(pg_dsn, "UPDATE sales.events SET note = 'changed' WHERE id % 7 = 0")
    assert run_until_streaming(config, pg_dsn) == 0
    assert_root_rebuilt(pg_dsn, s3_client, bucket)
    execute(pg_dsn, "ALTER TABLE sales.events DETACH PARTITION sales.events_2026_04")
    assert run_until_streaming(config, pg_dsn, f"join_{point}") == 70
    execute(pg_dsn, "DELETE FROM sales.events WHERE id % 5 = 0")
    assert run_until_streaming(config, pg_dsn) == 0
    assert_root_rebuilt(pg_dsn, s3_client, bucket)


def test_sigkills_during_an_attach_snapshot(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """SIGKILL at random moments while the daemon runs with a partition attached with its
    rows (chunks of 40), CHECKPOINTs and application changes between the rounds; then runs
    until the root streams again: the root rebuilt from the objects equals the source."""
    rng = random.Random(11)
    config = setup(pg_dsn, s3_server, bucket, tmp_path)
    attach_april(pg_dsn)
    for n in range(6):
        with daemon_process(config) as daemon:
            time.sleep(0.5 + rng.random() * 2.0)
            stop_daemon(daemon, signal.SIGKILL)
        execute(
            pg_dsn,
            f"UPDATE sales.events SET amount = {n} WHERE id % 11 = {n}",
            "CHECKPOINT",
        )
    assert run_until_streaming(config, pg_dsn) == 0
    assert_root_rebuilt(pg_dsn, s3_client, bucket)
