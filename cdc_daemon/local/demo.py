"""``cdc-daemon demo``: the whole pipeline on local defaults, end to end.

Starts a throwaway PostgreSQL cluster, moto's S3 server (with S3 -> SQS notifications) and the
local warehouse (fakesnow behind the real Snowflake connector, with the Snowpipe stand-in and
the task runner of ``warehouse/local.py``); loads the shipped Online Retail sample (or a full
copy with ``--csv``) into ``ecommerce_sales``; runs the daemon -- capture and reconciler --
while it inserts more rows; waits until the reconciler has confirmed every batch; prints a
report of rows per stage; stops everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import psycopg
import structlog

from cdc_daemon.cli import init
from cdc_daemon.config import Settings, load_settings
from cdc_daemon.errors import ConfigError
from cdc_daemon.local.sample import (
    SAMPLE_TABLE,
    load_online_retail,
    sample_path,
    sample_snowflake,
)
from cdc_daemon.local.services import LocalPostgres, LocalS3, noise_to
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.logging import configure_logging
from cdc_daemon.state.report import PRODUCER_NAMES, LedgerReader, group_ledgers
from cdc_daemon.worker import Worker

log = structlog.get_logger()

# Changes made while the daemon runs: inserts (dated today: a new day partition), updates
# (one moves a row to another day, one to another invoice) and deletes.
LIVE_CHANGES = [
    (
        "inserted",
        "INSERT INTO ecommerce_sales (invoice_no, stock_code, description, quantity,"
        " invoice_date, unit_price, customer_id, country)"
        " SELECT 'D' || (600000 + g)::text, stock_code, description, quantity,"
        " now() - g * interval '1 hour', unit_price, customer_id, country"
        " FROM (SELECT * FROM ecommerce_sales ORDER BY id LIMIT 5) s, generate_series(1, 2) g",
    ),
    (
        "updated",
        "UPDATE ecommerce_sales SET quantity = quantity + 10, description = 'UPDATED ' ||"
        " coalesce(description, '') WHERE id IN (SELECT id FROM ecommerce_sales ORDER BY id"
        " OFFSET 20 LIMIT 4)",
    ),
    (
        "updated",
        "UPDATE ecommerce_sales SET invoice_date = invoice_date + interval '3 days'"
        " WHERE id = (SELECT min(id) + 30 FROM ecommerce_sales)",
    ),
    (
        "updated",
        "UPDATE ecommerce_sales SET invoice_no = 'C' || invoice_no"
        " WHERE id = (SELECT min(id) + 40 FROM ecommerce_sales)",
    ),
    (
        "deleted",
        "DELETE FROM ecommerce_sales WHERE id IN (SELECT id FROM ecommerce_sales ORDER BY id"
        " OFFSET 50 LIMIT 3)",
    ),
]


def say(line: str) -> None:
    """A progress line for the person watching (the log lines go to the demo's log file)."""
    print(line, flush=True)


def run_demo(
    data: Path | None,
    compression: str,
    report: Path | None = None,
    timeout_s: float = 900,
    log_format: Literal["auto", "json", "console"] | None = None,
) -> int:
    """The demo, printing a few lines of progress and its report; the daemon's log lines and
    the local services' output go to a log file it names (kept: it outlives the demo's
    folder). A terminal or a file gets the same lines."""
    if data is not None and not data.is_file():
        raise ConfigError(f"--csv {data}: there is no such file")
    handle, name = tempfile.mkstemp(prefix="cdc-demo-", suffix=".log")
    os.close(handle)
    log_path = Path(name)
    say(f"cdc-daemon demo: log lines of the daemon and the local services go to {log_path}")
    code = 1
    try:
        with log_path.open("a") as log_file, noise_to(log_path):
            configure_logging("info", log_format or "json", file=log_file)
            code = _demo(data, compression, report, timeout_s)
    finally:
        if code != 0:
            say(f"cdc-daemon demo: failed; what happened is in {log_path}")
    return code


def _demo(data: Path | None, compression: str, report: Path | None, timeout_s: float) -> int:
    pg = LocalPostgres()
    s3 = LocalS3()
    work = Path(tempfile.mkdtemp(prefix="cdc-demo-"))
    warehouse: LocalWarehouse | None = None
    try:
        pg.start()
        s3.start()
        log.info("demo_services_started", postgres=pg.dsn, s3=s3.endpoint_url)
        say(f"  started PostgreSQL ({pg.dsn}) and S3 (moto, {s3.endpoint_url})")
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            rows = load_online_retail(conn, data or sample_path())
            # Logical mode logs whole old rows of a table with TOASTable columns.
            conn.execute("ALTER TABLE ecommerce_sales REPLICA IDENTITY FULL")
        log.info("demo_data_loaded", table=SAMPLE_TABLE["name"], rows=rows)
        say(f"  loaded {rows:,} rows of Online Retail into {SAMPLE_TABLE['name']}")
        # The demo's own configuration: the sample's table (SALES, partitioned by invoice_date)
        # and its models.
        base = load_settings(
            None,
            postgres={"dsn": pg.dsn},
            tables=[SAMPLE_TABLE],
            capture={"mode": "logical", "poll_interval_s": 0.5},
            s3={"endpoint_url": s3.endpoint_url, "bucket": "cdc-demo"},
            batch={
                "compression": compression,
                "spool_dir": str(work / "spool"),
                "max_rows": 100_000,
                "max_age_s": 1,
            },
            snowflake={"reconcile_interval_s": 1, "missing_after_s": 60, **sample_snowflake()},
        )
        (work / "spool").mkdir()
        _create_bucket(base)
        warehouse = LocalWarehouse(base, work / "warehouse").start()
        warehouse.apply()
        warehouse.connect_notifications()
        log.info("demo_warehouse_ready", port=warehouse.port, database=base.snowflake.database)
        say("  created the warehouse side (snowflake/ SQL) in the local Snowflake (fakesnow)")
        return asyncio.run(_run(warehouse.settings, warehouse, pg.dsn, timeout_s, report))
    finally:
        if warehouse is not None:
            warehouse.stop()
        s3.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


def _create_bucket(settings: Settings) -> None:
    import boto3  # type: ignore[import-untyped]

    boto3.client(
        "s3", endpoint_url=settings.s3.endpoint_url, region_name=settings.s3.region
    ).create_bucket(Bucket=settings.s3.bucket)


async def _run(
    settings: Settings,
    warehouse: LocalWarehouse,
    dsn: str,
    timeout_s: float,
    report: Path | None,
) -> int:
    # The ledger, the publication (the first run makes the slot). What init prints for an
    # operator goes with the log lines.
    with contextlib.redirect_stdout(sys.stderr):
        await init(settings)
    done = asyncio.Event()
    stop_pump = threading.Event()
    pump = threading.Thread(target=warehouse.pump_forever, args=(stop_pump,), daemon=True)
    pump.start()
    started = time.monotonic()
    daemon = asyncio.create_task(Worker(settings).serve(shutdown_trigger=done.wait))
    try:
        await asyncio.sleep(2)
        changes: dict[str, int] = {}
        with psycopg.connect(dsn, autocommit=True) as conn:
            for kind, statement in LIVE_CHANGES:
                changes[kind] = changes.get(kind, 0) + conn.execute(statement).rowcount
            (after,) = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone() or (None,)
        log.info("demo_changes_committed", **changes)
        done_changes = ", ".join(f"{n} {kind}" for kind, n in changes.items())
        say(f"  the daemon is running; changed meanwhile: {done_changes}")
        say("  waiting until the reconciler has confirmed every batch loaded into the warehouse")
        while not await _all_loaded(settings, dsn, str(after)):
            if daemon.done() or time.monotonic() - started > timeout_s:
                break
            await asyncio.sleep(0.5)
    finally:
        done.set()
        code = await daemon
        stop_pump.set()
        pump.join()
    if code == 0:
        warehouse.pump()  # the last merge
        await _report(settings, warehouse, dsn, time.monotonic() - started, report, changes)
        if not await _all_loaded(settings, dsn, str(after)):
            print("Not every batch was confirmed loaded in time: see the batch states above.")
            return 1
    return code


async def _all_loaded(settings: Settings, dsn: str, lsn: str) -> bool:
    """Every change up to ``lsn`` is exported (the ledger's position, an LSN in logical mode,
    is past it) and every batch is confirmed loaded by the reconciler."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT coalesce((SELECT high FROM cdc.positions WHERE table_name = %s), 0)"
            "   >= %s::pg_lsn - '0/0'::pg_lsn,"
            " (SELECT count(*) FROM cdc.batches WHERE table_name = %s AND status <> 'loaded'),"
            " (SELECT count(*) FROM cdc.batches WHERE table_name = %s)",
            (settings.table, lsn, settings.table, settings.table),
        ).fetchone()
    return row is not None and bool(row[0]) and row[1] == 0 and row[2] > 0


async def _report(
    settings: Settings,
    warehouse: LocalWarehouse,
    dsn: str,
    seconds: float,
    report: Path | None,
    changes: dict[str, int],
) -> None:
    table = settings.table
    # Every delivery of the group, whoever produced it (the snapshot's chunks, the stream's
    # batches): the same count as `status`.
    reader = await LedgerReader.connect(settings, "cdc-daemon-demo")
    try:
        exported = await reader.exported(group_ledgers(settings), settings.s3.prefix)
    finally:
        await reader.close()
    with psycopg.connect(dsn) as conn:
        (source,) = conn.execute("SELECT count(*) FROM ecommerce_sales").fetchone() or (0,)
        lag = conn.execute(
            "SELECT extract(epoch FROM max(loaded_at) - max(uploaded_at)) FROM cdc.deliveries"
        ).fetchone()

    def one(query: str) -> Any:
        return next(iter(warehouse.query(query)[0].values()))

    landing = one("SELECT COUNT(*) AS N FROM RAW_SALES")
    equal = await asyncio.to_thread(_sales_equal_source, warehouse, dsn)
    sales = one("SELECT COUNT(*) AS N FROM SALES")
    invoices = one("SELECT COUNT(*) AS N FROM INVOICES")
    cancelled = one("SELECT COUNT(*) AS N FROM INVOICES WHERE IS_CANCELLATION")
    products = one("SELECT COUNT(*) AS N FROM PRODUCTS")
    revenue = one("SELECT SUM(AMOUNT)::NUMBER(38, 2) AS N FROM INVOICES")
    top = warehouse.query(
        "SELECT STOCK_CODE, DESCRIPTION, QUANTITY FROM PRODUCTS ORDER BY QUANTITY DESC LIMIT 3"
    )
    lines = [
        f"cdc-daemon demo: {table} -> s3://{settings.s3.bucket}/ -> local Snowflake",
        f"  source rows (Postgres)        {source:>10,}",
        "  changed while running         "
        + ", ".join(f"{n} {kind}" for kind, n in changes.items()),
        f"  rows exported to S3           {exported['rows']:>10,}"
        f"  in {exported['objects']} objects",
        *(
            f"    by {PRODUCER_NAMES.get(p, p):<24} {f['rows']:>10,}  in {f['objects']} objects"
            for p, f in exported["producers"].items()
        ),
        f"  landing rows (RAW_SALES)      {landing:>10,}  (one per change)",
        f"  SALES rows                    {sales:>10,}",
        f"  INVOICES                      {invoices:>10,}  ({cancelled} cancellations)",
        f"  PRODUCTS                      {products:>10,}",
        f"  revenue (sum of INVOICES)     {revenue:>13,} GBP",
    ]
    for row in top:
        name = row["DESCRIPTION"] or ""
        lines.append(
            f"    top product {row['STOCK_CODE']:<8} {name:<36} {row['QUANTITY']:>7,} units"
        )
    by_status = ", ".join(f"{k} {v}" for k, v in sorted(exported["deliveries"].items()))
    lines.append(
        f"  batches: {by_status}  ("
        + "; ".join(
            f"{PRODUCER_NAMES.get(p, p)}: "
            + ", ".join(f"{k} {v}" for k, v in sorted(f["deliveries"].items()))
            for p, f in exported["producers"].items()
        )
        + ")"
    )
    if lag and lag[0] is not None:
        lines.append(
            f"  last delivery: uploaded -> confirmed loaded in {float(lag[0]):.1f} s (the local "
            "Snowpipe stand-in, slower than Snowpipe with many small objects)"
        )
    lines.append(f"  everything confirmed in {seconds:.1f} s")
    lines.append("  SALES equals the source: " + ("yes" if equal else "NO"))
    # The product's own proof: every value compared by row hashes inside each database.
    from cdc_daemon.reconcile.verify import verify_group

    verified = await asyncio.to_thread(verify_group, settings)
    for r in verified:
        lines.append(
            f"  verify {r.table}: "
            + ("every value equal" if r.equal else f"{len(r.differences)} key(s) differ")
            + f" ({r.source_rows:,} rows, {r.rows_fetched} fetched, {r.seconds:.1f} s)"
        )
    print()
    print("\n".join(lines))
    if report is not None:
        from cdc_daemon.local.charts import sample_charts
        from cdc_daemon.state.report import recent_deliveries
        from cdc_daemon.state.verify import VerifyState
        from cdc_daemon.warehouse.report import report_tables, write_report

        write_report(
            report,
            warehouse.query,
            settings.postgres,
            settings.snowflake,
            report_tables(settings),
            lines,
            sample_charts(warehouse.query),
            [
                VerifyState(
                    r.source_table.key,
                    last_pass_at=datetime.now(UTC),
                    rows_verified=r.source_rows,
                    differing=tuple(d.key for d in r.differences),
                    checked_at=datetime.now(UTC),
                )
                for r in verified
            ],
            await recent_deliveries(settings),
        )
        print(f"  report: {report}")


def _sales_equal_source(warehouse: LocalWarehouse, dsn: str) -> bool:
    """Every row of SALES equals the source row of the same id, column by column."""
    cols = "id, invoice_no, stock_code, description, quantity, invoice_date, unit_price,"
    cols += " customer_id, country"
    got = warehouse.query(f"SELECT {cols.upper()} FROM SALES")
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        source = {r[0]: r for r in conn.execute(f"SELECT {cols} FROM ecommerce_sales")}
    names = [c.strip().upper() for c in cols.split(",")]
    return len(got) == len(source) and all(
        source.get(int(r["ID"])) == tuple(r[n] for n in names) for r in got
    )
