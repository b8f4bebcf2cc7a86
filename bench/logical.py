"""bench/logical: inserts, updates and deletes decoded from a pgoutput slot and uploaded by
``cdc-daemon run --exit-when-idle`` (logical mode), against the rate of
``pg_logical_slot_peek_binary_changes`` alone on the same changes, measured in the same run.

    .venv/bin/python -m bench.logical [--rows 300000] [--txn-rows 10000]

The reference counts the peek's output rows server-side (``SELECT count(*) FROM
pg_logical_slot_peek_binary_changes(...)``): PostgreSQL decoding the WAL, nothing else. The
daemon does that same peek plus the transfer, Python decoding, CSV, gzip, upload, ledger and
slot advance. Also shown: the peek's output streamed to the client and dropped (binary COPY).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import psycopg

from bench.common import Services, cli, finish_daemon, machine, services, start_daemon, write_config
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


def change(svc: Services, op: str, rows: int, txn_rows: int) -> None:
    with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000, help="changes per operation")
    parser.add_argument("--txn-rows", type=int, default=10_000, help="rows per transaction")
    args = parser.parse_args()
    with services() as svc:
        with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
            generate_sales(conn, 0)
            conn.execute("ALTER TABLE ecommerce_sales REPLICA IDENTITY FULL")
        config: Path = write_config(svc, capture={"mode": "logical"}, batch={"max_rows": 500_000})
        cli(config, "init")
        first = finish_daemon(start_daemon(config, "--exit-when-idle"), time.perf_counter(), config)
        assert first.batches[0]["rows"] == 0 if first.batches else True
        print(f"bench/logical on {machine()}")
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


if __name__ == "__main__":
    main()
