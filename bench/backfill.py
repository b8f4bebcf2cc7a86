"""bench/backfill: ``cdc-daemon backfill`` over every day of N synthetic sales rows, with
``--jobs`` 1, 2 and 4, against the daemon's own export of the same rows (``run
--exit-when-idle``) and ``psql \\copy ... | gzip -1``, measured in the same run.

    .venv/bin/python -m bench.backfill [--rows 2000000] [--days 373] [--jobs 1,2,4]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from datetime import date, timedelta

import psycopg

from bench.common import (
    VENV_BIN,
    finish_daemon,
    load_rows,
    machine,
    reference_seconds,
    reset_capture,
    run_until_idle,
    services,
    write_config,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--days", type=int, default=373, help="days the rows are spread over")
    parser.add_argument("--jobs", default="1,2,4")
    args = parser.parse_args()
    with services() as svc:
        load_rows(svc, args.rows, args.days)
        with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
            conn.execute("CREATE INDEX ON ecommerce_sales (invoice_date)")
        reference_seconds(svc, "gzip -1")  # warm the cache once, for every side
        reference = reference_seconds(svc, "gzip -1")
        config = write_config(svc)
        reset_capture(svc)
        live = run_until_idle(config)
        first = date(2010, 12, 1)
        end = first + timedelta(days=args.days + 1)
        print(f"bench/backfill on {machine()}")
        print(f"  rows {args.rows:,} over {args.days} days (one chunk and object per day), gzip")
        print(
            f"  reference psql \\copy | gzip -1:        {reference:6.2f} s "
            f"({args.rows / reference:,.0f} rows/s)"
        )
        print(
            f"  cdc-daemon run --exit-when-idle:       {live.seconds:6.2f} s "
            f"({args.rows / live.seconds:,.0f} rows/s), peak RSS {live.peak_rss_mb:.0f} MB"
        )
        for jobs in (int(j) for j in args.jobs.split(",")):
            reset_capture(svc)
            subprocess.run(
                [str(VENV_BIN / "cdc-daemon"), "--config", str(config), "init"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            log = (config.parent / "daemon.log").open("wb")
            started = time.perf_counter()
            proc = subprocess.Popen(
                [
                    str(VENV_BIN / "cdc-daemon"),
                    "--config",
                    str(config),
                    "backfill",
                    "--from",
                    first.isoformat(),
                    "--to",
                    end.isoformat(),
                    "--jobs",
                    str(jobs),
                ],
                stdout=log,
                env={**os.environ},
            )
            run = finish_daemon(proc, started, config)
            log.close()
            chunks = [e for e in run.events if e.get("event") == "backfill_chunk_uploaded"]
            rows = sum(c["rows"] for c in chunks)
            assert rows == args.rows, f"backfilled {rows} rows of {args.rows}"
            print(
                f"  cdc-daemon backfill --jobs {jobs}:          {run.seconds:6.2f} s "
                f"({rows / run.seconds:,.0f} rows/s, {live.seconds / run.seconds:.2f}x the "
                f"daemon's export), peak RSS {run.peak_rss_mb:.0f} MB, CPU {run.cpu_seconds:.1f} s"
            )


if __name__ == "__main__":
    main()
