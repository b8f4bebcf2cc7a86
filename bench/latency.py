"""bench/latency: a writer commits small transactions at a steady rate (default 2,000 rows/s
in transactions of 20 rows) for a minute while the daemon runs with a short max_age_s; reports
commit-to-object-visible latency (p50/p95/p99) and the daemon's CPU share of one core.

    .venv/bin/python -m bench.latency [--seconds 60] [--rate 2000] [--max-age 1]
"""

from __future__ import annotations

import argparse
import gzip
import signal
import threading
import time

import psycopg

from bench.common import cli as run_cli
from bench.common import finish_daemon, load_rows, machine, services, start_daemon, write_config

INSERT = (
    "INSERT INTO ecommerce_sales (invoice_no, stock_code, description, quantity, invoice_date,"
    " unit_price, customer_id, country) SELECT 'L' || g, 'S', 'latency probe', 1, now(), 1, 1,"
    " 'UK' FROM generate_series(1, %s) g RETURNING id"
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rate", type=int, default=2000, help="rows per second")
    parser.add_argument("--rows-per-txn", type=int, default=20)
    parser.add_argument("--max-age", type=float, default=1.0, help="batch.max_age_s")
    args = parser.parse_args()
    committed: dict[int, float] = {}
    visible: dict[int, float] = {}
    stop = threading.Event()

    with services() as svc:
        load_rows(svc, 1000, days=1)
        config = write_config(
            svc, batch={"max_age_s": args.max_age}, capture={"poll_interval_s": 0.1}
        )
        run_cli(config, "init")
        s3 = svc.s3()

        def writer() -> None:
            interval = args.rows_per_txn / args.rate
            with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
                next_at = time.monotonic()
                while not stop.is_set():
                    ids = [r[0] for r in conn.execute(INSERT, (args.rows_per_txn,))]
                    now = time.time()
                    for i in ids:
                        committed[int(i)] = now
                    next_at += interval
                    time.sleep(max(0.0, next_at - time.monotonic()))

        def observer() -> None:
            seen: set[str] = set()
            while not stop.is_set() or any(i not in visible for i in list(committed)):
                listed = time.time()
                for page in s3.get_paginator("list_objects_v2").paginate(Bucket=svc.bucket):
                    for item in page.get("Contents", []):
                        if item["Key"] in seen:
                            continue
                        seen.add(item["Key"])
                        body = s3.get_object(Bucket=svc.bucket, Key=item["Key"])["Body"].read()
                        for line in gzip.decompress(body).decode().splitlines()[1:]:
                            visible.setdefault(int(line.split(",", 1)[0]), listed)
                if stop.is_set() and time.time() - stopped_at > 60:
                    return
                time.sleep(0.1)

        started = time.perf_counter()
        daemon = start_daemon(config)
        stopped_at = float("inf")
        threads = [threading.Thread(target=writer), threading.Thread(target=observer)]
        for thread in threads:
            thread.start()
        time.sleep(args.seconds)
        stopped_at = time.time()
        stop.set()
        threads[0].join()
        threads[1].join()
        daemon.send_signal(signal.SIGTERM)
        run = finish_daemon(daemon, started, config)
        with psycopg.connect(svc.pg.dsn) as conn:
            ledger = conn.execute(
                "SELECT (SELECT max(id) FROM ecommerce_sales), low, high, state::text,"
                " (SELECT count(*) FROM cdc.batches WHERE status = 'pending') FROM cdc.positions"
            ).fetchone()

    latencies = [visible[i] - t for i, t in committed.items() if i in visible]
    missing = len(committed) - len(latencies)
    print(f"bench/latency on {machine()}")
    print(
        f"  writer: {len(committed):,} rows in {args.seconds:.0f} s "
        f"({len(committed) / args.seconds:,.0f} rows/s, {args.rows_per_txn} rows per commit)"
    )
    print(f"  daemon: max_age_s {args.max_age}, {len(run.batches)} batches")
    p50 = percentile(latencies, 0.5)
    print(
        f"  commit -> object visible (listing every 0.1 s): p50 {p50:.2f} s,"
        f" p95 {percentile(latencies, 0.95):.2f} s, p99 {percentile(latencies, 0.99):.2f} s,"
        f" max {max(latencies):.2f} s"
    )
    print(f"  target p99 < max_age_s + 2 s = {args.max_age + 2:.1f} s")
    print(
        f"  daemon CPU: {run.cpu_seconds:.1f} s over {run.seconds:.0f} s = "
        f"{100 * run.cpu_seconds / run.seconds:.0f}% of one core (target < 25%)"
    )
    if missing:
        absent = sorted(i for i in committed if i not in visible)
        print(f"  NOT VISIBLE: {missing} rows, ids {absent[0]}..{absent[-1]}")
        last = run.batches[-1] if run.batches else {}
        print(f"  last batch: {last.get('batch_id')} at {last.get('timestamp')}")
        print(f"  ledger (max id, low, high, state, pending): {ledger}")
        tail = run.events[run.events.index(last) + 1 :] if last in run.events else []
        for event in tail[:10]:
            print(f"  after: {event}")
        for event in run.events:
            if event.get("level") in ("warning", "error"):
                print(f"  {event}")


if __name__ == "__main__":
    main()
