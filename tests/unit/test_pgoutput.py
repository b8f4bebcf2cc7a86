"""The pgoutput decoder on real bytes captured from PostgreSQL 15 (``capture_pgoutput.py``)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_daemon.capture.logical.pgoutput import (
    UNCHANGED,
    Begin,
    Commit,
    DecodeError,
    Delete,
    Ignored,
    Insert,
    Relation,
    Truncate,
    Update,
    decode,
    format_lsn,
    iso_utc,
    parse_lsn,
)

FIXTURE = json.loads((Path(__file__).parent / "data" / "pgoutput_v1.json").read_text())
MESSAGES = [(parse_lsn(m["lsn"]), bytes.fromhex(m["data"])) for m in FIXTURE["messages"]]
DECODED = [decode(data) for _, data in MESSAGES]


M = TypeVar("M")


def of(kind: type[M]) -> list[M]:
    """The decoded messages of one kind, in stream order."""
    return [m for m in DECODED if isinstance(m, kind)]


def test_transactions_are_framed_by_begin_and_commit() -> None:
    """Every Begin is followed, before the next Begin, by a Commit with the same commit LSN and
    timestamp; the row LSN of a Commit is the transaction's end LSN, and commits are ordered."""
    begin: Begin | None = None
    ends = []
    for (lsn, _), message in zip(MESSAGES, DECODED, strict=True):
        if isinstance(message, Begin):
            assert begin is None
            begin = message
        elif isinstance(message, Commit):
            assert begin is not None
            assert (message.commit_lsn, message.commit_ts) == (begin.final_lsn, begin.commit_ts)
            assert message.end_lsn == lsn > message.commit_lsn
            ends.append(message.end_lsn)
            begin = None
        else:
            assert begin is not None, message
    assert begin is None
    assert ends == sorted(ends)
    assert len(ends) == 9


def test_relation_lists_columns_types_and_key() -> None:
    """The Relation message names the table, its replica identity and every column with type
    OID, typmod and whether it is part of the key; an added column shows up in a later one."""
    t = [r for r in of(Relation) if r.name == "t"]
    first, last = t[0], t[-1]
    assert (first.namespace, first.replica_identity) == ("public", "d")
    assert [c.name for c in first.columns] == ["id", "name", "price", "at", "raw", "note", "m"]
    assert [c.type_oid for c in first.columns[:6]] == [20, 25, 1700, 1184, 17, 25]
    assert first.columns[2].typmod == (12 << 16 | 3) + 4  # numeric(12,3)
    assert [c.key for c in first.columns] == [True] + [False] * 6
    assert [c.name for c in last.columns][-1] == "extra"
    f = next(r for r in of(Relation) if r.name == "f")
    assert f.replica_identity == "f"
    assert all(c.key for c in f.columns)


def test_insert_values_are_text_with_null_and_empty_apart() -> None:
    """Values come in text output form, byte for byte (quotes, commas, newlines, UTF-8);
    NULL is None and the empty string is b''."""
    first, second = of(Insert)[:2]
    assert first.new == [
        b"1",
        'a,b "q"\nx £'.encode(),
        b"1.500",
        b"2011-03-27 00:30:00.25+00",
        b"\\x00ff",
        None,
        b"ok",
    ]
    assert second.new[:5] == [b"2", b"", None, None, None]
    assert second.new[5] == b"z" * 10000


def test_unchanged_toast_is_marked_never_empty() -> None:
    """An update that leaves a TOASTed value alone sends 'u' for it: decoded as UNCHANGED,
    distinct from NULL and from ''. Under the default identity there is no old row."""
    update = of(Update)[0]
    assert update.old is None
    assert update.old_kind is None
    assert update.new[5] is UNCHANGED
    assert update.new[:3] == [b"2", b"", b"2.000"]


def test_key_change_and_delete_carry_the_old_key() -> None:
    """An update changing the key sends the old key ('K', other columns NULL); so does a delete
    under the default identity. REPLICA IDENTITY FULL sends the whole old row ('O')."""
    key_change = of(Update)[1]
    assert key_change.old_kind == "K"
    assert key_change.old == [b"1", None, None, None, None, None, None]
    assert key_change.new[0] == b"3"
    delete = of(Delete)[0]
    assert (delete.old_kind, delete.old[0]) == ("K", b"3")
    full_update = of(Update)[2]
    assert (full_update.old_kind, full_update.old, full_update.new) == (
        "O",
        [b"1", b"one"],
        [b"1", b"uno"],
    )
    full_delete = of(Delete)[1]
    assert (full_delete.old_kind, full_delete.old) == ("O", [b"1", b"uno"])


def test_truncate_type_and_ignored_messages() -> None:
    """TRUNCATE of two tables is one message naming both; Type messages are ignored safely."""
    (truncate,) = of(Truncate)
    oids = {r.name: r.oid for r in of(Relation)}
    assert set(truncate.relations) == {oids["t"], oids["f"]}
    assert {m.kind for m in of(Ignored)} == {"Y"}


def test_commit_time_is_iso_utc() -> None:
    """_cdc_ts: the commit time as YYYY-MM-DDTHH:MM:SS.ffffffZ."""
    assert iso_utc(0) == "2000-01-01T00:00:00.000000Z"
    assert iso_utc(1_500_001) == "2000-01-01T00:00:01.500001Z"
    assert iso_utc(of(Begin)[0].commit_ts).startswith("20")


def test_lsn_text_round_trip() -> None:
    """An LSN in PostgreSQL's X/Y hex text parses to its 64-bit position and formats back to the
    same text."""
    assert parse_lsn("0/150B8C8") == 0x150B8C8
    assert format_lsn(parse_lsn("1A/FF00")) == "1A/FF00"


@pytest.mark.parametrize("cut", [1, 3, 7, 12])
def test_truncated_messages_are_refused(cut: int) -> None:
    """A message cut short is a DecodeError, never a wrong value."""
    for data in (MESSAGES[0][1], MESSAGES[3][1], MESSAGES[2][1]):
        if cut < len(data):
            with pytest.raises(DecodeError):
                decode(data[:cut])


@given(st.binary(max_size=64))
def test_garbage_never_crashes_differently(data: bytes) -> None:
    """Any bytes decode to a message or raise DecodeError, nothing else."""
    with contextlib.suppress(DecodeError):
        decode(data)
