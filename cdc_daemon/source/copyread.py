"""The export's COPY: the query that makes PostgreSQL write a table's rows in the object
format, each after its day (``copy_query``, ``snapshot_query``: every capture mode's rows, so
the same bytes; ``capture.copy.stream_rows`` reads it into the spool).

Reading ``COPY ... TO STDOUT`` in batches: the rows libpq already holds, in one call.

psycopg's ``Copy.read()`` returns one row per call and drives two generators through
``Connection.wait`` to do it: as much CPU per row as the rest of the watermark hot loop.
``CopyRows.batch()`` takes every row libpq has already received with
``PGconn.get_copy_data`` (libpq's ``PQgetCopyData``, non-blocking, far cheaper) and hands waiting
for the socket back to ``Copy.read()``, so psycopg still does every wait, cancel and error.

The one step done here is the end: once ``get_copy_data`` has returned -1 (the server ended
the COPY, with success or an error), libpq must not be asked for copy data again, so the
final results are fetched here, with psycopg's own non-blocking generator, and an error is
raised as the same exception class psycopg would raise (``QueryCanceled`` after a cancel).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import errors, generators, pq, sql
from psycopg.abc import Buffer

from cdc_daemon.source.table import TableInfo


class CopyRows:
    """The rows of one ``COPY ... TO STDOUT``, in batches (see the module docstring)."""

    __slots__ = ("_copy", "_done", "_get")

    def __init__(self, copy: psycopg.Copy) -> None:
        self._copy = copy
        self._get = copy.connection.pgconn.get_copy_data
        self._done = False

    def batch(self) -> list[Buffer]:
        """At least one row, or ``[]`` once the COPY has ended (successfully: an error the
        server sent is raised)."""
        if self._done:
            return []
        rows: list[Buffer] = []
        append = rows.append
        get = self._get
        while True:
            nbytes, data = get(1)
            if nbytes > 0:
                append(data)
                continue
            if nbytes == 0:  # nothing buffered: let psycopg wait for the socket
                if rows:
                    return rows
                raw = self._copy.read()
                if not raw:
                    self._done = True
                    return rows
                append(raw)
                continue
            self._done = True
            self._finish()
            return rows

    def _finish(self) -> None:
        """The COPY's final result after ``get_copy_data`` returned -1 (or -2)."""
        conn = self._copy.connection
        results: list[Any] = conn.wait(generators.fetch_many(conn.pgconn))
        for result in results:
            if result.status != pq.ExecStatus.COMMAND_OK:
                raise errors.error_from_result(result, encoding=conn.info.encoding)
        if not results:
            raise psycopg.OperationalError("the COPY ended without a result")


def copy_query(
    table: TableInfo,
    where: sql.Composable,
    read_ts: str,
    seq: sql.Composable | None = None,
    *,
    ordered: bool = True,
    unchanged: bool = False,
    op: str = "I",
    source: sql.Composable | None = None,
) -> sql.Composed:
    """``COPY`` of the rows matching ``where`` (in id order unless not ``ordered``), each as
    ``day,<csv row>``: the source columns, ``_cdc_op`` (``op``), ``_cdc_seq`` (the watermark
    unless ``seq`` says otherwise), ``_cdc_ts`` and, with ``unchanged``, an empty
    ``_cdc_unchanged`` (the logical objects' last column). ``source``: the relation read
    instead of the table (a partition of it, or one detached from it), aliased ``t``."""
    ident = table.watermark.ident()
    return sql.SQL(
        "COPY (SELECT {day}, {cols}, {op}, {seq}, {ts}{unchanged} FROM {tbl} t WHERE {where}"
        "{order}) TO STDOUT (FORMAT csv)"
    ).format(
        unchanged=sql.SQL(", NULL" if unchanged else ""),
        op=sql.Literal(op),
        order=sql.SQL(" ORDER BY t.{}").format(ident) if ordered else sql.SQL(""),
        day=table.day_expr(read_ts),
        cols=sql.SQL(", ").join(c.csv_expr() for c in table.columns),
        seq=sql.SQL("{}::bigint").format(ident) if seq is None else seq,
        id=ident,
        ts=sql.Literal(read_ts),
        tbl=table.ident() if source is None else source,
        where=where,
    )


def snapshot_query(
    table: TableInfo,
    seq: int,
    read_ts: str,
    where: sql.Composable | None = None,
    op: str = "I",
    source: sql.Composable | None = None,
) -> sql.Composed:
    """``COPY`` of a table's rows as ``I`` changes (or ``op``) with ``_cdc_seq`` ``seq``, in the
    logical objects' format: ``copy_query``'s rows, unordered, with an empty
    ``_cdc_unchanged``; ``source``: see ``copy_query``."""
    return copy_query(
        table,
        sql.SQL("true") if where is None else where,
        read_ts,
        sql.SQL("{}::bigint").format(sql.Literal(seq)),
        ordered=False,
        unchanged=True,
        op=op,
        source=source,
    )
