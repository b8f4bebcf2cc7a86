"""One transaction of 1,000,000 rows, exported by the daemon (a process) with bounded memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3
from tests.e2e.daemon import cli, env, write_config
from tests.helpers import assert_rebuilt_equals_source

ROWS = 1_000_000

# Runs argv[2:] and writes its peak RSS (ru_maxrss from wait4, KiB) to argv[1]. The daemon is
# measured from this small parent, not from pytest: on Linux, exec() keeps the larger of the new
# program's peak RSS and the peak of the address space it replaces, and subprocess starts a
# child with vfork(), in the parent's own address space. A daemon started by pytest therefore
# reports at least pytest's own peak RSS, which grows with the tests run before in the session.
_OWN_PEAK_RSS = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""

pytestmark = pytest.mark.usefixtures("drop_slots")


@pytest.mark.slow
def test_million_row_transaction_in_bounded_memory(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A single transaction inserting 1,000,000 rows comes back from the slot whole (upto_nchanges
    is only checked between transactions); the daemon streams it into the spool and exports
    it as one batch with a peak RSS under 300 MB, and every row arrives."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 0)
        conn.execute("ALTER TABLE ecommerce_sales REPLICA IDENTITY FULL")
    config = write_config(
        tmp_path,
        pg_dsn,
        s3_server,
        bucket,
        capture={"mode": "logical", "poll_interval_s": 0.05},
        batch={"max_rows": 100_000},
    )
    assert cli(config, "init").returncode == 0
    assert cli(config, "run", "--exit-when-idle").returncode == 0  # the empty snapshot
    with psycopg.connect(pg_dsn, autocommit=True, options="-c synchronous_commit=on") as conn:
        generate_sales(conn, ROWS, days=30)  # one INSERT ... SELECT: one transaction
    peak_file = tmp_path / "peak_rss_kib"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _OWN_PEAK_RSS,
            str(peak_file),
            sys.executable,
            "-m",
            "cdc_daemon",
            "--config",
            str(config),
            "run",
            "--exit-when-idle",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(),
    )
    out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    peak_mb = int(peak_file.read_text()) / 1024
    print(f"peak RSS {peak_mb:.0f} MB")
    batches = [line for line in out.decode().splitlines() if '"batch_uploaded"' in line]
    assert len(batches) == 1, batches
    assert f'"rows": {ROWS}' in batches[0]
    assert 50 < peak_mb < 300  # above 50 MB: the measurement did see the daemon
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
