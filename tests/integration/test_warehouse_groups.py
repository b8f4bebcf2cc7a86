"""A group of tables nobody wrote for this project (pgbench's, the many-types table, a table of
the remaining types with a composite text key) through its generated warehouse: logical
capture -> S3 -> the pipe stand-ins (by column name) -> one landing table, stream and merge task
per table -> current-state tables, compared with the source value by value."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.cli import init
from cdc_daemon.errors import CdcError
from cdc_daemon.local.sample import generate_sales, sample_snowflake
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.reconcile.reconciler import Reconciler
from tests.fix_warehouse import start_warehouse
from tests.helpers import (
    export_until_idle,
    make_settings,
    object_bodies,
    running_daemon,
    wait_until,
)
from tests.schemas import (
    MANY_TYPES,
    PGBENCH_KEYS,
    create_many_types,
    pgbench_init,
    random_group_changes,
)
from tests.warehouse_checks import assert_table_equals_source, assert_warehouse_equals_source

pytestmark = pytest.mark.usefixtures("drop_slots")

SYNC = "-c synchronous_commit=on"
MORE_TYPES = "more_types"
TABLES = [*PGBENCH_KEYS, MANY_TYPES, MORE_TYPES, "ecommerce_sales"]


def create_more_types(dsn: str) -> None:
    """The mapping's types the other tables lack, under a composite key of text and integer."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {MORE_TYPES} (code text, n integer, s smallint, r real,"
            " d double precision, v varchar(10), c char(3), t time, j json, iv interval,"
            " ip inet, tz timestamptz, p numeric(20,5), big numeric(40,2), PRIMARY KEY (code, n))"
        )
        insert_more_types(conn, 0, 50)


def insert_more_types(conn: psycopg.Connection[Any], first: int, count: int) -> None:
    conn.execute(
        f"INSERT INTO {MORE_TYPES} SELECT 'k,' || (g %% 7), g, g - 100, g / 3.0, g / 7.0,"
        " 'v' || g, 'c', '10:00'::time + g * interval '1 min 0.5 s',"
        " json_build_object('g', g, 'list', json_build_array(g, 'x\"y')),"
        " g * interval '1 day 2 hours', ('10.0.0.' || (g %% 250))::inet,"
        " '2011-03-27 00:30:00+00'::timestamptz + g * interval '1 h',"
        " (g * 12345.6789)::numeric(20,5), (g * 1e30 + 0.25)::numeric(40,2)"
        " FROM generate_series(%s::int, %s::int) g",
        (first, first + count - 1),
    )


@pytest.fixture
def group(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> Iterator[LocalWarehouse]:
    pgbench_init(pg_dsn)
    create_many_types(pg_dsn, 200)
    create_more_types(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 3_000, days=10)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        # ecommerce_sales as SALES, with the sample's models on it (as the demo has it).
        tables=[
            {"name": t, **({"warehouse_table": "SALES"} if t == "ecommerce_sales" else {})}
            for t in TABLES
        ],
        capture={"mode": "logical", "group": "shop"},
        batch={"max_rows": 20_000},
        snowflake=sample_snowflake(),
    )
    wh = start_warehouse(settings, warehouse_dir)
    yield wh
    wh.stop()


async def test_every_table_of_a_group_reaches_its_generated_warehouse(
    pg_dsn: str, group: LocalWarehouse, s3_client: Any, bucket: str
) -> None:
    """pgbench's keyed tables, the many-types table (uuid key, jsonb, arrays, unconstrained
    numeric, bytea, enum, TOASTed text) and the table of the other types (composite text key,
    smallint, real, double, varchar(n), char(n), time, json, interval, inet, timestamptz,
    numeric(20,5), numeric(40,2))
    get a landing table, pipe, stream and merge task each, generated from the catalog; after
    the snapshot and random inserts, updates (some leaving the TOASTed body unchanged) and
    deletes, every current-state table equals its source row for row and value for value, the
    unchanged TOASTed values kept (also for a key whose body was replaced and then left
    unchanged by a second update merged in the same run); ecommerce_sales in the same group
    has SALES, and INVOICES and PRODUCTS equal PostgreSQL's own aggregates; the reconciler
    confirms every batch of every table. Once applied, `snowflake apply --plan` finds nothing
    to change for any of these tables."""
    settings = group.settings
    assert group.apply(plan_only=True).empty
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    random_group_changes(pg_dsn, random.Random(11), 150)
    with psycopg.connect(pg_dsn, options=SYNC) as conn:
        insert_more_types(conn, 100, 20)
        conn.execute(f"UPDATE {MORE_TYPES} SET j = NULL, r = r + 1 WHERE n % 5 = 0")
        conn.execute(f"DELETE FROM {MORE_TYPES} WHERE n % 9 = 0")
        conn.execute(
            "UPDATE ecommerce_sales SET quantity = quantity + 1, country = 'Iceland'"
            " WHERE id % 13 = 0"
        )
        conn.execute("DELETE FROM ecommerce_sales WHERE id % 17 = 0")
        conn.commit()
        # One key, two changes merged in one run: the first replaces the TOASTed body, the
        # second leaves it unchanged (not logged): the merge must keep the first's value.
        (key,) = conn.execute(
            f"SELECT id FROM {MANY_TYPES} WHERE length(body) > 4000 LIMIT 1"
        ).fetchone() or (None,)
        assert key is not None
        conn.execute(
            f"UPDATE {MANY_TYPES} SET body = 'replaced ' || repeat(md5(id::text), 200)"
            " WHERE id = %s",
            (key,),
        )
        conn.commit()
        conn.execute(f"UPDATE {MANY_TYPES} SET flag = NOT flag WHERE id = %s", (key,))
        conn.commit()
    assert await export_until_idle(settings) == 0
    unchanged = [k for k, body in object_bodies(s3_client, bucket).items() if b",body\n" in body]
    assert unchanged, "no change named an unchanged TOASTed value"
    group.pump_until_quiet()
    rows = {t.names.name: assert_table_equals_source(pg_dsn, group, t) for t in group.tables}
    assert set(rows) == {
        "PGBENCH_ACCOUNTS",
        "PGBENCH_BRANCHES",
        "PGBENCH_TELLERS",
        "MANY_TYPES",
        "MORE_TYPES",
        "SALES",
    }
    assert rows["PGBENCH_ACCOUNTS"] >= 100_000
    (kept,) = group.query(
        f"SELECT BODY FROM {MANY_TYPES} WHERE ID = %(k)s",
        {"k": str(key)},
    )
    assert str(kept["BODY"]).startswith("replaced ")
    # The seed's model on SALES: INVOICES and PRODUCTS equal Postgres's own aggregates.
    assert_warehouse_equals_source(pg_dsn, group)
    reconciler = Reconciler(settings)
    try:
        outcome = await reconciler.run_once()
        assert {p.name for p in outcome.pipes} == {f"RAW_{n}_PIPE" for n in rows}
        assert all(p.healthy for p in outcome.pipes)
        assert not outcome.failed
        assert not outcome.missing
        assert outcome.loaded
    finally:
        await reconciler.close()


async def test_a_column_added_while_running_lands_in_its_own_column(
    pg_dsn: str, group: LocalWarehouse
) -> None:
    """A column added to a table of the running group is added to its landing and
    current-state tables before the first object naming it is uploaded, and its merge task is
    re-created with it: new values land in that column (by name, nothing shifted), the rows
    before it hold NULL there (a table whose new column no change names yet gets it with the
    first object that does), and a later column drop leaves the column in Snowflake."""
    settings = group.settings
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    group.pump_until_quiet()

    def noted() -> bool:
        """The tellers' new column has landed (it does not exist before the daemon adds it)."""
        group.pump()
        try:
            rows = group.query("SELECT COUNT(NOTE) AS N FROM RAW_PGBENCH_TELLERS")
        except CdcError:
            return False
        return bool(rows[0]["N"])

    async with running_daemon(settings):
        with psycopg.connect(pg_dsn, options=SYNC, autocommit=True) as conn:
            conn.execute("ALTER TABLE pgbench_branches ADD COLUMN note text, ADD COLUMN score int")
            conn.execute("UPDATE pgbench_branches SET note = 'n,' || bid, score = bid * 10")
            conn.execute("INSERT INTO pgbench_branches (bid, bbalance, note) VALUES (99, 5, 'new')")
            conn.execute("ALTER TABLE pgbench_tellers ADD COLUMN note text")
            conn.execute("UPDATE pgbench_tellers SET tbalance = tbalance + 1 WHERE tid = 1")
            conn.execute("UPDATE pgbench_tellers SET note = 'last' WHERE tid = 2")
        await wait_until(noted, 120)
    group.pump_until_quiet()
    branches = group.query("SELECT BID, NOTE, SCORE FROM PGBENCH_BRANCHES ORDER BY BID")
    assert [(r["BID"], r["NOTE"], r["SCORE"]) for r in branches] == [
        (1, "n,1", 10),
        (99, "new", None),
    ]
    tellers = group.query("SELECT COUNT(*) AS N, COUNT(NOTE) AS NOTES FROM PGBENCH_TELLERS")
    assert (tellers[0]["N"], tellers[0]["NOTES"]) == (10, 1)
    with psycopg.connect(pg_dsn, options=SYNC, autocommit=True) as conn:
        conn.execute("ALTER TABLE pgbench_branches DROP COLUMN score")
        conn.execute("UPDATE pgbench_branches SET bbalance = bbalance + 1 WHERE bid = 1")
    assert await export_until_idle(settings) == 0
    group.pump_until_quiet()
    (row,) = group.query("SELECT BBALANCE, NOTE, SCORE FROM PGBENCH_BRANCHES WHERE BID = 1")
    assert (row["NOTE"], row["SCORE"]) == ("n,1", None)
