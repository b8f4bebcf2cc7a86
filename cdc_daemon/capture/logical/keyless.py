"""Keyless tables: a table with no primary key and no usable unique index, captured under REPLICA
IDENTITY FULL, each row known by its values and exact duplicates kept as copies
(docs/logical.md#keyless-tables).

- ``_cdc_row``, the row's identity, is the BLAKE2b-128 digest (32 hex digits) of its fields as
  the object carries them: the captured columns in table order, as the CSV the object holds,
  joined by commas (``row_id``). Two rows with equal values have equal identities; the objects
  of the stream and of the snapshot hold the same bytes for the same values, so they agree.
- A change is ``+1`` or ``-1`` copy of a row: an insert ``I`` of its new row, a delete ``D`` of
  its old row (FULL logs it whole), an update both (``D`` of the old row, ``U`` of the new).
- ``_cdc_seq`` is the transaction's commit LSN and ``_cdc_nth`` the change's number (from 1)
  among the rows the transaction wrote for keyless tables: the pair is unique per change, in
  commit order, and ``_cdc_seq`` says on which side of a snapshot the change lies.
- The snapshot is one consistent read: a temporary logical slot is created with an exported
  snapshot (``SNAPSHOT 'export'``), whose consistent point L is exactly the boundary between the
  transactions the snapshot sees and those the slot would decode after it (PostgreSQL's own
  guarantee for a new slot). The rows read in it are ``S`` rows with ``_cdc_seq`` L and
  ``_cdc_nth`` their number in the read. The group's stream keeps the table's changes from its
  join on (at or before L), so every transaction committing after L is streamed.
- The warehouse counts, per ``_cdc_row``, the ``S`` rows of the latest snapshot (highest L) plus
  the ``I``/``U`` minus the ``D`` rows of transactions committing after L, each change once (by
  ``_cdc_seq`` and ``_cdc_nth``), whatever order the objects load in (snowflake/70_tasks.sql). A
  snapshot read again (after a crash, or by ``resync``) has a higher L and replaces the earlier
  one whole.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Callable

import psycopg
from psycopg import sql

from cdc_daemon.batch.spool import DaySpool
from cdc_daemon.capture.logical.pgoutput import parse_lsn
from cdc_daemon.source.copyread import CopyRows, snapshot_query
from cdc_daemon.source.session import read_snapshot, translated
from cdc_daemon.source.table import TableInfo

SNAPSHOT_OP = "S"


def row_id(fields: bytes) -> bytes:
    """A row's ``_cdc_row``: 32 hex digits of the BLAKE2b-128 digest of its CSV fields."""
    return hashlib.blake2b(fields, digest_size=16).hexdigest().encode()


def with_row_id(line: bytes, nth: int) -> bytes:
    """A snapshot COPY row ``day,<fields>,S,<seq>,<ts>,\\n`` with its ``_cdc_nth`` and
    ``_cdc_row`` appended. The day and the last four fields never hold a comma or a quote."""
    body = line[:-1] if line.endswith(b"\n") else line
    head = body.rsplit(b",", 4)[0]
    fields = head[head.index(b",") + 1 :]
    return b"%s,%d,%s\n" % (body, nth, row_id(fields))


def copy_keyless(
    conn: psycopg.Connection[tuple[object, ...]],
    replication: Callable[[], psycopg.Connection[tuple[object, ...]]],
    info: TableInfo,
    read_ts: str,
    spool: DaySpool,
    rewrite: Callable[[bytes], bytes] | None = None,
) -> int:
    """The whole table as ``S`` rows, read in the exported snapshot of a temporary slot made
    for it; returns the slot's consistent point L. ``replication``: opens a
    ``replication=database`` connection (the temporary slot ends with it). ``rewrite``: the
    table's hash_columns rewrite of a COPY row (applied before the identity is taken)."""
    name = f"cdc_keyless_{os.getpid()}_{zlib.crc32(info.qualified.encode()):08x}"
    with translated(f"copying the snapshot of {info.qualified}"), replication() as repl:
        row = repl.execute(
            sql.SQL(
                "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')"
            ).format(sql.Identifier(name))
        ).fetchone()
        assert row is not None
        consistent, snapshot = parse_lsn(str(row[1])), str(row[2])
        query = snapshot_query(info, consistent, read_ts, op=SNAPSHOT_OP)
        with read_snapshot(conn):
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            with conn.cursor() as cur, cur.copy(query) as copy:
                rows = CopyRows(copy).batch
                nth = 0
                while batch := rows():
                    for data in batch:
                        line = bytes(data)
                        if rewrite is not None:
                            line = rewrite(line)
                        nth += 1
                        spool.add(with_row_id(line, nth))
    return consistent
