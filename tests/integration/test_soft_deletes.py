"""``deletes = "soft"`` through the local warehouse, on tables not written for this project
(pgbench's tellers and the many-types table, soft; pgbench's branches, hard): a deleted row
stays with ``_CDC_DELETED_AT``, a re-inserted key is live again, and the live rows equal the
source."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.cli import init
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.reconcile.verify import verify_group
from cdc_daemon.warehouse.model import Names, WarehouseTable
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, make_settings
from tests.schemas import MANY_TYPES, create_many_types, pgbench_init, random_group_changes
from tests.warehouse_checks import assert_table_equals_source

pytestmark = pytest.mark.usefixtures("drop_slots")

SYNC = "-c synchronous_commit=on"


@pytest.fixture
def soft(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> Iterator[LocalWarehouse]:
    pgbench_init(pg_dsn)
    create_many_types(pg_dsn, 120)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[
            {"name": "pgbench_tellers", "deletes": "soft"},
            {"name": MANY_TYPES, "deletes": "soft"},
            {"name": "pgbench_branches"},
        ],
        capture={"mode": "logical", "group": "soft"},
    )
    wh = start_warehouse(settings, warehouse_dir)
    yield wh
    wh.stop()


def live_table(wh: LocalWarehouse, t: WarehouseTable) -> WarehouseTable:
    """``t`` read through a view of its live rows (``_CDC_DELETED_AT`` NULL)."""
    view = f"{t.names.name}_LIVE"
    wh.query(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM {t.names.name} WHERE {t.live}")
    return dataclasses.replace(t, names=Names(t.names.table, view))


def deleted(wh: LocalWarehouse, table: str, key: str) -> dict[Any, Any]:
    """The soft-deleted rows' keys -> their ``_CDC_DELETED_AT``."""
    rows = wh.query(
        f"SELECT {key} AS K, _CDC_DELETED_AT AS AT FROM {table} WHERE _CDC_DELETED_AT IS NOT NULL"
    )
    return {str(r["K"]): r["AT"] for r in rows}


async def test_soft_deleted_rows_stay_marked_and_a_reinserted_key_is_live_again(
    pg_dsn: str, soft: LocalWarehouse
) -> None:
    """After the snapshot, two tellers deleted (one re-inserted later with other values), a
    branch deleted (hard), and random inserts, updates (TOASTed values left unchanged among
    them) and deletes of the many-types table: the deleted tellers and many-types rows stay in
    their current-state tables with ``_CDC_DELETED_AT`` set to the delete's commit time and
    their last values, the branch is gone; the re-inserted teller is live again with its new
    values and no ``_CDC_DELETED_AT``; every soft-deleted key is absent from the source, every
    many-types key deleted since the snapshot is marked, and the live rows equal the source
    value for value; ``verify`` finds every table equal."""
    settings = soft.settings
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    soft.pump_until_quiet()
    tables = {t.names.name: t for t in soft.tables}
    assert tables["PGBENCH_TELLERS"].soft_deletes
    assert not tables["PGBENCH_BRANCHES"].soft_deletes
    snapshot_keys = {str(r["ID"]) for r in soft.query(f"SELECT ID FROM {MANY_TYPES}")}
    (before,) = soft.query("SELECT TBALANCE AS B FROM PGBENCH_TELLERS WHERE TID = 4")
    with psycopg.connect(pg_dsn, options=SYNC) as conn:
        conn.execute("UPDATE pgbench_tellers SET tbalance = 55 WHERE tid = 3")
        started = conn.execute("SELECT now()").fetchone()
        conn.execute("DELETE FROM pgbench_tellers WHERE tid IN (3, 4)")
        conn.execute("DELETE FROM pgbench_branches WHERE bid = 1")
        conn.commit()
    committed = datetime.now(UTC)
    random_group_changes(pg_dsn, random.Random(21), 60)
    assert await export_until_idle(settings) == 0
    soft.pump_until_quiet()
    marked = deleted(soft, "PGBENCH_TELLERS", "TID")
    assert set(marked) == {"3", "4"}
    assert started is not None
    for at in marked.values():
        assert started[0] <= at <= committed
    (row,) = soft.query("SELECT TBALANCE AS B FROM PGBENCH_TELLERS WHERE TID = 4")
    assert row["B"] == before["B"]
    assert soft.query("SELECT * FROM PGBENCH_BRANCHES") == []

    with psycopg.connect(pg_dsn, options=SYNC) as conn:
        conn.execute("INSERT INTO pgbench_tellers (tid, bid, tbalance) VALUES (3, 1, 777)")
        conn.commit()
    assert await export_until_idle(settings) == 0
    soft.pump_until_quiet()
    (row,) = soft.query(
        "SELECT TBALANCE AS B, _CDC_DELETED_AT AS AT FROM PGBENCH_TELLERS WHERE TID = 3"
    )
    assert (row["B"], row["AT"]) == (777, None)
    assert set(deleted(soft, "PGBENCH_TELLERS", "TID")) == {"4"}

    with psycopg.connect(pg_dsn) as conn:
        source_keys = {str(r[0]) for r in conn.execute(f"SELECT id FROM {MANY_TYPES}")}
    gone = deleted(soft, MANY_TYPES, "ID")
    assert gone, "the random changes deleted no many-types row"
    assert not set(gone) & source_keys
    assert snapshot_keys - source_keys <= set(gone)
    for name in ("PGBENCH_TELLERS", "MANY_TYPES", "PGBENCH_BRANCHES"):
        assert_table_equals_source(pg_dsn, soft, live_table(soft, tables[name]))
    assert all(r.equal for r in verify_group(settings))


async def test_switching_a_table_to_soft_deletes_is_applied_to_its_warehouse(
    pg_dsn: str, soft: LocalWarehouse
) -> None:
    """A table captured with hard deletes, then configured with ``deletes = "soft"``:
    ``snowflake apply --plan`` shows the column added to its current-state table and its merge
    task re-created, and nothing for the others; once applied, a delete keeps the row marked
    while the rows merged before keep NULL there; a second plan is empty."""
    settings = soft.settings
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    soft.pump_until_quiet()
    specs = [
        t.model_copy(update={"deletes": "soft"}) if t.name == "pgbench_branches" else t
        for t in settings.tables
    ]
    soft.settings = settings.model_copy(update={"tables": tuple(specs)})
    plan = soft.apply(plan_only=True)
    lines = plan.render()
    assert "add column _CDC_DELETED_AT" in lines
    assert "MERGE_PGBENCH_BRANCHES" in lines, lines
    assert "PGBENCH_TELLERS" not in lines.replace("MERGE_PGBENCH_TELLERS", "")
    soft.apply()
    assert soft.apply(plan_only=True).empty
    with psycopg.connect(pg_dsn, options=SYNC) as conn:
        conn.execute("INSERT INTO pgbench_branches (bid, bbalance) VALUES (2, 0)")
        conn.execute("DELETE FROM pgbench_branches WHERE bid = 1")
        conn.commit()
    assert await export_until_idle(soft.settings) == 0
    soft.pump_until_quiet()
    assert set(deleted(soft, "PGBENCH_BRANCHES", "BID")) == {"1"}
    (row,) = soft.query("SELECT _CDC_DELETED_AT AS AT FROM PGBENCH_BRANCHES WHERE BID = 2")
    assert row["AT"] is None
