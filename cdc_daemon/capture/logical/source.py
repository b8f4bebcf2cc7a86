"""The source side of a logical group: one session for the catalog (``tables.describe``), the
prerequisites ``init`` checks (``source.validate``), the publication and the slot, and the
stream read (``LogicalSource.read``: the transactions committing at or after a position, whole,
through ``stream.ReplicationStream``, into a ``reader.ChangeReader``). Positions, hand-over,
TOAST and schema changes: docs/logical.md."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg import sql

from cdc_daemon.batch.policy import Limits
from cdc_daemon.capture.logical.pgoutput import (
    DecodeError,
    Relation,
    format_lsn,
    parse_lsn,
)
from cdc_daemon.capture.logical.reader import ChangeReader, ReadResult, SpoolFactory
from cdc_daemon.capture.logical.stream import (
    XLOG_HEADER,
    Keepalive,
    ReplicationStream,
)
from cdc_daemon.capture.logical.tables import LogicalTable, describe
from cdc_daemon.config import Settings
from cdc_daemon.errors import CdcError, SourceError, TransientError, from_psycopg
from cdc_daemon.names import TableName
from cdc_daemon.source.session import SourceSession, connect
from cdc_daemon.source.table import TableInfo, hasher_of
from cdc_daemon.source.validate import (
    generated_notes,
    identity_line,
    logical_problems,
    partition_problems,
)

log = structlog.get_logger()

T = TypeVar("T")

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_XLOG_START = struct.Struct(">Q").unpack_from  # XLogData's dataStart: the message's LSN
# Draining: the server's walEnd has not moved and nothing came for this long.
_STALLED_S = 10.0
_CHANGES = frozenset(b"IUD")


@dataclass(frozen=True)
class SlotStatus:
    exists: bool
    confirmed_flush: int = 0
    restart_lsn: int = 0
    wal_status: str | None = None
    flush_lsn: int = 0  # pg_current_wal_flush_lsn(): where a drain (--exit-when-idle) ends
    lag_bytes: int = 0


class LogicalSource(SourceSession):
    """The source side of logical capture of a group of tables through one slot and one
    publication. Synchronous; the pipeline runs it in a thread."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._tables: list[LogicalTable] = []
        self._by_oid: dict[int, LogicalTable] = {}
        self._stream: ReplicationStream | None = None
        self._stream_next = 0  # the stream delivered every transaction committing before this
        # pgoutput sends a table's Relation message once per stream (and after DDL), not once
        # per batch: the latest one of each table is kept for the next batch of the stream.
        self.stream_relations: dict[int, Relation] = {}
        self._keepalive: threading.Thread | None = None
        self._cancelled = False
        # Called (from the reading thread) about every second while a read goes on.
        self.on_progress: Callable[[], None] | None = None
        # The column list of each table accepted so far (from the ledger, then from Relation
        # messages), by qualified name.
        self.accepted: dict[str, tuple[tuple[str, int, int], ...]] = {}
        # Tables with a widened column (a Relation message), for Snowflake to follow before
        # the next batch is recorded; a restart finds the widening again (``accepted`` comes
        # from the ledger, which saves a column list only with a committed batch).
        self.widened: set[str] = set()
        # The oids whose changes are kept (None: every table of the group). A redo of a batch
        # recorded before a table joined must not pick up that table's changes.
        self.active: set[int] | None = None
        # Array type oid -> element type oid (arrays are written as JSON arrays).
        self.array_elements: dict[int, int] = {}
        # Configured tables that could not be read at connect(), with the reason.
        self.unavailable: dict[str, str] = {}

    # -- names and connection -----------------------------------------------------------------

    @property
    def tables(self) -> list[LogicalTable]:
        assert self._tables, "connect() first"
        return self._tables

    def deactivate(self, oid: int) -> None:
        """Stop keeping a table's changes (it failed)."""
        if self.active is None:
            self.active = set(self._by_oid)
        self.active.discard(oid)

    def by_oid(self, oid: int) -> LogicalTable | None:
        """A table of the group whose changes are kept (``active``), else None."""
        if self.active is not None and oid not in self.active:
            return None
        return self._by_oid.get(oid)

    @property
    def logical_table(self) -> LogicalTable:
        """The group's first table."""
        return self.tables[0]

    @property
    def table(self) -> TableInfo:
        return self.logical_table.info

    @property
    def slot(self) -> str:
        return self._settings.slot_name

    @property
    def publication(self) -> str:
        return self._settings.publication_name

    @property
    def schema_change(self) -> str:
        """``capture.schema_change``: what a retyped column does to its table."""
        return self._settings.capture.schema_change

    def connect(self) -> TableInfo:
        """Open the session and read every configured table's catalog. A table that cannot
        be read (dropped, no privilege) is left out and named in ``unavailable`` (the group
        goes on without it); when none can be, the first one's error is raised."""
        self.close()
        self._conn = connect(self._settings.postgres)
        tables = []
        self.unavailable = {}
        first: CdcError | None = None
        hasher = hasher_of(self._settings)
        for spec in self._settings.table_specs:
            try:
                try:
                    table = describe(self._conn, spec, hasher)
                    self._conn.execute(
                        sql.SQL("SELECT 1 FROM {} LIMIT 0").format(table.info.ident())
                    )
                except psycopg.Error as exc:
                    raise from_psycopg(exc, f"cannot read {spec.name}") from None
            except CdcError as exc:
                if exc.retriable:
                    raise
                first = first or exc
                self.unavailable[spec.qualified] = str(exc)
                continue
            tables.append(table)
        if not tables:
            assert first is not None
            raise first
        self._tables = tables
        self._by_oid = {t.oid: t for t in tables}
        try:
            self.array_elements = {
                int(str(oid)): int(str(elem))
                for oid, elem in self._conn.execute(
                    "SELECT oid::int8, typelem::int8 FROM pg_type"
                    " WHERE typinput = 'array_in'::regproc"
                )
            }
        except psycopg.Error as exc:
            raise from_psycopg(exc, "reading the catalog's array types") from None
        return self.table

    def _guard(
        self, doing: str, fn: Callable[[psycopg.Connection[tuple[object, ...]]], Any]
    ) -> Any:
        try:
            return fn(self._session())
        except psycopg.errors.QueryCanceled as exc:
            self.close()
            raise TransientError(f"{doing}: cancelled") from exc
        except psycopg.Error as exc:
            # A session left in an odd state is not reused: the next call reconnects.
            self.close()
            raise _translate(exc, doing) from None

    # -- prerequisites, publication, slot ----------------------------------------------------

    def check_prerequisites(self) -> list[str]:
        """Each missing prerequisite as one actionable sentence (empty: all good)."""

        def check(conn: psycopg.Connection[tuple[object, ...]]) -> list[tuple[Any, ...]]:
            return [
                tuple(row)
                for row in conn.execute(
                    "SELECT current_setting('wal_level'), r.rolsuper OR r.rolreplication,"
                    " has_database_privilege(current_database(), 'CREATE'),"
                    " pg_has_role(c.relowner, 'USAGE'), current_user, c.oid::int8"
                    " FROM pg_roles r, pg_class c WHERE r.rolname = current_user"
                    " AND c.oid = ANY(%s)",
                    ([t.oid for t in self.tables],),
                ).fetchall()
            ]

        rows = self._guard("checking the source", check)
        wal_level, replication, can_create, _, user, _ = rows[0]
        owns_all = all(row[3] for row in rows)
        problems = []
        if wal_level != "logical":
            problems.append(
                f"wal_level is {wal_level!r}: set wal_level = logical in postgresql.conf and "
                "restart the server"
            )
        if not replication:
            problems.append(
                f"role {user} may not use replication slots: ALTER ROLE {user} REPLICATION"
            )
        for t in self.tables:
            assert t.facts is not None, "described from the catalog"
            problems += logical_problems(t.facts, t.key, t.configured_key, t.spec)
            if t.partitioned:
                leaves: list[str] = self._guard(
                    "reading the partitions",
                    partial(_partition_problems, table=t),
                )
                problems += leaves
        if not self.publication_exists() and not (owns_all and can_create):
            names = ", ".join(t.facts.quoted if t.facts else t.qualified for t in self.tables)
            problems.append(
                f"role {user} cannot create publication {self.publication} (it must own every "
                f"table and may CREATE in the database): have the owner run CREATE PUBLICATION "
                f"{self.publication} FOR TABLE {names}"
            )
        return problems + self.check_publication()

    def identity_notes(self) -> list[str]:
        """Each table's key, its replica identity and what that costs the source, and which
        generated columns are left out (``init`` prints them)."""
        notes = []
        for t in self.tables:
            if t.facts is not None:
                notes.append(identity_line(t.facts, t.key, t.configured_key, logical=True))
                notes += generated_notes(t.facts)
            if t.replica_identity != "f" and t.toastable:
                notes.append(
                    f"{t.qualified}: replica identity by key: an update that leaves a large "
                    f"(TOASTed) value of {', '.join(t.toastable)} unchanged does not log it; "
                    "the change names it in _cdc_unchanged and the warehouse merge keeps the "
                    "current value (REPLICA IDENTITY FULL avoids this at the cost of WAL)"
                )
        return notes

    def publication_tables(self) -> dict[str, TableName] | None:
        """The tables of the publication by ledger key; None when it does not exist."""

        def read(conn: psycopg.Connection[tuple[object, ...]]) -> dict[str, TableName] | None:
            if not conn.execute(
                "SELECT 1 FROM pg_publication WHERE pubname = %s", (self.publication,)
            ).fetchone():
                return None
            rows = conn.execute(
                "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
                (self.publication,),
            ).fetchall()
            tables = [TableName(str(r[0]), str(r[1])) for r in rows]
            return {t.key: t for t in tables}

        found: dict[str, TableName] | None = self._guard("reading the publication", read)
        return found

    def check_publication(self) -> list[str]:
        """An existing publication must publish every kind of change of every table: one
        made by hand with ``publish = 'insert'`` would silently drop updates and deletes."""

        def read(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[Any, ...] | None:
            return conn.execute(
                "SELECT p.pubinsert AND p.pubupdate AND p.pubdelete AND p.pubtruncate,"
                " p.pubviaroot FROM pg_publication p WHERE p.pubname = %s",
                (self.publication,),
            ).fetchone()

        row = self._guard("reading the publication", read)
        if row is None:
            return []
        pub = self.publication
        problems = []
        if not row[0]:
            problems.append(
                f"publication {pub} does not publish every change: ALTER PUBLICATION {pub} "
                "SET (publish = 'insert, update, delete, truncate')"
            )
        roots = [str(t.info.table) for t in self.tables if t.partitioned]
        if roots and not row[1]:
            # Without it each partition's changes arrive under the partition's own oid and
            # name, which the group does not know (pg_publication_tables then lists the
            # partitions, not the root).
            problems.append(
                f"publication {pub} does not include the changes of {', '.join(roots)} under "
                f"the partitioned table's name: run `cdc-daemon init` (or ALTER PUBLICATION "
                f"{pub} SET (publish_via_partition_root = true))"
            )
        published = self.publication_tables() or {}
        missing = [str(t.info.table) for t in self.tables if t.qualified not in published]
        if missing:
            problems.append(
                f"publication {pub} does not include {', '.join(missing)}: run `cdc-daemon "
                f"init` (or ALTER PUBLICATION {pub} ADD TABLE {', '.join(missing)})"
            )
        return problems

    def publication_exists(self) -> bool:
        return self.publication_tables() is not None

    def sync_publication(self) -> list[str]:
        """Create the publication for the group's tables, or bring its table list in line
        with the configuration; returns what changed, one line each."""
        published = self.publication_tables()
        idents = {t.qualified: t.info.table for t in self.tables}
        pub = sql.Identifier(self.publication)
        # A partitioned table's changes are published under its own name and columns, whichever
        # partition (one attached or created later included) they touch: one warehouse table.
        via_root = any(t.partitioned for t in self.tables)
        if published is None:
            statement = sql.SQL("CREATE PUBLICATION {} FOR TABLE {}{}").format(
                pub,
                sql.SQL(", ").join(t.sql() for t in idents.values()),
                sql.SQL(" WITH (publish_via_partition_root = true)" if via_root else ""),
            )
            self._guard("creating the publication", lambda c: c.execute(statement))
            listed = ", ".join(str(t) for t in idents.values())
            return [f"created publication {self.publication} for {listed}"]
        changes = []
        row = via_root and self._guard(
            "reading the publication",
            lambda c: c.execute(
                "SELECT pubviaroot FROM pg_publication WHERE pubname = %s", (self.publication,)
            ).fetchone(),
        )
        if row and not row[0]:
            on = sql.SQL("ALTER PUBLICATION {} SET (publish_via_partition_root = true)")
            self._execute("publishing through the partitioned tables' root", on.format(pub))
            changes.append(f"publication {self.publication} publishes through partition roots")
            # pg_publication_tables lists the roots now, not their partitions.
            published = self.publication_tables() or {}
        for key, table in idents.items():
            if key not in published:
                add = sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(pub, table.sql())
                self._execute(f"adding {table} to the publication", add)
                changes.append(f"added {table} to publication {self.publication}")
        for key in sorted(published.keys() - idents.keys()):
            table = published[key]
            drop = sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(pub, table.sql())
            self._execute(f"dropping {table} from the publication", drop)
            changes.append(f"dropped {table} from publication {self.publication}")
        return changes

    def _execute(self, doing: str, statement: sql.Composed) -> None:
        self._guard(doing, lambda c: c.execute(statement))

    def slot_status(self) -> SlotStatus:
        def read(conn: psycopg.Connection[tuple[object, ...]]) -> SlotStatus:
            row = conn.execute(
                "SELECT confirmed_flush_lsn::text, restart_lsn::text, wal_status,"
                " pg_current_wal_flush_lsn()::text,"
                " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8"
                " FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()",
                (self.slot,),
            ).fetchone()
            if row is None:
                return SlotStatus(False)
            confirmed, restart, wal_status, flush, lag = row
            return SlotStatus(
                True,
                parse_lsn(str(confirmed)) if confirmed else 0,
                parse_lsn(str(restart)) if restart else 0,
                str(wal_status) if wal_status else None,
                parse_lsn(str(flush)),
                int(str(lag or 0)),
            )

        status: SlotStatus = self._guard("reading the slot", read)
        return status

    def create_slot(self) -> int:
        """A slot without a snapshot (``capture.initial_snapshot = false``): streaming starts
        at its consistent point, which is returned."""
        with self.replication() as repl:
            row = repl.execute(
                sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'nothing')").format(
                    sql.Identifier(self.slot)
                )
            ).fetchone()
        assert row is not None
        return parse_lsn(str(row[1]))

    def replication(self) -> psycopg.Connection[tuple[object, ...]]:
        return replication_connection(self._settings)

    def drop(self) -> list[str]:
        """Drop the slot and the publication (teardown); returns what was dropped."""
        dropped = []
        if self.slot_status().exists:
            self._guard(
                "dropping the slot",
                lambda c: c.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,)),
            )
            dropped.append(f"slot {self.slot}")
        if self.publication_exists():
            self._guard(
                "dropping the publication",
                lambda c: c.execute(
                    sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(self.publication))
                ),
            )
            dropped.append(f"publication {self.publication}")
        return dropped

    def advance(self, lsn: int) -> None:
        """Move the slot's confirmed position to ``lsn`` (only ever forward): through the
        stream's status update while one is open (the slot is busy then), else by SQL."""
        stream = self._stream
        if stream is not None and not stream.closed:
            stream.confirm(lsn)
            return
        self._guard(
            "advancing the slot",
            lambda c: c.execute(
                "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (self.slot, format_lsn(lsn))
            ),
        )

    # -- the initial snapshot -----------------------------------------------------------------

    # -- streaming ----------------------------------------------------------------------------

    def _stream_at(self, lo: int, confirmed: int) -> ReplicationStream:
        """The open stream when it stands at ``lo`` (it delivered everything before), else a
        new one started there, reporting ``confirmed`` (the ledger's position) as flushed."""
        stream = self._stream
        if stream is not None and not stream.closed and self._stream_next == lo:
            return stream
        self.close_stream()
        stream = ReplicationStream(self._settings, self.slot, self.publication)
        stream.open(lo, min(confirmed, lo))
        self._stream = stream
        self._stream_next = lo
        self.stream_relations = {}
        # Status updates go out while nobody reads (an upload, a retry's backoff), or the
        # walsender drops the connection after wal_sender_timeout.
        self._keepalive = threading.Thread(
            target=_keep_alive, args=(stream,), name="cdc-stream-keepalive", daemon=True
        )
        self._keepalive.start()
        return stream

    def close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
        thread, self._keepalive = self._keepalive, None
        if thread is not None:
            thread.join()

    def close(self) -> None:
        self.close_stream()
        super().close()

    async def run(self, fn: Callable[[], T]) -> T:
        # Cleared here, before the thread starts: a cancellation that comes before the read
        # takes its first step is not forgotten.
        self._cancelled = False
        return await super().run(fn)

    def cancel(self) -> None:
        self._cancelled = True
        super().cancel()

    def read(
        self,
        lo: int,
        new_spool: SpoolFactory,
        limits: Limits | None = None,
        max_age_s: float = 0.0,
        wait_s: float = 1.0,
        drain_to: int | None = None,
        redo_end: int | None = None,
        confirmed: int | None = None,
    ) -> ReadResult:
        """Stream the transactions that commit at or after ``lo`` into spools, whole. Without
        ``redo_end`` the batch closes after a commit once ``limits`` are reached (``cut``:
        more is waiting) or once its first change is ``max_age_s`` old; with ``drain_to``
        (draining: everything committed before the call), once the stream is caught up to
        it (a keepalive's walEnd past it, with no transaction open). An idle call returns
        after about ``wait_s``. With ``redo_end`` it reads exactly the transactions
        committing in ``[lo, redo_end)`` (a recorded batch, again). ``confirmed``: the ledger's
        position, when the read starts past it (``lo`` otherwise)."""
        stream = self._stream_at(lo, lo if confirmed is None else confirmed)
        result = ReadResult(lo, None, 0)
        reader = ChangeReader(self, result, new_spool, lo, redo_end)
        for relation in self.stream_relations.values():
            reader.relation(relation)
        # Ask for the server's position at once: an idle stream is known idle in one trip.
        stream.confirm(stream.confirmed, reply=True)
        asked = started = progressed = beaten = time.monotonic()
        first_row = 0.0
        wal_end = 0
        try:
            while True:
                if self._cancelled:
                    raise TransientError("reading the slot was cancelled").at("postgres")
                message = stream.receive(0.1)
                now = time.monotonic()
                if now - beaten >= 1.0 and self.on_progress is not None:
                    # A huge transaction is read whole: the loop is alive while it flows.
                    self.on_progress()
                    beaten = now
                if stream.wal_end > wal_end or isinstance(message, bytes):
                    wal_end, progressed = stream.wal_end, now
                if isinstance(message, bytes):
                    lsn = _XLOG_START(message, 1)[0]
                    if reader.feed(lsn, message, XLOG_HEADER, len(message)):
                        result.hi = redo_end  # a Begin at or past the end of a redone batch
                        break
                    if result.rows and not first_row:
                        first_row = now
                    if not reader.after_commit or redo_end is not None:
                        continue
                    if limits is not None and (
                        result.rows >= limits.max_rows
                        or reader.raw_bytes() >= limits.max_bytes
                        or reader.days() > limits.max_days
                    ):
                        result.hi, result.cut, result.more = reader.last_end, True, True
                        break
                    if result.rows and drain_to is None and now - first_row >= max_age_s:
                        result.hi = reader.last_end
                        break
                    continue  # draining: on until the stream is caught up
                if reader.in_transaction:
                    continue  # a large transaction: its Commit is on its way
                if isinstance(message, Keepalive) and message.wal_end >= lo:
                    # Everything committing before wal_end has been received.
                    caught = max(message.wal_end, reader.last_end or 0)
                    result.upto = caught
                    if redo_end is not None:
                        if caught >= redo_end:
                            result.hi = redo_end
                            break
                    elif drain_to is not None:
                        result.hi = caught if caught > lo else None
                        # The server's flush LSN can stand inside a record the walsender cannot
                        # read yet: a walEnd that stops moving while nothing comes is the end.
                        if caught >= drain_to or now - progressed >= _STALLED_S:
                            break
                    elif not result.rows:
                        result.hi = caught if caught > lo else None
                        if now - started >= wait_s:
                            break
                    elif now - first_row >= max_age_s:
                        result.hi = caught
                        break
                elif (
                    result.rows
                    and redo_end is None
                    and drain_to is None
                    and (now - first_row >= max_age_s)
                ):
                    result.hi = reader.last_end
                    break
                # At most every 50 ms: with wait_s 0 (a snapshot's chunks wait) it would ask
                # on every message, and the walsender would answer as often.
                if now - asked >= min(max(wait_s, 0.05), 0.5):
                    stream.confirm(stream.confirmed, reply=True)
                    asked = now
        except CdcError:
            reader.discard()
            self.close_stream()
            raise
        except DecodeError as exc:
            reader.discard()
            self.close_stream()
            raise CdcError(
                f"slot {self.slot} sent a message this decoder cannot read: {exc}"
            ) from None
        except BaseException:
            reader.discard()
            self.close_stream()
            raise
        reader.finish()
        if redo_end is not None:
            self.close_stream()  # it may have read past the batch: the next read starts anew
        elif result.hi is not None:
            self._stream_next = result.hi
        return result


def _partition_problems(
    conn: psycopg.Connection[tuple[object, ...]], table: LogicalTable
) -> list[str]:
    return partition_problems(conn, table.oid, table.key, table.configured_key)


def _keep_alive(stream: ReplicationStream) -> None:
    """Status updates for ``stream`` until it closes (see ``LogicalSource._stream_at``)."""
    while not stream.closed:
        try:
            stream.keep_alive()
        except CdcError:
            return  # the reader sees the broken stream on its next call
        # Woken by close(): closing the stream (every exit, every error) does not wait.
        stream.ended.wait(min(stream.status_interval_s / 4, 1.0))


def _translate(exc: psycopg.Error, doing: str) -> CdcError:
    if exc.sqlstate == "55006":
        # "replication slot ... is active for PID ...": the backend of a daemon that was just
        # killed has not noticed yet; it goes away on its own.
        return TransientError(f"{doing}: {str(exc).strip().splitlines()[0]}")
    if exc.sqlstate in ("55000", "42704"):
        return SourceError(f"{doing}: {str(exc).strip().splitlines()[0]}")
    return from_psycopg(exc, doing)


def replication_connection(settings: Settings) -> psycopg.Connection[tuple[object, ...]]:
    """A ``replication=database`` session (slot commands: CREATE_REPLICATION_SLOT)."""
    try:
        return psycopg.connect(
            settings.postgres.dsn.get_secret_value(),
            autocommit=True,
            replication="database",
            application_name="cdc-daemon-slot",
            connect_timeout=max(1, int(settings.postgres.connect_timeout_s)),
        )
    except psycopg.Error as exc:
        raise from_psycopg(exc, "cannot open a replication connection") from None
