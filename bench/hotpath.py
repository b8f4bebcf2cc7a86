"""bench/hotpath: the per-change hot path alone, in one process, on the same synthetic pgoutput
messages: ``ChangeReader.feed`` (decode, encode, spool to an uncompressed file) for the
changes of bench/logical (inserts, a third as many updates, a sixth as many deletes, rows of
the sales table), without PostgreSQL, S3 or the daemon's start.

    .venv/bin/python -m bench.hotpath [--rows 300000] [--identity full|default] [--repeat 5]
        [--profile]

It times the path the process would run: the compiled core when it is built, the pure-Python
one with CDC_DAEMON_PURE_PYTHON=1 (and, run from a copy of the package with its modules
compiled by mypyc on PYTHONPATH, that one). ``--profile`` prints cProfile's top functions of
one pass instead.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import struct
import tempfile
import time
from pathlib import Path

from cdc_daemon.batch.spool import DaySpool
from cdc_daemon.capture.logical import encode, pgoutput
from cdc_daemon.capture.logical.reader import ChangeReader, ReadResult
from cdc_daemon.capture.logical.source import LogicalSource
from cdc_daemon.capture.logical.tables import LogicalTable
from cdc_daemon.config import load_settings
from cdc_daemon.source import hotpath
from cdc_daemon.source.table import Column, TableInfo
from cdc_daemon.source.values import QuarantineJudge

REL = 16400
# The sales table of cdc_daemon.local.sample: (name, type oid, typmod, SQL type).
COLUMNS = (
    ("id", 20, -1, "bigint"),
    ("invoice_no", 25, -1, "text"),
    ("stock_code", 25, -1, "text"),
    ("description", 25, -1, "text"),
    ("quantity", 23, -1, "integer"),
    ("invoice_date", 1184, -1, "timestamp with time zone"),
    ("unit_price", 1700, (12 << 16 | 3) + 4, "numeric(12,3)"),
    ("customer_id", 23, -1, "integer"),
    ("country", 25, -1, "text"),
)


def _tuple(values: list[bytes | None]) -> bytes:
    out = [struct.pack(">H", len(values))]
    for v in values:
        out.append(b"n" if v is None else b"t" + struct.pack(">I", len(v)) + v)
    return b"".join(out)


def _row(g: int, quantity: int, price: str) -> list[bytes | None]:
    """One row as bench/logical's INSERT makes it, in pgoutput's text forms."""
    seconds = 31 * g
    day, rest = divmod(seconds, 86400)
    stamp = f"2010-{12 if day < 31 else 1:02d}-{day % 28 + 1:02d} "
    stamp += f"{8 + rest // 3600 % 16:02d}:{rest // 60 % 60:02d}:{rest % 60:02d}+00"
    return [
        str(g + 1).encode(),
        str(536365 + g // 20).encode(),
        b"85123A",
        f"PRODUCT {g} WHITE HANGING HEART".encode(),
        str(quantity).encode(),
        stamp.encode(),
        price.encode(),
        str(17850 + g % 5000).encode(),
        b"United Kingdom",
    ]


def messages(rows: int, identity: str) -> list[bytes]:
    """Begin, the changes, Commit; the Relation first."""
    relation = b"R" + struct.pack(">I", REL) + b"public\0ecommerce_sales\0"
    relation += (b"f" if identity == "full" else b"d") + struct.pack(">H", len(COLUMNS))
    for name, oid, typmod, _ in COLUMNS:
        flag = 1 if identity == "full" or name == "id" else 0
        relation += bytes([flag]) + name.encode() + b"\0" + struct.pack(">Ii", oid, typmod)
    out = [relation, b"B" + struct.pack(">QqI", 1 << 40, 849_000_000_000_000, 1)]
    for g in range(rows):
        out.append(b"I" + struct.pack(">I", REL) + b"N" + _tuple(_row(g, 1 + g % 24, "2.550")))
    for g in range(rows // 3):
        new = b"N" + _tuple(_row(g, 2 + g % 24, "2.805"))
        old = b"O" + _tuple(_row(g, 1 + g % 24, "2.550")) if identity == "full" else b""
        out.append(b"U" + struct.pack(">I", REL) + old + new)
    for g in range(rows // 6):
        if identity == "full":
            old = b"O" + _tuple(_row(g, 2 + g % 24, "2.805"))
        else:
            old = b"K" + _tuple([str(g + 1).encode()] + [None] * (len(COLUMNS) - 1))
        out.append(b"D" + struct.pack(">I", REL) + old)
    out.append(b"C" + struct.pack(">BQQq", 0, 1 << 40, (1 << 40) + 100, 849_000_000_000_000))
    return out


def reader(folder: Path) -> ChangeReader:
    settings = load_settings(
        None,
        postgres={"dsn": "postgresql://localhost/x", "table": "public.ecommerce_sales"},
        s3={"bucket": "b"},
        capture={"mode": "logical", "partition_column": "invoice_date"},
    )
    columns = tuple(Column(name, sql) for name, _, _, sql in COLUMNS)
    table = LogicalTable(
        TableInfo("public", "ecommerce_sales", columns, columns[0], columns[5]),
        REL,
        ("id",),
        "d",
        (),
        tuple((n, o, t) for n, o, t, _ in COLUMNS),
    )
    source = LogicalSource(settings)
    source._tables, source._by_oid = [table], {REL: table}

    def new_spool(header: list[str], judge: QuarantineJudge) -> DaySpool:
        return DaySpool(folder, "none", 0, b"", judge=judge)

    return ChangeReader(source, ReadResult(0, None, 0), new_spool, 0, None)


def one_pass(batch: list[bytes]) -> tuple[float, int]:
    """Seconds to feed every message, and the rows spooled."""
    with tempfile.TemporaryDirectory(prefix="cdc-hotpath-") as folder:
        changes = reader(Path(folder))
        started = time.perf_counter()
        for lsn, data in enumerate(batch):
            changes.feed(lsn, data, 0, len(data))
        for g in changes._result.generations:
            g.spool.finish()
        seconds = time.perf_counter() - started
        changes.discard()
        return seconds, changes._result.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--identity", choices=("full", "default"), default="full")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    batch = messages(args.rows, args.identity)
    changes = len(batch) - 3
    compiled_by = "mypyc" if encode.__file__.endswith(".so") else "none"
    print(
        f"bench/hotpath: {changes:,} changes, identity {args.identity}; path {hotpath.describe()};"
        f" encode.py and pgoutput.py compiled by: {compiled_by}"
        f" ({os.path.basename(encode.__file__)}, {os.path.basename(pgoutput.__file__)})"
    )
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        one_pass(batch)
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)
        return
    one_pass(batch)  # warm up
    times = []
    for _ in range(args.repeat):
        seconds, rows = one_pass(batch)
        times.append(seconds)
    best, median = min(times), statistics.median(times)
    print(
        f"  {rows:,} rows spooled; median {median:.3f} s = {median / changes * 1e6:.2f} µs per"
        f" change (best {best / changes * 1e6:.2f} µs, {args.repeat} passes)"
    )


if __name__ == "__main__":
    main()
