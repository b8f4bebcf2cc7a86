"""Columns left out of the capture (``columns`` / ``exclude_columns``), in both capture modes,
through S3, the ledger, the logs and the local warehouse: a plaintext marker in a left-out
column reaches none of them, and the columns captured equal the source."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from structlog.testing import capture_logs

from cdc_daemon.cli import init
from cdc_daemon.config import Settings
from cdc_daemon.errors import CdcError
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.reconcile.verify import verify_group
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, make_settings, object_bodies
from tests.schemas import MANY_TYPES, create_many_types, pgbench_init, random_group_changes
from tests.warehouse_checks import assert_table_equals_source

pytestmark = pytest.mark.usefixtures("drop_slots")

SYNC = "-c synchronous_commit=on"
# What must never leave the source: each test puts it in every left-out column.
MARKER = "PLAINTEXT-MARKER-5e1f"


def create_tables(dsn: str) -> None:
    """Two tables not written for the daemon's sake: people (one column left out by
    ``exclude_columns``) and cards (``columns`` names the ones to keep)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE people (id bigserial PRIMARY KEY, name text, email text,"
            " ssn text, born date)"
        )
        conn.execute(
            "CREATE TABLE cards (id bigserial PRIMARY KEY, holder text, pan text, cvv text)"
        )
        insert_rows(conn, 0, 30)


def insert_rows(conn: psycopg.Connection[Any], first: int, count: int) -> None:
    conn.execute(
        "INSERT INTO people (name, email, ssn, born) SELECT 'name ' || g,"
        " CASE WHEN g %% 4 = 0 THEN NULL ELSE 'p' || g || '@example.com' END,"
        " %(m)s || '-' || g, date '1980-01-01' + g FROM generate_series(%(a)s::int, %(b)s::int) g",
        {"m": MARKER, "a": first, "b": first + count - 1},
    )
    conn.execute(
        "INSERT INTO cards (holder, pan, cvv) SELECT 'holder ' || g, %(m)s || g, %(m)s"
        " FROM generate_series(%(a)s::int, %(b)s::int) g",
        {"m": MARKER, "a": first, "b": first + count - 1},
    )


def shaped_settings(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, mode: str
) -> Settings:
    return make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[
            {"name": "people", "exclude_columns": ["ssn"]},
            {"name": "cards", "columns": ["id", "holder"]},
        ],
        capture={"mode": mode, "group": "shaped"},
    )


@pytest.fixture(params=["watermark", "logical"])
def shaped(
    request: pytest.FixtureRequest,
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    tmp_path: Path,
    warehouse_dir: Path,
) -> Iterator[LocalWarehouse]:
    create_tables(pg_dsn)
    wh = start_warehouse(
        shaped_settings(pg_dsn, s3_server, bucket, tmp_path, request.param), warehouse_dir
    )
    yield wh
    wh.stop()


def ledger_texts(dsn: str, schema: str) -> str:
    """Every row of every table of the ledger's schema, as text."""
    with psycopg.connect(dsn) as conn:
        tables = [
            str(r[0])
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (schema,),
            )
        ]
        assert tables
        return "\n".join(
            str(r[0])
            for t in tables
            for r in conn.execute(
                sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(schema, t))
            )
        )


def warehouse_texts(wh: LocalWarehouse) -> str:
    """Every row of every table of the warehouse's schema, as text."""
    schema = wh.settings.snowflake.schema_
    tables = [
        str(r["TABLE_NAME"])
        for r in wh.query(
            "SELECT TABLE_NAME FROM INFORMATION_SCHEMA.TABLES WHERE TABLE_SCHEMA = %(s)s",
            {"s": schema},
        )
    ]
    assert "PEOPLE" in tables
    assert "RAW_PEOPLE" in tables
    return "\n".join(str(row) for t in tables for row in wh.query(f'SELECT * FROM "{t}"'))


async def test_left_out_columns_reach_no_object_ledger_log_or_warehouse_table(
    pg_dsn: str, shaped: LocalWarehouse, s3_client: Any, bucket: str
) -> None:
    """With ``exclude_columns = ["ssn"]`` on one table and ``columns = ["id", "holder"]`` on
    another, in watermark and logical mode: after the first export and more inserts (logical
    mode also updates of kept and left-out columns and deletes), the marker held only by the
    left-out columns is in no S3 object, no row of the ledger's tables, no log line and no
    table of the warehouse (landing and current state); the left-out columns are no column of
    the objects or of Snowflake; every captured column equals the source, and ``verify``
    finds nothing differing."""
    settings = shaped.settings
    logical = settings.capture.mode == "logical"
    with capture_logs() as logs:
        assert await init(settings) == 0
        assert await export_until_idle(settings) == 0
        with psycopg.connect(pg_dsn, options=SYNC) as conn:
            insert_rows(conn, 100, 20)
            if logical:
                conn.execute(f"UPDATE people SET ssn = '{MARKER}-u' WHERE id % 3 = 0")
                conn.execute("UPDATE people SET name = name || '!' WHERE id % 5 = 0")
                conn.execute("UPDATE cards SET pan = pan || 'x', holder = 'h' WHERE id % 2 = 0")
                conn.execute("DELETE FROM people WHERE id % 7 = 0")
            conn.commit()
        assert await export_until_idle(settings) == 0
    bodies = object_bodies(s3_client, bucket)
    assert bodies
    for key, body in bodies.items():
        assert MARKER.encode() not in body, key
        header = body.split(b"\n", 1)[0].split(b",")
        assert not {b"ssn", b"pan", b"cvv"} & set(header), key
    assert MARKER not in ledger_texts(pg_dsn, settings.state.schema_)
    assert logs
    assert MARKER not in repr(logs)
    shaped.pump_until_quiet()
    assert MARKER not in warehouse_texts(shaped)
    tables = {t.names.name: t for t in shaped.tables}
    assert [c.source for c in tables["PEOPLE"].columns] == ["id", "name", "email", "born"]
    assert [c.source for c in tables["CARDS"].columns] == ["id", "holder"]
    rows = {n: assert_table_equals_source(pg_dsn, shaped, t) for n, t in tables.items()}
    assert rows["CARDS"] == 50
    results = verify_group(settings)
    assert [(r.warehouse_table, r.equal) for r in results] == [("PEOPLE", True), ("CARDS", True)]


@pytest.mark.parametrize("mode", ["watermark", "logical"])
@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (
            {"name": "people", "hash_columns": ["emial"]},
            "public.people has no column 'emial', named in [[tables]] hash_columns "
            "(did you mean 'email'?)",
        ),
        (
            {"name": "cards", "exclude_columns": ["id"]},
            "cards: key column 'id' cannot be left out of the capture (the warehouse merges by "
            "the key): capture it, hashed if it must not leave in clear (hash_columns)",
        ),
    ],
)
async def test_init_refuses_an_unknown_column_and_a_left_out_primary_key(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    tmp_path: Path,
    mode: str,
    entry: dict[str, Any],
    problem: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``init`` refuses, with one sentence, a column the table does not have (with the
    closest name) and a primary key (the merge key by default, known only from the catalog)
    left out, in both modes, before it changes anything on the source."""
    monkeypatch.setenv("CDC_HASH_SALT", "a-salt-for-the-init-refusals")
    create_tables(pg_dsn)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[entry],
        capture={"mode": mode, "group": "shaped"},
    )
    with pytest.raises(CdcError) as caught:
        await init(settings)
    assert problem in str(caught.value)
    assert "\n" not in str(caught.value)


async def test_a_left_out_toasted_column_left_unchanged_by_updates(
    pg_dsn: str,
    s3_server: LocalS3,
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
    warehouse_dir: Path,
) -> None:
    """Logical mode, the many-types table with its TOASTed ``body`` left out: updates that
    leave ``body`` unchanged (pgoutput sends it as unchanged, not its value) and updates that
    replace it become plain changes naming no unchanged column, the objects never name
    ``body``, and the warehouse table equals the source's other columns after random inserts,
    updates and deletes."""
    pgbench_init(pg_dsn)  # (random_group_changes changes pgbench's tables too)
    create_many_types(pg_dsn, 80)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": MANY_TYPES, "exclude_columns": ["body"]}],
        capture={"mode": "logical", "group": "toast"},
    )
    wh = start_warehouse(settings, warehouse_dir)
    try:
        settings = wh.settings
        assert await init(settings) == 0
        assert await export_until_idle(settings) == 0
        random_group_changes(pg_dsn, random.Random(8), 60)
        assert await export_until_idle(settings) == 0
        with psycopg.connect(pg_dsn) as conn:
            toasted = conn.execute(
                f"SELECT count(*) FROM {MANY_TYPES} WHERE length(body) > 4000"
            ).fetchone()
        assert toasted is not None
        assert toasted[0] > 0
        for key, body in object_bodies(s3_client, bucket).items():
            header, *rows = body.decode().splitlines()
            assert "body" not in header.split(","), key
            # _cdc_unchanged, the last field, names no column (the rows have no quoted
            # line ends here: many_types' text values are single lines).
            assert all(r.endswith(",") for r in rows), key
        wh.pump_until_quiet()
        (table,) = wh.tables
        assert "body" not in [c.source for c in table.columns]
        assert_table_equals_source(pg_dsn, wh, table)
        assert all(r.equal for r in verify_group(settings))
    finally:
        wh.stop()
