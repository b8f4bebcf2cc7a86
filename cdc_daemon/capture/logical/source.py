"""Logical replication capture: inserts, updates and deletes from a ``pgoutput`` slot.

Every committed change of the table goes into the same daily objects as the watermark mode,
with ``_cdc_op`` I/U/D, ``_cdc_seq`` the change's LSN and ``_cdc_ts`` its commit time. For one
key, changes are serialised by row locks, so their LSNs grow in commit order and "highest
``_cdc_seq`` per key wins" rebuilds the table. An update that changes the key also writes a
``D`` row for the old key (same LSN).

Reading. Changes come over the streaming replication protocol (``stream.ReplicationStream``:
``START_REPLICATION ... LOGICAL`` on a ``replication=database`` connection): the walsender
decodes each WAL record once and keeps its reorder buffer for the whole session, so a long open
transaction elsewhere costs nothing per read (the SQL peek functions decode again from the
slot's ``restart_lsn`` on every call). Messages are decoded and written to the spool as they
arrive, so a transaction of any size is exported with bounded memory (the walsender spills
large transactions to disk, not the daemon). One stream serves batch after batch; a broken
one (a terminated walsender, a restart) is replaced by a new one started at the ledger's
position.

Position. The position ``P`` (kept in the ledger as the batch's ``hi``) means: every
transaction whose commit record starts before ``P`` is in S3. The walsender sends whole
transactions at their commit record, and skips those whose commit starts before the start
LSN. A batch therefore holds whole transactions with commit LSN in ``[lo, hi)``: ``hi`` is the
end LSN of its last transaction, or the walEnd of a keepalive that came with no transaction
open (then nothing else commits before it). A batch is never split inside a transaction.
Order: spool -> intent record (``pending``, with ``lo``/``hi``) -> upload -> ledger commit ->
the slot's confirmed position moves to ``hi`` (a standby status update reporting ``hi`` as
flushed; ``pg_replication_slot_advance`` when no stream is open). Status updates only ever
report the ledger's position, never what was received: the slot never moves past what is
durable in S3. A slot behind the ledger (crash after the commit) is moved up at the next
pass; a slot ahead of the ledger, missing, or invalidated (``wal_status = 'lost'``) stops the
daemon with a clear message, never a silent restart from "now". A pending batch is redone by
streaming ``[lo, hi)`` again: the same transactions, LSNs and commit times, so byte-identical
objects under the same keys (changes may be exported twice, with the same ``_cdc_seq``; never
lost).

Idle table, busy server: a keepalive that comes with no transaction open proves that nothing
commits before its walEnd, and the walsender reads the WAL of every database of the cluster,
so the position moves there (ledger, then slot) every ``capture.heartbeat_s``: the slot never
holds WAL back for unrelated activity, also when the source database itself is idle (tested;
no ``pg_logical_emit_message`` heartbeat is needed). Slot lag
(``pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)``) is logged with every batch
(``slot_lag_bytes``) and a warning passes ``capture.max_lag_bytes``.

TOAST. PostgreSQL does not log an unchanged TOASTed value of an updated row ('u') under the
default replica identity. Such a change is written with that field empty and the column's
name in the last column, ``_cdc_unchanged`` (names separated by commas; empty when none): the
warehouse merge keeps the current value of a column it names, never overwriting it with an
empty one. Under REPLICA IDENTITY FULL every update carries the whole old row and an unchanged
value is taken from it (nothing is ever unchanged then), at the cost of WAL on the source;
``init`` says which applies to each table. FULL also makes deletes carry the whole old row (so
a ``D`` row lands in its day's object); under a key-only identity a ``D`` row has only the key
columns and goes to ``dt=unknown`` (or, for a table without a partition column, the commit's
day).

Schema changes. pgoutput sends a Relation message (the column list) before a table's first
change in every call and after each DDL. A column added at the end starts a new object
"generation" within the batch (keys ``<batch_id>-s<n>``) whose header has the new column;
it is logged (``columns_changed``), and the warehouse gets the column before the first
object naming it is uploaded (``warehouse.evolve``). A dropped column is followed too (the
pipes load by name: Snowflake's column gets NULL from then on; a rename is a drop and an add).
A retyped column stops that table (a group of one: the daemon) with a clear message unless
``capture.schema_change = "follow"``. The accepted column list is
kept in the ledger (``relations``) so a restart compares against it too. TRUNCATE of the table
stops the daemon: it cannot be expressed as row changes (re-initialise the pipeline).

Initial snapshot and hand-over (``capture.logical.join``): the slot is created without an
exported snapshot; every table of the group then joins at the slot's consistent point, its
rows copied in chunks by key (``copy_chunk``, through the watermark mode's COPY: same bytes)
as ``I`` rows while the stream goes on. Their ``_cdc_seq`` is the slot's ``restart_lsn`` at
creation, not its consistent point: a transaction that began before the consistent point but
commits after it is streamed with change LSNs *below* the consistent point, and must still win
over a chunk's older version of the row; every streamed change lies at or after
``restart_lsn``. Why chunks read at different times still rebuild the table exactly is in
``capture.logical.join``.

Tables: a group's tables share the slot, the publication and the stream; each table's rows go
to its own objects (``<schema>.<table>/dt=.../``), a batch holds whole transactions over any
of them, and changes of tables outside the group (a publication made by hand) are skipped.
"""

from __future__ import annotations

import operator
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg import sql

from cdc_daemon.batch.policy import Limits
from cdc_daemon.batch.spool import BLOCK_ROWS, DaySpool
from cdc_daemon.capture.logical.encode import ColumnType, RowEncoder, quote
from cdc_daemon.capture.logical.pgoutput import (
    UNCHANGED,
    Begin,
    Commit,
    DecodeError,
    Relation,
    Truncate,
    TupleData,
    decode,
    decode_tuple,
    format_lsn,
    iso_utc,
    parse_lsn,
)
from cdc_daemon.capture.logical.stream import (
    XLOG_HEADER,
    Keepalive,
    ReplicationStream,
)
from cdc_daemon.config import Settings, TableSettings
from cdc_daemon.errors import CdcError, SourceError, TransientError, from_psycopg
from cdc_daemon.source.copyread import CopyRows
from cdc_daemon.source.session import SourceSession, connect, read_snapshot, translated
from cdc_daemon.source.table import Column, TableInfo, partition_of
from cdc_daemon.source.validate import TableFacts, generated_notes, logical_problems, read_facts
from cdc_daemon.source.values import QuarantineJudge
from cdc_daemon.state.joins import Key

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


@dataclass(frozen=True)
class LogicalTable:
    info: TableInfo  # columns in table order, the partition column (for the snapshot's COPY)
    oid: int
    key: tuple[str, ...]
    replica_identity: str
    toastable: tuple[str, ...]
    columns: tuple[tuple[str, int, int], ...]  # (name, type oid, typmod), as Relation sends
    has_primary_key: bool = True
    facts: TableFacts | None = None  # what the catalog said when described (None: made by hand)
    configured_key: bool = False  # the key is [[tables]] key, not the primary key

    @property
    def qualified(self) -> str:
        return self.info.qualified

    @property
    def header(self) -> list[str]:
        return logical_header([c[0] for c in self.columns])

    def judge(self) -> QuarantineJudge:
        """What the warehouse gets for the snapshot's quarantined rows."""
        return self.info.judge(self.key, self.header)


# The daemon's own columns of a logical object, after the table's: the operation, the change's
# LSN, its commit time, and the columns whose unchanged TOASTed values the change lacks.
CDC_COLUMNS = ("_cdc_op", "_cdc_seq", "_cdc_ts", "_cdc_unchanged")


def logical_header(columns: list[str]) -> list[str]:
    return [*columns, *CDC_COLUMNS]


@dataclass
class ReadResult:
    """What one read found. ``hi`` is the new position (None: no progress)."""

    lo: int
    hi: int | None
    upto: int
    rows: int = 0
    transactions: int = 0
    cut: bool = False  # closed early by max_bytes/max_days: more is waiting
    more: bool = False  # the window or the change count bounded the call
    generations: list[Generation] = field(default_factory=list)
    # Tables that failed during the read (their later changes were skipped): name -> reason.
    failed: dict[str, str] = field(default_factory=dict)


@dataclass
class Generation:
    """The rows of one column list within a batch: one spool, one header."""

    columns: tuple[tuple[str, int, int], ...]  # (name, type oid, typmod)
    spool: DaySpool
    encoder: RowEncoder
    key_index: tuple[int, ...]
    table: LogicalTable
    number: int = 0  # the table's n-th column list within the batch (0: its first)
    # The key columns of a tuple, compared as one value (None: no key).
    key_of: Callable[[TupleData], object] | None = field(init=False, repr=False)
    # The table has a partition column (else a row goes to its commit's day); read per row.
    partitioned: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.key_of = operator.itemgetter(*self.key_index) if self.key_index else None
        self.partitioned = self.table.info.partition is not None

    @property
    def header(self) -> list[str]:
        return logical_header([c[0] for c in self.columns])


SpoolFactory = Callable[[list[str], QuarantineJudge], DaySpool]


def describe(
    conn: psycopg.Connection[tuple[object, ...]],
    spec: TableSettings,
    default_partition: str | None = None,
) -> LogicalTable:
    """The table as logical mode captures it, from its catalog facts (read once; ``init``
    checks them with ``source.validate``). Generated columns are left out: pgoutput
    (PostgreSQL < 18) does not send them, so neither the snapshot nor the objects carry them,
    and a Relation message without them is no column change."""
    table = spec.name
    facts = read_facts(conn, table)
    if facts is None:
        raise SourceError(f"table {table!r} does not exist (or is not visible to this user)")
    schema, name = facts.schema, facts.name
    if facts.kind == "p":
        raise SourceError(
            f"{schema}.{name} is a partitioned table: logical mode does not capture one yet "
            '(its changes arrive under each partition\'s name); use capture.mode = "watermark"'
        )
    if facts.kind != "r":
        raise SourceError(f"{schema}.{name} is not a table")
    captured = facts.captured(logical=True)
    columns = tuple(Column(c.name, c.type_name) for c in captured)
    primary = facts.primary_key_columns()
    by_name = {c.name: c for c in columns}
    key = primary if spec.key is None else spec.key
    missing = [k for k in key if k not in by_name]
    if missing:
        generated = facts.column(missing[0]) is not None
        raise SourceError(
            f"{schema}.{name}: key column {missing[0]!r} is a generated column, which logical "
            "mode leaves out (pgoutput does not send it): name other key columns in [[tables]] "
            'key, or use capture.mode = "watermark"'
            if generated
            else f"{schema}.{name} has no column {missing[0]!r} (key)"
        )
    partition = partition_of(schema, name, by_name, spec.partition_column, default_partition)
    # TableInfo's watermark is meaningless here; the first key column stands in.
    info = TableInfo(schema, name, columns, by_name[key[0]] if key else columns[0], partition)
    toastable = tuple(c.name for c in captured if c.toastable)
    catalog = tuple((c.name, c.type_oid, c.typmod) for c in captured)
    return LogicalTable(
        info,
        facts.oid,
        key,
        facts.identity,
        toastable,
        catalog,
        bool(primary),
        facts,
        spec.key is not None,
    )


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

    def connect(self) -> TableInfo:
        """Open the session and read every configured table's catalog. A table that cannot
        be read (dropped, no privilege) is left out and named in ``unavailable`` (the group
        goes on without it); when none can be, the first one's error is raised."""
        self.close()
        self._conn = connect(self._settings)
        tables = []
        self.unavailable = {}
        first: CdcError | None = None
        for spec in self._settings.table_specs:
            try:
                try:
                    table = describe(self._conn, spec, self._settings.default_partition)
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
            problems += logical_problems(t.facts, t.key, t.configured_key)
        if not self.publication_exists() and not (owns_all and can_create):
            names = ", ".join(t.facts.quoted if t.facts else t.qualified for t in self.tables)
            problems.append(
                f"role {user} cannot create publication {self.publication} (it must own every "
                f"table and may CREATE in the database): have the owner run CREATE PUBLICATION "
                f"{self.publication} FOR TABLE {names}"
            )
        return problems + self.check_publication()

    def identity_notes(self) -> list[str]:
        """What each table's replica identity means for its updates, and which generated
        columns are left out (``init`` prints them)."""
        notes = []
        for t in self.tables:
            if t.facts is not None:
                notes += generated_notes(t.facts)
            if t.replica_identity == "f":
                notes.append(
                    f"{t.qualified}: REPLICA IDENTITY FULL: every update and delete logs the "
                    "whole old row (more WAL on the source), so no value is ever unchanged"
                )
            elif t.toastable:
                notes.append(
                    f"{t.qualified}: default replica identity: an update that leaves a large "
                    f"(TOASTed) value of {', '.join(t.toastable)} unchanged does not log it; "
                    "the change names it in _cdc_unchanged and the warehouse merge keeps the "
                    "current value (REPLICA IDENTITY FULL avoids this at the cost of WAL)"
                )
        return notes

    def publication_tables(self) -> set[str] | None:
        """The tables of the publication, ``schema.table``; None when it does not exist."""

        def read(conn: psycopg.Connection[tuple[object, ...]]) -> set[str] | None:
            if not conn.execute(
                "SELECT 1 FROM pg_publication WHERE pubname = %s", (self.publication,)
            ).fetchone():
                return None
            rows = conn.execute(
                "SELECT schemaname || '.' || tablename FROM pg_publication_tables"
                " WHERE pubname = %s",
                (self.publication,),
            ).fetchall()
            return {str(r[0]) for r in rows}

        found: set[str] | None = self._guard("reading the publication", read)
        return found

    def check_publication(self) -> list[str]:
        """An existing publication must publish every kind of change of every table: one
        made by hand with ``publish = 'insert'`` would silently drop updates and deletes."""

        def read(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[Any, ...] | None:
            return conn.execute(
                "SELECT p.pubinsert AND p.pubupdate AND p.pubdelete AND p.pubtruncate"
                " FROM pg_publication p WHERE p.pubname = %s",
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
        published = self.publication_tables() or set()
        missing = [t.qualified for t in self.tables if t.qualified not in published]
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
        idents = {t.qualified: t.info.ident() for t in self.tables}
        pub = sql.Identifier(self.publication)
        if published is None:
            statement = sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                pub, sql.SQL(", ").join(idents.values())
            )
            self._guard("creating the publication", lambda c: c.execute(statement))
            return [f"created publication {self.publication} for {', '.join(idents)}"]
        changes = []
        for name, ident in idents.items():
            if name not in published:
                add = sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(pub, ident)
                self._execute(f"adding {name} to the publication", add)
                changes.append(f"added {name} to publication {self.publication}")
        for name in sorted(published - set(idents)):
            schema, _, table = name.partition(".")
            drop = sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                pub, sql.Identifier(schema, table)
            )
            self._execute(f"dropping {name} from the publication", drop)
            changes.append(f"dropped {name} from publication {self.publication}")
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
        with self._replication() as repl:
            row = repl.execute(
                sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'nothing')").format(
                    sql.Identifier(self.slot)
                )
            ).fetchone()
        assert row is not None
        return parse_lsn(str(row[1]))

    def _replication(self) -> psycopg.Connection[tuple[object, ...]]:
        try:
            return psycopg.connect(
                self._settings.postgres.dsn.get_secret_value(),
                autocommit=True,
                replication="database",
                application_name="cdc-daemon-slot",
                connect_timeout=max(1, int(self._settings.postgres.connect_timeout_s)),
            )
        except psycopg.Error as exc:
            raise from_psycopg(exc, "cannot open a replication connection") from None

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
        reader = _Reader(self, result, new_spool, lo, redo_end)
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


def snapshot_query(
    table: TableInfo, seq: int, read_ts: str, where: sql.Composable | None = None
) -> sql.Composed:
    """``COPY`` of a table's rows as ``I`` changes with ``_cdc_seq`` ``seq``: each as
    ``day,<csv row>`` (the source columns and the four ``_cdc_*`` columns)."""
    return sql.SQL(
        "COPY (SELECT {day}, {cols}, 'I', {seq}::bigint, {ts}, NULL FROM {tbl} t{where})"
        " TO STDOUT (FORMAT csv)"
    ).format(
        day=table.day_expr(read_ts),
        cols=sql.SQL(", ").join(c.csv_expr() for c in table.columns),
        seq=sql.Literal(seq),
        ts=sql.Literal(read_ts),
        tbl=table.ident(),
        where=sql.SQL("") if where is None else sql.SQL(" WHERE {}").format(where),
    )


def copy_snapshot(
    conn: psycopg.Connection[tuple[object, ...]],
    table: TableInfo,
    spool: DaySpool,
    seq: int,
    read_ts: str,
    where: sql.Composable | None = None,
) -> None:
    with conn.cursor() as cur, cur.copy(snapshot_query(table, seq, read_ts, where)) as copy:
        rows = CopyRows(copy).batch
        while batch := rows():
            for data in map(bytes, batch):
                spool.add(data)


def _key_sql(table: LogicalTable) -> tuple[sql.Composable, Callable[[Key], sql.Composable]]:
    """The key as a row expression, and a key's values as one (cast to the key's types)."""
    types = {c.name: c.type_name for c in table.info.columns}
    key = sql.SQL(", ").join(sql.Identifier(k) for k in table.key)

    def bound(values: Key) -> sql.Composable:
        return sql.SQL(", ").join(
            sql.SQL("CAST({} AS {})").format(sql.Literal(v), sql.SQL(types[k]))
            for k, v in zip(table.key, values, strict=True)
        )

    return key, bound


def _key_texts(table: LogicalTable) -> sql.Composable:
    """The key's values as text, under names of their own: an output column named like the
    key column would make ``ORDER BY`` sort by the text (PostgreSQL matches output names
    first), not by the key's type and index."""
    return sql.SQL(", ").join(
        sql.SQL("{}::text AS {}").format(sql.Identifier(k), sql.Identifier(f"_cdc_key_{n}"))
        for n, k in enumerate(table.key)
    )


def split_keys(
    conn: psycopg.Connection[tuple[object, ...]], table: LogicalTable, parts: int
) -> list[Key]:
    """Up to ``parts - 1`` keys that cut the table into parts of about equal rows (from the
    planner's row estimate; exact cuts are not needed, only disjoint ranges)."""
    if parts <= 1:
        return []
    info = table.info
    row = conn.execute(
        "SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = %s", (table.oid,)
    ).fetchone()
    estimate = int(str(row[0])) if row else 0
    if estimate < parts * 2:
        return []
    key, _ = _key_sql(table)
    cuts: list[Key] = []
    for n in range(1, parts):
        found = conn.execute(
            sql.SQL("SELECT {texts} FROM {t} ORDER BY {k} OFFSET %s LIMIT 1").format(
                texts=_key_texts(table), t=info.ident(), k=key
            ),
            (estimate * n // parts,),
        ).fetchone()
        if found is None:
            break
        cut = tuple(None if v is None else str(v) for v in found)
        if not cuts or cut != cuts[-1]:
            cuts.append(cut)
    return cuts


def copy_chunk(
    conn: psycopg.Connection[tuple[object, ...]],
    table: LogicalTable,
    start: Key | None,
    upper: Key | None,
    limit: int,
    seq: int,
    read_ts: str,
    spool: DaySpool,
) -> Key | None:
    """Copy the next ``limit`` rows of ``table`` by key, those above ``start`` and at most
    ``upper`` (None: unbounded), into ``spool`` as ``I`` rows with ``_cdc_seq`` ``seq``, in
    one transaction. Returns the chunk's last key, or None when it reached ``upper``."""
    info = table.info
    key, bound = _key_sql(table)
    conditions: list[sql.Composable] = []
    if start is not None:
        conditions.append(sql.SQL("({}) > ({})").format(key, bound(start)))
    if upper is not None:
        conditions.append(sql.SQL("({}) <= ({})").format(key, bound(upper)))
    where: sql.Composable = sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true")
    with translated(f"copying the snapshot of {info.qualified}"), read_snapshot(conn):
        row = conn.execute(
            sql.SQL("SELECT {texts} FROM {t} WHERE {w} ORDER BY {k} OFFSET %s LIMIT 1").format(
                texts=_key_texts(table), t=info.ident(), w=where, k=key
            ),
            (limit - 1,),
        ).fetchone()
        last = None if row is None else tuple(None if v is None else str(v) for v in row)
        if last is not None:
            where = sql.SQL("{} AND ({}) <= ({})").format(where, key, bound(last))
        copy_snapshot(conn, info, spool, seq, read_ts, where)
    return None if last == upper else last


def _keep_alive(stream: ReplicationStream) -> None:
    """Status updates for ``stream`` until it closes (see ``LogicalSource._stream_at``)."""
    while not stream.closed:
        try:
            stream.keep_alive()
        except CdcError:
            return  # the reader sees the broken stream on its next call
        # Woken by close(): closing the stream (every exit, every error) does not wait.
        stream.ended.wait(min(stream.status_interval_s / 4, 1.0))


class _Reader:
    """Turns the messages of one read into spooled CSV rows (one instance per batch): one
    generation (spool) per table and column list."""

    def __init__(
        self,
        source: LogicalSource,
        result: ReadResult,
        new_spool: SpoolFactory,
        lo: int,
        redo_end: int | None,
    ) -> None:
        self._source = source
        self._result = result
        self._new_spool = new_spool
        self._lo = lo
        self._redo_end = redo_end
        self._current: dict[int, Generation] = {}  # by relation oid: its column list now
        self._counts: dict[int, int] = {}  # generations per relation in this batch
        self._ts = b","
        self._day = b""
        self.in_transaction = False
        self.after_commit = False
        self.last_end: int | None = None

    @property
    def _generation(self) -> Generation | None:
        """The latest generation (tests of one table look at it)."""
        return self._result.generations[-1] if self._result.generations else None

    def raw_bytes(self) -> int:
        return sum(g.spool.raw_bytes for g in self._result.generations)

    def days(self) -> int:
        return sum(len(g.spool) for g in self._result.generations)

    def discard(self) -> None:
        for g in self._result.generations:
            g.spool.discard()

    def finish(self) -> None:
        # A generation that got no rows (e.g. only a Relation message) makes no objects.
        kept = []
        for g in self._result.generations:
            if len(g.spool):
                kept.append(g)
            else:
                g.spool.discard()
        self._result.generations = kept

    def feed(self, lsn: int, data: bytes, start: int, end: int) -> bool:
        """One message; True when the read must stop here (end of a redone range)."""
        kind = data[start]
        self.after_commit = False
        if kind in _CHANGES:
            # The hot path: the tuples are read in place, without a message object.
            try:
                self._change(kind, lsn, data, start)
            except (IndexError, struct.error):
                decode(data[start:end])  # raises the DecodeError that says what is wrong
                raise
            return False
        message = decode(data[start:end])
        if isinstance(message, Begin):
            if self._redo_end is not None and message.final_lsn >= self._redo_end:
                return True
            self.in_transaction = True
            commit_ts = iso_utc(message.commit_ts).encode()
            self._ts = b"," + commit_ts + b","
            self._day = commit_ts[:10]
        elif isinstance(message, Commit):
            self.in_transaction = False
            self.after_commit = True
            self.last_end = message.end_lsn
            self._result.transactions += 1
        elif isinstance(message, Relation):
            if self._source.by_oid(message.oid) is not None:
                self.relation(message)
        elif isinstance(message, Truncate):
            for oid in message.relations:
                table = self._source.by_oid(oid)
                if table is not None:
                    fix = (
                        "re-initialise the pipeline (cdc-daemon teardown --yes, empty the "
                        "warehouse table, cdc-daemon init, run)"
                        if len(self._source.tables) == 1
                        else "empty its warehouse table, then export it again (cdc-daemon "
                        f"resync --table {table.qualified})"
                    )
                    self._fail(
                        table,
                        f"{table.qualified} was truncated (commit before LSN "
                        f"{format_lsn(lsn)}): a TRUNCATE cannot be exported as row changes; " + fix,
                    )
        return False

    def _fail(self, table: LogicalTable, reason: str) -> None:
        """One table of the group fails: its later changes are skipped (the others go on);
        the pipeline records it ``failed`` once this batch is committed."""
        if len(self._source.tables) == 1:
            raise SourceError(reason)  # a group of one: the daemon stops, as it always did
        log.error("table_failed", table=table.qualified, error=reason)
        self._result.failed[table.qualified] = reason
        self._current.pop(table.oid, None)
        self._source.deactivate(table.oid)

    def _unlogged(self, table: LogicalTable, lsn: int) -> None:
        q = table.qualified
        self._fail(
            table,
            f"a delete of {q} at LSN {format_lsn(lsn)} did not log its old row's key: "
            f"ALTER TABLE {q} REPLICA IDENTITY FULL, then cdc-daemon resync --table {q}",
        )

    def _change(self, kind: int, lsn: int, data: bytes, start: int) -> None:
        """Insert, Update or Delete at ``start`` (layouts as in ``pgoutput.decode``)."""
        (rel,) = _U32(data, start + 1)
        gen = self._current.get(rel)
        if gen is None:
            if self._source.by_oid(rel) is None:
                return  # a table outside the group (a publication made by hand may have more)
            raise CdcError(f"a change for relation {rel} came without its Relation message")
        if kind == 73:  # 'I'
            if data[start + 5] != 78:
                raise DecodeError("insert without a new tuple")
            self._row(gen, decode_tuple(data, start + 6)[0], b"I", lsn)
            return
        pos = start + 5
        old_kind = data[pos]
        if kind == 68:  # 'D'
            if old_kind not in (75, 79):
                raise DecodeError("delete without an old tuple")
            old = decode_tuple(data, pos + 1)[0]
            if UNCHANGED in old:
                self._unlogged(gen.table, lsn)
                return
            self._row(gen, old, b"D", lsn)
            return
        old_values: TupleData | None = None
        if old_kind in (75, 79):  # 'K', 'O'
            old_values, pos = decode_tuple(data, pos + 1)
        if data[pos] != 78:
            raise DecodeError("update without a new tuple")
        new = decode_tuple(data, pos + 1)[0]
        key_of = gen.key_of
        if old_values is not None and key_of is not None and key_of(old_values) != key_of(new):
            if UNCHANGED in new and old_kind != 79:
                # The new key has no earlier row to keep the unlogged value from.
                q = gen.table.qualified
                self._fail(
                    gen.table,
                    f"an update of {q} at LSN {format_lsn(lsn)} changed the key and left a "
                    "TOASTed value unchanged, which the default replica identity does not log: "
                    f"ALTER TABLE {q} REPLICA IDENTITY FULL, then cdc-daemon resync --table {q}",
                )
                return
            # The key changed: the old key is deleted (same LSN, another key).
            self._row(gen, old_values, b"D", lsn)
        if UNCHANGED in new:
            if old_kind == 79 and old_values is not None:  # the whole old row: take them
                new = [o if v is UNCHANGED else v for v, o in zip(new, old_values, strict=True)]
            else:
                # Not logged: the fields stay empty and _cdc_unchanged names them; the merge
                # keeps the warehouse's current value for them.
                names = [gen.columns[i][0] for i, v in enumerate(new) if v is UNCHANGED]
                new = [None if v is UNCHANGED else v for v in new]
                self._row(gen, new, b"U", lsn, quote(",".join(names).encode()))
                return
        self._row(gen, new, b"U", lsn)

    def _row(
        self, gen: Generation, values: list[Any], op: bytes, lsn: int, unchanged: bytes = b""
    ) -> None:
        day, fields = gen.encoder.encode(values)
        if not day and not gen.partitioned:
            day = self._day  # no partition column: the commit's UTC day
        target = gen.spool.day(day)
        pending = target.pending
        pending.append(b"%s,%s,%d%s%s\n" % (fields, op, lsn, self._ts, unchanged))
        if len(pending) >= BLOCK_ROWS:
            target.drain()
        self._result.rows += 1

    def relation(self, message: Relation) -> None:
        """A table's column list from now on (a Relation message)."""
        table = self._source.by_oid(message.oid)
        if table is None:
            return  # a table that failed during this stream
        self._source.stream_relations[message.oid] = message
        columns = tuple((c.name, c.type_oid, c.typmod) for c in message.columns)
        accepted = self._source.accepted.get(table.qualified)
        if accepted is not None and columns != accepted:
            problem = self._changed(table, accepted, columns)
            if problem is not None:
                self._fail(table, problem)
                return
        self._source.accepted[table.qualified] = columns
        current = self._current.get(message.oid)
        if current is not None and current.columns == columns:
            return
        partition = table.info.partition_name
        try:
            encoder = RowEncoder(
                [
                    ColumnType(
                        c.name, c.type_oid, self._source.array_elements.get(c.type_oid), c.typmod
                    )
                    for c in message.columns
                ],
                partition,
            )
        except ValueError as exc:
            self._fail(table, f"{table.qualified}: {exc}")
            return
        # The key (under REPLICA IDENTITY FULL pgoutput flags every column as key).
        key_index = tuple(i for i, c in enumerate(message.columns) if c.name in table.key)
        number = self._counts.get(message.oid, 0)
        self._counts[message.oid] = number + 1
        header = logical_header([c[0] for c in columns])
        judge = QuarantineJudge(header, encoder.checks(), table.key, partition)
        generation = Generation(
            columns, self._new_spool(header, judge), encoder, key_index, table, number
        )
        self._current[message.oid] = generation
        self._result.generations.append(generation)

    def _changed(
        self,
        table: LogicalTable,
        old: tuple[tuple[str, int, int], ...],
        new: tuple[tuple[str, int, int], ...],
    ) -> str | None:
        """Log a column-list change; the reason to stop at it, if any."""
        q = table.qualified
        old_names = {c[0]: c for c in old}
        new_names = {c[0]: c for c in new}
        dropped = [n for n in old_names if n not in new_names]
        retyped = [n for n in old_names if n in new_names and old_names[n] != new_names[n]]
        added = [n for n in new_names if n not in old_names]
        log.warning("columns_changed", table=q, added=added, dropped=dropped, retyped=retyped)
        if retyped and self._source._settings.capture.schema_change == "stop":
            names = ", ".join(retyped)
            return (
                f"columns of {q} changed type ({names}): Snowflake's columns keep their type. "
                "Change them in Snowflake (or drop the table's warehouse tables for "
                "`snowflake apply` to create them again), then set "
                'capture.schema_change = "follow" for one run'
                + ("" if len(self._source.tables) == 1 else f" and cdc-daemon resync --table {q}")
            )
        return None


def _translate(exc: psycopg.Error, doing: str) -> CdcError:
    if exc.sqlstate == "55006":
        # "replication slot ... is active for PID ...": the backend of a daemon that was just
        # killed has not noticed yet; it goes away on its own.
        return TransientError(f"{doing}: {str(exc).strip().splitlines()[0]}")
    if exc.sqlstate in ("55000", "42704"):
        return SourceError(f"{doing}: {str(exc).strip().splitlines()[0]}")
    return from_psycopg(exc, doing)
