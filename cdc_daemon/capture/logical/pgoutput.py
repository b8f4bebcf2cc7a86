"""A decoder for PostgreSQL's ``pgoutput`` logical replication messages, protocol version 1.

Pure: bytes in, messages out. The messages are the payloads of the stream's XLogData messages
(the same bytes as the ``data`` column of ``pg_logical_slot_peek_binary_changes``); the
change's own LSN is XLogData's ``dataStart``, not part of the message. Layouts: PostgreSQL's
"Logical Replication Message Formats".

Decoded: Begin, Commit, Relation, Insert, Update, Delete, Truncate. Type, Origin and logical
decoding Message are recognised and returned as ``Ignored`` (they carry nothing the capture
needs); anything else is a ``DecodeError``.

Tuple values arrive in their text output form, in the decoding session's settings (the
capture's session uses TimeZone=UTC, DateStyle=ISO, so they match the watermark path's COPY).
A column is one of: a ``bytes`` value, ``None`` (SQL NULL), or ``UNCHANGED``: an unchanged
TOASTed value that PostgreSQL did not log. ``UNCHANGED`` must never be written out as a value
(see ``capture.logical.source`` for how the capture fills it in from the old row, and refuses
when it cannot).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final


class DecodeError(ValueError):
    """The bytes are not a pgoutput v1 message this decoder understands."""


class _Unchanged:
    """An unchanged TOASTed column ('u'): the value was not logged."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()

Value = bytes | None | _Unchanged
TupleData = list[Value]

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

_U8 = struct.Struct(">B").unpack_from
_U16 = struct.Struct(">H").unpack_from
_I32 = struct.Struct(">i").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from
_I64 = struct.Struct(">q").unpack_from
_BEGIN = struct.Struct(">QqI").unpack_from
_COMMIT = struct.Struct(">BQQq").unpack_from


def pg_timestamp(micros: int) -> datetime:
    """A pgoutput timestamp (microseconds since 2000-01-01 UTC) as an aware datetime."""
    return _PG_EPOCH + timedelta(microseconds=micros)


def iso_utc(micros: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ``: the format of ``_cdc_ts`` in both capture modes."""
    return pg_timestamp(micros).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int  # the LSN of the commit record (= Commit.commit_lsn)
    commit_ts: int  # microseconds since 2000-01-01 UTC
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int  # where the commit record starts
    end_lsn: int  # where it ends: the position just past this transaction
    commit_ts: int


@dataclass(frozen=True, slots=True)
class RelationColumn:
    name: str
    type_oid: int
    typmod: int
    key: bool  # part of the replica identity


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    namespace: str
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[RelationColumn, ...]


@dataclass(frozen=True, slots=True)
class Insert:
    relation: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    relation: int
    old_kind: str | None  # 'K' key columns only, 'O' the whole old row, None: not sent
    old: TupleData | None
    new: TupleData


@dataclass(frozen=True, slots=True)
class Delete:
    relation: int
    old_kind: str  # 'K' or 'O'
    old: TupleData


@dataclass(frozen=True, slots=True)
class Truncate:
    relations: tuple[int, ...]
    options: int  # 1: CASCADE, 2: RESTART IDENTITY


@dataclass(frozen=True, slots=True)
class Ignored:
    kind: str  # 'Y' type, 'O' origin, 'M' logical decoding message


Message = Begin | Commit | Relation | Insert | Update | Delete | Truncate | Ignored


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(0, pos)
    return buf[pos:end].decode(), end + 1


def decode_tuple(buf: bytes, pos: int) -> tuple[TupleData, int]:
    """TupleData at ``pos``: the values and the position after them. (The hot loop of the
    capture: one branch and one slice per text value.)"""
    (count,) = _U16(buf, pos)
    pos += 2
    values: TupleData = [None] * count
    u32 = _U32
    for i in range(count):
        kind = buf[pos]
        if kind == 116:  # 't': text
            start = pos + 5
            pos = start + u32(buf, pos + 1)[0]
            values[i] = buf[start:pos]
        elif kind == 110:  # 'n': NULL
            pos += 1
        elif kind == 117:  # 'u': unchanged TOASTed value, not sent
            values[i] = UNCHANGED
            pos += 1
        else:
            # 'b' (binary) only comes with the 'binary' option, which the capture never sets.
            raise DecodeError(f"unexpected tuple value kind {chr(kind)!r}")
    if pos > len(buf):
        raise DecodeError("tuple data runs past the end of the message")
    return values, pos


def decode(buf: bytes) -> Message:
    """One pgoutput message."""
    if not buf:
        raise DecodeError("empty message")
    kind = buf[0]
    try:
        if kind == 73:  # 'I'
            (rel,) = _U32(buf, 1)
            if buf[5] != 78:
                raise DecodeError("insert without a new tuple")
            new, _ = decode_tuple(buf, 6)
            return Insert(rel, new)
        if kind == 85:  # 'U'
            (rel,) = _U32(buf, 1)
            pos = 5
            old_kind: str | None = None
            old: TupleData | None = None
            if buf[pos] in (75, 79):  # 'K', 'O'
                old_kind = chr(buf[pos])
                old, pos = decode_tuple(buf, pos + 1)
            if buf[pos] != 78:
                raise DecodeError("update without a new tuple")
            new, _ = decode_tuple(buf, pos + 1)
            return Update(rel, old_kind, old, new)
        if kind == 68:  # 'D'
            (rel,) = _U32(buf, 1)
            if buf[5] not in (75, 79):
                raise DecodeError("delete without an old tuple")
            old, _ = decode_tuple(buf, 6)
            return Delete(rel, chr(buf[5]), old)
        if kind == 66:  # 'B'
            final_lsn, ts, xid = _BEGIN(buf, 1)
            return Begin(final_lsn, ts, xid)
        if kind == 67:  # 'C'
            flags, commit_lsn, end_lsn, ts = _COMMIT(buf, 1)
            return Commit(flags, commit_lsn, end_lsn, ts)
        if kind == 82:  # 'R'
            return _relation(buf)
        if kind == 84:  # 'T'
            (count,) = _U32(buf, 1)
            options = buf[5]
            oids = struct.unpack_from(f">{count}I", buf, 6)
            return Truncate(tuple(oids), options)
        if kind in (89, 79, 77):  # 'Y' type, 'O' origin, 'M' message
            return Ignored(chr(kind))
    except (IndexError, struct.error, ValueError) as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(f"truncated or malformed {chr(kind)!r} message: {exc}") from None
    raise DecodeError(f"unknown pgoutput message type {chr(kind)!r}")


def _relation(buf: bytes) -> Relation:
    (oid,) = _U32(buf, 1)
    namespace, pos = _string(buf, 5)
    name, pos = _string(buf, pos)
    identity = chr(buf[pos])
    (count,) = _U16(buf, pos + 1)
    pos += 3
    columns = []
    for _ in range(count):
        flags = buf[pos]
        column, pos = _string(buf, pos + 1)
        type_oid, typmod = struct.unpack_from(">Ii", buf, pos)
        pos += 8
        columns.append(RelationColumn(column, type_oid, typmod, bool(flags & 1)))
    return Relation(oid, namespace, name, identity, tuple(columns))
