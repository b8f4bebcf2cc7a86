"""A group of tables nobody wrote for this project, as a process, under SIGKILLs and crash
points while writers change every table and a table joins the running group."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.local.services import LocalS3
from tests.e2e.daemon import cli, sigkill_rounds, write_config
from tests.integration.test_groups import assert_tables_rebuilt
from tests.schemas import (
    MANY_TYPES,
    PGBENCH_KEYS,
    create_many_types,
    pgbench_init,
    random_group_changes,
)

pytestmark = pytest.mark.usefixtures("drop_slots")

FIRST = ["pgbench_accounts", "pgbench_branches", MANY_TYPES]
JOINING = "pgbench_tellers"


def config_for(tmp_path: Path, pg_dsn: str, s3: LocalS3, bucket: str, tables: list[str]) -> Path:
    return write_config(
        tmp_path,
        pg_dsn,
        s3,
        bucket,
        tables=[{"name": t} for t in tables],
        capture={
            "mode": "logical",
            "group": "shop",
            "poll_interval_s": 0.05,
            "snapshot_chunk_rows": 20_000,
        },
        batch={"max_rows": 300},
    )


def test_a_group_loses_nothing_under_sigkills_and_a_join(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """pgbench's keyed tables and the many-types table (default replica identity) in one
    group, three writers doing inserts, updates (some leaving a TOASTed value unchanged) and
    deletes on every table: 6 seeded SIGKILL rounds and a run until idle; then pgbench_tellers
    joins (init, new
    configuration) and the join's first chunk is interrupted twice by crash points (after
    its intent record, after its upload); 6 more SIGKILL rounds; one clean run. Every table
    rebuilt from its objects equals its source. The seed is printed; CDC_TEST_SEED replays
    it."""
    seed = int(os.environ.get("CDC_TEST_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    pgbench_init(pg_dsn)
    create_many_types(pg_dsn, 200)
    config = config_for(tmp_path, pg_dsn, s3_server, bucket, FIRST)
    done = cli(config, "init")
    assert done.returncode == 0, done.stderr
    stop = threading.Event()

    def writer(n: int) -> None:
        wrng = random.Random(seed + n)
        while not stop.is_set():
            random_group_changes(pg_dsn, wrng, 2)
            time.sleep(wrng.random() * 0.05)

    writers = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for thread in writers:
        thread.start()
    try:
        sigkill_rounds(config, rng, 6)
        # The group's own snapshot done (the rounds may all have cut it short): the new
        # table joins a group that streams, rather than being part of its first snapshot.
        done = cli(config, "run", "--exit-when-idle")
        assert done.returncode == 0, done.stderr[-3000:]
        config = config_for(tmp_path, pg_dsn, s3_server, bucket, [*FIRST, JOINING])
        done = cli(config, "init")
        assert done.returncode == 0, done.stderr
        assert f"added public.{JOINING} to publication cdc_shop" in done.stdout
        for point in ("join_after_pending", "join_after_upload"):
            died = cli(config, "run", "--exit-when-idle", CDCTEST_CRASH_AT=point)
            assert died.returncode == 70, died.stdout[-4000:] + died.stderr[-2000:]
            assert '"crash_point_reached"' in died.stdout
        sigkill_rounds(config, rng, 6)
    finally:
        stop.set()
        for thread in writers:
            thread.join()
    final = cli(config, "run", "--exit-when-idle")
    assert final.returncode == 0, final.stderr[-3000:]
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT table_name, status FROM cdc.group_tables ORDER BY table_name"
        ).fetchall()
        attempts = conn.execute(
            "SELECT (SELECT max(attempt) FROM cdc.join_chunks WHERE table_name = %s),"
            " (SELECT bool_and(uploaded_at IS NOT NULL) FROM cdc.deliveries"
            " WHERE producer = 'join' AND table_name = %s)",
            (f"public.{JOINING}", f"public.{JOINING}"),
        ).fetchone()
    assert {r[1] for r in rows} == {"streaming"}, rows
    # The joining table's chunks were read again after the crashes (its two ranges run at
    # once, so which one each crash interrupted varies), and all of them are in S3.
    assert attempts is not None
    most, all_uploaded = attempts
    assert all_uploaded
    assert most >= 2
    assert_tables_rebuilt(pg_dsn, s3_client, bucket, {**PGBENCH_KEYS, MANY_TYPES: "id"})
