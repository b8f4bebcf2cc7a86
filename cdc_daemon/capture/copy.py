"""Reading an export COPY (``source.copyread.copy_query``) into the spool: the hot loop the
watermark export and the backfill share (``stream_rows``)."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
from psycopg import sql

from cdc_daemon.batch.csv import seq_of_row
from cdc_daemon.batch.policy import Limits
from cdc_daemon.batch.spool import DRAIN_ROWS, DayFile, DaySpool, Row
from cdc_daemon.source.copyread import CopyRows

# Never the start of a row: 0xFF does not occur in UTF-8.
_NO_PREFIX = b"\xff"


def stream_rows(
    conn: psycopg.Connection[tuple[object, ...]],
    query: sql.Composed,
    spool: DaySpool,
    limits: Limits,
    rewrite: Callable[[bytes | bytearray | memoryview], bytes] | None = None,
) -> int | None:
    """Stream the rows of a ``copy_query`` into the spool; returns the id the batch was
    cut at, or None when every row was read (``backfill`` uses it too). ``rewrite``: what
    each row goes through first (``TableInfo.copy_hasher``, for a table with hash_columns).

    The hot loop: Postgres sends one row per message, and a row of the same day as the one
    before (the common case: ids and dates grow together) costs a slice compare and a list
    append; the row bytes are never parsed. Limits are checked per block of rows: past
    max_bytes, or at the first row of a day beyond max_days, the batch closes at the next
    change of id (never between two rows with the same watermark) and becomes ``(lo, cut]``.
    """
    block_rows = limits.block_rows
    prefix = _NO_PREFIX  # "YYYY-MM-DD," of the day being appended to
    target: DayFile | None = None
    pending: list[Row] = []
    closing: int | None = None  # a limit was reached: close at the next change of id
    cut: int | None = None
    try:
        with conn.cursor() as cursor, cursor.copy(query) as copy:
            rows = CopyRows(copy).batch  # the rows libpq holds; [] at the end
            while batch := rows():
                # One copy out of libpq's buffer, then bytes operations: several times
                # cheaper per row than slicing and comparing memoryviews.
                # A table that hashes columns has its rows rewritten; the others' rows stay
                # unparsed (one test per batch, none per row).
                for data in map(bytes, batch) if rewrite is None else map(rewrite, batch):
                    if data.startswith(prefix):
                        pending.append(data[11:])
                        if len(pending) < block_rows:
                            continue
                        assert target is not None
                        target.drain()
                        pending = target.pending
                        if spool.raw_bytes >= limits.max_bytes:
                            closing, prefix = seq_of_row(target.last_row), _NO_PREFIX
                        continue
                    # The slow path: a new day, an odd day prefix, or a batch about to close.
                    if cut is not None:
                        continue  # what the server sent before the cancel landed
                    comma = data.index(b",")
                    day = data[:comma]
                    if (
                        closing is None
                        and target is not None
                        and day not in spool
                        and len(spool) >= limits.max_days
                    ):
                        closing = seq_of_row(target.last_row)
                    if closing is not None and seq_of_row(data) != closing:
                        cut = closing
                        conn.cancel_safe(timeout=5)
                        continue
                    if target is not None and len(pending) >= DRAIN_ROWS:
                        # Leaving a day: compress what it has, so that memory stays bounded by
                        # max_days small remainders, not by the batch.
                        target.drain()
                    target = spool.day(day)
                    target.pending.append(data[comma + 1 :])
                    pending = target.pending
                    prefix = data[:11] if comma == 10 and closing is None else _NO_PREFIX
    except psycopg.errors.QueryCanceled:
        if cut is None:
            raise
    return cut
