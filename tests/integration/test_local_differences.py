"""The local warehouse (fakesnow's server, DuckDB) against Snowflake's documented behaviour:
each difference it had that could be fixed in the emulator is pinned here as fixed, through
the real connector (and, for loads, through the daemon, S3 and the pipe stand-in); each one
DuckDB cannot remove is asserted as still there, so that the day it goes this file says to
drop its line from docs/snowflake.md ("Known differences")."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from cdc_daemon.cli import init
from cdc_daemon.config import load_settings
from cdc_daemon.errors import WarehouseError
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.warehouse.sql import Statement
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, make_settings
from tests.warehouse_checks import assert_table_equals_source

FIVE_MB = 5 * 1024 * 1024


@pytest.fixture
def bare(s3_server: LocalS3, warehouse_dir: Path) -> Iterator[LocalWarehouse]:
    """The local warehouse with an empty database and schema, for statements sent through the
    connector (no source, pipes or tasks)."""
    settings = load_settings(
        None,
        postgres={"dsn": "postgresql://nobody@127.0.0.1:1/none", "table": "public.t"},
        s3={"endpoint_url": s3_server.endpoint_url, "bucket": "unused"},
        snowflake={"database": "DIFFS"},
    )
    wh = LocalWarehouse(settings, warehouse_dir).start()
    sf = wh.settings.snowflake
    for text in (
        f"CREATE DATABASE IF NOT EXISTS {sf.database}",
        f"CREATE SCHEMA IF NOT EXISTS {sf.database}.{sf.schema_}",
        f"USE SCHEMA {sf.database}.{sf.schema_}",
    ):
        wh.wh.dialect.execute_ddl(wh.wh, Statement("00_database.sql", text))
    yield wh
    wh.stop()


def through_warehouse(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    tmp_path: Path,
    warehouse_dir: Path,
    ddl: str,
    table: str,
) -> LocalWarehouse:
    """``table`` made by ``ddl`` (with its rows) in the source, its warehouse applied, the table
    exported by the daemon (logical snapshot) to S3, loaded by the pipe stand-in and merged."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(ddl)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": table}],
        capture={"mode": "logical", "group": "diffs"},
    )
    return start_warehouse(settings, warehouse_dir)


async def exported(wh: LocalWarehouse) -> None:
    assert await init(wh.settings) == 0
    assert await export_until_idle(wh.settings) == 0
    wh.pump_until_quiet(timeout_s=120)
    failed = wh.query(
        "SELECT FILE_NAME, FIRST_ERROR_MESSAGE AS E FROM _EMU_COPY_HISTORY WHERE STATUS <> 'Loaded'"
    )
    assert not failed, failed
    errors = wh.query("SELECT ERROR_MESSAGE AS E FROM _EMU_TASK_HISTORY WHERE STATE <> 'SUCCEEDED'")
    assert not errors, errors


@pytest.mark.usefixtures("drop_slots")
async def test_a_quoted_empty_field_loads_as_an_empty_string_and_an_empty_key_merges(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> None:
    """The daemon writes '' as ``""`` and NULL as an empty field; the project's file format
    (FIELD_OPTIONALLY_ENCLOSED_BY = '"', EMPTY_FIELD_AS_NULL = TRUE) loads the first as an
    empty string and the second as NULL, so a text key '' merges like any other key and a
    column keeps '' apart from NULL in the landing and the current-state table."""
    wh = through_warehouse(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        warehouse_dir,
        "CREATE TABLE empties (k text PRIMARY KEY, note text);"
        " INSERT INTO empties VALUES ('', ''), ('n', NULL), ('e', ''), ('x', 'x')",
        "empties",
    )
    try:
        await exported(wh)
        landed = wh.query('SELECT "K" AS K, "NOTE" AS NOTE FROM RAW_EMPTIES ORDER BY 1')
        assert [(r["K"], r["NOTE"]) for r in landed] == [
            ("", ""),
            ("e", ""),
            ("n", None),
            ("x", "x"),
        ]
        assert assert_table_equals_source(pg_dsn, wh, wh.tables[0]) == 4
    finally:
        wh.stop()


@pytest.mark.usefixtures("drop_slots")
async def test_a_5_mb_value_and_doubled_quotes_load_as_written(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> None:
    """A 5 MB value, a value holding a quote (written ``"w""2"``), a delimiter and a newline:
    the stand-in reads the file with the file format's own quoting, nothing sniffed, and each
    value arrives whole in the current-state table."""
    wh = through_warehouse(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        warehouse_dir,
        "CREATE TABLE quoting (id integer PRIMARY KEY, note text);"
        f" INSERT INTO quoting VALUES (1, 'w\"2'), (2, repeat('x', {FIVE_MB})),"
        " (3, E'a,b\\nc\\r\\n\"'), (4, '\\N'), (5, '\"\"')",
        "quoting",
    )
    try:
        await exported(wh)
        got = {r["ID"]: r["NOTE"] for r in wh.query("SELECT ID, NOTE FROM QUOTING")}
        assert got == {1: 'w"2', 2: "x" * FIVE_MB, 3: 'a,b\nc\r\n"', 4: "\\N", 5: '""'}
    finally:
        wh.stop()


@pytest.mark.usefixtures("drop_slots")
async def test_a_column_named_with_a_quote_is_applied_loaded_and_merged(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> None:
    """A source column named ``it's``: apply creates every table with it (fakesnow records a
    column's name in a string literal of its own catalog), and its values reach the
    current-state table."""
    wh = through_warehouse(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        warehouse_dir,
        """CREATE TABLE odd_names (id integer PRIMARY KEY, "it's" text);"""
        """ INSERT INTO odd_names VALUES (1, 'yes'), (2, NULL)""",
        "odd_names",
    )
    try:
        assert wh.apply(plan_only=True).empty
        await exported(wh)
        assert assert_table_equals_source(pg_dsn, wh, wh.tables[0]) == 2
    finally:
        wh.stop()


def test_a_null_timestamp_comes_back_as_null(bare: LocalWarehouse) -> None:
    """NULL in TIMESTAMP_NTZ, TIMESTAMP_TZ and TIMESTAMP_LTZ, and in a column added after the
    row was written, reaches the connector as None (fakesnow sent it as epoch 0, read as
    1970-01-01 00:00:00); a value beside it is unchanged."""
    bare.query("CREATE TABLE T (ID NUMBER, NTZ TIMESTAMP_NTZ, TZ TIMESTAMP_TZ, LTZ TIMESTAMP_LTZ)")
    bare.query(
        "INSERT INTO T VALUES (1, NULL, NULL, NULL),"
        " (2, '2011-03-27 00:30:00', '2011-03-27 00:30:00+00:00', '2011-03-27 00:30:00+00:00')"
    )
    bare.query("ALTER TABLE T ADD COLUMN LATER TIMESTAMP_NTZ")
    rows = bare.query("SELECT ID, NTZ, TZ, LTZ, LATER FROM T ORDER BY ID")
    assert [(r["NTZ"], r["TZ"], r["LTZ"], r["LATER"]) for r in rows[:1]] == [
        (None, None, None, None)
    ]
    assert rows[1]["NTZ"] == datetime(2011, 3, 27, 0, 30)  # noqa: DTZ001 - TIMESTAMP_NTZ
    assert rows[1]["TZ"].isoformat() == "2011-03-27T00:30:00+00:00"
    assert rows[1]["LATER"] is None


def test_sum_of_a_number_is_an_exact_number(bare: LocalWarehouse) -> None:
    """SUM over NUMBER(38,3) (and over a product of NUMBERs, as the INVOICES model sums) is a
    NUMBER with the column's scale, as in Snowflake, not a float; a column read without an
    alias keeps Snowflake's name for it."""
    bare.query("CREATE TABLE N (Q NUMBER(10,0), P NUMBER(38,3))")
    bare.query("INSERT INTO N VALUES (1, 347311.42), (3, 0.01), (1, 0.01)")
    for _ in range(20):
        bare.query("INSERT INTO N VALUES (0, 0.01)")
    (row,) = bare.query("SELECT SUM(P) AS S, SUM(Q * P) AS A, SUM(Q) FROM N")
    assert row["S"] == Decimal("347311.640")
    assert row["A"] == Decimal("347311.460")
    assert row["SUM(Q)"] == 5


def test_a_not_null_violation_is_refused_at_once(bare: LocalWarehouse) -> None:
    """Writing NULL into a NOT NULL column fails the statement as Snowflake does: error 100072
    "NULL result in a non-nullable column" (the column named), which the connector raises as
    IntegrityError in seconds; it was an HTTP 500 that the connector retried until its
    timeout."""
    from snowflake.connector.errors import IntegrityError

    bare.query("CREATE TABLE K (ID VARCHAR NOT NULL)")
    started = time.monotonic()
    with (
        pytest.raises(IntegrityError, match="NULL result in a non-nullable column") as caught,
        bare.wh.conn.cursor() as cur,
    ):
        cur.execute("INSERT INTO K VALUES (NULL)")
    assert time.monotonic() - started < 10
    assert caught.value.errno == 100072
    assert "K.ID" in str(caught.value)


def test_desc_shows_the_declared_array_and_object_types(bare: LocalWarehouse) -> None:
    """DESC TABLE shows an ARRAY or OBJECT column as declared, as Snowflake does (fakesnow
    keeps them as DuckDB's JSON and showed VARIANT, so every plan reported them as retyped):
    in a CREATE TABLE, a copy made with LIKE, and a column added later; a VARIANT column stays
    VARIANT, and a CREATE TABLE IF NOT EXISTS of an existing table changes nothing."""
    dialect = bare.wh.dialect

    def run(text: str) -> None:
        dialect.execute_ddl(bare.wh, Statement("test", text))

    run('CREATE TABLE IF NOT EXISTS D (ID NUMBER(10, 0), "Tags" ARRAY, DOC VARIANT, O OBJECT)')
    run("CREATE TABLE IF NOT EXISTS D_COPY LIKE D")
    run("ALTER TABLE D_COPY ADD COLUMN IF NOT EXISTS MORE ARRAY")
    run('CREATE TABLE IF NOT EXISTS D (ID NUMBER(10, 0), "Tags" VARIANT)')
    types = {k: v[0] for k, v in (dialect.describe(bare.wh, "TABLE", "D") or {}).items()}
    assert (types["Tags"], types["DOC"], types["O"]) == ("ARRAY", "VARIANT", "OBJECT")
    copied = {k: v[0] for k, v in (dialect.describe(bare.wh, "TABLE", "D_COPY") or {}).items()}
    assert (copied["Tags"], copied["DOC"], copied["MORE"]) == ("ARRAY", "VARIANT", "ARRAY")


# -- known differences: DuckDB cannot behave like Snowflake here (docs/snowflake.md) --------


def test_known_difference_sum_of_text_is_refused(bare: LocalWarehouse) -> None:
    """Known difference: Snowflake casts a VARCHAR argument of SUM to a number; the local
    warehouse refuses it (DuckDB has no implicit cast, and fakesnow's cast to a float is what
    made every SUM of a NUMBER a float). When this fails, SUM over text works: drop the line
    in docs/snowflake.md."""
    bare.query("CREATE TABLE V (S VARCHAR)")
    bare.query("INSERT INTO V VALUES ('1.5'), ('2')")
    with pytest.raises(WarehouseError, match="sum"):
        bare.query("SELECT SUM(S) AS S FROM V")


def test_known_difference_a_primary_key_is_enforced(bare: LocalWarehouse) -> None:
    """Known difference: Snowflake records a PRIMARY KEY but does not enforce it; DuckDB
    refuses a second row with the same key (at once, as a refusal). The merge writes one row
    per key, so the project's SQL never meets it. When this fails, drop the line in
    docs/snowflake.md."""
    bare.query("CREATE TABLE P (ID NUMBER NOT NULL, PRIMARY KEY (ID))")
    bare.query("INSERT INTO P VALUES (1)")
    with pytest.raises(WarehouseError, match=r"(?i)duplicate key"):
        bare.query("INSERT INTO P VALUES (1)")
