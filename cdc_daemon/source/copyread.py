"""Reading ``COPY ... TO STDOUT`` in batches: the rows libpq already holds, in one call.

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
from psycopg import errors, generators, pq
from psycopg.abc import Buffer


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
