"""Logical capture as a process: crash points and random SIGKILLs while writers change rows.
Whatever the crash, the table rebuilt from the objects equals the source (changes may be
exported twice, with the same _cdc_seq; none is lost)."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3
from tests.e2e.daemon import (
    cli,
    daemon_process,
    sigkill_rounds,
    stop_daemon,
    wait_for_event,
    write_config,
)
from tests.helpers import assert_rebuilt_equals_source
from tests.integration.test_logical import random_changes

pytestmark = pytest.mark.usefixtures("drop_slots")


def setup(pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path) -> Path:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 1000, days=4)
        conn.execute("ALTER TABLE ecommerce_sales REPLICA IDENTITY FULL")
    config = write_config(
        tmp_path,
        pg_dsn,
        s3_server,
        bucket,
        capture={"mode": "logical", "poll_interval_s": 0.05},
        batch={"max_rows": 200},
    )
    done = cli(config, "init")
    assert done.returncode == 0, done.stderr
    return config


def slot_within_ledger(pg_dsn: str) -> None:
    """The slot's confirmed position never passes the ledger's (what is durable in S3)."""
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots"
            " WHERE slot_name = 'cdc_public_ecommerce_sales'),"
            " (SELECT high FROM cdc.positions WHERE table_name = 'public.ecommerce_sales')"
        ).fetchone()
    assert row is not None
    confirmed, ledger = row
    if confirmed is not None and ledger is not None:
        assert int(confirmed) <= int(ledger), (confirmed, ledger)


def statuses(pg_dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg_dsn) as conn:
        return conn.execute("SELECT DISTINCT status FROM cdc.batches").fetchall()


@pytest.mark.parametrize("point", ["after_pending", "after_upload", "after_commit"])
def test_crash_points_redo_without_loss(
    point: str, pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The daemon dies (exit 70) right after the intent record, the upload, or the ledger
    commit (before the slot advance), first during the snapshot (a chunk: ``join_`` points),
    then during streaming; the next start redoes the chunk or the batch (or catches the slot
    up) and the rebuilt table is exact."""
    config = setup(pg_dsn, s3_server, bucket, tmp_path)
    died = cli(config, "run", "--exit-when-idle", CDCTEST_CRASH_AT=f"join_{point}")
    assert died.returncode == 70, died.stderr
    random_changes(pg_dsn, random.Random(1), 30)
    died = cli(config, "run", "--exit-when-idle", CDCTEST_CRASH_AT=point)
    assert died.returncode == 70, died.stderr
    random_changes(pg_dsn, random.Random(2), 30)
    final = cli(config, "run", "--exit-when-idle")
    assert final.returncode == 0, final.stderr
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    assert statuses(pg_dsn) == [("uploaded",)]


def test_random_sigkills_lose_nothing(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """15 rounds: start the daemon, SIGKILL it after a random time while three writers insert,
    update (also the partition column) and delete, some concurrently; after every round the
    slot's confirmed position is at most the ledger's; then one clean run. The rebuilt table
    equals the source. The seed is printed; CDC_TEST_SEED replays it."""
    seed = int(os.environ.get("CDC_TEST_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    config = setup(pg_dsn, s3_server, bucket, tmp_path)
    stop = threading.Event()

    def writer(n: int) -> None:
        wrng = random.Random(seed + n)
        while not stop.is_set():
            random_changes(pg_dsn, wrng, 3)
            time.sleep(wrng.random() * 0.05)

    writers = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for thread in writers:
        thread.start()
    try:
        sigkill_rounds(config, rng, 15, lambda: slot_within_ledger(pg_dsn))
    finally:
        stop.set()
        for thread in writers:
            thread.join()
    final = cli(config, "run", "--exit-when-idle")
    assert final.returncode == 0, final.stderr
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    # Every batch uploaded (none, when no round got past the slot's creation: a kill during
    # it leaves a walsender that holds the slot until its snapshot is built, and the final
    # run's snapshot then holds every change).
    assert set(statuses(pg_dsn)) <= {("uploaded",)}


def test_sigterm_finishes_the_batch_and_exits_zero(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """SIGTERM while changes stream in: the daemon stops taking batches, finishes the one in
    flight, exits 0, and nothing is left pending; a later run exports the rest."""
    config = setup(pg_dsn, s3_server, bucket, tmp_path)
    with daemon_process(config) as daemon:
        wait_for_event(daemon, "table_snapshot_done")
        random_changes(pg_dsn, random.Random(5), 20)
        time.sleep(0.5)  # let the daemon take those changes in: any moment will do
        out, err = stop_daemon(daemon, timeout=60)
    assert daemon.returncode == 0, err[-2000:]
    assert '"daemon_stopped"' in out
    assert ("pending",) not in statuses(pg_dsn)
    random_changes(pg_dsn, random.Random(6), 5)
    final = cli(config, "run", "--exit-when-idle")
    assert final.returncode == 0, final.stderr
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
