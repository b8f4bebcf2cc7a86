"""bench/export: N synthetic sales rows exported by ``cdc-daemon run --exit-when-idle`` into a
local S3 server, against ``psql \\copy ... to stdout csv | gzip -1`` (or ``zstd -1``) on the
same table, measured in the same run.

    .venv/bin/python -m bench.export [--rows 5000000] [--compression gzip|zstd] [--repeat 1]

With ``--repeat N`` the reference and the daemon run N times, alternately, on the same table;
every run's ratio is printed and the details are those of the median run.
"""

from __future__ import annotations

import argparse
import os

from bench.common import (
    load_rows,
    machine,
    reference_run,
    reset_capture,
    run_until_idle,
    same_bytes_run,
    services,
    write_config,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--compression", choices=["gzip", "zstd"], default="gzip")
    parser.add_argument("--days", type=int, default=373, help="days the rows are spread over")
    parser.add_argument("--max-rows", type=int, default=500_000, help="batch.max_rows")
    parser.add_argument("--max-days", type=int, default=64, help="batch.max_days")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side, alternately")
    args = parser.parse_args()
    compressor = {"gzip": "gzip -1", "zstd": "zstd -q -1"}[args.compression]
    with services() as svc:
        load_rows(svc, args.rows, args.days)
        reference_run(svc, compressor)  # warm the cache once, for both sides
        config = write_config(
            svc,
            batch={
                "max_rows": args.max_rows,
                "compression": args.compression,
                "max_days": args.max_days,
            },
        )
        same = same_bytes_run(svc, config, compressor)
        same_bytes = same.seconds
        cores = os.cpu_count() or 1
        parallel = same_bytes_run(svc, config, compressor, jobs=cores)
        pairs = []
        for _ in range(args.repeat):
            ref = reference_run(svc, compressor)
            reset_capture(svc)
            pairs.append((ref, run_until_idle(config, svc)))
        ratios = sorted(r.seconds / d.seconds for r, d in pairs)
        ref, run = sorted(pairs, key=lambda p: p[0].seconds / p[1].seconds)[len(pairs) // 2]
        reference = ref.seconds
        objects = sum(b["objects"] for b in run.batches)
        rows = sum(b["rows"] for b in run.batches)
        raw_mb = run.total("bytes") / 1e6
        assert rows == args.rows, f"exported {rows} rows of {args.rows}"
        print(f"bench/export on {machine()}")
        print(
            f"  rows {rows:,}, CSV {raw_mb:,.0f} MB, {args.compression}, {objects} objects, "
            f"{len(run.batches)} batches of up to {args.max_rows:,} rows"
        )
        print(
            f"  reference psql \\copy | {compressor}: {reference:6.2f} s "
            f"({args.rows / reference:,.0f} rows/s)"
        )
        print(
            f"  cdc-daemon run --exit-when-idle:     {run.seconds:6.2f} s "
            f"({rows / run.seconds:,.0f} rows/s, {raw_mb / run.seconds:,.0f} MB/s)"
        )
        print(f"  ratio (reference / daemon): {reference / run.seconds:.2f}x")
        if len(pairs) > 1:
            print(f"  ratios of {len(pairs)} runs: " + ", ".join(f"{r:.2f}x" for r in ratios))
        print(
            f"  the daemon's own query through psql | {compressor}: {same_bytes:6.2f} s "
            f"(ratio {same_bytes / run.seconds:.2f}x; the server's share of the work)"
        )
        print(
            f"  the same, {cores} psql in parallel (id ranges): {parallel.seconds:6.2f} s "
            f"(ratio {reference / parallel.seconds:.2f}x of the reference)"
        )
        print(f"  daemon peak RSS {run.peak_rss_mb:.0f} MB, CPU {run.cpu_seconds:.1f} s")
        print(f"  reference:  {ref.cpu_line()}")
        print(f"  same bytes: {same.cpu_line()}")
        print(f"  same, x{cores}:  {parallel.cpu_line()}")
        print(f"  daemon:     {run.timed().cpu_line()}")
        bound = run.cpu_bound_s(cores)
        print(
            f"  CPU bound: start {run.start_s:.2f} s on one core (until the first pass), then "
            f"all the run's CPU spread over {cores} cores: at least {bound:.2f} s, at most "
            f"{reference / bound:.2f}x of the reference"
        )
        print(
            f"  time in batches (overlapping): extract (read, route, compress; ends when the "
            f"last block is compressed) {run.total('extract_s'):.1f} s, of which compressing "
            f"in its own thread {run.total('compress_s'):.1f} s; upload "
            f"{run.total('upload_s'):.1f} s, commit {run.total('commit_s'):.2f} s"
        )


if __name__ == "__main__":
    main()
