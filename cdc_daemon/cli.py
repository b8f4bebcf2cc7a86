"""Command line: ``cdc-daemon [--config PATH] {run,init,backfill,status,demo}``.

A user's mistake (bad configuration, unreachable server, missing table) ends with one sentence on
stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import signal
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from cdc_daemon import __version__, extensions
from cdc_daemon.config import Settings, load_settings
from cdc_daemon.errors import CdcError, ConfigError
from cdc_daemon.logging import configure_logging
from cdc_daemon.names import TableName
from cdc_daemon.state.store import Store
from cdc_daemon.worker import Worker

if TYPE_CHECKING:
    from cdc_daemon.reconcile.verify import TableResult

LOCAL_ACTIONS = ("up", "down")  # and ``serve``, which ``local up`` runs in a process of its own


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name (``status --config X``). The
    subcommands' copies default to SUPPRESS, so one given before the command is not reset by
    the subcommand's parser."""
    common = argparse.ArgumentParser(add_help=False)
    default: Any = None if defaults else argparse.SUPPRESS
    common.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        default=default,
        help="TOML configuration file; CDC_<SECTION>__<KEY> variables override it",
    )
    common.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default=default,
        help="log lines as JSON or for people (default: log.format, whose auto is the console "
        "renderer on a terminal, JSON otherwise)",
    )
    return common


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdc-daemon",
        description="Change-data-capture from PostgreSQL to S3 (for Snowflake).",
        parents=[_common_options(defaults=True)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = [_common_options(defaults=False)]
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        parent: Any, name: str, summary: str, description: str | None = None
    ) -> argparse.ArgumentParser:
        # The line in the list of commands opens `COMMAND --help` too, unless it has more to say.
        made: argparse.ArgumentParser = parent.add_parser(
            name,
            help=summary,
            description=description or summary[0].upper() + summary[1:] + ".",
            parents=common,
        )
        made.set_defaults(command_parser=made)
        return made

    run = command(sub, "run", "run the capture daemon")
    run.add_argument(
        "--exit-when-idle",
        action="store_true",
        help="export everything committed, then exit 0 (9 if a table of the group is failed; "
        "for cron and tests)",
    )
    command(
        sub,
        "init",
        "create the ledger schema (idempotent) and check the source",
        "Create the ledger schema (idempotent) and check every configured table; in logical "
        "mode also create the publication. Every table that cannot be captured is reported, "
        "each with its fix, and nothing is changed on the source.",
    )
    backfill = command(
        sub,
        "backfill",
        "export the rows of past days again, beside the running daemon",
        "Export the rows whose partition day (UTC) is in [--from, --to) again, "
        "into the same daily layout under keys of their own. Runs beside the daemon; an "
        "interrupted run resumes when the same range is asked for again.",
    )
    backfill.add_argument(
        "--from",
        dest="day_from",
        required=True,
        metavar="YYYY-MM-DD",
        help="first day exported (UTC, of the table's partition_column)",
    )
    backfill.add_argument(
        "--table", help="schema.table: which table of the group (default: the first)"
    )
    backfill.add_argument(
        "--to", dest="day_to", required=True, metavar="YYYY-MM-DD", help="first day not exported"
    )
    backfill.add_argument("--jobs", default="4", metavar="N", help="days read at once (4)")
    backfill.add_argument(
        "--resume", action="store_true", help="only resume an unfinished run of this range"
    )
    backfill.add_argument(
        "--dry-run", action="store_true", help="print the plan (days, rows, objects), write nothing"
    )
    backfill.add_argument(
        "--progress-interval",
        default="10",
        metavar="SECONDS",
        help="seconds between progress log lines when not on a terminal (10)",
    )
    resync = command(
        sub,
        "resync",
        "a failed table of the group back in it, at the daemon's next start: in logical mode "
        "exported again from a new snapshot, in watermark mode read on from its position",
    )
    resync.add_argument("--table", required=True, help="schema.table, as configured")
    teardown = command(
        sub, "teardown", "logical mode: drop the replication slot and the publication"
    )
    teardown.add_argument(
        "--yes", action="store_true", help="confirm: the next run starts with a new snapshot"
    )
    status = command(
        sub,
        "status",
        "is it running, how far behind, batches by status, batches that need attention; "
        "a failed table of the group first",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    snowflake = command(sub, "snowflake", "the warehouse side (snowflake/ SQL)")
    sf_sub = snowflake.add_subparsers(dest="snowflake_command", required=True, metavar="ACTION")
    sf_render = command(sf_sub, "render", "print the SQL for the current configuration")
    sf_render.add_argument(
        "--grants",
        action="store_true",
        help="print the least-privilege roles and grants instead (run by an administrator)",
    )
    sf_apply = command(
        sf_sub,
        "apply",
        "bring Snowflake in line with the SQL: only what differs is changed (a pipe whose "
        "COPY changed is recreated without losing or reloading a file)",
    )
    sf_apply.add_argument(
        "--plan", action="store_true", help="print each difference and change nothing"
    )
    reconcile = command(
        sub,
        "reconcile",
        "check Snowflake's load history against the ledger",
        "Check Snowflake's load history against the ledger: every "
        "snowflake.reconcile_interval_s until SIGTERM or SIGINT (the daemon's own reconciler, "
        "on its own), or one round with --once.",
    )
    reconcile.add_argument(
        "--once",
        action="store_true",
        help="one round, print what it found, then exit (1 if a batch is failed or missing)",
    )
    reconcile.add_argument(
        "--completeness",
        action="store_true",
        help="with --once: also compare per-day rows and column totals of each table in "
        "Postgres and the warehouse (the loop does it every snowflake.completeness_interval_s)",
    )
    reconcile.add_argument(
        "--json", action="store_true", help="with --once: machine-readable output"
    )
    demo = command(
        sub,
        "demo",
        "start a local Postgres and S3, load the Online Retail sample, export it, "
        "print what was written",
    )
    demo.add_argument(
        "--csv",
        "--data",
        dest="data",
        type=Path,
        metavar="PATH",
        help="Online Retail CSV(.gz) to load instead of the sample (e.g. the full data set)",
    )
    demo.add_argument(
        "--report", type=Path, metavar="PATH", help="also write a one-page HTML report with charts"
    )
    demo.add_argument(
        "--compression",
        choices=["gzip", "zstd", "none"],
        default="gzip",
        help="how the exported CSV objects are compressed (gzip)",
    )
    local = command(
        sub,
        "local",
        "the local services (PostgreSQL, S3, the local warehouse) left running in DIR",
    )
    # Checked in main, not with choices: argparse would list the internal ``serve`` in its
    # refusal.
    local.add_argument(
        "local_command",
        metavar="up|down",
        help="up: start them and write DIR/cdc.toml; down: stop them",
    )
    local.add_argument(
        "--dir",
        dest="local_dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="the folder of their data, logs and cdc.toml",
    )
    verify = command(
        sub,
        "verify",
        "compare every table with its warehouse table, value by value (exit 1 if any differs)",
    )
    verify.add_argument("--table", help="only this table of the configuration")
    verify.add_argument(
        "--settle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="read differing keys again for up to this long (changes still being merged)",
    )
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="export the differing keys again (the rows as they are now, deletes for keys the "
        "source no longer has); the merge then fixes exactly those",
    )
    report = command(sub, "report", "write the one-page HTML report from the configured warehouse")
    report.add_argument(
        "--out", type=Path, required=True, metavar="FILE", help="the HTML file written"
    )
    return parser


def limit_malloc_arenas(arenas: int = 1) -> None:
    """At most ``arenas`` glibc malloc arenas (what MALLOC_ARENA_MAX=1 does), set before any
    thread starts. glibc gives each thread that allocates its own arena (64 MB of address
    space, kept once touched), and the daemon's reading, compressing and uploading threads all
    allocate: bench/export at 2M rows peaked at 190 MB with the default and 151 MB with one
    arena (167 MB with two; no slower: small objects come from pymalloc under the GIL). No-op
    elsewhere than glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    usage_error = args.command_parser.error  # the subcommand's usage with the refusal
    if args.command == "local" and args.local_command not in (*LOCAL_ACTIONS, "serve"):
        usage_error(
            f"argument up|down: invalid choice: {args.local_command!r} (choose from up, down)"
        )
    if args.command == "reconcile" and not args.once and (args.json or args.completeness):
        usage_error(
            "--json and --completeness go with --once (without it the reconciler runs until "
            "stopped and logs each round)"
        )
    limit_malloc_arenas()  # every command: run, backfill and demo start threads
    try:
        if args.command == "demo":
            # The demo lives in the local tooling, which the daemon never imports.
            run_demo = extensions.load("demo", "the demo")
            # (It sends the log lines to a file of its own and prints its progress.)
            return int(
                run_demo(args.data, args.compression, args.report, log_format=args.log_format)
            )
        if args.command == "local":
            local = extensions.load("local", "the local services")
            configure_logging("info", args.log_format or "auto")
            return int(local(args.local_command, args.local_dir))
        settings = load_settings(args.config)
        configure_logging(settings.log.level, args.log_format or settings.log.format)
        if args.command == "run":
            return asyncio.run(Worker(settings, exit_when_idle=args.exit_when_idle).serve())
        if args.command == "init":
            return asyncio.run(init(settings))
        if args.command == "backfill":
            from cdc_daemon.capture.backfill import parse_request, run_backfill

            request = parse_request(
                args.day_from,
                args.day_to,
                args.jobs,
                args.resume,
                args.dry_run,
                args.progress_interval,
            )
            return asyncio.run(run_backfill(table_settings(settings, args.table), request))
        if args.command == "resync":
            if settings.capture.mode == "watermark":
                from cdc_daemon.capture.watermark.group import resync as resync_watermark

                return asyncio.run(resync_watermark(settings, args.table))
            from cdc_daemon.capture.logical.setup import resync

            return asyncio.run(resync(settings, args.table))
        if args.command == "teardown":
            from cdc_daemon.capture.logical.setup import teardown

            return asyncio.run(teardown(settings, confirmed=args.yes))
        if args.command == "status":
            return asyncio.run(status(settings, as_json=args.json))
        if args.command == "snowflake":
            return snowflake_command(
                settings,
                args.snowflake_command,
                getattr(args, "grants", False),
                getattr(args, "plan", False),
            )
        if args.command == "reconcile":
            if not args.once:
                return asyncio.run(reconcile_continuously(settings))
            return asyncio.run(reconcile_once(settings, args.completeness, args.json))
        if args.command == "report":
            return write_report(settings, args.out)
        if args.command == "verify":
            return verify(settings, args.table, args.settle, args.json, args.repair)
    except CdcError as exc:
        from cdc_daemon.source.validate import TablesRefused

        # Every table init refused, one a line: each problem ends with its own fix.
        lines = exc.lines() if isinstance(exc, TablesRefused) else [str(exc)]
        print("cdc-daemon: " + "\n".join(lines), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unknown command {args.command}")  # pragma: no cover


def table_settings(settings: Settings, table: str | None) -> Settings:
    """The settings narrowed to one configured table of the group (``--table``)."""
    if table is None:
        return settings.for_table(settings.table_specs[0])
    name = parse_table(table)
    for spec in settings.table_specs:
        if spec.table == name:
            return settings.for_table(spec)
    names = ", ".join(str(t.table) for t in settings.table_specs)
    raise ConfigError(f"{name} is not a configured table (the group has {names})")


def parse_table(text: str) -> TableName:
    """A table named on the command line, or ConfigError with the parser's sentence."""
    try:
        return TableName.parse(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def snowflake_command(
    settings: Settings, action: str, grants: bool = False, plan_only: bool = False
) -> int:
    from cdc_daemon.warehouse import sql
    from cdc_daemon.warehouse.client import Warehouse
    from cdc_daemon.warehouse.evolve import apply_sql, record_columns
    from cdc_daemon.warehouse.model import read_catalog

    tables = read_catalog(settings)
    if action == "render":
        text = sql.render_grants(settings, tables) if grants else sql.render(settings, tables)
        print(text, end="")
        return 0
    wh = Warehouse.of_group(settings).connect()
    try:
        plan = apply_sql(
            wh,
            settings,
            tables,
            stage_url_override=wh.dialect.stage_url(wh),
            staged=lambda folder, since: staged_objects(settings, folder, since),
            plan_only=plan_only,
        )
    finally:
        wh.close()
    print(plan.render(), end="")
    if plan_only:
        return 0
    for t in tables:
        record_columns(settings, t)
    manual = [c for c in plan.changes if c.action == "manual"]
    if manual:
        print(f"cdc-daemon: {len(manual)} difference(s) left for you (see above)", file=sys.stderr)
        return 1
    return 0


def staged_objects(settings: Settings, folder: str, since: datetime) -> list[tuple[str, datetime]]:
    """A table folder's objects modified since ``since`` (relative to the bucket's prefix, with
    their last modification)."""
    from contextlib import AsyncExitStack

    from cdc_daemon.sink.s3 import S3Sink

    async def keys() -> list[tuple[str, datetime]]:
        async with AsyncExitStack() as stack:
            sink = await S3Sink.open(settings.s3, stack)
            return await sink.keys_modified_since(settings.s3.prefix + folder, since)

    return [(k.removeprefix(settings.s3.prefix), at) for k, at in asyncio.run(keys())]


def write_report(settings: Settings, out: Path) -> int:
    from cdc_daemon.warehouse.client import Warehouse
    from cdc_daemon.warehouse.report import report_tables
    from cdc_daemon.warehouse.report import write_report as write

    if not settings.snowflake.enabled:
        raise ConfigError("snowflake.account is not set: there is no warehouse to report on")
    # Before the queries: a path that cannot be written is said at once.
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory: name the report's file")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")
    from cdc_daemon.state.report import recent_deliveries
    from cdc_daemon.state.verify import verify_states

    tables = report_tables(settings)
    states = asyncio.run(verify_states(settings))
    deliveries = asyncio.run(recent_deliveries(settings))
    wh = Warehouse.of_group(settings).connect()
    try:
        write(
            out,
            wh.query,
            settings.postgres,
            settings.snowflake,
            tables,
            [],
            (),
            states,
            deliveries,
        )
    except OSError as exc:
        raise ConfigError(f"cannot write the report to {out}: {exc.strerror}") from None
    finally:
        wh.close()
    print(f"report: {out}")
    return 0


def verify(
    settings: Settings, table: str | None, settle_s: float, as_json: bool, repair: bool = False
) -> int:
    """``verify``: exit 0 when every table equals its warehouse table, 1 when one differs
    (also when ``repair`` exported the differing keys again: the merge has yet to run)."""
    from cdc_daemon.reconcile.verify import verify_group

    if not settings.snowflake.enabled:
        raise ConfigError("snowflake.account is not set: there is no warehouse to verify")
    results = verify_group(settings, None if table is None else parse_table(table), settle_s)
    asyncio.run(record_verified(settings, results))
    repaired: list[dict[str, object]] = []
    if repair and not all(r.equal for r in results):
        from cdc_daemon.capture.repair import RepairRequest, repair_group

        requests = [
            RepairRequest(
                r.source_table,
                tuple(d.key for d in r.differences if d.kind != "extra"),
                tuple(d.key for d in r.differences if d.kind == "extra"),
            )
            for r in results
            if not r.equal
        ]
        for outcome in asyncio.run(repair_group(settings, requests)):
            repaired.append(
                {
                    "table": outcome.table,
                    "rows": outcome.rows,
                    "deletes": outcome.deletes,
                    "objects": outcome.objects,
                    "seq": outcome.seq,
                }
            )
    if as_json:
        out = [r.as_json() for r in results]
        for item in out:
            item["repair"] = next((x for x in repaired if x["table"] == item["table"]), None)
        print(json.dumps(out, indent=2, default=str))
    else:
        for r in results:
            print("\n".join(r.lines()))
        for x in repaired:
            print(
                f"repair of {x['table']}: {x['rows']} row(s) and {x['deletes']} delete(s) "
                f"exported again in {x['objects']} object(s); run verify again once they are "
                "merged"
            )
    return 0 if all(r.equal for r in results) else 1


async def record_verified(settings: Settings, results: Sequence[TableResult]) -> None:
    """Each table ``verify`` compared whole is a full pass of the continuous verification."""
    from datetime import UTC, timedelta

    from cdc_daemon.state.verify import VerifyState, record_full_pass

    now = datetime.now(UTC)
    await record_full_pass(
        settings,
        [
            VerifyState(
                r.source_table.key,
                cursor=None,
                pass_started_at=now - timedelta(seconds=r.seconds),
                last_pass_at=now,
                rows_verified=r.source_rows,
                differing=tuple(d.key for d in r.differences),
                checked_at=now,
            )
            for r in results
        ],
    )


async def reconcile_continuously(settings: Settings) -> int:
    """The daemon's reconciler loop on its own (``Reconciler.run``: a round every
    ``snowflake.reconcile_interval_s``, completeness when due, failures logged and retried)
    until SIGTERM or SIGINT; the round in progress ends first. Exit 0."""
    from cdc_daemon.reconcile.reconciler import Reconciler

    if not settings.snowflake.enabled:
        raise ConfigError("snowflake.account is not set: there is no warehouse to reconcile with")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    log = structlog.get_logger()

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            os._exit(128 + signum)  # asked twice: no waiting for the round (as the daemon)
        log.info("shutdown_requested", reason=signum.name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        log.info(
            "reconciler_started",
            group=settings.group,
            interval_s=settings.snowflake.reconcile_interval_s,
        )
        await Reconciler(settings).run(stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("reconciler_stopped", group=settings.group)
    return 0


async def reconcile_once(settings: Settings, completeness: bool, as_json: bool) -> int:
    """One reconciler round. Exit 1 when a batch is failed or missing (for scripts)."""
    from cdc_daemon.reconcile.reconciler import Reconciler

    if not settings.snowflake.enabled:
        raise ConfigError("snowflake.account is not set: there is no warehouse to reconcile with")
    reconciler = Reconciler(settings)
    try:
        outcome = await reconciler.run_once()
        days = await reconciler.completeness() if completeness else None
        store = await Store.from_settings(settings)
        try:
            counts = {}
            for position in await store.positions():
                counts[position.table] = await store.status_counts(position.table)
        finally:
            await store.close()
    finally:
        await reconciler.close()
    report: dict[str, Any] = {"round": outcome.as_json(), "batches": counts}
    if days is not None:
        report["days_differing"] = [d.as_json() for d in days]
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        for pipe in outcome.pipes:
            print(
                f"pipe        {pipe.name} {pipe.execution_state}"
                f" (pending files: {pipe.pending_file_count})"
            )
        print(
            f"this round  loaded {len(outcome.loaded)}, failed {len(outcome.failed)},"
            f" missing {len(outcome.missing)}, refreshed {len(outcome.refreshed)},"
            f" waiting {outcome.waiting}"
        )
        for table, by_status in counts.items():
            print(f"{table}  " + ", ".join(f"{k} {v}" for k, v in sorted(by_status.items())))
        for batch_id, error in outcome.failed:
            print(f"  failed   {batch_id}: {error}")
        for batch_id, reason in outcome.missing:
            print(f"  missing  {batch_id}: {reason}")
        if days is not None:
            print(f"days differing between Postgres and the warehouse: {len(days)}")
            for d in days[:20]:
                print(f"  {d.line()}")
    bad = sum(c.get("failed", 0) + c.get("missing", 0) for c in counts.values())
    return 1 if bad or (days is not None and days) else 0


async def init(settings: Settings) -> int:
    from cdc_daemon.capture.watermark.source import WatermarkSource
    from cdc_daemon.warehouse.model import names

    # The tables' Snowflake names (two tables on one name are refused) before anything is set up.
    names(settings)
    store = await Store.from_settings(settings)
    try:
        await store.init_schema()
    finally:
        await store.close()
    if settings.capture.mode == "logical":
        from cdc_daemon.capture.logical.setup import init_logical

        return await init_logical(settings)
    from cdc_daemon.source.validate import check_watermark_tables

    # Every problem of every table in one message, before anything else reads them.
    for line in await asyncio.to_thread(check_watermark_tables, settings):
        print(line)
    for spec in settings.table_specs:
        source = WatermarkSource(settings.for_table(spec))
        try:
            table = await asyncio.to_thread(source.connect)
        finally:
            source.close()
        structlog.get_logger().info(
            "ledger_ready",
            schema=settings.state.schema_,
            group=settings.group,
            table=table.qualified,
            watermark_column=table.watermark.name,
            partition_column=table.partition_name,
        )
    return 0


async def status(settings: Settings, as_json: bool) -> int:
    from cdc_daemon.ops.status import collect, render

    slot = settings.slot_name if settings.capture.mode == "logical" else None
    report = await collect(settings, slot=slot)
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0
