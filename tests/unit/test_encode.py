"""pgoutput text values -> CSV row bytes (the watermark COPY's format). Pure; the comparison
against PostgreSQL's own COPY output is in tests/integration/test_logical.py."""

from __future__ import annotations

import csv
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_daemon.capture.logical.encode import (
    BYTEA,
    DATE,
    FLOAT8,
    INT8,
    NUMERIC,
    TEXT,
    TIMESTAMP,
    TIMESTAMPTZ,
    ColumnType,
    RowEncoder,
)
from cdc_daemon.capture.logical.pgoutput import TupleData

COLUMNS = [
    ColumnType("id", INT8),
    ColumnType("at", TIMESTAMPTZ),
    ColumnType("note", TEXT),
    ColumnType("n", NUMERIC),
    ColumnType("f", FLOAT8),
    ColumnType("b", BYTEA),
    ColumnType("local", TIMESTAMP),
    ColumnType("d", DATE),
]
ENCODER = RowEncoder(COLUMNS, "at")


def row(**values: bytes | None) -> TupleData:
    base: dict[str, bytes | None] = {
        "id": b"1",
        "at": b"2011-03-27 00:30:00+00",
        "note": b"x",
        "n": b"1.50",
        "f": b"0.1",
        "b": b"\\x00ff",
        "local": b"2011-01-01 10:00:00",
        "d": b"2011-01-02",
    }
    base.update(values)
    return [base[c.name] for c in COLUMNS]


def test_plain_row() -> None:
    """Timestamps become ISO-8601 with a T (+00:00 for timestamptz), bytea hex loses its \\x,
    the day is the partition value's UTC date."""
    day, data = ENCODER.encode(row())
    assert day == b"2011-03-27"
    assert data == b"1,2011-03-27T00:30:00+00:00,x,1.50,0.1,00ff,2011-01-01T10:00:00,2011-01-02"


@pytest.mark.parametrize(
    ("text", "out"),
    [
        (b"2010-12-01 08:26:00.123456+00", b"2010-12-01T08:26:00.123456+00:00"),
        (b"2011-03-27 00:30:00.25+00", b"2011-03-27T00:30:00.25+00:00"),
        (b"0044-03-15 12:00:00+00", b"0044-03-15T12:00:00+00:00"),
        (b"infinity", b"infinity"),
        (b"-infinity", b"-infinity"),
        (b"0044-03-15 12:00:00+00 BC", b"0044-03-15 12:00:00+00 BC"),
        (b"10000-01-01 00:00:00+00", b"10000-01-01 00:00:00+00"),
    ],
)
def test_timestamptz_forms(text: bytes, out: bytes) -> None:
    """timestamptz text as pgoutput sends it becomes ISO-8601 with a T and +00:00, keeping the
    fraction as sent; infinity, BC dates and years past 9999 are passed through unchanged."""
    _, data = ENCODER.encode(row(at=text))
    assert data.split(b",")[1] == out


def test_null_empty_and_quoting() -> None:
    """NULL is an empty unquoted field, '' is "", and a value with a comma, quote, CR or LF is
    quoted with doubled quotes; an empty bytea is an empty string."""
    _, data = ENCODER.encode(row(note=b"", b=b"\\x", d=None))
    assert data.split(b",")[2] == b'""'
    assert data.split(b",")[5] == b'""'
    assert data.endswith(b",")
    _, data = ENCODER.encode(row(note=b'a,"b"\r\nc'))
    assert b',"a,""b""\r\nc",' in data


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("n", b"NaN", b"!nan-n"),
        ("n", b"Infinity", b"!numeric_out_of_range-n"),
        ("n", b"1" * 39, b"!numeric_out_of_range-n"),
        ("n", b"0." + b"1" * 38, b"!numeric_inexact-n"),
        ("n", b"1" * 30, b"!numeric_out_of_range-n"),
        ("d", b"infinity", b"!infinite-d"),
        ("d", b"0001-01-01 BC", b"!before_year_1-d"),
        ("local", b"10000-01-01 00:00:00", b"!after_year_9999-local"),
        ("note", b"x" * (16 * 1024 * 1024 + 1), b"!longer_than_16mb-note"),
    ],
)
def test_quarantine_reasons(column: str, value: bytes, reason: bytes) -> None:
    """Values Snowflake cannot read back route the row to !<reason>-<column>."""
    day, _ = ENCODER.encode(row(**{column: value}))
    assert day == reason


def test_float_specials_load_as_snowflakes() -> None:
    """Float NaN and infinities are not quarantined: they are written as Snowflake's FLOAT
    reads them (NaN, inf, -inf), the row in its own day."""
    for value, written in ((b"NaN", b"NaN"), (b"Infinity", b"inf"), (b"-Infinity", b"-inf")):
        day, data = ENCODER.encode(row(f=value))
        assert day == b"2011-03-27"
        assert data.split(b",")[4] == written


def test_first_reason_in_column_order() -> None:
    """A row with several values Snowflake cannot read is routed by the first of them in column
    order (n before f)."""
    day, _ = ENCODER.encode(row(n=b"NaN", d=b"infinity"))
    assert day == b"!nan-n"


def test_no_partition_value_is_unknown_day() -> None:
    """A NULL partition value gives the empty day (the spool's 'unknown' object), not an error."""
    assert ENCODER.encode(row(at=None))[0] == b""


@given(st.lists(st.one_of(st.none(), st.text()), min_size=3, max_size=3))
def test_text_round_trips_through_a_csv_reader(texts: list[str | None]) -> None:
    """Any text (commas, quotes, line breaks, Unicode) reads back as itself; NULL and '' stay
    apart (an unquoted empty field vs "")."""
    encoder = RowEncoder(
        [ColumnType("d", DATE), *(ColumnType(f"t{i}", TEXT) for i in range(3))], "d"
    )
    values: TupleData = [b"2011-01-01", *(None if t is None else t.encode() for t in texts)]
    _, data = encoder.encode(values)
    text = data.decode()
    (fields,) = list(csv.reader(io.StringIO(text)))
    assert fields[1:] == ["" if t is None else t for t in texts]
    raw = [f for f in _split_raw(text)][1:]
    assert [r == "" for r in raw] == [t is None for t in texts]


def _split_raw(line: str) -> list[str]:
    """Fields as written (quotes kept), to tell "" from an empty field."""
    out, field, quoted = [], "", False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append(field)
            field = ""
        else:
            field += ch
    out.append(field)
    return out


# Text forms of each type, common and odd: what ``encode`` must hand to the careful path.
_TIMESTAMPTZ = st.sampled_from(
    [
        b"2010-12-01 08:26:00+00",
        b"2010-12-01 08:26:00.5+00",
        b"2010-12-01 08:26:00.123456+00",
        b"0044-03-15 12:00:00+00 BC",
        b"10000-01-01 00:00:00+00",
        b"infinity",
        b"-infinity",
    ]
)
_TIMESTAMP = st.sampled_from(
    [
        b"2011-01-01 10:00:00",
        b"2011-01-01 10:00:00.25",
        b"2011-01-01 10:00:00.000001",
        b"0001-01-01 00:00:00 BC",
        b"10000-01-01 00:00:00",
        b"infinity",
    ]
)
_DATE = st.sampled_from([b"2011-01-02", b"0001-01-01 BC", b"10000-01-01", b"-infinity"])
_NUMERIC = st.one_of(
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"0", b"-1.50", b"1" * 38, b"1" * 39]),
    st.decimals(allow_nan=False, allow_infinity=False).map(lambda d: str(d).encode()),
)
_FLOAT = st.one_of(
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e+30", b"-0"]),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
)
_BYTEA = st.binary(max_size=8).map(lambda b: b"\\x" + b.hex().encode())
_TEXT = st.one_of(st.text(max_size=12).map(str.encode), st.sampled_from([b"", b",", b'"', b"\r\n"]))
_VALUES = {
    INT8: st.integers().map(lambda i: str(i).encode()),
    TIMESTAMPTZ: _TIMESTAMPTZ,
    TEXT: _TEXT,
    NUMERIC: _NUMERIC,
    FLOAT8: _FLOAT,
    BYTEA: _BYTEA,
    TIMESTAMP: _TIMESTAMP,
    DATE: _DATE,
}


@given(
    st.tuples(
        *(
            st.one_of(st.none(), _VALUES[c.type_oid]) if c.name != "id" else _VALUES[INT8]
            for c in COLUMNS
        )
    )
)
def test_fast_path_gives_the_reference_bytes(values: tuple[bytes | None, ...]) -> None:
    """``encode`` (the hot path) and ``encode_reference`` (field by field, every check) give
    the same day and the same bytes for any row: common forms, NULL, '', values needing
    quotes, and every quarantine reason."""
    fields: TupleData = list(values)
    assert ENCODER.encode(fields) == ENCODER.encode_reference(fields)


def test_fast_path_covers_the_common_row() -> None:
    """The common row does not fall back (else the hot path would be pointless), and each odd
    form does."""
    calls: list[int] = []

    class Counting(RowEncoder):
        def encode_reference(self, values: TupleData) -> tuple[bytes, bytes]:
            calls.append(1)
            return super().encode_reference(values)

    encoder = Counting(COLUMNS, "at")
    encoder.encode(row())
    encoder.encode(row(at=b"2010-12-01 08:26:00.123456+00", local=b"2011-01-01 10:00:00.5"))
    encoder.encode(row(note=None, n=None))
    assert calls == []
    encoder.encode(row(note=b""))
    encoder.encode(row(note=b"a,b"))
    encoder.encode(row(n=b"NaN"))
    encoder.encode(row(at=b"infinity"))
    assert len(calls) == 4
