"""``history = true`` through the local warehouse, on tables not written for this project
(pgbench's tellers and the many-types table with a history, pgbench's branches without): the
history rebuilt "as of" each commit equals the source as it was then, its current rows equal
the current-state table, and a history configured later starts from the rows merged so far."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.cli import init
from cdc_daemon.errors import ConfigError
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.names import TableName
from cdc_daemon.warehouse.model import Names, WarehouseTable
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, make_settings
from tests.schemas import BIG_TEXT, MANY_TYPES, create_many_types, insert_many_types, pgbench_init
from tests.warehouse_checks import assert_table_equals_source

pytestmark = pytest.mark.usefixtures("drop_slots")

SYNC = "-c synchronous_commit=on"
HISTORIED = ("PGBENCH_TELLERS", "MANY_TYPES")


@pytest.fixture
def historied(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> Iterator[LocalWarehouse]:
    pgbench_init(pg_dsn)
    create_many_types(pg_dsn, 40)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[
            {"name": "pgbench_tellers", "history": True},
            {"name": MANY_TYPES, "history": True},
            {"name": "pgbench_branches"},
        ],
        capture={"mode": "logical", "group": "hist"},
    )
    wh = start_warehouse(settings, warehouse_dir)
    yield wh
    wh.stop()


def random_transaction(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    """1-6 changes of the tellers and the many-types table, the same key more than once at
    times: inserts, updates (of values, of the TOASTed body or leaving it unchanged, of the
    key), deletes."""
    for _ in range(rng.randint(1, 6)):
        pick = rng.random()
        teller = "(SELECT tid FROM pgbench_tellers ORDER BY random() LIMIT 1)"
        row = f"(SELECT id FROM {MANY_TYPES} ORDER BY random() LIMIT 1)"
        if pick < 0.2:
            conn.execute(
                f"UPDATE pgbench_tellers SET tbalance = tbalance + %s WHERE tid = {teller}",
                (rng.randint(1, 99),),
            )
        elif pick < 0.27:
            conn.execute(
                "UPDATE pgbench_tellers SET tid = (SELECT max(tid) + 1 FROM pgbench_tellers)"
                f" WHERE tid = {teller}"
            )
        elif pick < 0.32:
            conn.execute(f"DELETE FROM pgbench_tellers WHERE tid = {teller}")
        elif pick < 0.4:
            conn.execute(
                "INSERT INTO pgbench_tellers (tid, bid, tbalance)"
                " SELECT max(tid) + 1, 1, %s FROM pgbench_tellers",
                (rng.randint(0, 9),),
            )
        elif pick < 0.6:
            # The TOASTed body is left as it is: the change does not carry it.
            conn.execute(
                f"UPDATE {MANY_TYPES} SET amount = amount + 1.5, flag = NOT flag WHERE id = {row}"
            )
        elif pick < 0.68:
            conn.execute(f"UPDATE {MANY_TYPES} SET body = {BIG_TEXT} WHERE id = {row}")
        elif pick < 0.74:
            # Setting the body too: under the default replica identity a key change that
            # leaves a TOASTed value unchanged stops the table (docs/logical.md).
            conn.execute(
                f"UPDATE {MANY_TYPES} SET id = gen_random_uuid(), body = body || ''"
                f" WHERE id = {row}"
            )
        elif pick < 0.82:
            conn.execute(f"DELETE FROM {MANY_TYPES} WHERE id = {row}")
        elif pick < 0.9:
            insert_many_types(conn, rng.randint(1, 2))
        else:
            conn.execute("UPDATE pgbench_branches SET bbalance = bbalance + 1")


def as_of(wh: LocalWarehouse, t: WarehouseTable, at: datetime, label: str) -> WarehouseTable:
    """``t`` read through a view of its history's rows as of ``at`` (the documented query)."""
    view = f"{t.names.name}_AS_OF_{label}"
    wh.query(
        f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM {t.names.history}"
        f" WHERE _CDC_VALID_FROM <= '{at.isoformat()}'::TIMESTAMP_TZ"
        f" AND (_CDC_VALID_TO IS NULL OR '{at.isoformat()}'::TIMESTAMP_TZ < _CDC_VALID_TO)"
    )
    return dataclasses.replace(t, names=Names(t.names.table, view))


def snapshot(conn: psycopg.Connection[Any], table: str, label: str) -> TableName:
    """A copy of the source table as it is now, for comparing with the history later."""
    copy = TableName("public", f"snap_{table}_{label}".lower())
    conn.execute(f"CREATE TABLE {copy.key} AS SELECT * FROM {table}")
    return copy


def current(wh: LocalWarehouse, t: WarehouseTable) -> WarehouseTable:
    """``t`` read through a view of its history's current rows."""
    view = f"{t.names.name}_HISTORY_CURRENT"
    wh.query(
        f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM {t.names.history} WHERE _CDC_IS_CURRENT"
    )
    return dataclasses.replace(t, names=Names(t.names.table, view))


async def test_history_as_of_each_commit_equals_the_source_then(
    pg_dsn: str, historied: LocalWarehouse
) -> None:
    """After the snapshot, 40 random transactions (inserts, updates of values and keys, updates
    leaving a TOASTed value unchanged, deletes, the same key changed twice in one transaction)
    merged in four rounds: for the snapshot and every commit, the history's rows as of a time
    between that commit and the next equal the source as it was then, value for value; its
    current rows equal the source and the current-state table; no key has two current
    versions, every delete's validity is empty, and the table without history has none."""
    settings = historied.settings
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    historied.pump_until_quiet()
    tables = {t.names.name: t for t in historied.tables}
    assert [n for n, t in tables.items() if t.history] == list(HISTORIED)
    rng = random.Random(27)
    moments: list[tuple[str, datetime, dict[str, TableName]]] = []
    with psycopg.connect(pg_dsn, options=SYNC) as conn:

        def remember(label: str) -> None:
            # Between this commit and the next: the source as the history must show it.
            row = conn.execute("SELECT clock_timestamp()").fetchone()
            assert row is not None
            copies = {
                name: snapshot(conn, tables[name].names.table.name, label) for name in HISTORIED
            }
            conn.commit()
            moments.append((label, row[0], copies))

        remember("S")
        for round_ in range(4):
            for i in range(10):
                random_transaction(conn, rng)
                conn.commit()
                remember(f"R{round_}T{i}")
            assert await export_until_idle(settings) == 0
            historied.pump_until_quiet()

    for label, at, copies in moments:
        for name in HISTORIED:
            view = as_of(historied, tables[name], at, label)
            source = dataclasses.replace(view, names=Names(copies[name], view.names.name))
            assert_table_equals_source(pg_dsn, historied, source)
    for name in HISTORIED:
        t = tables[name]
        assert_table_equals_source(pg_dsn, historied, current(historied, t))
        assert_table_equals_source(pg_dsn, historied, t)
        key = ", ".join(c.q for c in t.key)
        assert not historied.query(
            f"SELECT {key} FROM {t.names.history} WHERE _CDC_IS_CURRENT"
            f" GROUP BY {key} HAVING COUNT(*) > 1"
        )
        deletes = historied.query(
            f"SELECT _CDC_VALID_FROM AS F, _CDC_VALID_TO AS T, _CDC_IS_CURRENT AS C"
            f" FROM {t.names.history} WHERE _CDC_OP = 'D'"
        )
        assert deletes, f"{name}: the random transactions deleted no row"
        assert all(r["F"] == r["T"] and not r["C"] for r in deletes)
    assert not historied.query(
        "SELECT 1 FROM INFORMATION_SCHEMA.TABLES WHERE TABLE_NAME = 'PGBENCH_BRANCHES_HISTORY'"
    )


async def test_a_history_configured_later_starts_from_the_merged_rows(
    pg_dsn: str, historied: LocalWarehouse
) -> None:
    """A table captured without history, then configured with ``history = true``: ``snowflake
    apply --plan`` shows its history table created and its merge task altered, and nothing
    for the others; once applied, the history holds each merged row as a current first
    version valid from its last commit, later changes add versions (an update closes the
    first version at its commit time), and a second plan is empty."""
    settings = historied.settings
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    historied.pump_until_quiet()
    specs = [
        t.model_copy(update={"history": True}) if t.name == "pgbench_branches" else t
        for t in settings.tables
    ]
    historied.settings = settings.model_copy(update={"tables": tuple(specs)})
    lines = historied.apply(plan_only=True).render().splitlines()
    assert any(line.startswith("create   TABLE PGBENCH_BRANCHES_HISTORY") for line in lines)
    assert any(line.startswith("alter    TASK MERGE_PGBENCH_BRANCHES") for line in lines)
    assert not any("TELLERS" in line or "MANY_TYPES" in line for line in lines), lines
    historied.apply()
    first = historied.query(
        "SELECT BID, BBALANCE, _CDC_VALID_FROM AS F, _CDC_VALID_TO AS T, _CDC_IS_CURRENT AS C"
        " FROM PGBENCH_BRANCHES_HISTORY"
    )
    merged = historied.query("SELECT BID, BBALANCE, _CDC_TS FROM PGBENCH_BRANCHES")
    assert len(first) == len(merged) == 1
    assert (first[0]["BID"], first[0]["BBALANCE"], first[0]["F"]) == (
        merged[0]["BID"],
        merged[0]["BBALANCE"],
        merged[0]["_CDC_TS"],
    )
    assert first[0]["T"] is None
    assert first[0]["C"]

    with psycopg.connect(pg_dsn, options=SYNC) as conn:
        conn.execute("UPDATE pgbench_branches SET bbalance = 42")
        conn.commit()
    assert await export_until_idle(historied.settings) == 0
    historied.pump_until_quiet()
    versions = historied.query(
        "SELECT BBALANCE AS B, _CDC_VALID_FROM AS F, _CDC_VALID_TO AS T, _CDC_IS_CURRENT AS C,"
        " _CDC_OP AS OP FROM PGBENCH_BRANCHES_HISTORY ORDER BY _CDC_SEQ"
    )
    assert [(v["B"], v["C"], v["OP"]) for v in versions] == [(0, False, "I"), (42, True, "U")]
    assert versions[0]["T"] == versions[1]["F"]
    assert versions[1]["T"] is None
    assert historied.apply(plan_only=True).empty


def test_history_needs_the_logical_mode(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """``history = true`` in a watermark group is refused with one sentence naming the mode
    that can keep one (the watermark mode has no commit times and sees no deletes)."""
    with pytest.raises(ConfigError) as caught:
        make_settings(
            pg_dsn,
            s3_server,
            bucket,
            tmp_path,
            tables=[{"name": "ecommerce_sales", "history": True}],
            capture={"mode": "watermark"},
        )
    assert 'needs capture.mode = "logical"' in str(caught.value)
