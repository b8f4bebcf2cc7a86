"""``cdc-daemon demo``: the whole watermark pipeline on local defaults.

Starts a throwaway PostgreSQL cluster and moto's S3 server, loads the shipped Online Retail sample
into ``ecommerce_sales``, runs the daemon until idle, prints what it wrote, and stops both.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import psycopg
import structlog

from cdc_daemon.config import Settings, load_settings
from cdc_daemon.localdev import LocalPostgres, LocalS3
from cdc_daemon.sample import load_online_retail, sample_path
from cdc_daemon.state.store import Store
from cdc_daemon.worker import Worker

log = structlog.get_logger()


def run_demo(data: Path | None, compression: str) -> int:
    pg = LocalPostgres()
    s3 = LocalS3()
    spool = tempfile.mkdtemp(prefix="cdc-demo-spool-")
    try:
        pg.start()
        s3.start()
        log.info("demo_services_started", postgres=pg.dsn, s3=s3.endpoint_url)
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            rows = load_online_retail(conn, data or sample_path())
        log.info("demo_data_loaded", table="public.ecommerce_sales", rows=rows)
        settings = load_settings(
            None,
            postgres={"dsn": pg.dsn},
            s3={"endpoint_url": s3.endpoint_url, "bucket": "cdc-demo"},
            batch={"compression": compression, "spool_dir": spool, "max_rows": 100_000},
        )
        return asyncio.run(_export_and_report(settings))
    finally:
        s3.stop()
        pg.stop()
        shutil.rmtree(spool, ignore_errors=True)


async def _export_and_report(settings: Settings) -> int:
    from contextlib import AsyncExitStack

    from cdc_daemon.sink.s3 import S3Sink

    async with AsyncExitStack() as stack:
        sink = await S3Sink.open(settings.s3, stack)
        await sink.create_bucket()
    store = await Store.from_settings(settings)
    await store.init_schema()
    await store.close()
    await Worker(settings, exit_when_idle=True).serve()
    store = await Store.from_settings(settings)
    batches = await store.batches("public.ecommerce_sales")
    await store.close()
    per_day: Counter[str] = Counter()
    objects = []
    for batch in batches:
        for obj in batch.objects:
            per_day[obj.day] += obj.rows
            objects.append(obj)
    print()
    print(
        f"Wrote {len(objects)} objects, {sum(per_day.values())} rows, "
        f"{len(batches)} batches to s3://{settings.s3.bucket}/"
    )
    for obj in objects[:5]:
        print(f"  {obj.key}  rows={obj.rows} bytes={obj.size}")
    if len(objects) > 5:
        print(f"  ... and {len(objects) - 5} more")
    print("Rows per day (first and last 5):")
    days = sorted(per_day.items())
    shown = days if len(days) <= 10 else [*days[:5], ("...", 0), *days[-5:]]
    for day, n in shown:
        print(f"  {day}  {n}" if day != "..." else "  ...")
    return 0
