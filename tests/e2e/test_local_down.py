"""``cdc-daemon local down`` stops every service ``local up`` started, also when the serving
process cannot stop them itself."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.local.services import LocalPostgres

CLI = [sys.executable, "-m", "cdc_daemon"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, check=False)


def test_local_down_stops_postgresql_when_the_serving_process_is_stuck(tmp_path: Path) -> None:
    """The serving process stopped (SIGSTOP: it cannot act on SIGTERM, as when it was stuck in
    a statement the connector kept retrying): `down` kills it after its grace period and
    stops the PostgreSQL cluster it started (which runs on its own), removing its folder;
    local.json is gone and a second `down` finds nothing to stop."""
    folder = tmp_path / "local"
    started = cli("local", "up", "--dir", str(folder))
    assert started.returncode == 0, started.stderr
    info: dict[str, Any] = json.loads((folder / "local.json").read_text())
    try:
        with psycopg.connect(info["postgres_dsn"], connect_timeout=5) as conn:
            conn.execute("SELECT 1")
        os.kill(int(info["pid"]), signal.SIGSTOP)
        stopped = cli("local", "down", "--dir", str(folder))
        assert stopped.returncode == 0, stopped.stderr
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(info["postgres_dsn"], connect_timeout=5).close()
        assert not Path(info["postgres_folder"]).exists()
        assert not (folder / "local.json").exists()
        assert cli("local", "down", "--dir", str(folder)).returncode == 2
    finally:
        # Whatever failed above, nothing of this test is left running.
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(info["pid"]), signal.SIGKILL)
        if info.get("postgres_folder"):
            LocalPostgres.existing(Path(info["postgres_folder"]), 0).stop()
