"""pgoutput messages of one read -> spooled CSV rows (``ChangeReader``, one per batch): one
generation (spool) per table and column list; inserts, updates (a key change writes a ``D``
for the old key), deletes, unchanged TOASTed values named in ``_cdc_unchanged``, column-list
changes and TRUNCATE (the table fails). The rules are in docs/logical.md."""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from cdc_daemon.batch.spool import BLOCK_ROWS, DaySpool
from cdc_daemon.capture.logical.encode import ColumnType, RowEncoder
from cdc_daemon.capture.logical.keyless import row_id
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
)
from cdc_daemon.capture.logical.tables import LogicalTable, logical_header, type_text
from cdc_daemon.errors import CdcError, SourceError
from cdc_daemon.source.hotpath import Core
from cdc_daemon.source.values import QuarantineJudge, quote
from cdc_daemon.warehouse.model import retype_problem


class Group(Protocol):
    """What the reader needs of the group's source (``source.LogicalSource``)."""

    # The column list accepted so far per table, the array types' elements, the latest
    # Relation message of each table on this stream.
    accepted: dict[str, tuple[tuple[str, int, int], ...]]
    array_elements: dict[int, int]
    stream_relations: dict[int, Relation]
    # Tables with a widened column whose Snowflake columns are not known to follow it yet:
    # widened before the next batch is recorded.
    widened: set[str]

    @property
    def tables(self) -> list[LogicalTable]: ...

    @property
    def schema_change(self) -> str: ...

    def by_oid(self, oid: int) -> LogicalTable | None: ...

    def deactivate(self, oid: int) -> None: ...


log = structlog.get_logger()

_U32 = struct.Struct(">I").unpack_from
_CHANGES = frozenset(b"IUD")


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
    # The positions in a change's tuple of the columns captured (None: all of them): the
    # others (exclude_columns) are dropped before the row is encoded.
    keep: tuple[int, ...] | None = None
    # Every column's name, by its position in a change's tuple.
    sent: tuple[str, ...] = ()
    # Rewrites the hash_columns' fields of an encoded row (None: the table hashes none).
    hash_fields: Callable[[bytes], bytes] | None = None
    # The key columns of a tuple, compared as one value (None: no key).
    key_of: Callable[[TupleData], object] | None = field(init=False, repr=False)
    # The table has a partition column (else a row goes to its commit's day); read per row.
    partitioned: bool = field(init=False, repr=False)
    # The compiled core when a change can go from its message to its line there (every
    # column kept, none hashed), else None (``source.hotpath``); its key columns for it.
    core: Core | None = field(init=False, repr=False)
    core_keys: bytes = field(init=False, repr=False)

    # No key: each row is written with its identity, an update as two rows (``keyless``).
    keyless: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.key_of = operator.itemgetter(*self.key_index) if self.key_index else None
        self.partitioned = self.table.info.partition is not None
        self.keyless = self.table.keyless
        # A keyless table's lines carry its own _cdc_seq and _cdc_row: the Python path.
        direct = self.keep is None and self.hash_fields is None and not self.keyless
        self.core = self.encoder.core if direct else None
        self.core_keys = b"".join(i.to_bytes(2) for i in self.key_index)

    @property
    def header(self) -> list[str]:
        return logical_header([c[0] for c in self.columns], self.keyless)


SpoolFactory = Callable[[list[str], QuarantineJudge], DaySpool]


class ChangeReader:
    """Turns the messages of one read into spooled CSV rows (one instance per batch): one
    generation (spool) per table and column list."""

    def __init__(
        self,
        source: Group,
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
        self._commit = 0  # the transaction's commit LSN
        self._number = 0  # rows of keyless tables the transaction wrote so far
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
            self._commit = message.final_lsn
            self._number = 0
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
        q = table.table
        self._fail(
            table,
            f"a delete of {q} at LSN {format_lsn(lsn)} did not log its old row's key: "
            f"ALTER TABLE {q} REPLICA IDENTITY FULL, then cdc-daemon resync --table {q}",
        )

    def _not_full(self, table: LogicalTable, lsn: int) -> None:
        q = table.table
        self._fail(
            table,
            f"a change of the keyless table {q} at LSN {format_lsn(lsn)} did not log its whole "
            f"old row, which a keyless table needs to know the row: ALTER TABLE {q} REPLICA "
            f"IDENTITY FULL, then cdc-daemon resync --table {q}",
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
            if gen.core is not None and self._direct(gen, data, start + 6, b"I", lsn):
                return
            self._row(gen, self._decode_tuple(gen, data, start + 6)[0], b"I", lsn)
            return
        pos = start + 5
        old_kind = data[pos]
        if kind == 68:  # 'D'
            if old_kind not in (75, 79):
                raise DecodeError("delete without an old tuple")
            # An old tuple holding an unchanged value is not encoded here: the table fails.
            if gen.core is not None and self._direct(gen, data, pos + 1, b"D", lsn):
                return
            old = self._decode_tuple(gen, data, pos + 1)[0]
            if gen.keyless and old_kind != 79:
                self._not_full(gen.table, lsn)
                return
            if UNCHANGED in old:
                self._unlogged(gen.table, lsn)
                return
            self._row(gen, old, b"D", lsn)
            return
        # The common update (the key unchanged, every value logged) in the core; the others
        # below (a key change writes a D first, unchanged values are filled or named).
        if (core := gen.core) is not None and (
            found := core.encode_update(
                data,
                pos,
                gen.encoder.plan,
                gen.encoder.partition_index,
                gen.core_keys,
                lsn,
                self._ts,
            )
        ):
            self._line(gen, *found)
            return
        old_values: TupleData | None = None
        if old_kind in (75, 79):  # 'K', 'O'
            old_values, pos = self._decode_tuple(gen, data, pos + 1)
        if data[pos] != 78:
            raise DecodeError("update without a new tuple")
        new = self._decode_tuple(gen, data, pos + 1)[0]
        if gen.keyless:
            if old_kind != 79 or old_values is None:
                self._not_full(gen.table, lsn)
                return
            # One copy of the old row goes, one of the new row comes (FULL logs the old row
            # whole, so an unchanged TOASTed value is taken from it).
            self._row(gen, old_values, b"D", lsn)
            if UNCHANGED in new:
                new = [o if v is UNCHANGED else v for v, o in zip(new, old_values, strict=True)]
            self._row(gen, new, b"U", lsn)
            return
        key_of = gen.key_of
        if old_values is not None and key_of is not None and key_of(old_values) != key_of(new):
            if UNCHANGED in new and old_kind != 79:
                # The new key has no earlier row to keep the unlogged value from.
                q = gen.table.table
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
                kept = range(len(new)) if gen.keep is None else gen.keep
                sent = gen.sent or tuple(c[0] for c in gen.columns)
                names = [sent[i] for i in kept if new[i] is UNCHANGED]
                if not names:  # only left-out columns were unchanged
                    self._row(gen, new, b"U", lsn)
                    return
                new = [None if v is UNCHANGED else v for v in new]
                self._row(gen, new, b"U", lsn, quote(",".join(names).encode()))
                return
        self._row(gen, new, b"U", lsn)

    def _direct(self, gen: Generation, data: bytes, pos: int, op: bytes, lsn: int) -> bool:
        """The tuple at ``pos`` straight to its line in the compiled core; False when the
        core declines it (then the caller decodes it and takes the Python path)."""
        assert gen.core is not None
        found = gen.core.encode_change(
            data, pos, gen.encoder.plan, gen.encoder.partition_index, op, lsn, self._ts
        )
        if found is None:
            return False
        self._line(gen, *found)
        return True

    @staticmethod
    def _decode_tuple(gen: Generation, data: bytes, pos: int) -> tuple[TupleData, int]:
        """``pgoutput.decode_tuple``, in the compiled core when there is one (which leaves a
        malformed tuple to the Python decoder, for its error)."""
        core = gen.encoder.core
        if core is not None and (found := core.decode_tuple(data, pos, UNCHANGED)) is not None:
            return found
        return decode_tuple(data, pos)

    def _row(
        self, gen: Generation, values: list[Any], op: bytes, lsn: int, unchanged: bytes = b""
    ) -> None:
        if gen.keep is not None:
            values = [values[i] for i in gen.keep]
        day, fields = gen.encoder.encode(values)
        if gen.hash_fields is not None:
            fields = gen.hash_fields(fields)
        if gen.keyless:
            self._number += 1
            line = b"%s,%s,%d%s,%d,%s\n" % (
                fields,
                op,
                self._commit,
                self._ts,
                self._number,
                row_id(fields),
            )
        else:
            line = b"%s,%s,%d%s%s\n" % (fields, op, lsn, self._ts, unchanged)
        self._line(gen, day, line)

    def _line(self, gen: Generation, day: bytes, line: bytes) -> None:
        """One object line into the spool of its day."""
        if not day and not gen.partitioned:
            day = self._day  # no partition column: the commit's UTC day
        target = gen.spool.day(day)
        pending = target.pending
        pending.append(line)
        if len(pending) >= BLOCK_ROWS:
            target.drain()
        self._result.rows += 1

    def relation(self, message: Relation) -> None:
        """A table's column list from now on (a Relation message)."""
        table = self._source.by_oid(message.oid)
        if table is None:
            return  # a table that failed during this stream
        self._source.stream_relations[message.oid] = message
        captured = [c for c in message.columns if table.captures(c.name)]
        columns = tuple((c.name, c.type_oid, c.typmod) for c in captured)
        accepted = self._source.accepted.get(table.qualified)
        if accepted is not None and columns != accepted:
            problem = self._changed(table, accepted, columns)
            if (
                problem is None
                and table.keyless
                and [c[0] for c in columns] != [c[0] for c in accepted]
            ):
                # A row's identity is all its values: with a column added or dropped, a later
                # change of a row could no longer name the copy it changes.
                q = table.table
                problem = (
                    f"columns of the keyless table {q} were added or dropped, which changes "
                    "every row's identity (_cdc_row): run cdc-daemon snowflake apply, then "
                    f"export it again with cdc-daemon resync --table {q} (its new snapshot "
                    "replaces the warehouse's rows)"
                )
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
                    for c in captured
                ],
                partition,
                table.info.hashed,
            )
        except ValueError as exc:
            self._fail(table, f"{table.qualified}: {exc}")
            return
        # The key (under REPLICA IDENTITY FULL pgoutput flags every column as key).
        key_index = tuple(i for i, c in enumerate(message.columns) if c.name in table.key)
        number = self._counts.get(message.oid, 0)
        self._counts[message.oid] = number + 1
        header = logical_header([c[0] for c in columns], table.keyless)
        judge = QuarantineJudge(header, encoder.checks(), table.key, partition)
        keep = None
        if len(captured) < len(message.columns):
            keep = tuple(i for i, c in enumerate(message.columns) if table.captures(c.name))
        generation = Generation(
            columns,
            self._new_spool(header, judge),
            encoder,
            key_index,
            table,
            number,
            keep,
            tuple(c.name for c in message.columns),
            table.field_hasher([c.name for c in captured]),
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
        q = table.table
        old_names = {c[0]: c for c in old}
        new_names = {c[0]: c for c in new}
        dropped = [n for n in old_names if n not in new_names]
        retyped = [n for n in old_names if n in new_names and old_names[n] != new_names[n]]
        added = [n for n in new_names if n not in old_names]
        log.warning(
            "columns_changed", table=table.qualified, added=added, dropped=dropped, retyped=retyped
        )
        types = {n: (type_text(*old_names[n][1:]), type_text(*new_names[n][1:])) for n in retyped}
        problems = {n: retype_problem(a, b) for n, (a, b) in types.items()}
        refused = {n: why for n, why in problems.items() if why is not None}
        widened = [n for n in retyped if n not in refused]
        if widened:
            # Followed: its values keep their text; Snowflake's columns are widened before the
            # first batch holding the new type is recorded (capture.logical.pipeline).
            self._source.widened.add(table.qualified)
            log.warning(
                "columns_widened",
                table=table.qualified,
                columns={n: f"{types[n][0]} -> {types[n][1]}" for n in widened},
            )
        if refused and self._source.schema_change == "stop":
            names = ", ".join(
                f"{n}: {types[n][0]} -> {types[n][1]}, {why}" for n, why in refused.items()
            )
            return (
                f"columns of {q} changed type ({names}): not a widening Snowflake follows, so its "
                "columns keep their type. Change them in Snowflake (or drop the table's "
                "warehouse tables for `snowflake apply` to create them again), then set "
                'capture.schema_change = "follow" for one run'
                + ("" if len(self._source.tables) == 1 else f" and cdc-daemon resync --table {q}")
            )
        return None
