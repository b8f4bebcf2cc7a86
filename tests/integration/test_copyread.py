"""``CopyRows``: COPY TO STDOUT read in batches straight from libpq, against a real server."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from cdc_daemon.source.copyread import CopyRows

QUERY = (
    "COPY (SELECT g, repeat('x', g % 300) FROM generate_series(1, {n}) g) TO STDOUT (FORMAT {f})"
)


def _read_all(
    conn: psycopg.Connection[tuple[object, ...]], query: str, out: list[bytes] | None = None
) -> list[bytes]:
    """The rows, appended to ``out`` as they come (so a test sees them past an error)."""
    out = [] if out is None else out
    with conn.cursor() as cur, cur.copy(query) as copy:
        rows = CopyRows(copy)
        while batch := rows.batch():
            out.extend(bytes(r) for r in batch)
        assert rows.batch() == []  # stays at the end
    return out


@pytest.mark.parametrize("fmt", ["csv", "binary"])
def test_same_rows_as_psycopg_read(pg_dsn: str, fmt: str) -> None:
    """Every row, in order, byte for byte as psycopg's own ``Copy.read()`` gives them, and the
    connection is usable afterwards (the COPY's final result was consumed)."""
    query = QUERY.format(n=200_000, f=fmt)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        with conn.cursor() as cur, cur.copy(query) as copy:
            expected = [bytes(r) for r in copy]
        got = _read_all(conn, query)
        assert got == expected
        assert len(got) == 200_000 + (fmt == "binary")  # binary: the trailer
        assert conn.execute("SELECT 42").fetchone() == (42,)
        # Inside a transaction too: the COPY ends without leaving it aborted or busy.
        conn.execute("BEGIN")
        assert len(_read_all(conn, QUERY.format(n=10, f="csv"))) == 10
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.execute("ROLLBACK")


def test_server_error_mid_copy_is_psycopgs_exception(pg_dsn: str) -> None:
    """An error the server raises after sending rows arrives as the exception class psycopg
    raises for it, and the connection stays usable."""
    query = (
        "COPY (SELECT g, 1 / (100000 - g) FROM generate_series(1, 200000) g) TO STDOUT (FORMAT csv)"
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        seen: list[bytes] = []
        with pytest.raises(psycopg.errors.DivisionByZero):
            _read_all(conn, query, seen)
        assert seen[:2] == [b"1,0\n", b"2,0\n"]
        assert conn.execute("SELECT 7").fetchone() == (7,)


def test_cancel_raises_query_canceled(pg_dsn: str) -> None:
    """``cancel_safe`` from another thread ends the COPY with ``QueryCanceled`` (what the hot
    loops rely on to close a batch early); the session survives."""
    query = (
        "COPY (SELECT g, repeat('x', 200), pg_sleep(0.001) FROM generate_series(1, 100000) g)"
        " TO STDOUT"
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        seen: list[bytes] = []

        def cancel_soon() -> None:
            # Once the first rows arrived: the COPY is under way, far from its end.
            deadline = time.monotonic() + 30
            while not seen and time.monotonic() < deadline:
                time.sleep(0.01)
            conn.cancel_safe(timeout=5)

        canceller = threading.Thread(target=cancel_soon)
        canceller.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            _read_all(conn, query, seen)
        canceller.join()
        assert 0 < len(seen) < 100_000
        assert conn.execute("SELECT 1").fetchone() == (1,)
