"""bench/long_txn: logical capture while a long transaction stays open: the daemon streaming
against the replaced peek reader, on slots made at the same point, in the same run.

    .venv/bin/python -m bench.long_txn [--wal-gb 1] [--seconds 60] [--max-age 1]

One transaction inserts a row into another table and stays open; then ``--wal-gb`` of WAL is
written by other tables (committed). From then on one change per second commits on the
captured table (ecommerce_sales), and two windows of ``--seconds`` follow each other:

1. ``cdc-daemon run`` (logical mode, ``batch.max_age_s`` = ``--max-age``), once it has caught
   up: commit-to-object latency (listing every 0.1 s, as bench/latency does) and PostgreSQL's
   CPU over the window;
2. what the replaced reader did: ``SELECT count(*) FROM pg_logical_slot_peek_binary_changes(
   <its own slot>, NULL, NULL, 'proto_version', '1', 'publication_names', <pub>)`` once per
   second (back to back when one takes longer), on a second slot made together with the
   daemon's: each call decodes again from the slot's restart_lsn, which the open transaction
   holds before all that WAL. PostgreSQL's CPU over the window and each call's time.

PostgreSQL's CPU is the cluster's (the postmaster's process tree, ended backends included);
the walsender's and the peek's backend's own come from ClusterCpu.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field

import psycopg

from bench.common import (
    ClusterCpu,
    Services,
    cli,
    finish_daemon,
    machine,
    services,
    start_daemon,
    write_config,
)
from bench.latency import percentile
from cdc_daemon.local.sample import generate_sales

PUBLICATION = "cdc_public_ecommerce_sales"
PEEK_SLOT = "bench_peek"
PEEK = (
    f"SELECT count(*) FROM pg_logical_slot_peek_binary_changes('{PEEK_SLOT}', NULL, NULL,"
    f" 'proto_version', '1', 'publication_names', '{PUBLICATION}')"
)
INSERT = (
    "INSERT INTO ecommerce_sales (invoice_no, stock_code, description, quantity, invoice_date,"
    " unit_price, customer_id, country) VALUES ('T1', 'S', 'long transaction probe', 1, now(),"
    " 1, 1, 'UK') RETURNING id"
)
# Rows of filler per committed transaction (~250 bytes of WAL each).
FILLER_ROWS = 200_000
GB = 1024**3


@dataclass
class Probes:
    """One change per second on the captured table, and when each became visible in S3."""

    svc: Services
    interval_s: float = 1.0
    committed: dict[int, float] = field(default_factory=dict)
    visible: dict[int, float] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    watching: threading.Event = field(default_factory=threading.Event)

    def writer(self) -> None:
        with psycopg.connect(self.svc.pg.dsn, autocommit=True) as conn:
            next_at = time.monotonic()
            while not self.stop.is_set():
                row = conn.execute(INSERT).fetchone()
                assert row is not None
                self.committed[int(str(row[0]))] = time.time()
                next_at += self.interval_s
                self.stop.wait(max(0.0, next_at - time.monotonic()))

    def observer(self) -> None:
        s3 = self.svc.s3()
        seen: set[str] = set()
        while not self.stop.is_set():
            if not self.watching.is_set():
                self.watching.wait(0.1)
                continue
            listed = time.time()
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.svc.bucket):
                for item in page.get("Contents", []):
                    if item["Key"] in seen:
                        continue
                    seen.add(item["Key"])
                    body = s3.get_object(Bucket=self.svc.bucket, Key=item["Key"])["Body"].read()
                    lines = gzip.decompress(body).decode().splitlines()
                    at = lines[0].split(",").index("id")
                    for line in lines[1:]:
                        self.visible.setdefault(int(line.split(",")[at]), listed)
            time.sleep(0.1)

    def wait_visible(self, ids: list[int], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(i in self.visible for i in ids):
                return True
            time.sleep(0.1)
        return False

    def since(self, start: float, end: float = float("inf")) -> list[int]:
        return [i for i, t in list(self.committed.items()) if start <= t < end]


def write_wal(svc: Services, target: int) -> tuple[int, float]:
    """Committed inserts into another table until ``target`` bytes of WAL are written."""
    with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE bench_filler (n int, payload text) WITH (autovacuum_enabled = false)"
        )
        start = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
        assert start is not None
        started = time.perf_counter()
        written = 0
        while written < target:
            conn.execute(
                "INSERT INTO bench_filler SELECT g, repeat(md5(g::text), 6)"
                " FROM generate_series(1, %s) g",
                (FILLER_ROWS,),
            )
            row = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)::int8", (start[0],)
            ).fetchone()
            assert row is not None
            written = int(str(row[0]))
        seconds = time.perf_counter() - started
        conn.execute("CHECKPOINT")  # not in either window
    return written, seconds


def walsender_pid(svc: Services) -> int | None:
    with psycopg.connect(svc.pg.dsn) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_stat_replication WHERE application_name = 'cdc-daemon-stream'"
        ).fetchone()
    return int(str(row[0])) if row else None


def slots(svc: Services) -> str:
    with psycopg.connect(svc.pg.dsn) as conn:
        rows = conn.execute(
            "SELECT slot_name, pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)),"
            " pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn))"
            " FROM pg_replication_slots ORDER BY slot_name"
        ).fetchall()
    return "; ".join(f"{n}: restart_lsn {r} behind, confirmed {c} behind" for n, r, c in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wal-gb", type=float, default=1.0, help="WAL written by other tables")
    parser.add_argument("--seconds", type=float, default=60, help="each window")
    parser.add_argument("--max-age", type=float, default=1.0, help="batch.max_age_s")
    parser.add_argument("--poll", type=float, default=0.1, help="capture.poll_interval_s")
    parser.add_argument("--catch-up-timeout", type=float, default=600)
    args = parser.parse_args()
    target = int(args.wal_gb * GB)
    # The WAL stays (the slots hold it), the filler table is about as large again, and the
    # decoders spill transactions to disk: keep room for three times the WAL, plus 2 GB.
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if 3 * target + 2 * GB > free:
        scaled = max(64 * 1024**2, (free - 2 * GB) // 3)
        print(
            f"only {free / GB:.1f} GB free in {tempfile.gettempdir()}: "
            f"{scaled / GB:.2f} GB of WAL instead of {args.wal_gb} GB"
        )
        target = scaled

    with services() as svc:
        with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
            generate_sales(conn, 0)
            conn.execute("ALTER TABLE ecommerce_sales REPLICA IDENTITY FULL")
            conn.execute("CREATE TABLE bench_other (n int)")
        config = write_config(
            svc,
            capture={"mode": "logical", "initial_snapshot": False, "poll_interval_s": args.poll},
            batch={"max_age_s": args.max_age},
        )
        cli(config, "init")  # the daemon's slot, at its consistent point
        with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (PEEK_SLOT,))
        # The open transaction: it has written, so restart_lsn cannot pass its start.
        open_txn = psycopg.connect(svc.pg.dsn)
        open_txn.execute("INSERT INTO bench_other VALUES (1)")
        xid = open_txn.execute("SELECT txid_current()").fetchone()
        wal, wal_s = write_wal(svc, target)

        probes = Probes(svc)
        threads = [threading.Thread(target=probes.writer), threading.Thread(target=probes.observer)]
        for thread in threads:
            thread.start()
        print(f"bench/long_txn on {machine()}")
        print(
            f"  open transaction (xid {xid[0] if xid else '?'}) inserted a row into bench_other;"
            f" then {wal / GB:.2f} GB of WAL from bench_filler ({wal_s:.0f} s);"
            f" one change per second on ecommerce_sales from then on"
        )
        print(f"  slots: {slots(svc)}")

        # The daemon: catching up (decoding the backlog once), then the window.
        probes.watching.set()
        with ClusterCpu(svc) as catching:
            started, started_at = time.perf_counter(), time.time()
            daemon = start_daemon(config)
            while not probes.since(started_at):
                time.sleep(0.05)
            first = probes.since(started_at)[:1]
            caught = probes.wait_visible(first, args.catch_up_timeout)
        if not caught:
            daemon.send_signal(signal.SIGTERM)
            finish_daemon(daemon, started, config)
            raise SystemExit(f"the daemon did not catch up in {args.catch_up_timeout:.0f} s")
        catch_up_s = probes.visible[first[0]] - started_at
        sender = walsender_pid(svc)
        with ClusterCpu(svc) as pg_daemon:
            window_start = time.time()
            time.sleep(args.seconds)
            window_end = time.time()
        sender_after = walsender_pid(svc)
        in_window = probes.since(window_start, window_end)
        all_seen = probes.wait_visible(in_window, 30)
        daemon.send_signal(signal.SIGTERM)
        run = finish_daemon(daemon, started, config)
        probes.watching.clear()
        latencies = [
            probes.visible[i] - probes.committed[i] for i in in_window if i in probes.visible
        ]
        daemon_window_s = window_end - window_start
        print(f"  slots after the daemon's window: {slots(svc)}")

        # The replaced reader, on its own slot, under the same open transaction.
        calls: list[tuple[float, int]] = []
        with psycopg.connect(svc.pg.dsn, autocommit=True) as peek:
            backend = peek.execute("SELECT pg_backend_pid()").fetchone()
            assert backend is not None
            with ClusterCpu(svc) as pg_peek:
                peek_start = time.monotonic()
                next_at = peek_start
                while time.monotonic() - peek_start < args.seconds:
                    time.sleep(max(0.0, next_at - time.monotonic()))
                    began = time.perf_counter()
                    row = peek.execute(PEEK).fetchone()
                    calls.append((time.perf_counter() - began, int(str(row[0])) if row else 0))
                    next_at += 1.0
                peek_window_s = time.monotonic() - peek_start
        probes.stop.set()
        for thread in threads:
            thread.join()
        open_txn.rollback()
        open_txn.close()

    errors = [e for e in run.events if e.get("level") in ("warning", "error")]
    print(
        f"  cdc-daemon run (max_age_s {args.max_age}, poll_interval_s {args.poll}):"
        f" caught up in {catch_up_s:.1f} s (first change visible; PostgreSQL CPU"
        f" {catching.total:.1f} s, walsender {catching.walsenders():.1f} s)"
    )
    if latencies:
        print(
            f"    window {daemon_window_s:.0f} s, {len(in_window)} changes,"
            f" {len(latencies)} visible:"
            f" commit -> object p50 {percentile(latencies, 0.5):.2f} s,"
            f" p99 {percentile(latencies, 0.99):.2f} s, max {max(latencies):.2f} s;"
            f" goal p99 <= {args.max_age + 2:.1f} s"
        )
    if not all_seen:
        missing = sorted(set(in_window) - set(probes.visible))
        print(f"    NOT VISIBLE 30 s after the window: ids {missing}")
    walsender_s = pg_daemon.of(sender) if sender else 0.0
    print(
        f"    PostgreSQL CPU {pg_daemon.total:.2f} s"
        f" ({100 * pg_daemon.total / daemon_window_s:.1f}% of one core); its walsender"
        f" (pid {sender}) {walsender_s:.2f} s; walsenders all {pg_daemon.walsenders():.2f} s"
        + ("" if sender == sender_after else f"; THE WALSENDER CHANGED: {sender} -> {sender_after}")
    )
    print(
        f"    daemon: {len(run.batches)} batches; own CPU {run.cpu_seconds:.1f} s over"
        f" {run.seconds:.0f} s; {len(errors)} warnings/errors"
    )
    for event in errors[:5]:
        print(f"      {event}")
    seconds = [c[0] for c in calls]
    backend_s = pg_peek.of(int(str(backend[0])))
    print(
        f"  peek loop: {len(calls)} calls in {peek_window_s:.0f} s, each"
        f" p50 {statistics.median(seconds):.2f} s, min {min(seconds):.2f} s,"
        f" max {max(seconds):.2f} s; {calls[0][1]}..{calls[-1][1]} messages returned"
        " (the captured table's since the slot was made)"
    )
    print(
        f"    PostgreSQL CPU {pg_peek.total:.2f} s"
        f" ({100 * pg_peek.total / peek_window_s:.0f}% of one core); the peek's backend"
        f" {backend_s:.2f} s"
    )
    daemon_rate = pg_daemon.total / daemon_window_s
    peek_rate = pg_peek.total / peek_window_s
    own = (walsender_s / daemon_window_s) / (backend_s / peek_window_s)
    print(
        f"  PostgreSQL CPU per second, cdc-daemon / peek loop: {100 * daemon_rate / peek_rate:.1f}%"
        f" (its walsender / the peek's backend: {100 * own:.2f}%); goal < 5%"
    )


if __name__ == "__main__":
    main()
