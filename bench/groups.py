"""bench/groups: a group of tables in logical mode (one slot, one publication): many small
tables against one table of the same volume, and the initial snapshot's ``snapshot_jobs``.

    .venv/bin/python -m bench.groups [--tables 20] [--rows 1000000] [--changes 200000]
        [--txn-rows 1000] [--pairs 2]
    .venv/bin/python -m bench.groups --snapshot [--rows 5000000] [--jobs 1,2,4] [--repeat 1]
        [--chunk-rows N]

Many against one (the default): ``--tables`` tables of ``--rows / --tables`` rows each, against
one table of ``--rows`` rows, all ``(id bigint primary key, k int, v text, at timestamptz)``,
default replica identity, no partition column (rows go to the day of the commit, snapshot rows
to the day of the read). Each side has a database of its own, made afresh (so its ledger,
slot and publication too), and its own object folders: ``cdc-daemon init``, then a timed
``run --exit-when-idle`` that takes the initial snapshot (every table joins at the slot's
consistent point; chunks by key, ``capture.snapshot_jobs`` at once), then ``--changes``
changes (60% inserts, 25% updates, 15% deletes, transactions of ``--txn-rows`` rows, each on
one table, the tables in turn: spread evenly over them), then the timed ``run
--exit-when-idle`` that drains them. Both runs are whole processes, with PostgreSQL's CPU
(ClusterCpu: the whole cluster, and its walsender alone) and the S3 server's around them; the
objects are read back and their ``_cdc_op`` counted against what was done. The sides take turns
(one, many; then many, one; ...), and the figures are the medians over ``--pairs``.

``--snapshot``: the initial snapshot of one table of ``--rows`` rows with each of ``--jobs``
(a fresh ledger, slot, publication and objects each time), against ``psql \\copy (select *
... order by id) to stdout csv | gzip -1 > /dev/null`` of the same rows, run just before each.
The table is analysed first: the daemon cuts a table's keys into ``snapshot_jobs`` ranges from
the planner's row estimate (``reltuples``), and a table never analysed is one range.
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.common import (
    VENV_BIN,
    ClusterCpu,
    Services,
    finish_daemon,
    machine,
    pg_bin,
    services,
    start_daemon,
    timed_shell,
    write_config,
)

CREATE = "CREATE TABLE {t} (id bigint, k int, v text, at timestamptz)"
LOAD = (
    "INSERT INTO {t} SELECT g, g %% 1000, md5(g::text),"
    " timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second'"
    " FROM generate_series(%s::bigint, %s::bigint) g"
)
# The changes' share of inserts and updates; the rest are deletes.
INSERT_SHARE, UPDATE_SHARE = 0.60, 0.25


# -- databases, tables, configurations ------------------------------------------------------------


def db_dsn(svc: Services, dbname: str) -> str:
    base, _, _ = svc.pg.dsn.rpartition("/")
    return f"{base}/{dbname}"


def fresh_database(svc: Services, dbname: str) -> str:
    """A new, empty database (the previous one of that name dropped, its slots first)."""
    drop_database(svc, dbname)
    with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    return db_dsn(svc, dbname)


def drop_database(svc: Services, dbname: str) -> None:
    with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE database = %s",
            (dbname,),
        )
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )


def make_tables(dsn: str, names: list[str], rows: int) -> None:
    """``rows`` rows in each table (ids 1..rows), the key added after the load, analysed
    (the snapshot's key ranges come from the row estimate), autovacuum off (a vacuum during
    one side's run would bill that side)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in names:
            table = sql.Identifier(name)
            conn.execute(sql.SQL(CREATE).format(t=table))
            if rows:
                conn.execute(sql.SQL(LOAD).format(t=table), (1, rows))
            conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(table))
            conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(table))
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table))
        conn.execute("CHECKPOINT")


def group_config(
    svc: Services, side_dir: Path, dsn: str, group: str, tables: list[str], **capture: Any
) -> Path:
    """bench.common's configuration (JSON log, the local S3 server, spool in the work
    directory) for a logical group of ``tables``, in ``side_dir`` (the daemon's log goes
    beside it)."""
    base = write_config(
        svc,
        seed=False,
        postgres={"dsn": dsn},
        capture={"mode": "logical", "group": group, **capture},
    )
    side_dir.mkdir(parents=True, exist_ok=True)
    entries = "".join(f'\n[[tables]]\nname = "public.{t}"\n' for t in tables)
    path = side_dir / "cdc.toml"
    path.write_text(base.read_text() + entries)
    return path


def init(config: Path) -> str:
    """``cdc-daemon init``; what it printed."""
    done = subprocess.run(
        [str(VENV_BIN / "cdc-daemon"), "--config", str(config), "init"],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def forget_capture(svc: Services, dsn: str, group: str, prefixes: list[str]) -> None:
    """The group's slot, publication, ledger and objects gone: the next init and run start
    with a new slot and a new snapshot."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name = %s",
            (f"cdc_{group}",),
        )
        conn.execute(
            sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(f"cdc_{group}"))
        )
        conn.execute("DROP SCHEMA IF EXISTS cdc CASCADE")
    delete_objects(svc, prefixes)


def object_keys(svc: Services, prefixes: list[str]) -> list[str]:
    s3 = svc.s3()
    keys = []
    for prefix in prefixes:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=svc.bucket, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def delete_objects(svc: Services, prefixes: list[str]) -> None:
    s3 = svc.s3()
    for key in object_keys(svc, prefixes):
        s3.delete_object(Bucket=svc.bucket, Key=key)


def read_objects(svc: Services, prefix: str) -> list[tuple[str, list[bytes], list[bytes]]]:
    """(key, header, rows) of every object under ``prefix`` (no value of these tables holds a
    comma or a quote: a row is its fields split at commas)."""
    s3 = svc.s3()
    found = []
    for key in object_keys(svc, [prefix]):
        lines = gzip.decompress(s3.get_object(Bucket=svc.bucket, Key=key)["Body"].read())
        header, *rows = lines.splitlines()
        found.append((key, header.split(b","), rows))
    return found


@dataclass
class Exported:
    """What a table's objects hold: its snapshot's rows (``join-`` objects), how many distinct
    ids among them, and the stream's changes by ``_cdc_op``."""

    snapshot_rows: int = 0
    snapshot_ids: int = 0
    ops: dict[str, int] = field(default_factory=dict)

    def add(self, other: Exported) -> None:
        self.snapshot_rows += other.snapshot_rows
        self.snapshot_ids += other.snapshot_ids
        for op, n in other.ops.items():
            self.ops[op] = self.ops.get(op, 0) + n


def exported(svc: Services, table: str, max_id: int) -> Exported:
    seen = bytearray(max_id + 1)
    out = Exported()
    for key, header, rows in read_objects(svc, f"public.{table}/"):
        if key.rsplit("/", 1)[1].startswith("join-"):
            at = header.index(b"id")
            out.snapshot_rows += len(rows)
            for row in rows:
                seen[int(row.split(b",", at + 1)[at])] = 1
        else:
            at = header.index(b"_cdc_op")
            for row in rows:
                op = row.split(b",")[at].decode()
                out.ops[op] = out.ops.get(op, 0) + 1
    out.snapshot_ids = sum(seen)
    return out


def snapshot_check(found: Exported, rows: int) -> str:
    """Every row of the tables in the snapshot (else an error); duplicates said."""
    if found.snapshot_ids != rows:
        raise RuntimeError(f"the snapshot holds {found.snapshot_ids:,} of {rows:,} ids")
    extra = found.snapshot_rows - rows
    if extra:
        return (
            f"DUPLICATES: the snapshot exported {found.snapshot_rows:,} rows for {rows:,} ids"
            f" ({extra:,} extra, {found.snapshot_rows / rows:.2f}x)"
        )
    return ""


# -- a measured run -------------------------------------------------------------------------------


@dataclass
class Run:
    """One ``run --exit-when-idle``: its time, CPU (its own by wait4, PostgreSQL's by
    ClusterCpu, the S3 server's), and the daemon's log lines."""

    seconds: float
    cpu_s: float
    pg_cpu_s: float
    walsender_s: float
    s3_cpu_s: float
    peak_rss_mb: float
    started_at: float
    events: list[dict[str, Any]] = field(default_factory=list)

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    def rows(self, event: str) -> int:
        return sum(int(e["rows"]) for e in self.of(event))

    def span(self, event: str) -> tuple[float, float]:
        """Seconds from the process's start to the first of these lines' work began, and to
        the last of them was logged."""
        found = self.of(event)
        if not found:
            return 0.0, 0.0
        ends = [datetime.fromisoformat(e["timestamp"]).timestamp() for e in found]
        starts = [end - float(e["seconds"]) for end, e in zip(ends, found, strict=True)]
        return min(starts) - self.started_at, max(ends) - self.started_at

    def total(self, event: str, key: str) -> float:
        return float(sum(float(e.get(key, 0)) for e in self.of(event)))

    def problems(self) -> list[str]:
        return [
            f"{e.get('level')} {e.get('event')}"
            for e in self.events
            if e.get("level") in ("warning", "error", "critical")
        ]


def measured_run(svc: Services, config: Path) -> Run:
    s3_before = svc.cpu()[1]
    with ClusterCpu(svc) as pg:
        started, started_at = time.perf_counter(), time.time()
        done = finish_daemon(start_daemon(config, "--exit-when-idle"), started, config)
    return Run(
        done.seconds,
        done.cpu_seconds,
        pg.total,
        pg.walsenders(),
        svc.cpu()[1] - s3_before,
        done.peak_rss_mb,
        started_at,
        done.events,
    )


def cpu_text(run: Run) -> str:
    return (
        f"daemon CPU {run.cpu_s:.2f} s, PostgreSQL {run.pg_cpu_s:.2f} s (walsender"
        f" {run.walsender_s:.2f} s), S3 server {run.s3_cpu_s:.2f} s"
    )


def snapshot_text(run: Run, rows: int) -> str:
    chunks = run.of("join_chunk_uploaded")
    first, last = run.span("join_chunk_uploaded")
    counts = [int(c["rows"]) for c in chunks] or [0]
    sizes = f"{min(counts):,}-{max(counts):,}"
    copy = (
        run.total("join_chunk_uploaded", "seconds")
        - run.total("join_chunk_uploaded", "upload_s")
        - run.total("join_chunk_uploaded", "commit_s")
    )
    return (
        f"{run.seconds:6.2f} s, {rows / run.seconds:9,.0f} rows/s; {cpu_text(run)}; peak RSS"
        f" {run.peak_rss_mb:.0f} MB; {len(chunks)} chunks of {sizes} rows, from {first:.2f} s"
        f" to {last:.2f} s"
        f" after the start (summed over chunks: copy+spool {copy:.2f} s, upload"
        f" {run.total('join_chunk_uploaded', 'upload_s'):.2f} s, ledger"
        f" {run.total('join_chunk_uploaded', 'commit_s'):.2f} s), exit {run.seconds - last:.2f} s"
        " after the last"
    )


# -- many tables against one ---------------------------------------------------------------------


@dataclass
class Side:
    name: str
    tables: list[str]
    rows_per_table: int


@dataclass
class SideResult:
    snapshot: Run
    drain: Run
    changes: int
    rows: int
    load_s: float
    change_s: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.changes / self.drain.seconds

    @property
    def snapshot_rate(self) -> float:
        return self.rows / self.snapshot.seconds


def split_change(txn_rows: int) -> tuple[int, int, int]:
    inserts = round(txn_rows * INSERT_SHARE)
    updates = round(txn_rows * UPDATE_SHARE)
    return inserts, updates, txn_rows - inserts - updates


def make_changes(dsn: str, side: Side, changes: int, txn_rows: int) -> dict[str, int]:
    """``changes`` changes in transactions of ``txn_rows`` rows, each on one table, the
    tables in turn; updates go up from the lowest id, deletes down from the highest loaded
    one, inserts above it. Returns the counts by ``_cdc_op``."""
    if changes % (txn_rows * len(side.tables)):
        raise SystemExit("--changes must be a multiple of --txn-rows times the tables")
    inserts, updates, deletes = split_change(txn_rows)
    per_table = changes // txn_rows // len(side.tables)
    if per_table * (updates + deletes) > side.rows_per_table:
        raise SystemExit("updates and deletes would hit more rows than a table holds")
    done = {name: 0 for name in side.tables}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n in range(changes // txn_rows):
            name = side.tables[n % len(side.tables)]
            table = sql.Identifier(name)
            k = done[name]
            done[name] += 1
            high = side.rows_per_table
            with conn.transaction():
                first = high + 1 + k * inserts
                conn.execute(sql.SQL(LOAD).format(t=table), (first, first + inserts - 1))
                conn.execute(
                    sql.SQL(
                        "UPDATE {} SET k = k + 1, v = v || 'u', at = at + interval '1 day'"
                        " WHERE id BETWEEN %s AND %s"
                    ).format(table),
                    (1 + k * updates, (k + 1) * updates),
                )
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE id BETWEEN %s AND %s").format(table),
                    (high - (k + 1) * deletes + 1, high - k * deletes),
                )
        conn.execute("CHECKPOINT")
    count = changes // txn_rows
    return {"I": count * inserts, "U": count * updates, "D": count * deletes}


def run_side(svc: Services, side: Side, args: argparse.Namespace, n: int) -> SideResult:
    dbname = f"bench_{side.name}"
    prefixes = [f"public.{t}/" for t in side.tables]
    started = time.perf_counter()
    dsn = fresh_database(svc, dbname)
    make_tables(dsn, side.tables, side.rows_per_table)
    load_s = time.perf_counter() - started
    config = group_config(svc, svc.workdir / side.name, dsn, side.name, side.tables)
    said = init(config)
    if n == 0:
        print(f"    {side.name}: init said: {said.splitlines()[0][:150] if said else '(nothing)'}")
    rows = side.rows_per_table * len(side.tables)
    snapshot = measured_run(svc, config)
    started = time.perf_counter()
    expected = make_changes(dsn, side, args.changes, args.txn_rows)
    change_s = time.perf_counter() - started
    drain = measured_run(svc, config)
    if drain.rows("batch_uploaded") != args.changes:
        raise RuntimeError(
            f"{side.name}: the drain exported {drain.rows('batch_uploaded')} changes,"
            f" expected {args.changes}"
        )
    found = Exported()
    for table in side.tables:
        found.add(exported(svc, table, side.rows_per_table))
    if found.ops != expected:
        raise RuntimeError(f"{side.name}: the stream's objects hold {found.ops}, not {expected}")
    if found.snapshot_rows != snapshot.rows("join_chunk_uploaded"):
        raise RuntimeError(
            f"{side.name}: {found.snapshot_rows} snapshot rows in S3, the log says"
            f" {snapshot.rows('join_chunk_uploaded')}"
        )
    note = snapshot_check(found, rows)
    drop_database(svc, dbname)
    delete_objects(svc, prefixes)
    return SideResult(snapshot, drain, args.changes, rows, load_s, change_s, note)


def drain_text(result: SideResult) -> str:
    run = result.drain
    batches = run.of("batch_uploaded")
    first, last = run.span("batch_uploaded")
    return (
        f"{run.seconds:6.2f} s, {result.rate:9,.0f} changes/s; {cpu_text(run)}"
        f" = {1e6 * run.pg_cpu_s / result.changes:.2f} us/change; peak RSS"
        f" {run.peak_rss_mb:.0f} MB; {len(batches)} batches,"
        f" {sum(int(b['objects']) for b in batches)} objects,"
        f" {run.total('batch_uploaded', 'compressed_bytes') / 1e6:.1f} MB gzip; first batch"
        f" began {first:.2f} s after the start; read+decode+spool"
        f" {run.total('batch_uploaded', 'extract_s'):.2f} s, upload"
        f" {run.total('batch_uploaded', 'upload_s'):.2f} s, ledger"
        f" {run.total('batch_uploaded', 'commit_s'):.2f} s; exit {run.seconds - last:.2f} s"
        " after the last batch"
    )


def many_vs_one(args: argparse.Namespace) -> None:
    if args.rows % args.tables:
        raise SystemExit("--rows must be a multiple of --tables")
    width = len(str(args.tables))
    many = Side(
        "many", [f"m{i:0{width}d}" for i in range(1, args.tables + 1)], args.rows // args.tables
    )
    one = Side("one", ["one"], args.rows)
    inserts, updates, deletes = split_change(args.txn_rows)
    with services() as svc:
        version = subprocess.run(
            [str(pg_bin("postgres")), "--version"], capture_output=True, text=True
        ).stdout.strip()
        print(f"bench/groups on {machine()}; {version}")
        print(
            f"  many: {args.tables} tables x {many.rows_per_table:,} rows; one: 1 table x"
            f" {args.rows:,} rows; then {args.changes:,} changes (transactions of"
            f" {args.txn_rows:,}: {inserts} inserts, {updates} updates, {deletes} deletes, each"
            f" on one table, the tables in turn); default replica identity, snapshot_jobs 2,"
            f" snapshot_chunk_rows 100,000; {args.pairs} pair(s), sides in turn"
        )
        results: dict[str, list[SideResult]] = {"many": [], "one": []}
        for n in range(args.pairs):
            order = [one, many] if n % 2 == 0 else [many, one]
            print(f"  pair {n + 1}: {', '.join(s.name for s in order)}")
            for side in order:
                result = run_side(svc, side, args, n)
                results[side.name].append(result)
                print(
                    f"    {side.name:4} loaded in {result.load_s:.1f} s, changes made in"
                    f" {result.change_s:.1f} s"
                )
                print(f"      snapshot {snapshot_text(result.snapshot, result.rows)}")
                print(f"      drain    {drain_text(result)}")
                if result.note:
                    print(f"      {result.note}")
                for run, what in ((result.snapshot, "snapshot"), (result.drain, "drain")):
                    if run.problems():
                        print(f"      {what} logged: {', '.join(run.problems())}")
        print(f"  medians over {args.pairs} pair(s):")
        for name, runs in results.items():
            print(
                f"    {name:4} drain {statistics.median(r.drain.seconds for r in runs):.2f} s ="
                f" {statistics.median(r.rate for r in runs):,.0f} changes/s (daemon CPU"
                f" {statistics.median(r.drain.cpu_s for r in runs):.2f} s, PostgreSQL"
                f" {statistics.median(r.drain.pg_cpu_s for r in runs):.2f} s, walsender"
                f" {statistics.median(r.drain.walsender_s for r in runs):.2f} s);"
                f" snapshot {statistics.median(r.snapshot.seconds for r in runs):.2f} s ="
                f" {statistics.median(r.snapshot_rate for r in runs):,.0f} rows/s (daemon CPU"
                f" {statistics.median(r.snapshot.cpu_s for r in runs):.2f} s, PostgreSQL"
                f" {statistics.median(r.snapshot.pg_cpu_s for r in runs):.2f} s)"
            )
        pairs = list(zip(results["many"], results["one"], strict=True))
        ratios = [m.rate / o.rate for m, o in pairs]
        snaps = [m.snapshot_rate / o.snapshot_rate for m, o in pairs]
        print(
            f"  many / one, changes/s: {statistics.median(ratios):.2f}x (pairs"
            f" {', '.join(f'{x:.2f}' for x in ratios)}); goal >= 0.8x:"
            f" {'met' if statistics.median(ratios) >= 0.8 else 'NOT met'}"
        )
        print(
            f"  many / one, snapshot rows/s: {statistics.median(snaps):.2f}x (pairs"
            f" {', '.join(f'{x:.2f}' for x in snaps)})"
        )


# -- the initial snapshot with snapshot_jobs 1, 2, 4 ----------------------------------------------


def snapshot_jobs(args: argparse.Namespace) -> None:
    jobs = [int(j) for j in args.jobs.split(",")]
    group, table = "snap", "snap"
    prefixes = [f"public.{table}/"]
    with services() as svc:
        version = subprocess.run(
            [str(pg_bin("postgres")), "--version"], capture_output=True, text=True
        ).stdout.strip()
        print(f"bench/groups --snapshot on {machine()}; {version}")
        started = time.perf_counter()
        dsn = fresh_database(svc, "bench_snap")
        make_tables(dsn, [table], args.rows)
        with psycopg.connect(dsn) as conn:
            size = conn.execute("SELECT pg_table_size(%s)", (table,)).fetchone()
        assert size is not None
        chunk = args.chunk_rows or 100_000
        print(
            f"  one table, {args.rows:,} rows ({int(size[0]) / 1e6:.0f} MB), loaded in"
            f" {time.perf_counter() - started:.1f} s; snapshot_chunk_rows {chunk:,};"
            f" jobs {', '.join(map(str, jobs))}; {args.repeat} round(s)"
        )
        query = f"select * from {table} order by id"
        reference_cmd = (
            f"psql '{dsn}' -q -c \"\\copy ({query}) to stdout csv\" | gzip -1 > /dev/null"
        )
        timed_shell(reference_cmd)  # the table into the page cache once, for every side
        capture: dict[str, Any] = {"snapshot_chunk_rows": chunk} if args.chunk_rows else {}
        results: dict[int, list[tuple[Run, float, float, float]]] = {j: [] for j in jobs}
        for n in range(args.repeat):
            order = jobs if n % 2 == 0 else jobs[::-1]
            for j in order:
                with ClusterCpu(svc) as pg:
                    reference = timed_shell(reference_cmd)
                forget_capture(svc, dsn, group, prefixes)
                config = group_config(
                    svc, svc.workdir / f"snap{j}", dsn, group, [table], snapshot_jobs=j, **capture
                )
                init(config)
                run = measured_run(svc, config)
                note = snapshot_check(exported(svc, table, args.rows), args.rows)
                results[j].append((run, reference.seconds, reference.cpu_s, pg.total))
                print(f"  jobs {j}: {snapshot_text(run, args.rows)}")
                print(
                    f"          reference {reference.seconds:.2f} s"
                    f" ({args.rows / reference.seconds:,.0f} rows/s; psql+gzip CPU"
                    f" {reference.cpu_s:.2f} s, PostgreSQL {pg.total:.2f} s);"
                    f" ratio {reference.seconds / run.seconds:.2f}x"
                )
                if note:
                    print(f"          {note}")
                if run.problems():
                    print(f"          logged: {', '.join(run.problems())}")
        forget_capture(svc, dsn, group, prefixes)
        print(f"  medians over {args.repeat} round(s):")
        for j in jobs:
            runs = results[j]
            seconds = statistics.median(r.seconds for r, *_ in runs)
            ref = statistics.median(x for _, x, _, _ in runs)
            ratio = statistics.median(x / r.seconds for r, x, _, _ in runs)
            print(
                f"    jobs {j}: {seconds:.2f} s, {args.rows / seconds:,.0f} rows/s, daemon CPU"
                f" {statistics.median(r.cpu_s for r, *_ in runs):.2f} s, PostgreSQL"
                f" {statistics.median(r.pg_cpu_s for r, *_ in runs):.2f} s, S3 server"
                f" {statistics.median(r.s3_cpu_s for r, *_ in runs):.2f} s; reference"
                f" {ref:.2f} s (psql+gzip {statistics.median(c for *_, c, _ in runs):.2f} s,"
                f" PostgreSQL {statistics.median(p for *_, p in runs):.2f} s); ratio"
                f" {ratio:.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--snapshot", action="store_true", help="the initial snapshot with --jobs instead"
    )
    parser.add_argument(
        "--rows", type=int, default=None, help="rows in all (default 1,000,000; --snapshot 5M)"
    )
    parser.add_argument("--tables", type=int, default=20, help="tables of the many side")
    parser.add_argument("--changes", type=int, default=200_000)
    parser.add_argument("--txn-rows", type=int, default=1000, help="rows per transaction")
    parser.add_argument("--pairs", type=int, default=2, help="pairs of sides, in turn")
    parser.add_argument("--jobs", default="1,2,4", help="--snapshot: snapshot_jobs to try")
    parser.add_argument("--repeat", type=int, default=1, help="--snapshot: rounds")
    parser.add_argument(
        "--chunk-rows", type=int, default=None, help="snapshot_chunk_rows (default: 100,000)"
    )
    args = parser.parse_args()
    if args.snapshot:
        args.rows = args.rows or 5_000_000
        snapshot_jobs(args)
    else:
        args.rows = args.rows or 1_000_000
        many_vs_one(args)


if __name__ == "__main__":
    main()
