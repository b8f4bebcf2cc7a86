"""bench/peers: dlt's ``sql_database`` export of the same table in the same run as the daemon
(and ``psql \\copy | gzip -1``), so the README can compare with what a data engineer would
otherwise use.

dlt is not a dependency of the project: it runs from a venv of its own (its pins would
otherwise decide ours), made once with

    python3 -m venv .venv-peers && .venv-peers/bin/pip install dlt pyarrow sqlalchemy \
        psycopg2-binary connectorx

    .venv/bin/python -m bench.peers [--rows 1000000] [--python .venv-peers/bin/python]

dlt writes gzipped CSV (its default for the filesystem destination) to a local folder with its
pyarrow backend and, when connectorx is installed, its connectorx backend (the fastest dlt CSV
path in the issue's table); the daemon writes gzip objects to the local S3 server (moto).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import (
    load_rows,
    machine,
    reference_run,
    run_until_idle,
    services,
    write_config,
)

DLT_SCRIPT = """
import sys
import dlt
from dlt.sources.sql_database import sql_table

dsn, out, backend = sys.argv[1:4]
table = sql_table(credentials=dsn, table="ecommerce_sales", backend=backend)
pipeline = dlt.pipeline(
    pipeline_name="bench_peers",
    destination=dlt.destinations.filesystem(bucket_url="file://" + out),
    dataset_name="sales",
    pipelines_dir=out + "/.pipelines",
)
pipeline.run(table, loader_file_format="csv")
rows = pipeline.last_trace.last_normalize_info.row_counts.get("ecommerce_sales", 0)
print(rows)
"""


def run_dlt(python: str, dsn: str, backend: str) -> tuple[float, float, int]:
    """(seconds, CPU seconds, rows) of one dlt run into a fresh folder."""
    with tempfile.TemporaryDirectory(prefix="cdc-peers-") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [python, "-c", DLT_SCRIPT, dsn, out, backend],
            stdout=subprocess.PIPE,
            env={**os.environ, "RUNTIME__LOG_LEVEL": "WARNING"},
        )
        assert proc.stdout is not None
        output = proc.stdout.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"dlt ({backend}) failed")
        return seconds, usage.ru_utime + usage.ru_stime, int(output.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--python", default=str(Path(".venv-peers/bin/python")))
    args = parser.parse_args()
    if not Path(args.python).exists():
        raise SystemExit(f"no {args.python}: make the peers' venv first (see bench/peers.py)")
    with services() as svc:
        load_rows(svc, args.rows)
        reference_run(svc, "gzip -1")  # warm the cache once, for every side
        ref = reference_run(svc, "gzip -1")
        dsn = svc.pg.dsn.replace("postgresql://", "postgresql+psycopg2://")
        peers = {}
        for backend in ("pyarrow", "connectorx"):
            has = subprocess.run([args.python, "-c", f"import {backend}"], check=False)
            if has.returncode == 0:
                peers[backend] = run_dlt(args.python, dsn, backend)
        config = write_config(svc, batch={"max_rows": 500_000, "compression": "gzip"})
        run = run_until_idle(config, svc)
        rows = sum(b["rows"] for b in run.batches)
        assert rows == args.rows, rows
        print(f"bench/peers on {machine()}, {args.rows:,} rows, gzipped CSV")
        print(f"  psql \\copy | gzip -1 > /dev/null:          {ref.seconds:6.2f} s")
        for backend, (seconds, cpu, peer_rows) in peers.items():
            assert peer_rows == args.rows, (backend, peer_rows)
            print(
                f"  dlt sql_table ({backend}) -> local folder: {seconds:6.2f} s, CPU {cpu:.1f} s"
                f" (daemon {seconds / run.seconds:.1f}x faster)"
            )
        print(
            f"  cdc-daemon run --exit-when-idle -> S3:      {run.seconds:6.2f} s, "
            f"CPU {run.cpu_seconds:.1f} s (+ S3 server {run.s3_cpu_s:.1f} s)"
        )
        if peers:
            fastest = min(seconds for seconds, _, _ in peers.values())
            print(f"  against the fastest dlt path: {fastest / run.seconds:.1f}x (target >= 4x)")


if __name__ == "__main__":
    main()
