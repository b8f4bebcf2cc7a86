"""bench/verify: ``cdc-daemon verify`` (range hashes, bisected where they differ) of N
synthetic sales rows against their table in the local warehouse (fakesnow/DuckDB), equal and
then with a value changed in a few rows spread over the table, against a naive full compare
(every row of both sides read and diffed in Python) measured in the same run.

    .venv/bin/python -m bench.verify [--rows 1000000] [--days 373] [--tamper 10] [--repeat 3]
        [--naive-repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from bench.common import Services, load_rows, machine, services
from cdc_daemon.config import Settings, load_settings
from cdc_daemon.local.sample import SAMPLE_TABLE, sample_snowflake
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.logging import configure_logging
from cdc_daemon.reconcile.verify import (
    TableResult,
    TableVerifier,
    _pg_raw,
    _same,
    _sf_raw,
    verify_group,
)
from cdc_daemon.source.session import connect
from cdc_daemon.state.store import Store
from cdc_daemon.warehouse.canonical import canon, pg_row_hash
from cdc_daemon.warehouse.client import Warehouse
from cdc_daemon.warehouse.model import WarehouseTable
from cdc_daemon.worker import Worker

T = TypeVar("T")


@dataclass
class Measured:
    """A timed call: wall time, this process's CPU (every thread: the caller, the in-process
    fakesnow server and its DuckDB), PostgreSQL's (the cluster's processes)."""

    seconds: float
    own_cpu_s: float
    pg_cpu_s: float

    def cpu(self) -> str:
        return f"CPU: bench process {self.own_cpu_s:.2f} s, PostgreSQL {self.pg_cpu_s:.2f} s"


def measured(svc: Services, call: Callable[[], T]) -> tuple[T, Measured]:
    pg_before = svc.cpu()[0]
    own_before = _own_cpu()
    started = time.perf_counter()
    out = call()
    seconds = time.perf_counter() - started
    return out, Measured(seconds, _own_cpu() - own_before, svc.cpu()[0] - pg_before)


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def settings_for(svc: Services) -> Settings:
    return load_settings(
        None,
        postgres={"dsn": svc.pg.dsn},
        s3={"endpoint_url": svc.s3_url, "bucket": svc.bucket},
        batch={"spool_dir": str(svc.workdir), "max_age_s": 0, "max_rows": 500_000},
        capture={"poll_interval_s": 0.2},
        tables=[SAMPLE_TABLE],
        snowflake={**sample_snowflake(), "database": "BENCH"},
    )


async def export_until_idle(settings: Settings) -> int:
    """The daemon in this process (``run --exit-when-idle``), as tests/helpers does."""
    store = await Store.from_settings(settings)
    try:
        await store.init_schema()
    finally:
        await store.close()

    async def never() -> None:
        await asyncio.Event().wait()

    return await Worker(settings, exit_when_idle=True).serve(shutdown_trigger=never)


# -- the reference ----------------------------------------------------------------------------


@dataclass
class Naive:
    source_rows: int
    warehouse_rows: int
    differing: dict[int, list[str]]  # key -> the columns that differ (or missing / extra)

    @property
    def transferred(self) -> int:
        return self.source_rows + self.warehouse_rows


def naive_compare(settings: Settings, table: WarehouseTable, fetch_rows: int = 10_000) -> Naive:
    """Every row of both sides read, the source's into a dict by key, the warehouse's
    streamed and compared with it column by column. Each column is read as the verifier
    fetches it (its canonical text on each side, floats and JSON as text and compared parsed),
    so a difference means the same as in ``verify``; only the strategy differs."""
    canons = [canon(c) for c in table.columns]
    (key,) = [i for i, k in enumerate(canons) if k.column.key]  # the sales table: id
    pg_columns = sql.SQL(", ").join(k.pg if k.exact else _pg_raw(k) for k in canons)
    source: dict[int, tuple[Any, ...]] = {}  # canonical texts (str) or None
    with (
        connect(settings.postgres, "bench-naive") as conn,
        conn.transaction(),
        conn.cursor(name="naive") as cur,  # server-side: read in batches
    ):
        cur.itersize = fetch_rows
        cur.execute(sql.SQL("SELECT {} FROM {}").format(pg_columns, table.names.table.sql()))
        for row in cur:
            source[int(str(row[key]))] = row
    source_rows = len(source)
    # Its own session: the default query timeout (30 s here) is for small queries.
    long = settings.snowflake.model_copy(update={"query_timeout_s": 3600})
    wh = Warehouse(long).connect()
    differing: dict[int, list[str]] = {}
    warehouse_rows = 0
    try:
        sf_columns = ", ".join(k.sf if k.exact else _sf_raw(k) for k in canons)
        with wh.conn.cursor() as sf:
            sf.execute(f"SELECT {sf_columns} FROM {table.names.name}")
            for got in _batches(sf, fetch_rows):
                warehouse_rows += 1
                values = [None if v is None else str(v) for v in got]
                k = int(values[key] or 0)
                mine = source.pop(k, None)
                if mine is None:
                    differing[k] = ["extra"]
                    continue
                changed = [
                    c.column.source
                    for c, a, b in zip(canons, mine, values, strict=True)
                    if not _same(c, a, b)
                ]
                if changed:
                    differing[k] = changed
    finally:
        wh.close()
    for k in source:
        differing[k] = ["missing"]
    return Naive(source_rows, warehouse_rows, differing)


def _batches(cur: Any, size: int) -> Iterator[tuple[Any, ...]]:
    while rows := cur.fetchmany(size):
        yield from rows


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Verified:
    result: TableResult
    warehouse_queries: int


def verify_once(settings: Settings) -> Verified:
    """``verify_group`` (what ``cdc-daemon verify`` runs), counting its warehouse queries."""
    calls = 0
    original = Warehouse.query

    def counting(self: Warehouse, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        nonlocal calls
        calls += 1
        return original(self, *args, **kwargs)

    Warehouse.query = counting  # type: ignore[method-assign]
    try:
        (result,) = verify_group(settings)
    finally:
        Warehouse.query = original  # type: ignore[method-assign]
    return Verified(result, calls)


@dataclass
class Probe:
    """What one range's sums cost (medians, seconds): over a one-row range (the fixed cost of
    a query) and over a range of a sixteenth of the table (the first level of the bisection),
    each side, and PostgreSQL's plan for the latter."""

    one_row_wh: float
    one_row_pg: float
    sixteenth_wh: float
    sixteenth_pg: float
    plan: str


def probe_ranges(settings: Settings, table: WarehouseTable, rows: int) -> Probe:
    conn = connect(settings.postgres, "bench-probe")
    wh = Warehouse.of_group(settings).connect()
    try:
        verifier = TableVerifier(conn, wh, table)
        found = conn.execute("SELECT min(id) FROM ecommerce_sales").fetchone()
        assert found is not None
        low = int(str(found[0]))

        def sums(lo: int, hi: int, times: int) -> tuple[float, float]:
            wh_s, pg_s = [], []
            for _ in range(times):
                before = verifier._wh_seconds
                started = time.perf_counter()
                verifier._sums((lo,), (hi,))
                spent = verifier._wh_seconds - before
                wh_s.append(spent)
                pg_s.append(time.perf_counter() - started - spent)
            return statistics.median(wh_s), statistics.median(pg_s)

        one = sums(low + rows // 2, low + rows // 2 + 1, 20)
        lo, hi = low + rows // 16, low + 2 * rows // 16
        sixteenth = sums(lo, hi, 3)
        where, params = verifier._pg_where((lo,), (hi,))
        plan = conn.execute(
            sql.SQL("EXPLAIN SELECT count(*), coalesce(sum({h}), 0) FROM {t} WHERE {w}").format(
                h=pg_row_hash(verifier._canons), t=table.names.table.sql(), w=where
            ),
            params,
        ).fetchall()
    finally:
        wh.close()
        conn.close()
    nodes = [str(r[0]).strip().split("  (")[0].lstrip("-> ") for r in plan]
    return Probe(*one, *sixteenth, " / ".join(nodes[:3]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=373, help="days the rows are spread over")
    parser.add_argument("--tamper", type=int, default=10, help="rows changed in the warehouse")
    parser.add_argument("--repeat", type=int, default=3, help="runs of verify each way")
    parser.add_argument("--naive-repeat", type=int, default=3, help="runs of the naive compare")
    args = parser.parse_args()
    # Stopped (SIGTERM), the run still stops its PostgreSQL and S3 server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # fakesnow's note on its own Arrow conversion, once per large result.
    warnings.filterwarnings("ignore", message="Arrow output on a DB-API result")
    with services() as svc:
        # fakesnow keeps its internal stages under tempfile's folder: keep them in the run's.
        folder = svc.workdir / "warehouse"
        folder.mkdir()
        os.environ["TMPDIR"] = str(folder)
        tempfile.tempdir = str(folder)
        configure_logging("warning", "json", file=(svc.workdir / "daemon.log").open("w"))
        run(svc, args)


def run(svc: Services, args: argparse.Namespace) -> None:
    setup_started = time.perf_counter()
    _, loaded = measured(svc, lambda: load_rows(svc, args.rows, args.days))
    warehouse = LocalWarehouse(settings_for(svc), svc.workdir / "warehouse", queue="bench")
    _, started = measured(svc, lambda: _start(warehouse))
    try:
        settings = warehouse.settings
        code, exported = measured(svc, lambda: asyncio.run(export_until_idle(settings)))
        assert code == 0, f"the export exited {code}"
        _, pumped = measured(svc, warehouse.pump_until_quiet)
        setup_s = time.perf_counter() - setup_started
        (table,) = warehouse.tables
        count = warehouse.query(f"SELECT COUNT(*) AS N FROM {table.names.name}")[0]["N"]
        assert int(count) == args.rows, f"{count} rows in the warehouse, {args.rows} expected"

        print(f"bench/verify on {machine()}")
        print(
            f"  rows {args.rows:,} ({table.names.table} -> {table.names.name}, "
            f"{len(table.columns)} columns), tampered {args.tamper}, "
            f"verify x{args.repeat}, naive x{args.naive_repeat}"
        )
        print(
            f"  setup (not the figure) {setup_s:.1f} s: rows {loaded.seconds:.1f} s, "
            f"warehouse start+apply {started.seconds:.1f} s, export (daemon in process) "
            f"{exported.seconds:.1f} s, load+merge (Snowpipe/task stand-ins) "
            f"{pumped.seconds:.1f} s"
        )

        equal = [measured(svc, lambda: verify_once(settings)) for _ in range(args.repeat)]
        for verified, _ in equal:
            result = verified.result
            assert result.equal, result.lines()
            assert result.source_rows == result.warehouse_rows == args.rows
        tampered_keys = tamper(svc, warehouse, table, args.tamper)
        changed = [measured(svc, lambda: verify_once(settings)) for _ in range(args.repeat)]
        for verified, _ in changed:
            result = verified.result
            found = {int(d.key["id"]) for d in result.differences}
            assert found == set(tampered_keys), f"verify named {sorted(found)}"
            assert all([c.column for c in d.columns] == ["quantity"] for d in result.differences)
        naive = [
            measured(svc, lambda: naive_compare(settings, table)) for _ in range(args.naive_repeat)
        ]
        for got, _ in naive:
            assert got.differing == {k: ["quantity"] for k in tampered_keys}, got.differing
            assert got.source_rows == got.warehouse_rows == args.rows
        probe = probe_ranges(settings, table, args.rows)
        report(args, equal, changed, naive, tampered_keys, probe)
    finally:
        warehouse.stop()


def _start(warehouse: LocalWarehouse) -> None:
    warehouse.start()
    # fakesnow's server logs every session's login at INFO, its level set when imported.
    logging.getLogger("fakesnow.server").setLevel(logging.WARNING)
    warehouse.apply()
    warehouse.connect_notifications()


def tamper(svc: Services, warehouse: LocalWarehouse, table: WarehouseTable, n: int) -> list[int]:
    """``n`` keys spread evenly over the table (by rank), QUANTITY + 1 in the warehouse."""
    with psycopg.connect(svc.pg.dsn) as conn:
        total = conn.execute("SELECT count(*) FROM ecommerce_sales").fetchone()
        assert total is not None
        step = int(total[0]) // n
        keys = [
            int(r[0])
            for r in conn.execute(
                "SELECT id FROM (SELECT id, row_number() OVER (ORDER BY id) - 1 AS rn"
                " FROM ecommerce_sales) s WHERE rn %% %s = %s ORDER BY id LIMIT %s",
                (step, step // 2, n),
            )
        ]
    for key in keys:
        warehouse.query(
            f"UPDATE {table.names.name} SET QUANTITY = QUANTITY + 1 WHERE ID = %(k)s", {"k": key}
        )
    return keys


def _median(values: list[float]) -> float:
    return statistics.median(values)


def report(
    args: argparse.Namespace,
    equal: list[tuple[Verified, Measured]],
    changed: list[tuple[Verified, Measured]],
    naive: list[tuple[Naive, Measured]],
    keys: list[int],
    probe: Probe,
) -> None:
    rows = args.rows

    def line(name: str, runs: list[tuple[Verified, Measured]]) -> tuple[float, int]:
        result, queries = runs[0][0].result, runs[0][0].warehouse_queries
        secs = [m.seconds for _, m in runs]
        wh = [v.result.warehouse_seconds for v, _ in runs]
        print(
            f"  verify, {name}: {_median(secs):.2f} s median ("
            + ", ".join(f"{s:.2f}" for s in secs)
            + f"), in the warehouse {_median(wh):.2f} s; {result.ranges} range(s), "
            f"{result.rows_fetched:,} row(s) fetched (both sides) = "
            f"{100 * result.rows_fetched / rows:.3f}% of the table's rows; "
            f"{len(result.differences)} key(s) differ; {queries} warehouse queries "
            f"({1000 * _median(wh) / queries:.0f} ms each on average)"
        )
        for i, (_, m) in enumerate(runs):
            print(f"    run {i + 1}: {m.seconds:.2f} s, {m.cpu()}")
        return _median(secs), result.rows_fetched

    equal_s, equal_rows = line("equal tables", equal)
    changed_s, changed_rows = line(f"{len(keys)} rows tampered", changed)
    print(f"    keys named: {', '.join(str(k) for k in keys)} (column quantity each)")
    got = naive[0][0]
    secs = [m.seconds for _, m in naive]
    naive_s = _median(secs)
    print(
        f"  naive full compare (both sides read, dict by key, canonical values): {naive_s:.2f} s"
        + (f" median ({', '.join(f'{s:.2f}' for s in secs)})" if len(secs) > 1 else "")
        + f"; {got.transferred:,} rows transferred ({got.source_rows:,} + "
        f"{got.warehouse_rows:,}); {len(got.differing)} key(s) differ (the same)"
    )
    for i, (_, m) in enumerate(naive):
        print(f"    run {i + 1}: {m.seconds:.2f} s, {m.cpu()}")
    print(
        f"  one range's sums, over 1 row (median of 20): warehouse {1000 * probe.one_row_wh:.0f}"
        f" ms, PostgreSQL {1000 * probe.one_row_pg:.1f} ms; over {rows // 16:,} rows (median "
        f"of 3): warehouse {1000 * probe.sixteenth_wh:.0f} ms, PostgreSQL "
        f"{1000 * probe.sixteenth_pg:.0f} ms (plan: {probe.plan})"
    )
    print()
    print("  | case | verify | naive | naive / verify time | rows transferred, verify / naive |")
    print("  |---|---|---|---|---|")
    for name, secs_v, fetched in (
        ("equal", equal_s, equal_rows),
        (f"{len(keys)} tampered", changed_s, changed_rows),
    ):
        print(
            f"  | {name} | {secs_v:.2f} s, {fetched:,} rows | {naive_s:.2f} s, "
            f"{got.transferred:,} rows | {naive_s / secs_v:.1f}x | "
            f"{fetched / got.transferred:.5f} ({100 * fetched / rows:.3f}% of the table) |"
        )


if __name__ == "__main__":
    main()
