"""bench/scaling: the export at 1M, 5M and 10M rows. Seconds per million rows and the daemon's
peak RSS should stay flat; each size is compared with ``psql \\copy | gzip -1`` in the same run.
Also shown: the daemon's start (until its first pass begins: imports, settings, connections,
checks) and the seconds per million rows after it.

    .venv/bin/python -m bench.scaling [--sizes 1000000,5000000,10000000]
"""

from __future__ import annotations

import argparse

import psycopg

from bench.common import (
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
    parser.add_argument("--sizes", default="1000000,5000000,10000000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"bench/scaling on {machine()}")
    print(
        f"  {'rows':>11} {'daemon s':>9} {'s/M rows':>9} {'start s':>8} {'s/M after':>10} "
        f"{'ref s/M':>8} {'ratio':>6} {'peak RSS MB':>12} {'objects':>8}"
    )
    with services() as svc:
        config = write_config(svc, batch={"max_rows": 500_000})
        for rows in sizes:
            with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
                conn.execute("DROP TABLE IF EXISTS ecommerce_sales")
            load_rows(svc, rows)
            reset_capture(svc)
            reference = reference_seconds(svc, "gzip -1")
            run = run_until_idle(config)
            exported = sum(b["rows"] for b in run.batches)
            assert exported == rows, f"exported {exported} of {rows}"
            per_m = run.seconds / rows * 1e6
            after = (run.seconds - run.start_s) / rows * 1e6
            print(
                f"  {rows:>11,} {run.seconds:>9.1f} {per_m:>9.2f} {run.start_s:>8.2f}"
                f" {after:>10.2f} {reference / rows * 1e6:>8.2f} {reference / run.seconds:>6.2f}"
                f" {run.peak_rss_mb:>12.0f} {sum(b['objects'] for b in run.batches):>8}"
            )


if __name__ == "__main__":
    main()
