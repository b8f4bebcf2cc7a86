"""Retyped columns (issue #27): a documented widening is followed while the daemon runs, with
Snowflake's columns widened before the first object holding a wider value loads, and every
value (from before and after) intact; any other change stops only its table, naming the way
forward. ``snowflake apply --plan`` shows the same widenings as column alters and the rest as
manual, and the local warehouse refuses the ALTERs Snowflake refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.errors import TableFailedError, WarehouseError
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.warehouse.model import WarehouseTable, read_catalog
from cdc_daemon.warehouse.sql import Statement
from tests.fix_warehouse import start_warehouse
from tests.helpers import make_settings, running_daemon, wait_until
from tests.warehouse_checks import assert_table_equals_source

SYNC = "-c synchronous_commit=on"
GAUGES = "public.gauges"
METERS = "public.meters"

TABLES = """
CREATE TABLE gauges (id bigint PRIMARY KEY, code varchar(8), qty smallint,
                     price numeric(8,2), seen timestamp(3));
INSERT INTO gauges SELECT g, 'c' || g, g * 100, g + 0.25,
       '2026-01-01'::timestamp + g * interval '1.5 seconds' FROM generate_series(1, 20) g;
CREATE TABLE meters (id integer PRIMARY KEY, reading integer, at timestamp);
INSERT INTO meters SELECT g, g, '2026-01-01'::timestamp + g * interval '1 hour'
       FROM generate_series(1, 5) g;
"""

# Each widening, then a change only the wider type holds (and one of an old row): none of
# these values fits the column's Snowflake type before the widening.
WIDENINGS = [
    (
        "ALTER TABLE gauges ALTER COLUMN code TYPE varchar(40)",
        "INSERT INTO gauges VALUES (21, repeat('x', 40), 1, 1, now())",
    ),
    (
        "ALTER TABLE gauges ALTER COLUMN qty TYPE integer",
        "INSERT INTO gauges VALUES (22, 'q', 123456789, 1, now());"
        " UPDATE gauges SET qty = 2000000000 WHERE id = 1",
    ),
    (
        "ALTER TABLE gauges ALTER COLUMN code TYPE text",
        "INSERT INTO gauges VALUES (23, repeat('y', 500), 1, 1, now())",
    ),
    (
        "ALTER TABLE gauges ALTER COLUMN qty TYPE bigint",
        "INSERT INTO gauges VALUES (24, 'b', 9000000000000000000, 1, now())",
    ),
    (
        "ALTER TABLE gauges ALTER COLUMN price TYPE numeric(16,2)",
        "INSERT INTO gauges VALUES (25, 'p', 1, 12345678901234.56, now());"
        " UPDATE gauges SET price = 99999999999999.99 WHERE id = 2",
    ),
    (
        "ALTER TABLE gauges ALTER COLUMN seen TYPE timestamp(6)",
        "INSERT INTO gauges VALUES (26, 's', 1, 1, '2026-02-03 04:05:06.123456')",
    ),
]


def _current(wh: LocalWarehouse, name: str) -> WarehouseTable:
    """The table as the warehouse sees it from the catalog now."""
    (t,) = [t for t in read_catalog(wh.settings) if t.names.source == name]
    return t


def _types(wh: LocalWarehouse, table: str) -> dict[str, str]:
    return {r["name"]: r["type"] for r in wh.query(f"DESC TABLE {table}")}


def _arrived(wh: LocalWarehouse, pg_dsn: str, name: str = GAUGES) -> bool:
    """One round of the pipe stand-in and the tasks; then whether the table equals its
    source."""
    wh.pump()
    try:
        assert_table_equals_source(pg_dsn, wh, _current(wh, name))
    except AssertionError:
        return False
    return True


@pytest.fixture
def warehouse(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> Any:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(TABLES)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": GAUGES}, {"name": METERS}],
        capture={"mode": "logical", "group": "widen", "poll_interval_s": 0.2},
        batch={"max_age_s": 0.5},
    )
    wh = start_warehouse(settings, warehouse_dir)
    yield wh
    wh.stop()


@pytest.mark.usefixtures("drop_slots")
async def test_widenings_are_followed_while_the_daemon_runs_and_another_change_stops_its_table(
    warehouse: LocalWarehouse, pg_dsn: str
) -> None:
    """A running daemon of a group of two: GAUGES arrives whole; then each widening (varchar(8)
    -> varchar(40) -> text, smallint -> integer -> bigint, numeric(8,2) -> numeric(16,2),
    timestamp(3) -> timestamp(6)), each followed by values only the wider type holds, arrives
    too: Snowflake's NUMBER columns are widened in RAW_GAUGES, GAUGES and GAUGES_CHANGES before
    those values load (no load fails), and every row, old and new, equals the source. METERS'
    key integer -> bigint is widened in its tombstones too (a wider key deleted). Then METERS,
    retyped timestamp -> timestamptz (not a widening Snowflake follows), fails alone with the
    reason and the way forward; its earlier rows stay. The plan is empty afterwards."""
    wh = warehouse
    assert await _init(wh) == 0
    async with running_daemon(wh.settings) as daemon:
        await wait_until(lambda: _arrived(wh, pg_dsn), 120)
        assert _types(wh, "RAW_GAUGES")["QTY"] == "NUMBER(5,0)"
        for ddl, change in WIDENINGS:
            with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
                conn.execute(ddl)
                conn.execute(change)
            await wait_until(lambda: _arrived(wh, pg_dsn), 120)
        # A key column: widened in the tombstones too (a delete of the wider key).
        with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
            conn.execute("ALTER TABLE meters ALTER COLUMN id TYPE bigint")
            conn.execute("INSERT INTO meters VALUES (1000000000000, 6, now())")
            conn.execute("INSERT INTO meters VALUES (1000000000001, 7, now())")
            conn.execute("DELETE FROM meters WHERE id IN (5, 1000000000001)")
        await wait_until(lambda: _arrived(wh, pg_dsn, METERS), 120)
        with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
            conn.execute("ALTER TABLE meters ALTER COLUMN at TYPE timestamptz")
            conn.execute("UPDATE meters SET reading = 99 WHERE id = 1")
            conn.execute("INSERT INTO gauges VALUES (27, 'after', 7, 7, now())")
        await wait_until(lambda: _arrived(wh, pg_dsn), 120)
        with pytest.raises(TableFailedError) as failed:
            await daemon.stopped()
    message = str(failed.value)
    assert message.startswith(f"table {METERS} of group widen is failed: ")
    assert "at: timestamp without time zone -> timestamp with time zone, TIMESTAMP_NTZ" in message
    assert f"resync --table {METERS}" in message
    assert "gauges" not in message
    failures = wh.query("SELECT FILE_NAME FROM _EMU_COPY_HISTORY WHERE STATUS <> 'Loaded'")
    assert failures == []
    for table in ("RAW_GAUGES", "GAUGES", "GAUGES_CHANGES"):
        types = _types(wh, table)
        assert (types["QTY"], types["PRICE"]) == ("NUMBER(19,0)", "NUMBER(16,2)"), table
        assert types["CODE"] == "VARCHAR(16777216)", table
    assert assert_table_equals_source(pg_dsn, wh, _current(wh, GAUGES)) == 27
    for table in ("RAW_METERS", "METERS", "METERS_CHANGES", "METERS_TOMBSTONES"):
        assert _types(wh, table)["ID"] == "NUMBER(19,0)", table
    tombstones = wh.query('SELECT "ID" FROM METERS_TOMBSTONES ORDER BY 1')
    assert [r["ID"] for r in tombstones] == [5, 1000000000001]
    readings = wh.query('SELECT "READING" AS R FROM METERS ORDER BY "ID"')
    assert [r["R"] for r in readings] == [1, 2, 3, 4, 6]  # nothing after the failure
    plan = wh.apply([_current(wh, GAUGES)], plan_only=True)
    assert plan.empty, plan.render()


async def _init(wh: LocalWarehouse) -> int:
    from cdc_daemon.cli import init

    return await init(wh.settings)


def test_apply_plan_alters_widened_columns_in_every_table_and_names_the_way_for_the_rest(
    warehouse: LocalWarehouse, pg_dsn: str
) -> None:
    """Columns widened in the source while no daemon runs: ``apply --plan`` names an ALTER
    COLUMN for each Snowflake table holding the column (the tombstones for a key column too),
    changes nothing, and apply makes them, the key's rows intact; varchar(8) -> text needs
    none. timestamp -> timestamptz is planned as manual in every table, with the way forward
    (resync), and stays as it was."""
    wh = warehouse
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE gauges ALTER COLUMN qty TYPE bigint")
        conn.execute("ALTER TABLE gauges ALTER COLUMN code TYPE text")
        conn.execute("ALTER TABLE meters ALTER COLUMN id TYPE bigint")
        conn.execute("ALTER TABLE meters ALTER COLUMN at TYPE timestamptz")
    text = wh.apply(plan_only=True).render()
    for table in ("RAW_GAUGES", "GAUGES", "GAUGES_CHANGES"):
        assert (
            f"alter    COLUMN {table}.QTY: NUMBER(5,0) -> NUMBER(19, 0) (widened in the source)\n"
            in text
        )
    for table in ("RAW_METERS", "METERS", "METERS_CHANGES", "METERS_TOMBSTONES"):
        assert f"alter    COLUMN {table}.ID: NUMBER(10,0) -> NUMBER(19, 0)" in text
    for table in ("RAW_METERS", "METERS", "METERS_CHANGES"):
        assert (
            f"manual   COLUMN {table}.AT: TIMESTAMP_NTZ(9) in Snowflake, TIMESTAMP_TZ from the "
            "catalog: TIMESTAMP_NTZ to TIMESTAMP_TZ is a change to another type, which "
            "Snowflake cannot make in place" in text
        )
    assert f"`cdc-daemon resync --table {METERS}`" in text
    assert "CODE" not in text
    assert _types(wh, "RAW_GAUGES")["QTY"] == "NUMBER(5,0)"  # --plan changed nothing
    wh.apply([_current(wh, GAUGES)])
    for table in ("RAW_GAUGES", "GAUGES", "GAUGES_CHANGES"):
        assert _types(wh, table)["QTY"] == "NUMBER(19,0)", table
    assert _types(wh, "RAW_METERS")["AT"] == "TIMESTAMP_NTZ(9)"
    assert wh.apply([_current(wh, GAUGES)], plan_only=True).empty
    # The key column too (the emulator rebuilds METERS for it: DuckDB cannot retype a PRIMARY
    # KEY column), its rows intact; the timestamp stays manual.
    wh.query(
        'INSERT INTO METERS ("ID", "READING", "AT", _CDC_SEQ)'
        " VALUES (1, 10, '2026-01-01 01:00:00', 5), (2, 20, '2026-01-01 02:00:00', 6)"
    )
    before = wh.query('SELECT "ID", "READING", "AT", _CDC_SEQ FROM METERS ORDER BY 1')
    assert len(before) == 2
    wh.apply([_current(wh, METERS)])
    for table in ("RAW_METERS", "METERS", "METERS_CHANGES", "METERS_TOMBSTONES"):
        assert _types(wh, table)["ID"] == "NUMBER(19,0)", table
    assert wh.query('SELECT "ID", "READING", "AT", _CDC_SEQ FROM METERS ORDER BY 1') == before
    left = wh.apply([_current(wh, METERS)], plan_only=True)
    assert {c.action for c in left.changes} == {"manual"}, left.render()


def test_the_local_warehouse_refuses_the_alters_snowflake_refuses(
    warehouse: LocalWarehouse,
) -> None:
    """As Snowflake documents for ALTER COLUMN ... SET DATA TYPE: a larger NUMBER precision is
    made (and the same VARCHAR); a changed scale, a smaller precision, a shorter VARCHAR (an
    unbounded one to VARCHAR(100)) and TIMESTAMP_NTZ -> TIMESTAMP_TZ are refused (DuckDB behind
    fakesnow would make them all)."""
    wh = warehouse.wh

    def alter(text: str) -> None:
        wh.dialect.execute_ddl(wh, Statement("40_tables.sql", text))

    alter('ALTER TABLE RAW_GAUGES ALTER COLUMN "PRICE" SET DATA TYPE NUMBER(12, 2)')
    alter('ALTER TABLE RAW_GAUGES ALTER COLUMN "CODE" SET DATA TYPE VARCHAR')
    for refused in (
        'ALTER TABLE RAW_GAUGES ALTER COLUMN "PRICE" SET DATA TYPE NUMBER(14, 3)',
        'ALTER TABLE RAW_GAUGES ALTER COLUMN "QTY" SET DATA TYPE NUMBER(4, 0)',
        'ALTER TABLE RAW_GAUGES ALTER COLUMN "CODE" SET DATA TYPE VARCHAR(100)',
        'ALTER TABLE RAW_GAUGES ALTER "SEEN" SET DATA TYPE TIMESTAMP_TZ',
    ):
        with pytest.raises(WarehouseError, match="cannot change column"):
            alter(refused)
    types = _types(warehouse, "RAW_GAUGES")
    assert (types["PRICE"], types["QTY"], types["SEEN"], types["CODE"]) == (
        "NUMBER(12,2)",
        "NUMBER(5,0)",
        "TIMESTAMP_NTZ(9)",
        "VARCHAR(16777216)",
    )
