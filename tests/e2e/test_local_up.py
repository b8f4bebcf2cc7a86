"""``cdc-daemon local up`` / ``local down`` as a user runs them: the three services left
running in a folder, the daemon pointed at a table of the user's own through the written
configuration, the generated SQL applied with ``snowflake apply``, the local warehouse queried
with the Snowflake connector, the report written from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

CLI = [sys.executable, "-m", "cdc_daemon"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=300, env=env, check=False
    )


def test_local_up_serves_a_users_own_table_until_down(tmp_path: Path) -> None:
    """`local up` returns once PostgreSQL, S3 and the local warehouse answer, with local.json
    (DSN, endpoint, bucket, the connector's keyword arguments) and a cdc.toml that names no table
    (refused in one sentence until it does); a second
    `up` on the same folder refuses in one sentence; with a [[tables]] entry added, init,
    snowflake apply (printing what it created; `apply --plan` then finds nothing to change) and
    run export the table and the warehouse's ORDERS equals it; `report`
    writes the page from the same warehouse; `down` stops every service; `up` again on the
    folder keeps the edited cdc.toml as cdc.toml.previous."""
    folder = tmp_path / "local"
    started = cli("local", "up", "--dir", str(folder))
    assert started.returncode == 0, started.stderr
    try:
        info: dict[str, Any] = json.loads((folder / "local.json").read_text())
        assert set(info) >= {"postgres_dsn", "s3_endpoint_url", "bucket", "snowflake"}
        again = cli("local", "up", "--dir", str(folder))
        assert again.returncode == 2
        assert again.stderr.count("\n") == 1
        assert "already holds running services" in again.stderr
        with psycopg.connect(info["postgres_dsn"], autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE orders (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
                " amount numeric(12,2), tags text[], doc jsonb, placed timestamptz)"
            )
            conn.execute(
                "INSERT INTO orders (amount, tags, doc, placed) SELECT g / 4.0,"
                " ARRAY['a', 'b,c'], jsonb_build_object('g', g), now()"
                " FROM generate_series(1, 200) g"
            )
        config = folder / "cdc.toml"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"}
        # There is no default table: the written configuration names none until the user does.
        unnamed = cli("--config", str(config), "init", env=env)
        assert unnamed.returncode == 2
        assert unnamed.stderr.count("\n") == 1
        assert "no table to capture" in unnamed.stderr
        config.write_text(
            config.read_text() + '\n[capture]\nmode = "logical"\n\n[[tables]]\nname = "orders"\n'
        )
        for step in (["init"], ["snowflake", "apply"], ["run", "--exit-when-idle"]):
            done = cli("--config", str(config), *step, env=env)
            assert done.returncode == 0, (step, done.stderr[-2000:])
            if step[0] == "snowflake":
                assert "create   PIPE RAW_ORDERS_PIPE: missing" in done.stdout
        planned = cli("--config", str(config), "snowflake", "apply", "--plan", env=env)
        assert planned.returncode == 0, planned.stderr[-2000:]
        assert planned.stdout == "Snowflake matches snowflake/: nothing to change\n"
        import snowflake.connector

        conn_sf = snowflake.connector.connect(**info["snowflake"])
        try:
            deadline = time.monotonic() + 120
            rows: list[Any] = []
            while time.monotonic() < deadline:
                cur = conn_sf.cursor()
                cur.execute("SELECT COUNT(*), SUM(AMOUNT) FROM ORDERS")
                rows = cur.fetchall()
                if rows and rows[0][0] == 200:
                    break
                time.sleep(1)
            assert rows == [(200, pytest.approx(sum(g / 4 for g in range(1, 201))))]
        finally:
            conn_sf.close()
        page = folder / "report.html"
        written = cli("--config", str(config), "report", "--out", str(page), env=env)
        assert written.returncode == 0, written.stderr[-2000:]
        assert "<td>public.orders</td><td>ORDERS</td><td>200</td><td>200</td>" in page.read_text()
    finally:
        stopped = cli("local", "down", "--dir", str(folder))
    assert stopped.returncode == 0, stopped.stderr
    assert not (folder / "local.json").exists()
    assert cli("local", "down", "--dir", str(folder)).returncode == 2
    # Up again on the folder: the edited configuration is kept beside the new one.
    restarted = cli("local", "up", "--dir", str(folder))
    assert restarted.returncode == 0, restarted.stderr
    try:
        assert 'name = "orders"' in (folder / "cdc.toml.previous").read_text()
        assert "\n[[tables]]" not in (folder / "cdc.toml").read_text()
    finally:
        assert cli("local", "down", "--dir", str(folder)).returncode == 0
