"""A quarantined change never leaves the current-state table claiming a value the source no
longer has (#23): through S3 and the local warehouse, in logical mode, on a table written for
no one (a gauge log in a schema of its own, REPLICA IDENTITY FULL so a delete carries the whole
old row)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.cli import init
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, make_settings, object_bodies

pytestmark = pytest.mark.usefixtures("drop_slots")

SYNC = "-c synchronous_commit=on"


@pytest.fixture
def gauges(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> Iterator[LocalWarehouse]:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA plant")
        conn.execute(
            "CREATE TABLE plant.gauge (id integer PRIMARY KEY, reading numeric(12,3),"
            " ratio float8, closes time, label text)"
        )
        conn.execute("ALTER TABLE plant.gauge REPLICA IDENTITY FULL")
        conn.execute(
            "INSERT INTO plant.gauge SELECT g, g * 1.5, g / 4.0, '17:00', 'g' || g"
            " FROM generate_series(1, 4) g"
        )
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": "plant.gauge"}],
        capture={"mode": "logical", "group": "plant"},
    )
    wh = start_warehouse(settings, warehouse_dir)
    yield wh
    wh.stop()


def current(wh: LocalWarehouse) -> dict[int, tuple[Any, ...]]:
    wh.pump_until_quiet()
    failed = wh.query(
        "SELECT NAME, ERROR_MESSAGE AS E FROM _EMU_TASK_HISTORY WHERE STATE <> 'SUCCEEDED'"
    )
    assert not failed, failed[0]
    rows = wh.query(
        'SELECT "ID" AS I, "READING" AS R, "RATIO" AS F, "CLOSES" AS C, "LABEL" AS L,'
        " _CDC_QUARANTINED AS Q FROM GAUGE"
    )
    return {int(r["I"]): (r["R"], r["F"], r["C"], r["L"], r["Q"]) for r in rows}


async def test_a_quarantined_update_withholds_the_value_and_a_delete_still_deletes(
    pg_dsn: str, gauges: LocalWarehouse, s3_client: Any, bucket: str
) -> None:
    """An update setting a numeric to NaN leaves the row in the current-state table with that
    column NULL and _CDC_QUARANTINED = 'reading:nan' (not the old value); TIME 24:00 the same
    way; a later clean update clears the mark; a row whose NaN is carried by its DELETE (full
    replica identity) is deleted; float NaN and infinities arrive as values, unquarantined;
    the original values are in the quarantine prefix."""
    settings = gauges.settings
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    assert current(gauges)[1][0] is not None

    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("UPDATE plant.gauge SET reading = 'NaN', label = 'stuck' WHERE id = 1")
        conn.execute("UPDATE plant.gauge SET reading = 'NaN' WHERE id = 2")
        conn.execute("DELETE FROM plant.gauge WHERE id = 2")
        conn.execute("UPDATE plant.gauge SET closes = '24:00' WHERE id = 3")
        conn.execute("UPDATE plant.gauge SET ratio = 'Infinity' WHERE id = 4")
    assert await export_until_idle(settings) == 0
    rows = current(gauges)
    assert set(rows) == {1, 3, 4}
    reading, _, _, label, mark = rows[1]
    assert (reading, label, mark) == (None, "stuck", "reading:nan")
    assert rows[3][2] is None
    assert rows[3][4] == "closes:time_out_of_range"
    assert rows[4][1] == float("inf")
    assert rows[4][4] is None
    quarantined = [k for k in object_bodies(s3_client, bucket) if k.startswith("_quarantine/")]
    assert any("reason=nan-reading/" in k for k in quarantined), quarantined
    assert any("reason=time_out_of_range-closes/" in k for k in quarantined), quarantined

    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("UPDATE plant.gauge SET reading = 7.25 WHERE id = 1")
    assert await export_until_idle(settings) == 0
    reading, _, _, label, mark = current(gauges)[1]
    assert (float(reading), label, mark) == (7.25, "stuck", None)


async def test_a_warehouse_made_before_the_quarantine_column_gains_it(
    pg_dsn: str, gauges: LocalWarehouse
) -> None:
    """A warehouse whose tables lack _CDC_QUARANTINED (made before it existed) gets it from
    the daemon before the first object naming it is uploaded: the withheld row loads with its
    mark instead of the by-name load dropping the column (and the reconciler failing the
    batch as header_mismatch)."""
    settings = gauges.settings
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    current(gauges)
    for table in ("RAW_GAUGE", "GAUGE", "GAUGE_CHANGES"):
        gauges.wh.execute(f"ALTER TABLE {table} DROP COLUMN _CDC_QUARANTINED")
    # What the ledger recorded of the landing table before the column existed.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            f"UPDATE {settings.state.schema_}.warehouse_columns"
            " SET columns = array_remove(columns, '_CDC_QUARANTINED')"
        )
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("UPDATE plant.gauge SET reading = 'NaN' WHERE id = 4")
    assert await export_until_idle(settings) == 0
    reading, _, _, _, mark = current(gauges)[4]
    assert (reading, mark) == (None, "reading:nan")
