"""The logical capture's hot path (``ChangeReader.feed`` reading Insert/Update/Delete tuples
in place) against the plain path (``pgoutput.decode`` + ``RowEncoder.encode_reference``), on
the real messages of ``data/pgoutput_v1.json``."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdc_daemon.batch.spool import DaySpool
from cdc_daemon.capture.logical.pgoutput import (
    UNCHANGED,
    Begin,
    DecodeError,
    Delete,
    Insert,
    Relation,
    Truncate,
    TupleData,
    Update,
    decode,
    iso_utc,
)
from cdc_daemon.capture.logical.reader import ChangeReader, ReadResult
from cdc_daemon.capture.logical.source import LogicalSource
from cdc_daemon.capture.logical.tables import LogicalTable
from cdc_daemon.config import load_settings
from cdc_daemon.errors import SourceError
from cdc_daemon.source.table import Column, TableInfo
from cdc_daemon.source.values import QuarantineJudge
from tests.unit.test_pgoutput import MESSAGES

T_OID = next(m.oid for _, d in MESSAGES if isinstance(m := decode(d), Relation) and m.name == "t")
# The messages of table t, minus the update whose TOASTed value was not logged (the reader
# refuses it, by design) and the TRUNCATE's transaction.
T_MESSAGES = [
    (lsn, data)
    for lsn, data in MESSAGES
    if not isinstance(m := decode(data), Insert | Update | Delete | Relation | Truncate)
    or (
        (getattr(m, "relation", None) or getattr(m, "oid", None)) == T_OID
        and not (isinstance(m, Update) and UNCHANGED in m.new)
    )
]


def _reader(tmp_path: Path, schema_change: str = "stop") -> tuple[ChangeReader, list[DaySpool]]:
    settings = load_settings(
        None,
        postgres={"dsn": "postgresql://localhost/x", "table": "public.ecommerce_sales"},
        s3={"bucket": "b"},
        capture={"mode": "logical", "partition_column": "at", "schema_change": schema_change},
    )
    relation = next(m for _, d in T_MESSAGES if isinstance(m := decode(d), Relation))
    columns = tuple(Column(c.name, "text") for c in relation.columns)
    source = LogicalSource(settings)
    table = LogicalTable(
        TableInfo("public", "t", columns, columns[0], columns[3]),
        T_OID,
        ("id",),
        "d",
        (),
        tuple((c.name, c.type_oid, c.typmod) for c in relation.columns),
    )
    source._tables, source._by_oid = [table], {T_OID: table}
    spools: list[DaySpool] = []

    def new_spool(header: list[str], judge: QuarantineJudge) -> DaySpool:
        spools.append(DaySpool(tmp_path, "none", 0, b"", judge=judge))
        return spools[-1]

    return ChangeReader(source, ReadResult(0, None, 0), new_spool, 0, None), spools


def test_hot_path_writes_what_the_plain_decoder_gives(tmp_path: Path) -> None:
    """Every row the reader spools equals decode() + encode_reference() + the _cdc_* suffix,
    for inserts (NULL, '', quoting, bytea, an enum), a key-changing update (D + U) and a
    key-only delete."""
    reader, spools = _reader(tmp_path)
    expected: list[dict[bytes, list[bytes]]] = []
    tail = b""
    generation = None
    for lsn, data in T_MESSAGES:
        reader.feed(lsn, data, 0, len(data))
        message = decode(data)
        if isinstance(message, Begin):
            # _cdc_ts, then an empty _cdc_unchanged (t's values are all logged).
            tail = b"," + iso_utc(message.commit_ts).encode() + b",\n"
        if reader._generation is not generation:  # a new column list: a new spool
            generation = reader._generation
            expected.append({})
        rows: list[tuple[TupleData, bytes]] = []
        if isinstance(message, Insert):
            rows = [(message.new, b"I")]
        elif isinstance(message, Update):
            assert message.old is not None  # the key changed: the old key is deleted
            rows = [(message.old, b"D"), (message.new, b"U")]
        elif isinstance(message, Delete):
            rows = [(message.old, b"D")]
        for values, op in rows:
            assert reader._generation is not None
            day, row = reader._generation.encoder.encode_reference(values)
            expected[-1].setdefault(day, []).append(row + b",%s,%d" % (op, lsn) + tail)
    reader.finish()
    assert len(spools) == len(expected) == 2
    for spool, want in zip(spools, expected, strict=True):
        got = {o.day.encode(): o.path.read_bytes() for o in spool.finish()}
        assert {k or b"unknown": b"".join(v) for k, v in want.items()} == got
        spool.discard()
    assert sum(len(v) for want in expected for v in want.values()) == 6


@pytest.mark.parametrize("index", [i for i, (_, d) in enumerate(T_MESSAGES) if d[0] in b"IUD"])
def test_truncated_change_is_a_decode_error(tmp_path: Path, index: int) -> None:
    """A change message cut anywhere raises DecodeError (what ``read`` turns into one clear
    sentence), never an IndexError or struct.error from the in-place reading."""
    reader, spools = _reader(tmp_path)
    relation = next(d for _, d in T_MESSAGES if d[0] == ord("R"))
    reader.feed(0, relation, 0, len(relation))
    lsn, data = T_MESSAGES[index]
    for cut in range(1, len(data)):
        with pytest.raises(DecodeError):
            reader.feed(lsn, data[:cut], 0, cut)
    for spool in spools:
        spool.discard()


def _relation() -> Relation:
    return next(m for _, d in T_MESSAGES if isinstance(m := decode(d), Relation))


def _accepted_with(
    relation: Relation, **types: tuple[int, int]
) -> tuple[tuple[str, int, int], ...]:
    """The relation's column list with some columns of another (oid, typmod): what the ledger
    held before the column was retyped."""
    return tuple((c.name, *types.get(c.name, (c.type_oid, c.typmod))) for c in relation.columns)


def test_a_widened_column_is_followed_and_marks_its_table(tmp_path: Path) -> None:
    """Table t's columns were varchar(10) and numeric(10,3) and are now text and numeric(12,3):
    widenings. The Relation message is followed (a new column list, no failure) and the table
    is marked for Snowflake to widen its columns."""
    reader, spools = _reader(tmp_path)
    relation = _relation()
    source = reader._source
    source.accepted["public.t"] = _accepted_with(
        relation, name=(1043, 14), price=(1700, ((10 << 16) | 3) + 4)
    )
    reader.relation(relation)
    assert source.widened == {"public.t"}
    assert source.accepted["public.t"] == _accepted_with(relation)
    assert len(spools) == 1  # the new column list's spool


def test_another_retype_stops_the_table_naming_types_reason_and_way(tmp_path: Path) -> None:
    """price was numeric(12,2) and is numeric(12,3) (another scale), at was timestamp and is
    timestamptz: a group of one stops with both columns, their old and new types, why neither
    is a widening and the way forward; with schema_change = "follow" it is followed."""
    reader, _ = _reader(tmp_path)
    relation = _relation()
    old = _accepted_with(relation, price=(1700, ((12 << 16) | 2) + 4), at=(1114, -1))
    reader._source.accepted["public.t"] = old
    with pytest.raises(SourceError) as stopped:
        reader.relation(relation)
    message = str(stopped.value)
    assert "price: numeric(12,2) -> numeric(12,3), another scale" in message
    assert "at: timestamp without time zone -> timestamp with time zone, TIMESTAMP_NTZ" in message
    assert 'capture.schema_change = "follow"' in message
    assert reader._source.widened == set()

    follow, _ = _reader(tmp_path, schema_change="follow")
    follow._source.accepted["public.t"] = old
    follow.relation(relation)
    assert follow._source.accepted["public.t"] == _accepted_with(relation)
