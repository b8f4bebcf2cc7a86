"""Postgres -> daemon -> S3 (moto) -> SQS -> pipe stand-in -> RAW_SALES -> tasks -> SALES,
INVOICES, PRODUCTS in the local warehouse (the real connector against fakesnow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from cdc_daemon.localdev import LocalS3
from cdc_daemon.sample import generate_sales
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, make_settings
from tests.warehouse_checks import assert_warehouse_equals_source


async def test_watermark_export_arrives_in_sales_invoices_products(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
    warehouse_dir: Path,
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 5_000, days=20)
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path, batch={"max_rows": 1_500})
    wh = start_warehouse(settings, warehouse_dir)
    try:
        assert await export_until_idle(settings) == 0
        wh.pump_until_quiet()
        assert_warehouse_equals_source(pg_dsn, wh)
    finally:
        wh.stop()
