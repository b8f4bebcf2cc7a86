"""The streaming replication protocol on one ``replication=database`` connection.

``START_REPLICATION SLOT s LOGICAL lsn (proto_version '1', publication_names 'p')`` turns the
connection into a COPY_BOTH stream (PostgreSQL: "Streaming Replication Protocol"). The server
sends CopyData messages:

* ``w`` XLogData: ``dataStart`` (Int64: the LSN the output plugin wrote the message at, the
  same ``lsn`` that ``pg_logical_slot_peek_binary_changes`` returns), ``walEnd``, ``sendTime``,
  then one pgoutput message;
* ``k`` primary keepalive: ``walEnd`` (how far the walsender has read WAL; every transaction
  committing before it that the publication covers has been sent before this message),
  ``sendTime``, and whether it wants a reply now.

The client sends ``r`` standby status updates: written, flushed and applied LSN, its clock,
and whether it wants a keepalive back. The slot's ``confirmed_flush_lsn`` follows the flushed
LSN, so it is only ever the ledger's position (what is durable in S3), never what was merely
received. The walsender drops a client that has not sent one for ``wal_sender_timeout``
(60 s by default), so one goes out four times per timeout (at most every
``STATUS_INTERVAL_S``) whatever the client is doing.

psycopg 3 refuses COPY_BOTH in its high-level API; its libpq layer (``psycopg.pq``) carries the
protocol: ``send_query``, ``get_copy_data`` (non-blocking), ``put_copy_data``, ``flush`` and the
socket to wait on. Blocking, for a thread; every libpq call holds ``lock``, so another thread
may send a status update while nobody reads.
"""

from __future__ import annotations

import select
import struct
import threading
import time
from dataclasses import dataclass

import psycopg
from psycopg import pq, sql

from cdc_daemon.capture.logical.pgoutput import format_lsn
from cdc_daemon.config import Settings
from cdc_daemon.errors import CdcError, SourceError, TransientError, from_psycopg
from cdc_daemon.source.session import ENCODING_OPTIONS

# Status updates go out at least this often, and four times per wal_sender_timeout when the
# server's is shorter (it is 60 s by default).
STATUS_INTERVAL_S = 10.0

_KEEPALIVE = struct.Struct(">QqB").unpack_from  # walEnd, sendTime, reply requested
_STATUS = struct.Struct(">cQQQqB").pack  # 'r', written, flushed, applied, clock, reply
# Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
_PG_EPOCH_US = 946_684_800_000_000
XLOG_HEADER = 25  # 'w' and three Int64: where the pgoutput message starts


@dataclass(frozen=True)
class Keepalive:
    wal_end: int
    reply: bool


class ReplicationStream:
    """One streaming session of a slot. ``open`` does the I/O; ``receive`` returns the next
    message (XLogData as ``bytes``, a ``Keepalive``, or None when nothing came in time)."""

    def __init__(self, settings: Settings, slot: str, publication: str) -> None:
        self._settings = settings
        self.slot = slot
        self.publication = publication
        self.lock = threading.Lock()
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self.confirmed = 0  # the flushed LSN reported to the server: the ledger's position
        self.wal_end = 0  # the server's walEnd, from its latest keepalive
        self._last_status = 0.0
        self.status_interval_s = STATUS_INTERVAL_S
        self.ended = threading.Event()  # set by close(): the keepalive thread stops at once

    @property
    def closed(self) -> bool:
        return self._conn is None

    def open(self, start: int, confirmed: int) -> None:
        """Start streaming the transactions that commit at or after ``start`` (the slot's
        confirmed position, when that is later). ``confirmed`` is the ledger's position: what
        the status updates report until ``confirm`` raises it (``start`` may stand past it
        where nothing of the table commits, and must not be reported)."""
        settings = self._settings
        try:
            conn = psycopg.connect(
                settings.postgres.dsn.get_secret_value(),
                autocommit=True,
                replication="database",
                application_name="cdc-daemon-stream",
                connect_timeout=max(1, int(settings.postgres.connect_timeout_s)),
                # pgoutput writes values as text in the walsender, in this session's settings.
                options=ENCODING_OPTIONS,
            )
        except psycopg.Error as exc:
            raise from_psycopg(exc, "cannot open a replication connection") from None
        command = sql.SQL(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names {})"
        ).format(
            sql.Identifier(self.slot),
            sql.SQL(format_lsn(start)),
            sql.Literal(sql.Identifier(self.publication).as_string(conn)),
        )
        pgconn = conn.pgconn
        try:
            row = conn.execute(
                "SELECT setting::int FROM pg_settings WHERE name = 'wal_sender_timeout'"
            ).fetchone()
            timeout_ms = int(str(row[0])) if row else 0
            if timeout_ms > 0:
                self.status_interval_s = min(STATUS_INTERVAL_S, timeout_ms / 4000)
            pgconn.send_query(command.as_bytes(conn))
            while True:
                pgconn.flush()
                if not pgconn.is_busy():
                    break
                self._wait(pgconn, 1.0)
                pgconn.consume_input()
            result = pgconn.get_result()
            if result is None or result.status != pq.ExecStatus.COPY_BOTH:
                raise _refused(result, f"starting replication from slot {self.slot}")
        except psycopg.Error as exc:
            conn.close()
            raise TransientError(
                f"starting replication from slot {self.slot}: {_first_line(str(exc))}"
            ).at("postgres") from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self.confirmed = confirmed
        self.wal_end = start
        self._last_status = time.monotonic()

    def close(self) -> None:
        with self.lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
        self.ended.set()

    @staticmethod
    def _wait(pgconn: pq.abc.PGconn, timeout: float) -> None:
        select.select([pgconn.socket], [], [], timeout)

    def _pgconn(self) -> pq.abc.PGconn:
        if self._conn is None:
            raise TransientError(f"the replication stream of slot {self.slot} is closed")
        return self._conn.pgconn

    def receive(self, timeout: float) -> bytes | Keepalive | None:
        """The next message, waiting at most ``timeout`` seconds; a status update goes out
        first when one is due (and at once when the server asks for one)."""
        with self.lock:
            pgconn = self._pgconn()
            try:
                if time.monotonic() - self._last_status >= self.status_interval_s:
                    self._send_status(pgconn, reply=False)
                size, data = pgconn.get_copy_data(1)
                if size == 0:
                    self._wait(pgconn, timeout)
                    pgconn.consume_input()
                    size, data = pgconn.get_copy_data(1)
                    if size == 0:
                        return None
            except psycopg.Error as exc:
                raise self._lost(str(exc)) from None
            if size < 0:
                raise self._ended(pgconn)
            message = bytes(data)
            kind = message[0]
            if kind == 0x77:  # 'w': the reader takes dataStart; walEnd is the keepalives' job
                return message
            if kind == 0x6B:  # 'k'
                wal_end, _, reply = _KEEPALIVE(message, 1)
                self.wal_end = max(self.wal_end, wal_end)
                if reply:
                    self._send(pgconn, reply=False)
                return Keepalive(wal_end, bool(reply))
            raise CdcError(f"slot {self.slot} sent an unknown stream message {chr(kind)!r}")

    def confirm(self, lsn: int, reply: bool = False) -> None:
        """Report ``lsn`` as flushed (the slot may move there) now; with ``reply``, ask the
        server for a keepalive (its walEnd) in return."""
        with self.lock:
            self.confirmed = max(self.confirmed, lsn)
            self._send(self._pgconn(), reply)

    def keep_alive(self) -> None:
        """A status update if one is due: for a thread that runs while nobody reads."""
        with self.lock:
            if self._conn is not None and time.monotonic() - self._last_status >= (
                self.status_interval_s
            ):
                self._send(self._conn.pgconn, reply=False)

    def _send(self, pgconn: pq.abc.PGconn, reply: bool) -> None:
        try:
            self._send_status(pgconn, reply)
        except psycopg.Error as exc:
            raise self._lost(str(exc)) from None

    def _send_status(self, pgconn: pq.abc.PGconn, reply: bool) -> None:
        lsn = self.confirmed
        clock = int(time.time() * 1_000_000) - _PG_EPOCH_US
        if pgconn.put_copy_data(_STATUS(b"r", lsn, lsn, lsn, clock, int(reply))) != 1:
            raise psycopg.OperationalError(pgconn.error_message.decode(errors="replace"))
        if pgconn.flush() != 0:
            raise psycopg.OperationalError(pgconn.error_message.decode(errors="replace"))
        self._last_status = time.monotonic()

    def _ended(self, pgconn: pq.abc.PGconn) -> CdcError:
        """The server ended the stream (a terminated walsender, a shutdown)."""
        result = pgconn.get_result()
        if result is not None and result.status == pq.ExecStatus.FATAL_ERROR:
            self._lost("")
            return _refused(result, f"streaming slot {self.slot}")
        return self._lost(pgconn.error_message.decode(errors="replace") or "the stream ended")

    def _lost(self, why: str) -> CdcError:
        """The stream is unusable: it is closed here (the lock is held), so that the next
        user starts a new one instead of failing on this one again."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self.ended.set()
        return TransientError(
            f"the replication stream of slot {self.slot} broke: {_first_line(why)}"
        ).at("postgres")


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else "no reason given"


def _refused(result: pq.abc.PGresult | None, doing: str) -> CdcError:
    if result is None:
        return TransientError(f"{doing}: no answer").at("postgres")
    sqlstate = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
    message = _first_line(result.error_message.decode(errors="replace"))
    if sqlstate == "55006":
        # "replication slot ... is active for PID ...": the walsender of a stream that was just
        # closed (or of a daemon just killed) has not exited yet; it goes away on its own.
        return TransientError(f"{doing}: {message}").at("postgres")
    if sqlstate in ("55000", "42704"):
        return SourceError(f"{doing}: {message}").at("postgres")
    if sqlstate.startswith(("08", "57", "53", "40")) or not sqlstate:
        return TransientError(f"{doing}: {message}").at("postgres")
    return CdcError(f"{doing}: {message}").at("postgres")
