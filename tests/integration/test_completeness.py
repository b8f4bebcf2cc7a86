"""The completeness check on tables that are not the seed's: per day, rows and per-column totals
computed by PostgreSQL and by the local warehouse agree after an export, and each kind of
damage in the warehouse is reported on its day, naming the column it touched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from structlog.testing import capture_logs

from cdc_daemon.config import Settings, TableSettings
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.reconcile.completeness import DayDifference, Scope, check_group, check_table
from cdc_daemon.warehouse.client import Warehouse
from cdc_daemon.warehouse.model import names
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, make_settings

EVERYTHING = 2**62  # a watermark above every id: every row counts


def create_shop(dsn: str) -> None:
    """shop.orders (partitioned by a timestamptz, with a number, a text, a boolean and a float),
    shop.items (partitioned by a date) and shop.notes (no partition column)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA shop")
        conn.execute(
            "CREATE TABLE shop.orders (id bigserial PRIMARY KEY, placed timestamptz,"
            " amount numeric(12,2), qty integer, note text, paid boolean, weight double precision)"
        )
        conn.execute(
            "INSERT INTO shop.orders (placed, amount, qty, note, paid, weight)"
            " SELECT '2024-03-01 22:00+00'::timestamptz + g * interval '5 hours', g * 1.25,"
            " g % 7, CASE WHEN g % 5 <> 0 THEN repeat('é', g % 4) || g END, g % 2 = 0, g / 3.0"
            " FROM generate_series(1, 60) g"
        )
        conn.execute(
            "CREATE TABLE shop.items (id bigserial PRIMARY KEY, day date NOT NULL, n bigint)"
        )
        conn.execute(
            "INSERT INTO shop.items (day, n) SELECT date '2024-03-01' + g % 4, g * 1000003"
            " FROM generate_series(1, 40) g"
        )
        conn.execute("CREATE TABLE shop.notes (id bigserial PRIMARY KEY, body text)")
        conn.execute("INSERT INTO shop.notes (body) SELECT 'n' || g FROM generate_series(1, 5) g")


@pytest.fixture
def shop(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> Iterator[LocalWarehouse]:
    create_shop(pg_dsn)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        capture={"group": "shop"},
        tables=[
            {"name": "shop.orders", "partition_column": "placed"},
            {"name": "shop.items", "partition_column": "day"},
            {"name": "shop.notes"},
        ],
    )
    wh = start_warehouse(settings, warehouse_dir)
    yield wh
    wh.stop()


async def everything(_: TableSettings) -> Scope:
    """Every day judged, every row counted."""
    return Scope(frozenset(), frozenset(), watermark=EVERYTHING)


async def check(
    settings: Settings, scope: Scope, table: str = "shop.orders"
) -> list[DayDifference]:
    """The check of one table of the group, on a warehouse session of its own."""
    wh = Warehouse.of_group(settings).connect()
    try:
        (spec,) = [s for s in settings.table_specs if s.qualified == table]
        (n,) = [n for n in names(settings) if n.source == table]
        return await check_table(settings.postgres, wh, spec, n, scope)
    finally:
        wh.close()


def day_of(dsn: str, order_id: int) -> str:
    with psycopg.connect(dsn) as conn:
        found = conn.execute(
            "SELECT to_char(placed AT TIME ZONE 'UTC', 'YYYY-MM-DD') FROM shop.orders"
            " WHERE id = %s",
            (order_id,),
        ).fetchone()
    assert found is not None
    return str(found[0])


async def test_every_table_with_a_partition_column_agrees_after_an_export(
    pg_dsn: str, shop: LocalWarehouse
) -> None:
    """After the group is exported and merged, no day of shop.orders (a timestamptz day, with
    sums, text lengths in characters, NULLs and booleans) nor of shop.items (a date day, bigint
    sums) differs; shop.notes, with no partition column, is not checked; one
    ``completeness_checked`` line per checked table, each having judged every day."""
    settings = shop.settings
    assert await export_until_idle(settings) == 0
    shop.pump_until_quiet()
    wh = Warehouse.of_group(settings).connect()
    try:
        with capture_logs() as logs:
            assert await check_group(settings, wh, everything) == []
    finally:
        wh.close()
    checked = {e["table"]: e["days"] for e in logs if e["event"] == "completeness_checked"}
    assert checked == {"shop.orders": 13, "shop.items": 4}


async def test_each_damage_is_reported_on_its_day_naming_the_column(
    pg_dsn: str, shop: LocalWarehouse
) -> None:
    """A changed amount, a NULLed note, a flipped boolean and a lost row in the warehouse are
    each reported on the day they are on, with both row counts and the totals that differ; a
    text changed to another of the same length and a timestamp moved by a second are seen by
    the row hash alone; a changed float is not seen (floats are counted, and hashed by NULL or
    not)."""
    settings = shop.settings
    assert await export_until_idle(settings) == 0
    shop.pump_until_quiet()
    shop.query("UPDATE ORDERS SET AMOUNT = AMOUNT + 1 WHERE ID = 3")
    shop.query("UPDATE ORDERS SET NOTE = NULL WHERE ID = 11")
    shop.query("UPDATE ORDERS SET PAID = NOT PAID WHERE ID = 22")
    shop.query("UPDATE ORDERS SET WEIGHT = WEIGHT + 1 WHERE ID = 40")
    shop.query("DELETE FROM ORDERS WHERE ID = 33")
    shop.query("UPDATE ORDERS SET NOTE = 'ééé15' WHERE ID = 51")
    shop.query("UPDATE ORDERS SET PLACED = DATEADD(SECOND, 1, PLACED) WHERE ID = 56")
    found = await check(settings, Scope(frozenset(), frozenset(), watermark=EVERYTHING))
    by_day = {d.day: d for d in found}
    assert sorted(by_day) == sorted(day_of(pg_dsn, i) for i in (3, 11, 22, 33, 51, 56))
    expected = {
        3: ("sum(amount)", "hash(row)"),
        11: ("count(note)", "length(note)", "hash(row)"),
        22: ("true(paid)", "hash(row)"),
        51: ("hash(row)",),
        56: ("hash(row)",),
    }
    for order, differing in expected.items():
        day = by_day[day_of(pg_dsn, order)]
        assert day.differing == differing
        assert day.source_rows == day.warehouse_rows
    gone = by_day[day_of(pg_dsn, 33)]
    assert gone.source_rows - gone.warehouse_rows == 1
    assert {"count(id)", "sum(id)", "sum(amount)", "count(weight)"} <= set(gone.differing)


async def test_only_days_the_ledger_lets_it_judge_are_compared(
    pg_dsn: str, shop: LocalWarehouse
) -> None:
    """A day with an object still waiting for Snowflake's confirmation is not judged; without a
    watermark (logical mode) a day with no object is not either; with one, rows above it (not
    exported yet) count on neither side."""
    settings = shop.settings
    assert await export_until_idle(settings) == 0
    shop.pump_until_quiet()
    shop.query("DELETE FROM ORDERS WHERE ID = 3")
    damaged = day_of(pg_dsn, 3)
    waiting = await check(settings, Scope(frozenset({damaged}), frozenset({damaged}), EVERYTHING))
    assert waiting == []
    unexported = await check(settings, Scope(frozenset({"2000-01-01"}), frozenset()))
    assert unexported == []
    (logical,) = await check(settings, Scope(frozenset({damaged}), frozenset()))
    assert logical.day == damaged
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO shop.orders (placed, amount) VALUES ('2024-03-02 12:00+00', 99)")
    assert await check(settings, Scope(frozenset(), frozenset(), watermark=2)) == []
