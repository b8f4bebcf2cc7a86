"""A watermark group of several tables against the local warehouse: the reconciler confirms
the deliveries of every table of the group, not only its first one's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cdc_daemon.cli import init
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.reconcile.reconciler import Reconciler
from cdc_daemon.reconcile.verify import verify_group
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, make_settings
from tests.schemas import pgbench_init


@pytest.fixture
def group(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> Iterator[LocalWarehouse]:
    pgbench_init(pg_dsn)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[
            {"name": "pgbench_branches", "watermark_column": "bid"},
            {"name": "pgbench_tellers", "watermark_column": "tid"},
        ],
        capture={"group": "bank"},
    )
    wh = start_warehouse(settings, warehouse_dir)
    yield wh
    wh.stop()


async def test_every_table_of_a_watermark_group_is_confirmed_and_verified(
    pg_dsn: str, group: LocalWarehouse
) -> None:
    """Both tables' batches are `loaded` after one reconciler round (the second table's
    ledger is its own), and both verify equal."""
    settings = group.settings
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    group.pump_until_quiet()
    reconciler = Reconciler(settings)
    try:
        outcome = await reconciler.run_once()
    finally:
        await reconciler.close()
    assert not outcome.failed
    assert not outcome.missing
    with psycopg.connect(pg_dsn) as conn:
        statuses = conn.execute(
            "SELECT table_name, status, count(*) FROM cdc.deliveries GROUP BY 1, 2 ORDER BY 1"
        ).fetchall()
    assert [(t, s) for t, s, _ in statuses] == [
        ("public.pgbench_branches", "loaded"),
        ("public.pgbench_tellers", "loaded"),
    ]
    assert all(r.equal for r in verify_group(settings))
