"""The daemon killed with SIGKILL at random moments while writers insert: nothing is lost."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3
from tests.e2e.daemon import cli, sigkill_rounds, write_config
from tests.helpers import assert_rebuilt_equals_source

INSERT = (
    "INSERT INTO ecommerce_sales (invoice_no, stock_code, description, quantity, invoice_date,"
    " unit_price, customer_id, country) SELECT 'w' || g, 'S', %s, 1,"
    " now() - random() * interval '3 days', 1, 1, 'UK' FROM generate_series(1, %s) g"
)


def writer(dsn: str, rng: random.Random, stop: threading.Event, hold_s: float) -> None:
    """Transactions of 1-40 rows; some stay open a while (late commits), some roll back."""
    with psycopg.connect(dsn) as conn:
        while not stop.is_set():
            conn.execute(INSERT, ('crash test, "quoted"\nline', rng.randint(1, 40)))
            time.sleep(rng.random() * hold_s)
            if rng.random() < 0.1:
                conn.rollback()
            else:
                conn.commit()


def test_random_sigkills_lose_nothing(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """20 rounds: start the daemon, SIGKILL it after a random time, while two writers commit
    (one quickly, one holding its transaction open); then one clean run. The table rebuilt
    from the objects equals the source, and no batch is left pending. The seed is printed;
    CDC_TEST_SEED replays a run."""
    seed = int(os.environ.get("CDC_TEST_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 2000, days=3)
    config = write_config(
        tmp_path,
        pg_dsn,
        s3_server,
        bucket,
        batch={"max_rows": 300},
        capture={"poll_interval_s": 0.05},
    )
    assert cli(config, "init").returncode == 0
    stop = threading.Event()
    writers = [
        threading.Thread(target=writer, args=(pg_dsn, random.Random(seed + 1), stop, 0.01)),
        threading.Thread(target=writer, args=(pg_dsn, random.Random(seed + 2), stop, 0.4)),
    ]
    for thread in writers:
        thread.start()
    try:
        sigkill_rounds(config, rng, 20)
    finally:
        stop.set()
        for thread in writers:
            thread.join()
    final = cli(config, "run", "--exit-when-idle")
    assert final.returncode == 0, final.stderr
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    with psycopg.connect(pg_dsn) as conn:
        statuses = conn.execute("SELECT DISTINCT status FROM cdc.batches").fetchall()
    assert statuses == [("uploaded",)]
