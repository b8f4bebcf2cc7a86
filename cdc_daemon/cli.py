"""Command line: ``cdc-daemon [--config PATH] {run,init,status,demo}``.

A user's mistake (bad configuration, unreachable server, missing table) ends with one sentence on
stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from cdc_daemon import __version__
from cdc_daemon.config import Settings, load_settings
from cdc_daemon.errors import CdcError
from cdc_daemon.logging import configure_logging
from cdc_daemon.state.ledger import Status
from cdc_daemon.state.store import Store
from cdc_daemon.worker import Worker


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdc-daemon",
        description="Change-data-capture from PostgreSQL to S3 (for Snowflake).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="TOML configuration file; CDC_<SECTION>__<KEY> variables override it",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the capture daemon")
    run.add_argument(
        "--exit-when-idle",
        action="store_true",
        help="export everything committed, then exit 0 (for cron and tests)",
    )
    sub.add_parser("init", help="create the ledger schema (idempotent) and check the source")
    teardown = sub.add_parser(
        "teardown", help="logical mode: drop the replication slot and the publication"
    )
    teardown.add_argument(
        "--yes", action="store_true", help="confirm: the next run starts with a new snapshot"
    )
    status = sub.add_parser("status", help="the watermark and batches by status")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    demo = sub.add_parser(
        "demo",
        help="start a local Postgres and S3, load the Online Retail sample, export it, "
        "print what was written",
    )
    demo.add_argument(
        "--data", type=Path, help="Online Retail CSV(.gz) to load instead of the sample"
    )
    demo.add_argument(
        "--compression",
        choices=["gzip", "zstd", "none"],
        default="gzip",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from cdc_daemon.demo import run_demo

            configure_logging("info", "auto")
            return run_demo(args.data, args.compression)
        settings = load_settings(args.config)
        configure_logging(settings.log.level, settings.log.format)
        if args.command == "run":
            return asyncio.run(Worker(settings, exit_when_idle=args.exit_when_idle).serve())
        if args.command == "init":
            return asyncio.run(init(settings))
        if args.command == "teardown":
            from cdc_daemon.logical_setup import teardown

            return asyncio.run(teardown(settings, confirmed=args.yes))
        if args.command == "status":
            return asyncio.run(status(settings, as_json=args.json))
    except CdcError as exc:
        print(f"cdc-daemon: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unknown command {args.command}")  # pragma: no cover


async def init(settings: Settings) -> int:
    from cdc_daemon.source.watermark import WatermarkSource

    store = await Store.from_settings(settings)
    try:
        await store.init_schema()
    finally:
        await store.close()
    if settings.capture.mode == "logical":
        from cdc_daemon.logical_setup import init_logical

        return await init_logical(settings)
    source = WatermarkSource(settings)
    try:
        table = await asyncio.to_thread(source.connect)
    finally:
        source.close()
    structlog.get_logger().info(
        "ledger_ready",
        schema=settings.state.schema_,
        table=table.qualified,
        watermark_column=table.watermark.name,
        partition_column=table.partition.name,
    )
    return 0


async def status(settings: Settings, as_json: bool) -> int:
    store = await Store.from_settings(settings)
    try:
        await store.check_schema()
        report = await status_report(store)
    finally:
        await store.close()
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        if not report:
            print("no table captured yet")
        for name, fields in report.items():
            print(name)
            for key, value in fields.items():
                print(f"  {key:<12} {value}")
    return 0


async def status_report(store: Store, table: str | None = None) -> dict[str, Any]:
    """Per captured table: its watermark, batches by status, rows and objects exported."""
    tables: dict[str, Any] = {}
    for position in await store.positions():
        if table is not None and position.table not in (table, f"public.{table}"):
            continue
        batches = await store.batches(position.table)
        tables[position.table] = {
            "watermark": position.position,
            "batches": await store.status_counts(position.table),
            "rows": sum(b.rows for b in batches),
            "objects": sum(len(b.objects) for b in batches),
            "last_batch": batches[-1].batch_id if batches else None,
            # Not (yet) in S3: pending, or failed with the reason the retries gave up on.
            "unfinished": [
                {
                    "batch_id": b.batch_id,
                    "status": b.status.value,
                    "attempts": b.attempts,
                    "error": b.error,
                }
                for b in batches
                if b.status in (Status.PENDING, Status.FAILED)
            ],
        }
    return tables
