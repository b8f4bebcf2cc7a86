"""The daemon as a process under systemd's semantics: ``Type=notify`` and the watchdog,
against a notify socket the test listens on (as systemd would), then SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import psycopg

from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3
from tests.e2e.daemon import cli, daemon_process, write_config
from tests.helpers import assert_rebuilt_equals_source


def receive(sock: socket.socket, until: str, seconds: float = 60) -> list[str]:
    """Datagrams until one has the line ``until``."""
    got = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        message = sock.recv(4096).decode()
        got.append(message)
        if until in message.splitlines():
            return got
    raise AssertionError(f"no {until} within {seconds}s: {got}")


def test_notify_ready_watchdog_stopping_and_clean_exit(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """READY=1 (with MAINPID) comes once startup checks passed: the daemon then holds the
    table's lock. WATCHDOG=1 follows every half WATCHDOG_USEC while it exports. SIGTERM
    brings STOPPING=1 and exit 0, with every row in S3."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 2000, days=2)
    config = write_config(tmp_path, pg_dsn, s3_server, bucket, batch={"max_rows": 500})
    assert cli(config, "init").returncode == 0
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        with daemon_process(config, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="200000") as proc:
            before_ready = receive(sock, "READY=1")
            assert all("WATCHDOG=1" not in m for m in before_ready[:-1])
            ready = before_ready[-1].splitlines()
            assert f"MAINPID={proc.pid}" in ready
            assert any(line.startswith("STATUS=exporting public.ecommerce_sales") for line in ready)
            with psycopg.connect(pg_dsn) as conn:
                holders = conn.execute(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                    " WHERE l.locktype = 'advisory' AND a.application_name = 'cdc-daemon-ledger'"
                ).fetchone()
            assert holders == (1,)

            started = time.monotonic()
            pings = receive(sock, "WATCHDOG=1")
            for _ in range(3):
                pings += receive(sock, "WATCHDOG=1", seconds=5)
            # Four pings at 0.1 s intervals: well under a second (and never silent 0.2 s).
            assert time.monotonic() - started < 2

            deadline = time.monotonic() + 60
            while True:
                with psycopg.connect(pg_dsn) as conn:
                    row = conn.execute("SELECT max(hi) FROM cdc.batches").fetchone()
                if row == (2000,) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert row == (2000,)

            proc.send_signal(signal.SIGTERM)
            stopping = receive(sock, "STOPPING=1", seconds=30)
            assert stopping[-1].splitlines()[0] == "STOPPING=1"
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
    events = [json.loads(line)["event"] for line in out.splitlines()]
    assert "shutdown_requested" in events
    assert events[-1] == "daemon_stopped"
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    shown = cli(config, "status")
    assert shown.returncode == 0, shown.stderr
    assert "no (no session holds the table's lock)" in shown.stdout
    assert "nothing (caught up)" in shown.stdout
    assert "uploaded 4" in shown.stdout
