"""bench/logical: a mix of inserts, updates and deletes (REPLICA IDENTITY FULL, or the default
identity) drained from a pgoutput slot by ``cdc-daemon run --exit-when-idle`` (logical mode, to
the local S3 server), side by side in the same run with the same daemon on its pure-Python hot
path, with ``pg_recvlogical`` and with dlt's ``pg_replication`` source.

    .venv/bin/python -m bench.logical [--rows 300000] [--txn-rows 10000] [--pairs 3]
        [--identity full|default]
        [--dlt-python /tmp/dlt-venv/bin/python] [--dlt-sources /tmp/dlt-verified-sources/sources]
    .venv/bin/python -m bench.logical --per-op [--rows 300000] [--txn-rows 10000]

By default ``--rows`` inserts, a third as many updates and a sixth as many deletes (300,000 /
100,000 / 50,000), in transactions of ``--txn-rows`` rows. Each side reads from a slot of its
own, created before the changes, as a whole process, with PostgreSQL's CPU (the postmaster's
process tree; the walsenders' own from ClusterCpu) measured around it:

* cdc-daemon: decode, CSV, gzip, upload, ledger, slot advance;
* cdc-daemon-pure: the same with ``CDC_DAEMON_PURE_PYTHON=1`` (the pure-Python hot path: the
  daemon before the compiled core), with a ledger schema, slot, publication and S3 prefix of
  its own (``pure/``);
* ``pg_recvlogical --start -o proto_version=1 -o publication_names=... -f /dev/null
  --endpos=<LSN>``: the server's streaming to a client that only writes the bytes away;
* dlt 1.31.0's ``pg_replication`` source (dlt-hub/verified-sources), parquet files in a local
  folder: the peer.

The sides take turns in a rotating order; every pair makes its own changes on fresh slots, and
the figures are the medians over the pairs.

dlt and its source are not dependencies of the project: they run from /tmp, made once with

    python3 -m venv /tmp/dlt-venv && /tmp/dlt-venv/bin/pip install dlt==1.31.0 \\
        psycopg2-binary pyarrow sqlalchemy
    # and a copy of sources/pg_replication of the dlt-hub/verified-sources repository in
    # /tmp/dlt-verified-sources/sources/pg_replication

Without them the other two sides still run.

``--per-op`` is the earlier benchmark: ``--rows`` changes of each kind, one kind at a time,
against ``pg_logical_slot_peek_binary_changes`` alone (counted server-side) and streamed to the
client and dropped (binary COPY), in the same run.
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg

from bench.common import (
    ClusterCpu,
    Services,
    cli,
    finish_daemon,
    machine,
    pg_bin,
    reset_capture,
    services,
    start_daemon,
    timed_shell,
    write_config,
)
from cdc_daemon.local.sample import generate_sales

PEEK = (
    "pg_logical_slot_peek_binary_changes('cdc_public_ecommerce_sales', NULL, NULL,"
    " 'proto_version', '1', 'publication_names', 'cdc_public_ecommerce_sales')"
)
INSERT = (
    "INSERT INTO ecommerce_sales (invoice_no, stock_code, description, quantity, invoice_date,"
    " unit_price, customer_id, country) SELECT (536365 + g / 20)::text, '85123A',"
    " 'PRODUCT ' || g || ' WHITE HANGING HEART', 1 + g %% 24,"
    " timestamptz '2010-12-01 08:00:00+00' + g * interval '31 seconds', 2.55, 17850 + g %% 5000,"
    " 'United Kingdom' FROM generate_series(%s::int, %s::int) g"
)
DAEMON_SLOT = "cdc_public_ecommerce_sales"
# The publication of pg_recvlogical and dlt (the daemon's is made by `cdc-daemon init`).
PEERS_PUBLICATION = "bench_peers"
RECV_SLOT, DLT_SLOT = "bench_recvlogical", "bench_dlt"
SIDES = ("cdc-daemon", "cdc-daemon-pure", "pg_recvlogical", "dlt")
# The pure-Python side's own ledger, slot, publication and objects.
PURE = {"schema": "cdc_pure", "slot": "cdc_pure_sales", "prefix": "pure"}

DLT_SCRIPT = """
import sys
dsn, out, slot, publication, sources = sys.argv[1:6]
sys.path.insert(0, sources)
import dlt
from pg_replication import replication_resource

pipeline = dlt.pipeline(
    pipeline_name="bench_logical",
    destination=dlt.destinations.filesystem(bucket_url="file://" + out),
    dataset_name="sales",
    pipelines_dir=out + "/.pipelines",
)
pipeline.run(replication_resource(slot, publication, credentials=dsn), loader_file_format="parquet")
print(pipeline.last_trace.last_normalize_info.row_counts.get("ecommerce_sales", 0))
"""


def change(svc: Services, op: str, rows: int, txn_rows: int, low: int | None = None) -> None:
    """``rows`` changes of one kind in transactions of ``txn_rows``; updates and deletes hit
    the ids from ``low`` on (the lowest id when None)."""
    with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
        if low is None:
            first = conn.execute("SELECT coalesce(min(id), 0) FROM ecommerce_sales").fetchone()
            assert first is not None
            low = int(first[0])
        for start in range(0, rows, txn_rows):
            end = min(rows, start + txn_rows)
            if op == "insert":
                conn.execute(INSERT, (start, end - 1))
            elif op == "update":
                conn.execute(
                    "UPDATE ecommerce_sales SET quantity = quantity + 1, unit_price = unit_price"
                    " * 1.1 WHERE id >= %s AND id < %s",
                    (low + start, low + end),
                )
            else:
                conn.execute(
                    "DELETE FROM ecommerce_sales WHERE id >= %s AND id < %s",
                    (low + start, low + end),
                )
        conn.execute("CHECKPOINT")


def peek_seconds(svc: Services) -> tuple[float, float, int]:
    """(server-side count, streamed to the client, rows of output)."""
    with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
        started = time.perf_counter()
        peeked = conn.execute(f"SELECT count(*) FROM {PEEK}").fetchone()
        assert peeked is not None
        count = int(peeked[0])
        counted = time.perf_counter() - started
        started = time.perf_counter()
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY (SELECT lsn, data FROM {PEEK}) TO STDOUT (FORMAT binary)") as copy,
        ):
            while copy.read():
                pass
        streamed = time.perf_counter() - started
    return counted, streamed, count


# -- the side-by-side run ------------------------------------------------------------------------


@dataclass
class Side:
    """One side's run: its time, its own CPU (wait4), PostgreSQL's meanwhile (the whole
    cluster, and its walsenders alone), the changes it delivered."""

    seconds: float
    cpu_s: float
    pg_cpu_s: float
    walsender_s: float
    changes: int
    s3_cpu_s: float = 0.0
    note: str = ""

    @property
    def rate(self) -> float:
        return self.changes / self.seconds

    def pg_us_per_change(self) -> float:
        return 1e6 * self.pg_cpu_s / self.changes


def pure_config(config: Path) -> Path:
    """The daemon's configuration for the pure-Python side: its own ledger schema, slot,
    publication and S3 prefix, beside the other's (a folder of its own for its log)."""
    text = config.read_text()
    text = text.replace(
        "[capture]\n",
        "[capture]\n" + (f'slot_name = "{PURE["slot"]}"\npublication_name = "{PURE["slot"]}"\n'),
        1,
    )
    text = text.replace("[s3]\n", f'[s3]\nprefix = "{PURE["prefix"]}"\n', 1)
    text += f'[state]\nschema = "{PURE["schema"]}"\n'
    folder = config.parent / "pure"
    folder.mkdir(exist_ok=True)
    (folder / config.name).write_text(text)
    return folder / config.name


def new_slots(svc: Services, config: Path, first: bool, pure: Path | None = None) -> None:
    """Fresh slots for every side (the daemon's by ``cdc-daemon init``, with no snapshot:
    ``capture.initial_snapshot = false``), all made before the pair's changes."""
    with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
        if pure is not None:
            conn.execute(f"DROP SCHEMA IF EXISTS {PURE['schema']} CASCADE")
        for slot in (DAEMON_SLOT, PURE["slot"], RECV_SLOT, DLT_SLOT):
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (slot,),
            )
    if not first:
        reset_capture(svc)  # the ledger's position and the objects of the previous pair
    cli(config, "init")
    if pure is not None:
        cli(pure, "init")
    with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
        for slot in (RECV_SLOT, DLT_SLOT):
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))


def make_changes(svc: Services, inserts: int, updates: int, deletes: int, txn_rows: int) -> str:
    """The pair's changes on ids of its own; returns the LSN where every side stops."""
    with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
        found = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM ecommerce_sales").fetchone()
        assert found is not None
        low = int(found[0])
    change(svc, "insert", inserts, txn_rows)
    change(svc, "update", updates, txn_rows, low)
    change(svc, "delete", deletes, txn_rows, low)
    with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
        # Autovacuum is off for the table: a vacuum that starts during one side's run would
        # bill that side for it. This one runs before every side.
        conn.execute("VACUUM ecommerce_sales")
        conn.execute("CHECKPOINT")
        end = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert end is not None
    return str(end[0])


def exported_ops(svc: Services, pure: bool = False) -> dict[str, int]:
    """The changes in the daemon's objects (the pure side's: under ``pure/``), by
    ``_cdc_op``."""
    s3 = svc.s3()
    ops: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=svc.bucket):
        for item in page.get("Contents", []):
            if item["Key"].startswith(PURE["prefix"] + "/") != pure:
                continue
            body = s3.get_object(Bucket=svc.bucket, Key=item["Key"])["Body"].read()
            # The last four fields (_cdc_op, _cdc_seq, _cdc_ts, _cdc_unchanged) hold no comma
            # here (no TOASTed value is left unchanged by these changes).
            for line in gzip.decompress(body).splitlines()[1:]:
                op = line.rsplit(b",", 4)[1].decode()
                ops[op] = ops.get(op, 0) + 1
    return ops


def run_daemon(svc: Services, config: Path, expected: dict[str, int], pure: bool = False) -> Side:
    s3_before = svc.cpu()[1]
    env = {"CDC_DAEMON_PURE_PYTHON": "1"} if pure else {"CDC_DAEMON_PURE_PYTHON": "0"}
    with ClusterCpu(svc) as pg:
        started, started_at = time.perf_counter(), time.time()
        run = finish_daemon(start_daemon(config, "--exit-when-idle", env=env), started, config)
    run.started_at = started_at
    rows = sum(b["rows"] for b in run.batches)
    last_batch = max(datetime.fromisoformat(b["timestamp"]).timestamp() for b in run.batches)
    hot_path = str(
        next(e.get("hot_path") for e in run.events if e.get("event") == "daemon_started")
    )
    if hot_path.startswith("python") != pure:
        raise RuntimeError(f"cdc-daemon ran the hot path {hot_path!r}")
    ops = exported_ops(svc, pure)
    if ops != expected:
        raise RuntimeError(f"cdc-daemon exported {ops} ({rows} rows), expected {expected}")
    return Side(
        run.seconds,
        run.cpu_seconds,
        pg.total,
        pg.walsenders(),
        rows,
        svc.cpu()[1] - s3_before,
        f"hot path {hot_path}; {len(run.batches)} batches,"
        f" {run.total('compressed_bytes') / 1e6:.0f} MB gzip; start"
        f" {run.start_s:.2f} s, then read+decode+spool {run.total('extract_s'):.2f} s, upload"
        f" {run.total('upload_s'):.2f} s, commit {run.total('commit_s'):.2f} s, exit"
        f" {run.seconds - (last_batch - started_at):.2f} s after the last batch; peak RSS"
        f" {run.peak_rss_mb:.0f} MB",
    )


def slot_position(svc: Services, slot: str) -> str:
    with psycopg.connect(svc.pg.dsn) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    assert row is not None
    return str(row[0])


def lsn_int(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def run_recvlogical(svc: Services, end: str, changes: int) -> Side:
    command = (
        f"{pg_bin('pg_recvlogical')} -d '{svc.pg.dsn}' -S {RECV_SLOT} --start --no-loop"
        f" -o proto_version=1 -o publication_names={PEERS_PUBLICATION} -f /dev/null"
        f" --endpos={end}"
    )
    with ClusterCpu(svc) as pg:
        run = timed_shell(command)
    # It reports what it wrote as flushed, up to endpos: the slot shows how far it read.
    reached = slot_position(svc, RECV_SLOT)
    if lsn_int(reached) < lsn_int(end):
        raise RuntimeError(f"pg_recvlogical stopped at {reached}, before {end}")
    return Side(run.seconds, run.cpu_s, pg.total, pg.walsenders(), changes)


def run_dlt(svc: Services, python: str, sources: str, changes: int) -> Side:
    with tempfile.TemporaryDirectory(prefix="cdc-bench-dlt-") as out:
        log = Path(out) / "dlt.log"
        with ClusterCpu(svc) as pg, log.open("wb") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(
                [python, "-c", DLT_SCRIPT, svc.pg.dsn, out, DLT_SLOT, PEERS_PUBLICATION, sources],
                stdout=subprocess.PIPE,
                stderr=err,
                env={
                    **os.environ,
                    "RUNTIME__LOG_LEVEL": "WARNING",
                    "RUNTIME__DLTHUB_TELEMETRY": "false",
                },
            )
            assert proc.stdout is not None
            output = proc.stdout.read().decode()
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - started
        warnings = log.read_text(errors="replace")
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"dlt failed: {warnings[-2000:]}")
        rows = int(output.split()[-1])
        written = sum(f.stat().st_size for f in Path(out).rglob("*.parquet"))
    if rows != changes:
        raise RuntimeError(f"dlt delivered {rows} changes, expected {changes}")
    unknown = warnings.count("is unknown")
    return Side(
        seconds,
        usage.ru_utime + usage.ru_stime,
        pg.total,
        pg.walsenders(),
        rows,
        note=f"{written / 1e6:.0f} MB of parquet, {unknown} 'type ... is unknown' warnings",
    )


def describe(name: str, side: Side) -> str:
    s3 = f" + S3 server {side.s3_cpu_s:.1f} s" if side.s3_cpu_s else ""
    note = f"; {side.note}" if side.note else ""
    return (
        f"{name:15} {side.seconds:6.2f} s {side.rate:9,.0f} changes/s, own CPU "
        f"{side.cpu_s:5.2f} s{s3}, PostgreSQL {side.pg_cpu_s:5.2f} s "
        f"({side.pg_us_per_change():.2f} us/change; walsenders {side.walsender_s:.2f} s){note}"
    )


def side_by_side(args: argparse.Namespace) -> None:
    updates = args.rows // 3 if args.updates is None else args.updates
    deletes = args.rows // 6 if args.deletes is None else args.deletes
    if deletes > updates or updates > args.rows:
        raise SystemExit("--deletes <= --updates <= --rows: they hit the inserted rows")
    total = args.rows + updates + deletes
    expected = {k: v for k, v in (("I", args.rows), ("U", updates), ("D", deletes)) if v}
    sides = list(SIDES)
    if not (
        Path(args.dlt_python).exists() and (Path(args.dlt_sources) / "pg_replication").is_dir()
    ):
        print(
            f"no dlt side: {args.dlt_python} or {args.dlt_sources}/pg_replication is missing "
            "(see bench/logical.py for how to set them up)"
        )
        sides.remove("dlt")
    with services() as svc:
        with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
            generate_sales(conn, 0)
            if args.identity == "full":
                conn.execute("ALTER TABLE ecommerce_sales REPLICA IDENTITY FULL")
            conn.execute("ALTER TABLE ecommerce_sales SET (autovacuum_enabled = false)")
            conn.execute(f"CREATE PUBLICATION {PEERS_PUBLICATION} FOR TABLE ecommerce_sales")
        config = write_config(
            svc,
            capture={"mode": "logical", "initial_snapshot": False},
            batch={"max_rows": 500_000},
        )
        pure = pure_config(config)
        version = subprocess.run(
            [str(pg_bin("pg_recvlogical")), "--version"], capture_output=True, text=True
        ).stdout.strip()
        print(f"bench/logical on {machine()}; {version}")
        print(
            f"  {args.rows:,} inserts + {updates:,} updates + {deletes:,} deletes = {total:,}"
            f" changes, transactions of {args.txn_rows:,} rows, REPLICA IDENTITY"
            f" {args.identity.upper()};"
            f" {args.pairs} rounds, sides in turn"
        )
        runs: dict[str, list[Side]] = {name: [] for name in sides}
        for n in range(args.pairs):
            new_slots(svc, config, first=n == 0, pure=pure)
            started = time.perf_counter()
            end = make_changes(svc, args.rows, updates, deletes, args.txn_rows)
            print(
                f"  round {n + 1}: changes made in {time.perf_counter() - started:.1f} s, to {end}"
            )
            order = sides[n % len(sides) :] + sides[: n % len(sides)]
            for name in order:
                if name == "cdc-daemon":
                    side = run_daemon(svc, config, expected)
                elif name == "cdc-daemon-pure":
                    assert pure is not None
                    side = run_daemon(svc, pure, expected, pure=True)
                elif name == "pg_recvlogical":
                    side = run_recvlogical(svc, end, total)
                else:
                    side = run_dlt(svc, args.dlt_python, args.dlt_sources, total)
                runs[name].append(side)
                print(f"    {describe(name, side)}")
        print(f"  medians over {args.pairs} rounds:")
        for name in sides:
            median = Side(
                statistics.median(s.seconds for s in runs[name]),
                statistics.median(s.cpu_s for s in runs[name]),
                statistics.median(s.pg_cpu_s for s in runs[name]),
                statistics.median(s.walsender_s for s in runs[name]),
                total,
                statistics.median(s.s3_cpu_s for s in runs[name]),
            )
            print(f"    {describe(name, median)}")
        daemon = runs["cdc-daemon"]
        recv = runs["pg_recvlogical"]
        for name in ("cdc-daemon", "cdc-daemon-pure"):
            to_recv = [d.rate / r.rate for d, r in zip(runs[name], recv, strict=True)]
            print(
                f"  {name} / pg_recvlogical, changes/s: {statistics.median(to_recv):.2f}x"
                f" (rounds {', '.join(f'{x:.2f}' for x in to_recv)}); goal >= "
                + ("0.6x" if args.identity == "full" else "0.8x")
            )
        gain = [d.rate / p.rate for d, p in zip(daemon, runs["cdc-daemon-pure"], strict=True)]
        print(
            f"  cdc-daemon / cdc-daemon-pure (compiled / pure-Python hot path), changes/s:"
            f" {statistics.median(gain):.2f}x (rounds {', '.join(f'{x:.2f}' for x in gain)})"
        )
        if "dlt" in runs:
            to_dlt = [d.rate / p.rate for d, p in zip(daemon, runs["dlt"], strict=True)]
            print(
                f"  cdc-daemon / dlt pg_replication, changes/s: {statistics.median(to_dlt):.1f}x"
                f" (rounds {', '.join(f'{x:.1f}' for x in to_dlt)}); goal >= 8x"
            )
        cpu = [d.pg_cpu_s / r.pg_cpu_s for d, r in zip(daemon, recv, strict=True)]
        print(
            f"  PostgreSQL CPU per change, cdc-daemon / pg_recvlogical: "
            f"{statistics.median(cpu):.2f} (rounds {', '.join(f'{x:.2f}' for x in cpu)});"
            " goal <= 1"
        )


# -- the earlier benchmark: one kind of change at a time, against the peek ----------------------


def per_op(args: argparse.Namespace) -> None:
    with services() as svc:
        with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
            generate_sales(conn, 0)
            conn.execute("ALTER TABLE ecommerce_sales REPLICA IDENTITY FULL")
        config: Path = write_config(svc, capture={"mode": "logical"}, batch={"max_rows": 500_000})
        cli(config, "init")
        first = finish_daemon(start_daemon(config, "--exit-when-idle"), time.perf_counter(), config)
        assert first.batches[0]["rows"] == 0 if first.batches else True
        print(f"bench/logical --per-op on {machine()}")
        print(f"  {args.rows:,} changes per operation, transactions of {args.txn_rows:,} rows")
        for op in ("insert", "update", "delete"):
            change(svc, op, args.rows, args.txn_rows)
            peek_seconds(svc)  # warm the WAL into the cache once, for both sides
            counted, streamed, messages = peek_seconds(svc)
            started = time.perf_counter()
            run = finish_daemon(start_daemon(config, "--exit-when-idle"), started, config)
            rows = sum(b["rows"] for b in run.batches)
            assert rows == args.rows, f"{op}: exported {rows} of {args.rows}"
            busy = sum(b["seconds"] for b in run.batches)
            print(f"  {op}:")
            print(
                f"    peek alone (count(*)):        {counted:6.2f} s "
                f"({args.rows / counted:,.0f} changes/s, {messages:,} messages)"
            )
            print(
                f"    peek streamed to the client:  {streamed:6.2f} s "
                f"({args.rows / streamed:,.0f} changes/s)"
            )
            print(
                f"    cdc-daemon (whole process):   {run.seconds:6.2f} s "
                f"({rows / run.seconds:,.0f} changes/s), in batches {busy:.2f} s "
                f"({rows / busy:,.0f} changes/s); {len(run.batches)} batches"
            )
            print(
                f"    ratio daemon / peek alone:    {counted / run.seconds:.2f} (process), "
                f"{counted / busy:.2f} (batches); target >= 0.5"
            )
            print(f"    peak RSS {run.peak_rss_mb:.0f} MB, CPU {run.cpu_seconds:.1f} s")
            for b in run.batches:
                print(
                    f"      batch {b['batch_id']}: {b['rows']:,} rows, read+decode+spool "
                    f"{b.get('extract_s', 0):.2f} s, upload {b.get('upload_s', 0):.2f} s, "
                    f"commit {b.get('commit_s', 0):.2f} s, {b['reason']}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, default=300_000, help="inserts (with --per-op: changes of each kind)"
    )
    parser.add_argument("--updates", type=int, default=None, help="default: --rows / 3")
    parser.add_argument("--deletes", type=int, default=None, help="default: --rows / 6")
    parser.add_argument("--txn-rows", type=int, default=10_000, help="rows per transaction")
    parser.add_argument("--pairs", type=int, default=3, help="rounds of all sides, in turn")
    parser.add_argument(
        "--identity",
        choices=("full", "default"),
        default="full",
        help="the table's replica identity",
    )
    parser.add_argument("--dlt-python", default="/tmp/dlt-venv/bin/python")
    parser.add_argument(
        "--dlt-sources",
        default="/tmp/dlt-verified-sources/sources",
        help="the folder holding verified-sources' pg_replication package",
    )
    parser.add_argument(
        "--per-op", action="store_true", help="the earlier benchmark: each kind against the peek"
    )
    args = parser.parse_args()
    if args.per_op:
        per_op(args)
    else:
        side_by_side(args)


if __name__ == "__main__":
    main()
