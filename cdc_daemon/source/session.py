"""The PostgreSQL source session every capture mode and the backfill use: connection settings
the encoding relies on, reopened after it broke, interrupted from another thread. Synchronous
(COPY in a thread runs at psql's speed); callers run it with ``asyncio.to_thread``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import psycopg

from cdc_daemon.config import PostgresSettings, Settings
from cdc_daemon.errors import SourceError, TransientError, from_psycopg

APPLICATION_NAME = "cdc-daemon"
# The settings the value encoding relies on, for every session whose rows become CSV: the COPY
# sessions and the replication stream (pgoutput formats values in the walsender, with its
# connection's settings). Given as startup options, they win over the server's, the
# database's and the role's defaults.
ENCODING_OPTIONS = (
    "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=1"
    " -c bytea_output=hex"
)

T = TypeVar("T")


async def in_thread(fn: Callable[[], T], cancel: Callable[[], None]) -> T:
    """Run blocking source work in a thread; on cancellation, interrupt the query (``cancel``)
    and wait for the thread to let go of its spool before the cancellation goes on."""
    future = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.to_thread(cancel)
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what matters now
        raise


def connect(
    pg: PostgresSettings, application_name: str = APPLICATION_NAME
) -> psycopg.Connection[tuple[object, ...]]:
    """A source session with the settings the encoding relies on (UTC, ISO dates). The name
    must start with ``cdc-daemon``: the fence ignores such sessions (they only read)."""
    options = ENCODING_OPTIONS
    if pg.statement_timeout_s:
        options += f" -c statement_timeout={int(pg.statement_timeout_s * 1000)}"
    try:
        return psycopg.connect(
            pg.dsn.get_secret_value(),
            autocommit=True,
            application_name=application_name,
            connect_timeout=max(1, int(pg.connect_timeout_s)),
            options=options,
        )
    except psycopg.Error as exc:
        raise from_psycopg(exc, "cannot connect to the source database") from None


class SourceSession:
    """The source session both capture modes keep (synchronous; run in a thread): reopened
    by ``_session()`` after it broke, closed by ``close()``, interrupted by ``cancel()``."""

    def __init__(self, settings: Settings, application_name: str = APPLICATION_NAME) -> None:
        self._settings = settings
        self._application_name = application_name
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    @property
    def settings(self) -> Settings:
        return self._settings

    def connect(self) -> object:
        """(Re)open the session; a capture mode also reads its table's catalog here."""
        self.close()
        self._conn = connect(self._settings.postgres, self._application_name)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _session(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self.connect()
        assert self._conn is not None
        return self._conn

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn`` (blocking work on this session) in a thread, interrupted on cancellation."""
        return await in_thread(fn, self.cancel)

    def cancel(self) -> None:
        """Interrupt a running statement from another thread (shutdown past its grace)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.cancel_safe(timeout=5)


@contextlib.contextmanager
def translated(doing: str) -> Iterator[None]:
    """psycopg's errors raised inside as the ``CdcError`` they mean (``errors.from_psycopg``);
    a cancelled statement is transient: a shutdown past its grace, or a retry reads again."""
    try:
        yield
    except psycopg.errors.QueryCanceled as exc:
        raise TransientError(f"{doing} was cancelled").at("postgres") from exc
    except psycopg.Error as exc:
        raise from_psycopg(exc, doing) from None


@contextlib.contextmanager
def read_snapshot(conn: psycopg.Connection[tuple[object, ...]]) -> Iterator[None]:
    """One REPEATABLE READ, READ ONLY transaction: everything read inside sees one snapshot.
    Read-only, so ending it with ROLLBACK is always right, also after a cancelled COPY."""
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        yield
    finally:
        if not conn.closed and not conn.broken:
            conn.execute("ROLLBACK")


def safe_position(conn: psycopg.Connection[tuple[object, ...]], wait_s: float) -> int:
    """W, a ``_cdc_seq`` for rows read after this returns, on the scale of the logical
    stream's (change LSNs): the WAL insert position, once every transaction that held an xid
    at W has ended. Every change logged before W is then reflected in a later read (or was
    rolled back); every change a later read misses is logged after W. ``capture.repair`` and
    logical-mode backfill read at it. On a session in autocommit.

    A transaction's end is seen by its transactionid lock going away (``pg_locks``): locks are
    released after the transaction has left the process array, so a snapshot taken then sees
    it (its commit status alone may turn committed earlier; a snapshot's xip list omits xids
    at or above its xmax). Prepared transactions keep their lock until resolved."""
    row = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()
    assert row is not None
    position = int(str(row[0]))
    deadline = time.monotonic() + wait_s
    running: list[str] = []
    first = True
    while first or running:
        found = conn.execute(
            "SELECT ARRAY(SELECT transactionid::text FROM pg_locks"
            " WHERE locktype = 'transactionid' AND mode = 'ExclusiveLock' AND granted"
            " AND (%s OR transactionid::text = ANY(%s)))::text[]",
            (first, running),
        ).fetchone()
        running = [str(x) for x in found[0]] if found and isinstance(found[0], list) else []
        first = False
        if not running:
            break
        if time.monotonic() > deadline:
            raise SourceError(
                f"{len(running)} transaction(s) open since before this read (xid {running[0]}"
                f", ...) kept it from a safe position for {wait_s:.0f} s: try again when they "
                "have ended (pg_stat_activity shows them)"
            )
        time.sleep(0.1)
    return position
