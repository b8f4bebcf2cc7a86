"""``verify --repair`` killed at each step of its unit of work (os._exit, as SIGKILL) and run
again: nothing lost, nothing doubled, the interrupted delivery marked superseded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.reconcile.verify import verify_group
from tests.e2e.daemon import cli, write_config
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, init_ledger, make_settings


@pytest.fixture
def warehouse(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> Iterator[LocalWarehouse]:
    wh = start_warehouse(make_settings(pg_dsn, s3_server, bucket, tmp_path), warehouse_dir)
    yield wh
    wh.stop()


@pytest.mark.parametrize("point", ["repair_after_pending", "repair_after_upload"])
async def test_a_repair_killed_midway_then_run_again_loses_and_doubles_nothing(
    point: str,
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    tmp_path: Path,
    warehouse: LocalWarehouse,
) -> None:
    """The process dies after the intent record (or after the uploads, before the commit);
    the next `verify --repair` marks that delivery failed as superseded and delivers its own;
    once merged, SALES equals the source with no key twice."""
    settings = warehouse.settings
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 1_200, days=5)
    await init_ledger(settings)
    assert await export_until_idle(settings) == 0
    warehouse.pump_until_quiet()
    warehouse.query("DELETE FROM SALES WHERE ID IN (5, 500, 1000)")
    warehouse.query("UPDATE SALES SET QUANTITY = -1 WHERE ID = 700")
    sf = settings.snowflake
    config = write_config(
        tmp_path,
        pg_dsn,
        s3_server,
        bucket,
        snowflake={
            **warehouse.settings_overrides()["snowflake"],
            "database": sf.database,
            "schema": sf.schema_,
        },
    )
    died = cli(config, "verify", "--repair", CDCTEST_CRASH_AT=point)
    assert died.returncode == 70, died.stderr[-2000:]
    again = cli(config, "verify", "--repair")
    assert again.returncode == 1, again.stderr[-2000:]
    assert "4 row(s) and 0 delete(s) exported again" in again.stdout
    warehouse.pump_until_quiet()
    (result,) = verify_group(settings)
    assert result.equal, result.lines()
    (dupes,) = warehouse.query("SELECT COUNT(*) - COUNT(DISTINCT ID) AS N FROM SALES")
    assert int(dupes["N"]) == 0
    with psycopg.connect(pg_dsn) as conn:
        repairs = conn.execute(
            "SELECT status, error FROM cdc.deliveries WHERE producer = 'repair' ORDER BY created_at"
        ).fetchall()
    assert [s for s, _ in repairs] == ["failed", "uploaded"]
    assert "superseded by repair" in str(repairs[0][1])
