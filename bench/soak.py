"""bench/soak: steady inserts for ten minutes while the daemon runs; its memory and open file
descriptors must stay flat and its lag bounded. Not part of CI.

    .venv/bin/python -m bench.soak [--minutes 10] [--rate 2000]
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path

import psycopg

from bench.common import cli as run_cli
from bench.common import finish_daemon, load_rows, machine, services, start_daemon, write_config
from bench.latency import INSERT


def sample(pid: int) -> tuple[float, int]:
    """(RSS in MB, open file descriptors) of a running process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(status.split("VmRSS:")[1].split()[0]) / 1024
    return rss, len(list(Path(f"/proc/{pid}/fd").iterdir()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=int, default=2000, help="rows per second")
    args = parser.parse_args()
    stop = threading.Event()
    with services() as svc:
        load_rows(svc, 1000, days=1)
        config = write_config(svc, batch={"max_age_s": 1}, capture={"poll_interval_s": 0.2})
        run_cli(config, "init")

        def writer() -> None:
            with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
                next_at = time.monotonic()
                while not stop.is_set():
                    conn.execute(INSERT, (20,))
                    next_at += 20 / args.rate
                    time.sleep(max(0.0, next_at - time.monotonic()))

        started = time.perf_counter()
        daemon = start_daemon(config)
        thread = threading.Thread(target=writer)
        thread.start()
        samples: list[tuple[float, float, int, int]] = []
        deadline = time.monotonic() + args.minutes * 60
        with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
            while time.monotonic() < deadline:
                time.sleep(10)
                rss, fds = sample(daemon.pid)
                row = conn.execute(
                    "SELECT (SELECT max(id) FROM ecommerce_sales) - coalesce(high, 0)"
                    " FROM cdc.positions"
                ).fetchone()
                behind = int(row[0]) if row and row[0] is not None else -1
                samples.append((time.perf_counter() - started, rss, fds, behind))
        stop.set()
        thread.join()
        daemon.send_signal(signal.SIGTERM)
        run = finish_daemon(daemon, started, config)

    print(f"bench/soak on {machine()}: {args.minutes:g} min at {args.rate} rows/s")
    print(f"  {'t s':>6} {'RSS MB':>7} {'fds':>4} {'rows behind':>12}")
    for t, rss, fds, behind in samples:
        print(f"  {t:>6.0f} {rss:>7.1f} {fds:>4} {behind:>12}")
    first, last = samples[len(samples) // 5], samples[-1]
    print(
        f"  RSS {first[1]:.0f} -> {last[1]:.0f} MB, fds {first[2]} -> {last[2]},"
        f" worst backlog {max(s[3] for s in samples)} rows, {len(run.batches)} batches,"
        f" daemon CPU {100 * run.cpu_seconds / run.seconds:.0f}% of one core"
    )


if __name__ == "__main__":
    main()
