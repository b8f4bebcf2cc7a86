"""Spool folders left by a daemon killed mid-batch are removed by the next start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3
from tests.e2e.daemon import cli, write_config
from tests.helpers import assert_rebuilt_equals_source


def test_a_killed_daemons_spool_folders_go_at_the_next_start(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A daemon that dies outright (os._exit at a crash point, as SIGKILL) after spooling a
    batch leaves its ``cdc-batch-*`` folder; the next start, holding the lock, removes it
    (``spool_swept``), redoes the batch, and leaves no spool folder behind."""
    spool = tmp_path / "spool"
    spool.mkdir()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 200, days=2)
    config = write_config(tmp_path, pg_dsn, s3_server, bucket, batch={"spool_dir": str(spool)})
    assert cli(config, "init").returncode == 0
    crashed = cli(config, "run", "--exit-when-idle", CDCTEST_CRASH_AT="after_pending")
    assert crashed.returncode == 70, crashed.stderr
    left = list(spool.glob("cdc-batch-*"))
    assert left
    assert any(any(folder.iterdir()) for folder in left)  # the batch's files, not just a folder
    final = cli(config, "run", "--exit-when-idle")
    assert final.returncode == 0, final.stderr
    assert '"spool_swept"' in final.stdout
    assert list(spool.glob("cdc-batch-*")) == []
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
