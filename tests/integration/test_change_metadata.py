"""The change metadata of every current-state table (``_CDC_OP``, ``_CDC_SEQ``,
``_CDC_SYNCED_AT``) through the local warehouse, and how a warehouse made before them gets
them: ``snowflake apply``, or the daemon's schema evolution when it re-creates a merge task."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from cdc_daemon.cli import init
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, make_settings
from tests.schemas import pgbench_init

pytestmark = pytest.mark.usefixtures("drop_slots")

SYNC = "-c synchronous_commit=on"


@pytest.fixture
def tellers(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> Iterator[LocalWarehouse]:
    pgbench_init(pg_dsn)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": "pgbench_tellers", "deletes": "soft"}, {"name": "pgbench_branches"}],
        capture={"mode": "logical", "group": "meta"},
    )
    wh = start_warehouse(settings, warehouse_dir)
    yield wh
    wh.stop()


def lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


async def test_every_row_carries_its_last_operation_position_and_merge_time(
    pg_dsn: str, tellers: LocalWarehouse
) -> None:
    """After the snapshot, an update, a soft delete and an insert: each row's ``_CDC_OP`` is
    its last change's (``I`` for the snapshot and an insert, ``U``, ``D`` for the soft-deleted
    row), its ``_CDC_SEQ`` that change's LSN (the snapshot's rows below every later change) and
    ``_CDC_SYNCED_AT`` the merge's time, the same as ``_MERGED_AT``."""
    settings = tellers.settings
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    tellers.pump_until_quiet()
    with psycopg.connect(pg_dsn, options=SYNC) as conn:
        conn.execute("UPDATE pgbench_tellers SET tbalance = 5 WHERE tid = 2")
        conn.execute("DELETE FROM pgbench_tellers WHERE tid = 3")
        conn.execute("INSERT INTO pgbench_tellers (tid, bid, tbalance) VALUES (11, 1, 0)")
        conn.commit()
        (position,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone() or ("",)
        conn.commit()
    before = datetime.now(UTC)
    assert await export_until_idle(settings) == 0
    tellers.pump_until_quiet()
    after = datetime.now(UTC) + timedelta(seconds=1)
    rows = {
        r["TID"]: r
        for r in tellers.query(
            "SELECT TID, _CDC_OP, _CDC_SEQ, _CDC_SYNCED_AT, _MERGED_AT FROM PGBENCH_TELLERS"
        )
    }
    assert {t: r["_CDC_OP"] for t, r in rows.items()} == {
        **{t: "I" for t in range(1, 11)},
        2: "U",
        3: "D",
        11: "I",
    }
    changed = [rows[t]["_CDC_SEQ"] for t in (2, 3, 11)]
    assert changed == sorted(changed)
    assert changed[-1] <= lsn(position)
    assert all(rows[1]["_CDC_SEQ"] < s for s in changed)
    for t in (2, 3, 11):
        synced = rows[t]["_CDC_SYNCED_AT"]
        assert synced == rows[t]["_MERGED_AT"]
        assert before - timedelta(seconds=1) <= synced <= after
    (branch,) = tellers.query("SELECT _CDC_OP, _CDC_SYNCED_AT FROM PGBENCH_BRANCHES")
    assert branch["_CDC_OP"] == "I"
    assert branch["_CDC_SYNCED_AT"] is not None


async def test_a_warehouse_without_the_metadata_gets_it_from_apply_and_from_evolution(
    pg_dsn: str, tellers: LocalWarehouse
) -> None:
    """A current-state table lacking the metadata columns (as an earlier version made it):
    ``snowflake apply --plan`` adds them; and when the daemon itself re-creates the merge task
    (a column added in the source), it adds them first, so the merge goes on and fills
    them."""
    settings = tellers.settings
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    tellers.pump_until_quiet()
    for table in ("PGBENCH_TELLERS", "PGBENCH_BRANCHES"):
        tellers.query(f"ALTER TABLE {table} DROP COLUMN _CDC_OP")
        tellers.query(f"ALTER TABLE {table} DROP COLUMN _CDC_SYNCED_AT")
    tellers.query("ALTER TABLE PGBENCH_TELLERS DROP COLUMN _CDC_DELETED_AT")
    lines = tellers.apply(plan_only=True).render()
    assert "PGBENCH_TELLERS: add column _CDC_OP, _CDC_SYNCED_AT, _CDC_DELETED_AT" in lines, lines
    assert "PGBENCH_BRANCHES: add column _CDC_OP, _CDC_SYNCED_AT" in lines, lines
    # The daemon's own path, without apply: a new source column re-creates the merge task.
    with psycopg.connect(pg_dsn, options=SYNC, autocommit=True) as conn:
        conn.execute("ALTER TABLE pgbench_tellers ADD COLUMN note text")
        conn.execute("UPDATE pgbench_tellers SET note = 'n' WHERE tid = 1")
    assert await export_until_idle(settings) == 0
    tellers.pump_until_quiet()
    (row,) = tellers.query(
        "SELECT NOTE, _CDC_OP, _CDC_SYNCED_AT FROM PGBENCH_TELLERS WHERE TID = 1"
    )
    assert (row["NOTE"], row["_CDC_OP"]) == ("n", "U")
    assert row["_CDC_SYNCED_AT"] is not None
    assert "PGBENCH_TELLERS: add" not in tellers.apply(plan_only=True).render()
