"""A failed table of a watermark group: the group's other tables keep delivering every row, the
failed one is named with its reason and its fix (health, ``status``, exit 9), an outage fails
no table, and ``resync --table`` after the repair brings it back with no row lost or doubled.
Against real PostgreSQL and S3, the daemon running as a non-superuser role (a superuser's
privileges cannot be revoked)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from structlog.testing import capture_logs

from cdc_daemon.capture.watermark.group import resync
from cdc_daemon.cli import init
from cdc_daemon.config import Settings
from cdc_daemon.errors import ConfigError, SourceError, TableFailedError
from cdc_daemon.local.services import LocalPostgres, LocalS3, free_port
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
from tests.integration.test_outages import DEFAULT_ATTEMPTS, attempts_failed, stop_postgres

TABLES = ("alpha", "beta", "gamma")
GROUP = "trio"
SYNC = "-c synchronous_commit=on"


def make_tables(pg_dsn: str, rows: int) -> str:
    """Three tables and a role that may read them and own the ledger's schema: the daemon's."""
    role = f"cdc_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for table in TABLES:
            conn.execute(
                f"CREATE TABLE {table} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                " note text, amount numeric(12, 2))"
            )
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT CONNECT ON DATABASE {conninfo_to_dict(pg_dsn)['dbname']} TO {role}")
        conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        conn.execute(f"GRANT SELECT ON {', '.join(TABLES)} TO {role}")
        conn.execute(f"CREATE SCHEMA cdc AUTHORIZATION {role}")
    insert(pg_dsn, TABLES, rows)
    return role


def insert(pg_dsn: str, tables: tuple[str, ...], rows: int) -> None:
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        for table in tables:
            conn.execute(
                f"INSERT INTO {table} (note, amount) SELECT '{table} ' || g, g / 7.0"
                " FROM generate_series(1, %s) g",
                (rows,),
            )


def as_role(pg_dsn: str, role: str) -> str:
    params = conninfo_to_dict(pg_dsn)
    params["user"] = role
    params.pop("password", None)
    return make_conninfo("", **params)


def trio_settings(
    pg_dsn: str, role: str, s3_server: LocalS3, bucket: str, tmp_path: Path, **sections: Any
) -> Settings:
    return make_settings(
        as_role(pg_dsn, role),
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": t} for t in TABLES],
        capture={"group": GROUP},
        batch={"max_rows": 100},
        **sections,
    )


def exported_high(pg_dsn: str, table: str) -> int | None:
    """The table's exported position as the ledger has it (None before its first batch)."""
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            "SELECT high FROM cdc.positions WHERE table_name = %s", (f"public.{table}",)
        ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def failed_in_ledger(pg_dsn: str) -> list[str]:
    """The group's tables the ledger has failed."""
    with psycopg.connect(pg_dsn) as conn:
        return [
            str(r[0])
            for r in conn.execute(
                "SELECT table_name FROM cdc.group_tables WHERE group_name = %s"
                " AND status = 'failed' ORDER BY table_name",
                (GROUP,),
            )
        ]


def assert_delivered_exactly(pg_dsn: str, s3_client: Any, bucket: str, table: str) -> None:
    """The table rebuilt from its own objects equals its source column by column, and the
    objects hold each source row exactly once (the rebuild keeps one row per key, so a row
    exported twice shows only in the raw count)."""
    rebuild(pg_dsn, object_bodies(s3_client, bucket, f"public.{table}/"), table, ("id",))
    source, rebuilt, missing, extra = differences(pg_dsn, table)
    assert (missing, extra) == (0, 0), f"{table}: {missing} missing, {extra} extra"
    assert source == rebuilt, table
    with psycopg.connect(pg_dsn) as conn:
        raw = conn.execute(f"SELECT count(*), count(DISTINCT id) FROM {table}_raw").fetchone()
    assert raw == (source, source), f"{table}: {raw} objects' rows for {source} source rows"


async def get(settings: Settings, path: str) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{settings.http.port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


async def degraded(settings: Settings) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for _ in range(600):
        status, body = await get(settings, "/healthz")
        assert status == 200, body
        if body["status"] == "degraded" and body["failed_tables"]:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"/healthz never named a failed table: {body}")


async def metrics_text(settings: Settings) -> str:
    url = f"http://127.0.0.1:{settings.http.port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()


def member_states(text: str) -> dict[str, str]:
    """Each table's state in the ``cdc_group_table_state`` gauge (the label set at 1)."""
    states: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("cdc_group_table_state{") and line.endswith(" 1.0"):
            labels = dict(
                part.split("=", 1)
                for part in line[line.index("{") + 1 : line.index("}")].split(",")
            )
            states[labels["member"].strip('"')] = labels["state"].strip('"')
    return states


async def test_a_revoked_table_fails_alone_and_resync_brings_it_back(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A running 3-table watermark group whose role loses SELECT on one table: that table is
    marked failed with the reason (permission denied) and the fix; /healthz says degraded and
    names it, the ``cdc_group_table_state`` gauge has it failed and the others streaming; the
    two others keep delivering every row written after the failure, exactly once; stopped,
    the daemon exits 9. ``status`` leads with the table, the reason and ``cdc-daemon resync
    --table``. ``resync`` refuses while the table still cannot be read; after the GRANT it
    succeeds (from the command line) and a second one finds nothing to do; the next run
    delivers the failed table's rows (written before, while it was failed, and after) with
    none lost or doubled."""
    role = make_tables(pg_dsn, 250)
    settings = trio_settings(
        pg_dsn,
        role,
        s3_server,
        bucket,
        tmp_path,
        http={"address": f"127.0.0.1:{free_port()}"},
        daemon={"shutdown_grace_s": 5},
    )
    assert await init(settings) == 0
    async with running_daemon(settings) as daemon:
        for table in TABLES:
            await wait_until(lambda t=table: exported_high(pg_dsn, t) == 250)  # type: ignore[misc]
        status, body = await get(settings, "/healthz")
        assert (status, body["status"], body["failed_tables"]) == (200, "ok", {})

        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"REVOKE SELECT ON beta FROM {role}")
        insert(pg_dsn, TABLES, 300)

        body = await degraded(settings)
        assert list(body["failed_tables"]) == ["public.beta"]
        assert "permission denied" in body["failed_tables"]["public.beta"]
        assert member_states(await metrics_text(settings)) == {
            "public.alpha": "streaming",
            "public.beta": "failed",
            "public.gamma": "streaming",
        }
        for table in ("alpha", "gamma"):
            await wait_until(lambda t=table: exported_high(pg_dsn, t) == 550)  # type: ignore[misc]
        insert(pg_dsn, ("alpha", "gamma"), 120)
        for table in ("alpha", "gamma"):
            await wait_until(lambda t=table: exported_high(pg_dsn, t) == 670)  # type: ignore[misc]
        assert not daemon.done()
        assert exported_high(pg_dsn, "beta") == 250
        with pytest.raises(TableFailedError, match=f"table public.beta of group {GROUP}") as ended:
            await daemon.stopped()
        assert "resync --table public.beta" in str(ended.value)
    for table in ("alpha", "gamma"):
        assert_delivered_exactly(pg_dsn, s3_client, bucket, table)

    report = await collect(settings)
    (failed,) = report["public.beta"]["failed_tables"]
    assert "permission denied" in failed["error"]
    assert failed["fix"] == "cdc-daemon resync --table public.beta"
    assert report["public.alpha"]["failed_tables"] == []
    first = render(report).splitlines()[0]
    assert first.startswith(f"FAILED: table public.beta of group {GROUP} exports nothing: ")
    assert "cdc-daemon resync --table public.beta" in first

    with pytest.raises(SourceError, match="still cannot be captured, fix it first"):
        await resync(settings, "beta")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"GRANT SELECT ON beta TO {role}")
    config = write_config(
        tmp_path,
        as_role(pg_dsn, role),
        s3_server,
        bucket,
        tables=[{"name": t} for t in TABLES],
        capture={"group": GROUP},
    )
    capsys.readouterr()
    assert await main_in_thread(["--config", str(config), "resync", "--table", "beta"]) == 0
    assert capsys.readouterr().out.startswith(
        "public.beta will be exported again from its position"
    )
    with pytest.raises(ConfigError, match="is not failed"):
        await resync(settings, "beta")
    insert(pg_dsn, ("beta",), 40)
    assert await export_until_idle(settings) == 0
    for table in TABLES:
        assert_delivered_exactly(pg_dsn, s3_client, bucket, table)
    report = await collect(settings)
    assert all(report[f"public.{t}"]["failed_tables"] == [] for t in TABLES)


async def test_a_dropped_table_fails_at_the_start_and_a_never_captured_one_is_refused(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A table of the group dropped while the daemon was stopped: the next run exports the
    other tables' new rows exactly and exits 9 naming the dropped table (does not exist) and
    the fix; the run after that still exits 9 (the ledger keeps it failed), from the command
    line with one line on stderr and no traceback. A table that was
    never captured and cannot be read (a mistyped or not yet created table) is refused with
    its own error instead, and no table is marked failed for it."""
    role = make_tables(pg_dsn, 120)
    settings = trio_settings(pg_dsn, role, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE gamma")
    insert(pg_dsn, ("alpha", "beta"), 130)
    with pytest.raises(TableFailedError, match=f"table public.gamma of group {GROUP}") as ended:
        await export_until_idle(settings)
    assert "does not exist" in str(ended.value)
    assert "resync --table public.gamma" in str(ended.value)
    for table in ("alpha", "beta"):
        assert_delivered_exactly(pg_dsn, s3_client, bucket, table)
    with pytest.raises(TableFailedError):
        await export_until_idle(settings)
    config = write_config(
        tmp_path,
        as_role(pg_dsn, role),
        s3_server,
        bucket,
        tables=[{"name": t} for t in TABLES],
        capture={"group": GROUP},
    )
    done = await asyncio.to_thread(cli, config, "run", "--exit-when-idle")
    assert done.returncode == 9, done.stderr
    assert done.stderr.startswith(f"cdc-daemon: table public.gamma of group {GROUP} is failed: ")
    assert done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr

    typo = make_settings(
        as_role(pg_dsn, role),
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": "alpha"}, {"name": "betta"}],
        capture={"group": "duo"},
    )
    with pytest.raises(SourceError, match="betta"):
        await export_until_idle(typo)
    with psycopg.connect(pg_dsn) as conn:
        members = conn.execute(
            "SELECT table_name, status FROM cdc.group_tables WHERE group_name = 'duo'"
        ).fetchall()
    assert ("public.betta", "failed") not in members


async def test_an_outage_fails_no_table_of_the_group(
    pg_dsn: str,
    local_pg: LocalPostgres | None,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    """PostgreSQL (source and ledger) stops under a running 3-table watermark group for longer
    than the default ``retry_attempts`` lasts: the retry loop waits it out, no table is marked
    failed (health names none, the ledger has every table capturing), and once it is back every
    row of every table, written before and after, is delivered exactly once."""
    if local_pg is None:
        pytest.skip("CDC_TEST_PG_DSN points at a server this test must not stop")
    role = make_tables(pg_dsn, 150)
    settings = trio_settings(
        pg_dsn,
        role,
        s3_server,
        bucket,
        tmp_path,
        daemon={"retry_max_wait_s": 0.5},
        http={"address": f"127.0.0.1:{free_port()}"},
    )
    assert await init(settings) == 0
    with capture_logs() as logs:
        async with running_daemon(settings) as daemon:
            for table in TABLES:
                await wait_until(lambda t=table: exported_high(pg_dsn, t) == 150)  # type: ignore[misc]
            await asyncio.to_thread(stop_postgres, local_pg)
            try:
                await wait_until(lambda: attempts_failed(logs) > DEFAULT_ATTEMPTS, seconds=60)
                assert not daemon.done()
            finally:
                await asyncio.to_thread(local_pg.restart)
            insert(pg_dsn, TABLES, 90)
            for table in TABLES:
                await wait_until(lambda t=table: exported_high(pg_dsn, t) == 240)  # type: ignore[misc]
            status, body = await get(settings, "/healthz")
            assert (status, body["failed_tables"]) == (200, {})
    assert not [e for e in logs if e["event"] == "table_failed"]
    with psycopg.connect(pg_dsn) as conn:
        members = conn.execute(
            "SELECT table_name, status FROM cdc.group_tables WHERE group_name = %s"
            " ORDER BY table_name",
            (GROUP,),
        ).fetchall()
    assert members == [(f"public.{t}", "streaming") for t in TABLES]
    for table in TABLES:
        assert_delivered_exactly(pg_dsn, s3_client, bucket, table)


async def test_a_column_retyped_so_it_cannot_be_read_fails_its_table_alone(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A ``bytea`` column of one table retyped to ``text`` while the daemon runs: the read of
    that table fails (its bytes are read with ``encode(..., 'hex')``, which a text column
    lacks), so that table alone is failed with the server's reason and the fix; the other
    tables' rows written after the change are delivered exactly; the run exits 9."""
    role = make_tables(pg_dsn, 60)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE beta ADD COLUMN blob bytea")
        conn.execute("UPDATE beta SET blob = '\\x0102ff'::bytea")
    settings = trio_settings(pg_dsn, role, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    async with running_daemon(settings) as daemon:
        for table in TABLES:
            await wait_until(lambda t=table: exported_high(pg_dsn, t) == 60)  # type: ignore[misc]
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE beta ALTER COLUMN blob TYPE text USING encode(blob, 'hex')")
        insert(pg_dsn, TABLES, 70)
        await wait_until(lambda: failed_in_ledger(pg_dsn) == ["public.beta"])
        for table in ("alpha", "gamma"):
            await wait_until(lambda t=table: exported_high(pg_dsn, t) == 130)  # type: ignore[misc]
        with pytest.raises(TableFailedError, match=f"table public.beta of group {GROUP}") as ended:
            await daemon.stopped()
    assert "encode(text, unknown) does not exist" in str(ended.value)
    assert "resync --table public.beta" in str(ended.value)
    assert exported_high(pg_dsn, "beta") == 60
    for table in ("alpha", "gamma"):
        assert_delivered_exactly(pg_dsn, s3_client, bucket, table)
