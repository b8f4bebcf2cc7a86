"""Opt-in: the warehouse SQL against a real Snowflake account, where the local warehouse cannot
say what Snowflake does (docs/snowflake-account-test.md says how to run it).

In a scratch schema it applies ``snowflake/`` (then plans again: nothing may differ), uploads
through an internal stage the objects the daemon wrote for three tables in each compression
(gzip, zstd, none), loads them with the pipe's own COPY (by column name, PARSE_HEADER,
INCLUDE_METADATA), runs each merge task's body, checks every value of every current-state table
against PostgreSQL with an empty string kept apart from NULL, and drops the schema.

The values cover what the daemon writes: ``,,`` (NULL) and ``,""`` (empty string), a
backslash, embedded quotes, commas and newlines, timestamptz with and without a fraction,
timestamp, date, time, interval, numerics at NUMBER(38, 9)'s edge and beyond 38 digits
(NUMBER(p, s) columns), json, arrays, bytea, uuid, an enum."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.config import Settings
from cdc_daemon.local.services import LocalS3
from cdc_daemon.warehouse import sql
from cdc_daemon.warehouse.client import Warehouse
from cdc_daemon.warehouse.evolve import apply_sql
from cdc_daemon.warehouse.model import read_catalog
from cdc_daemon.warehouse.plan import desired, make_plan
from tests.helpers import export_until_idle, make_settings
from tests.schemas import MANY_TYPES, create_many_types
from tests.warehouse_checks import assert_table_equals_source

ENV = "CDC_TEST_SNOWFLAKE_"
pytestmark = [
    pytest.mark.skipif(
        not os.environ.get(ENV + "ACCOUNT"),
        reason=f"{ENV}ACCOUNT is not set: the real-account test is opt-in "
        "(docs/snowflake-account-test.md)",
    ),
    pytest.mark.usefixtures("drop_slots"),
]
CODECS = ("gzip", "zstd", "none")
EDGES = "edge_values"


def account() -> dict[str, Any]:
    """The [snowflake] settings from CDC_TEST_SNOWFLAKE_* (user, password or private key file,
    role, warehouse, database) and a scratch schema of the test's own."""
    env = {k.removeprefix(ENV).lower(): v for k, v in os.environ.items() if k.startswith(ENV)}
    missing = [k for k in ("user", "warehouse", "database") if not env.get(k)]
    if missing or not (env.get("password") or env.get("private_key_file")):
        pytest.fail(
            f"set {', '.join(ENV + k.upper() for k in missing) or ENV + 'PASSWORD'} too "
            "(docs/snowflake-account-test.md)"
        )
    out: dict[str, Any] = {
        "account": env["account"],
        "user": env["user"],
        "warehouse": env["warehouse"],
        "database": env["database"],
        "schema": f"CDC_TEST_{uuid.uuid4().hex[:8].upper()}",
        "create_warehouse": False,
    }
    for key in ("password", "private_key_file", "private_key_passphrase", "role"):
        if env.get(key):
            out[key] = env[key]
    return out


def create_edge_values(dsn: str) -> None:
    """Text and time values at the edges of the CSV the daemon writes."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {EDGES} (id int PRIMARY KEY, t text, ts timestamp,"
            " tz timestamptz, d date, n numeric, p numeric(38, 0), f double precision)"
        )
        texts = [None, "", "a\\b", 'say "hi"', "one,two", "line1\nline2", "crlf\r\n", "é€😀"]
        conn.execute(
            f"INSERT INTO {EDGES} SELECT g, (%s::text[])[g %% 8 + 1],"
            " '2011-03-27 01:30:00'::timestamp + g * interval '1.25 s',"
            " '2011-03-27 00:30:00+00'::timestamptz + g * interval '0.5 s',"
            " date '2011-01-01' + g,"
            " (ARRAY[0, -0.000000001, 12345678901234567890123456789.123456789,"
            " -99999999999999999999999999999.999999999, 1.5])[g %% 5 + 1],"
            " (ARRAY[0, 99999999999999999999999999999999999999, -1])[g %% 3 + 1],"
            " (ARRAY[0.1, -1e-300, 1e300, 3])[g %% 4 + 1]"
            " FROM generate_series(1, 64) g",
            (texts,),
        )


def export(dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, codec: str) -> Settings:
    settings = make_settings(
        dsn,
        s3_server,
        bucket,
        tmp_path / codec,
        tables=[{"name": t} for t in ("pgbench_branches", MANY_TYPES, EDGES)],
        capture={"mode": "logical", "group": f"acct_{codec}"},
        batch={"compression": codec},
        s3={"prefix": f"{codec}/"},
        state={"schema": f"cdc_{codec}"},
    )
    (tmp_path / codec).mkdir()
    return settings


async def test_the_warehouse_sql_loads_and_merges_every_value_in_a_real_account(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, s3_client: Any
) -> None:
    """Applied to a scratch schema, the SQL plans nothing more; each compression's objects
    load through the pipe's COPY with every row, and after the merges every current-state
    table equals its source value for value."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE pgbench_branches (bid int PRIMARY KEY, bbalance int)")
        conn.execute("INSERT INTO pgbench_branches SELECT g, g * 7 FROM generate_series(1, 10) g")
    create_many_types(pg_dsn, 100)
    create_edge_values(pg_dsn)
    runs = [export(pg_dsn, s3_server, bucket, tmp_path, codec) for codec in CODECS]
    for settings in runs:
        assert await export_until_idle(settings) == 0
    settings = runs[0].model_copy(
        update={"snowflake": runs[0].snowflake.model_copy(update=account())}
    )
    sf = settings.snowflake
    wh = Warehouse.of_group(settings).connect()
    try:
        tables = read_catalog(settings)
        # An external stage on a bucket Snowflake never reads: the objects go through an
        # internal stage below.
        unused = "s3://cdc-daemon-account-test-unused/"
        apply_sql(wh, settings, tables, stage_url_override=unused)
        assert make_plan(wh, settings, tables, stage_url_override=unused).empty
        wh.execute(f"CREATE STAGE {sf.database}.{sf.schema_}.CDC_TEST_INTERNAL")
        statements = sql.statements(settings, tables, stage_url_override=unused)
        for run in runs:
            codec = run.batch.compression
            objects = s3_client.list_objects_v2(Bucket=bucket, Prefix=f"{codec}/")["Contents"]
            for item in objects:
                key = str(item["Key"])
                local = tmp_path / "put" / key
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
                folder = key.rsplit("/", 1)[0]
                wh.execute(
                    f"PUT 'file://{local}' @CDC_TEST_INTERNAL/{folder}/"
                    " AUTO_COMPRESS = FALSE SOURCE_COMPRESSION = AUTO_DETECT"
                )
            for t in tables:
                create = next(
                    s
                    for s in statements
                    if s.text.startswith(f"CREATE PIPE IF NOT EXISTS {t.names.pipe}")
                )
                copy = sql.pipe_copy(create).replace(
                    f"@{sf.database}.{sf.schema_}.{sf.stage}/",
                    f"@{sf.database}.{sf.schema_}.CDC_TEST_INTERNAL/{codec}/",
                )
                results = wh.query(copy)
                assert results, f"{codec}: no file of {t.names.source} loaded"
                for row in results:
                    assert str(row["status"]).upper() == "LOADED", row
                    assert row["rows_parsed"] == row["rows_loaded"], row
        for t in tables:
            merge = next(
                s
                for s in statements
                if s.text.startswith(f"CREATE OR ALTER TASK {t.names.merge_task}")
            )
            found = desired(merge)
            assert found is not None
            wh.execute(found[2]["DEFINITION"])
            assert_table_equals_source(pg_dsn, wh, t)
    finally:
        try:
            wh.execute(f"DROP SCHEMA IF EXISTS {sf.database}.{sf.schema_} CASCADE")
        finally:
            wh.close()
