"""A failed table of a logical group is never a silent success: ``run --exit-when-idle`` and a
stopped daemon exit 9, the health answers say ``degraded``, and ``status`` leads with the
table, its reason and its fix, while the group's other tables keep arriving. On pgbench's
tables (a schema nobody wrote for this project), in a schema of their own."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from cdc_daemon.cli import init
from cdc_daemon.config import Settings
from cdc_daemon.errors import TableFailedError
from cdc_daemon.local.services import LocalS3, free_port
from cdc_daemon.ops.status import collect, render
from tests.e2e.daemon import cli, write_config
from tests.helpers import (
    differences,
    export_until_idle,
    main_in_thread,
    make_settings,
    object_bodies,
    rebuild,
    running_daemon,
    wait_until,
)
from tests.schemas import pgbench_bin

pytestmark = pytest.mark.usefixtures("drop_slots")

SCHEMA = "bank"
ACCOUNTS = f"{SCHEMA}.pgbench_accounts"
TELLERS = f"{SCHEMA}.pgbench_tellers"
GROUP = "ledgers"
SYNC = "-c synchronous_commit=on"


def pgbench_in_schema(dsn: str) -> None:
    """``pgbench -i`` with its tables in ``bank``, not ``public`` (pgbench creates them in the
    first schema of the search path)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
    params = conninfo_to_dict(dsn)
    args = [pgbench_bin(), "-i", "-q", "-s", "1", "-I", "dtgp"]
    for flag, key in (("-h", "host"), ("-p", "port"), ("-U", "user")):
        if params.get(key):
            args += [flag, str(params[key])]
    args.append(str(params["dbname"]))
    env = {**os.environ, "PGOPTIONS": f"-c search_path={SCHEMA}"}
    subprocess.run(args, check=True, capture_output=True, env=env)


def group_settings(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, **sections: Any
) -> Settings:
    return make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": ACCOUNTS}, {"name": TELLERS}],
        capture={"mode": "logical", "group": GROUP},
        batch={"max_rows": 2000},
        **sections,
    )


def config_file(pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path) -> Path:
    """The same group as a TOML file, for the command line."""
    return write_config(
        tmp_path,
        pg_dsn,
        s3_server,
        bucket,
        tables=[{"name": ACCOUNTS}, {"name": TELLERS}],
        capture={"mode": "logical", "group": GROUP},
    )


def assert_accounts_arrived(pg_dsn: str, s3_client: Any, bucket: str) -> None:
    """The healthy table, rebuilt from its own objects, equals its source column by column."""
    rebuild(pg_dsn, object_bodies(s3_client, bucket, f"{ACCOUNTS}/"), ACCOUNTS, ("aid",))
    source, rebuilt, missing, extra = differences(pg_dsn, ACCOUNTS)
    assert (missing, extra) == (0, 0), f"{missing} missing, {extra} extra"
    assert source == rebuilt == 100_000


def truncate_tellers_and_change_both(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute(f"TRUNCATE {TELLERS}")
        conn.execute(f"INSERT INTO {TELLERS} (tid, bid, tbalance) VALUES (1, 1, 5)")
        conn.execute(f"UPDATE {ACCOUNTS} SET abalance = 9, filler = 'after' WHERE aid <= 50")


async def test_run_when_idle_exits_9_after_a_truncate_while_the_other_table_arrives(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """After a TRUNCATE of one captured table of a logical group, ``run --exit-when-idle``
    exports the other table's changes (rebuilt, it equals its source) and then ends with
    ``TableFailedError``, exit 9, naming the table, the reason and ``resync --table``; a later
    run (nothing new to export) still exits 9, since the table stays failed in the ledger until
    resynced. From the command line: exit 9 and one line on stderr, no traceback."""
    pgbench_in_schema(pg_dsn)
    settings = group_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    truncate_tellers_and_change_both(pg_dsn)

    with pytest.raises(TableFailedError) as raised:
        await export_until_idle(settings)
    assert raised.value.exit_code == 9
    message = str(raised.value)
    assert message.startswith(f"table {TELLERS} of group {GROUP} is failed: ")
    assert "truncated" in message
    assert f"resync --table {TELLERS}" in message
    assert_accounts_arrived(pg_dsn, s3_client, bucket)

    with pytest.raises(TableFailedError):
        await export_until_idle(settings)

    config = config_file(pg_dsn, s3_server, bucket, tmp_path)
    done = await asyncio.to_thread(cli, config, "run", "--exit-when-idle")
    assert done.returncode == 9, done.stderr
    assert done.stderr.startswith(f"cdc-daemon: table {TELLERS} of group {GROUP} is failed: ")
    assert done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr


async def test_status_leads_with_the_failed_table_its_reason_and_the_fix(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Once a table of the group is failed, the first line ``status`` prints says so: the
    table, the group, the reason (truncated) and the fix (``cdc-daemon resync --table``); the
    JSON has it under ``failed_tables`` with the command. Before, no such line. ``status``
    itself still exits 0: it reports, ``run`` is what exits 9."""
    pgbench_in_schema(pg_dsn)
    settings = group_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    report = await collect(settings, slot=settings.slot_name)
    assert report[GROUP]["failed_tables"] == []
    assert not render(report).startswith("FAILED")

    truncate_tellers_and_change_both(pg_dsn)
    with pytest.raises(TableFailedError):
        await export_until_idle(settings)

    report = await collect(settings, slot=settings.slot_name)
    (failed,) = report[GROUP]["failed_tables"]
    assert failed["table"] == TELLERS
    assert "truncated" in failed["error"]
    assert failed["fix"] == f"cdc-daemon resync --table {TELLERS}"
    first = render(report).splitlines()[0]
    assert first.startswith(f"FAILED: table {TELLERS} of group {GROUP} ")
    assert "truncated" in first
    assert f"cdc-daemon resync --table {TELLERS}" in first

    config = config_file(pg_dsn, s3_server, bucket, tmp_path)
    capsys.readouterr()
    assert await main_in_thread(["--config", str(config), "status"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == first


async def get(settings: Settings, path: str) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{settings.http.port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


async def test_a_running_daemon_keeps_the_group_flowing_reports_degraded_and_exits_9(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A long-running daemon whose group gets a failed table (a column retyped under
    ``schema_change = "stop"``, other than by a widening) keeps running and keeps exporting the
    other table; /healthz and /readyz still answer 200 (a restart would fix nothing) but say
    ``degraded`` and name the table; stopped (what SIGTERM does), it ends with exit 9 instead
    of 0."""
    pgbench_in_schema(pg_dsn)
    settings = group_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        http={"address": f"127.0.0.1:{free_port()}"},
        daemon={"shutdown_grace_s": 5},
    )
    assert await init(settings) == 0
    async with running_daemon(settings) as daemon:
        await wait_until(lambda: bool(object_bodies(s3_client, bucket, f"{TELLERS}/")))
        status, body = await get(settings, "/healthz")
        assert (status, body["status"], body["failed_tables"]) == (200, "ok", {})

        with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
            conn.execute(f"ALTER TABLE {TELLERS} ALTER COLUMN tbalance TYPE numeric(12,2)")
            conn.execute(f"UPDATE {TELLERS} SET tbalance = 7")
            conn.execute(f"UPDATE {ACCOUNTS} SET abalance = 9, filler = 'after' WHERE aid <= 50")

        async def degraded() -> dict[str, Any]:
            for _ in range(300):
                status, body = await get(settings, "/healthz")
                assert status == 200, body
                if body["status"] == "degraded":
                    return body
                await asyncio.sleep(0.1)
            raise AssertionError(f"/healthz never said degraded: {body}")

        body = await degraded()
        assert list(body["failed_tables"]) == [TELLERS]
        assert "changed type (tbalance: integer -> numeric(12,2)" in body["failed_tables"][TELLERS]
        status, ready = await get(settings, "/readyz")
        assert (status, ready["status"], list(ready["failed_tables"])) == (
            200,
            "degraded",
            [TELLERS],
        )
        await wait_until(lambda: _accounts_changed(pg_dsn, s3_client, bucket))
        assert not daemon.done()
        with pytest.raises(TableFailedError, match=f"table {TELLERS} of group {GROUP}"):
            await daemon.stopped()
    assert_accounts_arrived(pg_dsn, s3_client, bucket)


def _accounts_changed(pg_dsn: str, s3_client: Any, bucket: str) -> bool:
    """The accounts' update after the failure arrived in S3."""
    bodies = object_bodies(s3_client, bucket, f"{ACCOUNTS}/")
    return any(b"after" in body for body in bodies.values())
