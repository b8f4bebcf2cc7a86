"""The compiled hot path (``source/_hotpath.c``) against the pure-Python reference, on generated
values of every supported type, hostile ones included: the same bytes, or the compiled core
declines (returns None) and the reference runs. Both paths run in this one process.

Where the extension was not built these tests skip, except under ``CI=true``: there they fail,
so that CI always runs the compiled path."""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_daemon.batch.spool import DaySpool
from cdc_daemon.capture.logical import encode as enc
from cdc_daemon.capture.logical.encode import ColumnType, RowEncoder
from cdc_daemon.capture.logical.pgoutput import (
    UNCHANGED,
    DecodeError,
    TupleData,
    Value,
    decode_tuple,
)
from cdc_daemon.capture.logical.reader import ChangeReader, ReadResult
from cdc_daemon.capture.logical.source import LogicalSource
from cdc_daemon.capture.logical.tables import LogicalTable
from cdc_daemon.config import load_settings
from cdc_daemon.errors import CdcError
from cdc_daemon.source import hotpath
from cdc_daemon.source.table import Column, TableInfo
from cdc_daemon.source.values import MAX_TEXT, QuarantineJudge

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _core() -> hotpath.Core:
    core = hotpath.built()
    if core is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("the compiled hot path was not built: CI must run it (setup.py)")
        pytest.skip("the compiled hot path was not built (no C compiler at install)")
    return core


def _compiled(columns: list[ColumnType], partition: str | None) -> RowEncoder:
    """An encoder on the compiled core, whatever CDC_DAEMON_PURE_PYTHON says."""
    encoder = RowEncoder(columns, partition)
    encoder.core = _core()
    return encoder


def test_ci_builds_the_compiled_core() -> None:
    """Under CI the C extension is built and importable (a missing compiler fails CI instead
    of silently testing only the pure path); elsewhere this says whether it is."""
    _core()


def test_pure_python_env_forces_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """CDC_DAEMON_PURE_PYTHON=1 turns the core off for new encoders and says so at start;
    unset, a built core is used."""
    core = _core()
    monkeypatch.setenv(hotpath.PURE_ENV, "1")
    assert hotpath.core() is None
    assert RowEncoder(COLUMNS, "at").core is None
    assert "CDC_DAEMON_PURE_PYTHON" in hotpath.describe()
    monkeypatch.delenv(hotpath.PURE_ENV)
    assert hotpath.core() is core
    assert RowEncoder(COLUMNS, "at").core is core
    assert hotpath.describe() == "compiled"


def test_without_the_extension_the_pure_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """An install without a C compiler has no ``_hotpath``: encoders and the reader take the
    pure-Python path, and the start line says the extension was not built."""
    monkeypatch.delenv(hotpath.PURE_ENV, raising=False)
    monkeypatch.setattr(hotpath, "built", lambda: None)
    assert hotpath.core() is None
    assert RowEncoder(COLUMNS, "at").core is None
    assert hotpath.describe() == "python (the C extension was not built)"


# -- values of every type the encoder knows, common and hostile ---------------------------------

INT4_ARRAY, TEXT_ARRAY, BOOL_ARRAY, FLOAT8_ARRAY, INTERVAL = 1007, 1009, 1000, 1022, 1186

COLUMNS = [
    ColumnType("id", enc.INT8),
    ColumnType("at", enc.TIMESTAMPTZ),
    ColumnType("note", enc.TEXT),
    ColumnType("name", enc.VARCHAR, typmod=14),
    ColumnType("code", enc.BPCHAR, typmod=8),
    ColumnType("small", enc.INT2),
    ColumnType("qty", enc.INT4),
    ColumnType("flag", enc.BOOL),
    ColumnType("u", enc.UUID),
    ColumnType("n", enc.NUMERIC),
    ColumnType("price", enc.NUMERIC, typmod=((12 << 16) | 3) + 4),
    ColumnType("wide", enc.NUMERIC, typmod=((40 << 16) | 0) + 4),
    ColumnType("fine", enc.NUMERIC, typmod=((50 << 16) | 40) + 4),
    ColumnType("f4", enc.FLOAT4),
    ColumnType("f8", enc.FLOAT8),
    ColumnType("b", enc.BYTEA),
    ColumnType("local", enc.TIMESTAMP),
    ColumnType("d", enc.DATE),
    ColumnType("t", enc.TIME),
    ColumnType("j", enc.JSON),
    ColumnType("jb", enc.JSONB),
    ColumnType("ints", INT4_ARRAY, element=enc.INT4),
    ColumnType("texts", TEXT_ARRAY, element=enc.TEXT),
    ColumnType("bools", BOOL_ARRAY, element=enc.BOOL),
    ColumnType("floats", FLOAT8_ARRAY, element=enc.FLOAT8),
    ColumnType("span", INTERVAL),
]

_HOSTILE = [b"", b",", b'"', b'""', b"\r\n", b"\n", b"\r", b"a,b", b'say "hi"', b"\\", b"\\N"]
_HOSTILE += [b"NULL", b"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", b" ", b"\t", b"\x7f"]
_TEXT = st.one_of(
    st.text(max_size=20).map(str.encode),
    st.sampled_from(_HOSTILE),
    st.lists(st.sampled_from(_HOSTILE), max_size=4).map(b"".join),
)
_TIMESTAMPTZ = st.one_of(
    st.sampled_from(
        [
            b"2010-12-01 08:26:00+00",
            b"2010-12-01 08:26:00.5+00",
            b"2010-12-01 08:26:00.123456+00",
            b"0044-03-15 12:00:00+00 BC",
            b"0001-01-01 00:00:00+00 BC",
            b"10000-01-01 00:00:00+00",
            b"294276-12-31 23:59:59.999999+00",
            b"infinity",
            b"-infinity",
        ]
    ),
    st.datetimes().map(lambda d: (d.isoformat(sep=" ") + "+00").encode()),
)
_TIMESTAMP = st.one_of(
    st.sampled_from(
        [
            b"2011-01-01 10:00:00",
            b"2011-01-01 10:00:00.000001",
            b"0001-01-01 00:00:00 BC",
            b"10000-01-01 00:00:00",
            b"infinity",
            b"-infinity",
        ]
    ),
    st.datetimes().map(lambda d: d.isoformat(sep=" ").encode()),
)
_DATE = st.one_of(
    st.sampled_from([b"2011-01-02", b"0001-01-01 BC", b"10000-01-01", b"-infinity", b"infinity"]),
    st.dates().map(lambda d: d.isoformat().encode()),
)
_TIME = st.one_of(
    st.sampled_from([b"24:00:00", b"23:59:59.999999", b"00:00:00"]),
    st.times().map(lambda t: t.isoformat().encode()),
)
_NUMERIC = st.one_of(
    st.sampled_from(
        [b"NaN", b"Infinity", b"-Infinity", b"0", b"-1.50", b"1" * 29, b"1" * 30, b"1" * 38]
    ),
    st.sampled_from([b"1" * 39, b"0." + b"1" * 9, b"0." + b"1" * 10, b"1" * 29 + b".5"]),
    st.decimals(allow_nan=False, allow_infinity=False).map(lambda d: str(d).encode()),
    st.decimals(places=3, min_value=-(10**9), max_value=10**9).map(lambda d: str(d).encode()),
)
_FLOAT = st.one_of(
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e+30", b"-0", b"1.5e-310"]),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
)
_BYTEA = st.binary(max_size=12).map(lambda b: b"\\x" + b.hex().encode())
_JSON = st.sampled_from(
    [b'{"a": 1}', b'{"a": 1, "a": 2}', b"[1, 2.5e3]", b'"x,y"', b"null", b"1e400", b"{}"]
)
_INTS = st.integers(min_value=-(2**63), max_value=2**63 - 1).map(lambda i: str(i).encode())


def _pg_element(item: str | None) -> str:
    """One element as PostgreSQL's array output writes it (quoted when it must be)."""
    if item is None:
        return "NULL"
    if item == "" or item.upper() == "NULL" or any(c in item for c in '{},"\\ \t\n\r'):
        return '"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return item


def _arrays(elements: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    """Array text forms: flat or nested two deep (rectangular), with NULLs, sometimes with
    explicit bounds."""
    item = st.one_of(st.none(), elements)
    flat = st.lists(item, max_size=4).map(lambda xs: "{" + ",".join(map(_pg_element, xs)) + "}")

    def nested(width: int) -> st.SearchStrategy[str]:
        row = st.lists(item, min_size=width, max_size=width)
        return st.lists(row, min_size=1, max_size=3).map(
            lambda rows: (
                "{" + ",".join("{" + ",".join(map(_pg_element, r)) + "}" for r in rows) + "}"
            )
        )

    text = st.one_of(flat, st.integers(1, 3).flatmap(nested))
    bounds = st.sampled_from(["", "[0:1]=", "[-2:0]="])
    return st.tuples(bounds, text).map(lambda p: (p[0] + p[1]).encode())


_TEXT_ELEMENTS = st.one_of(st.text(max_size=8), st.sampled_from(["NULL", "", "a,b", '"', "\\"]))
_FLOAT_ELEMENTS = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)

VALUES: dict[str, st.SearchStrategy[bytes]] = {
    "id": _INTS,
    "at": _TIMESTAMPTZ,
    "note": _TEXT,
    "name": _TEXT,
    "code": _TEXT,
    "small": st.integers(-32768, 32767).map(lambda i: str(i).encode()),
    "qty": st.integers(-(2**31), 2**31 - 1).map(lambda i: str(i).encode()),
    "flag": st.sampled_from([b"t", b"f"]),
    "u": st.uuids().map(lambda u: str(u).encode()),
    "n": _NUMERIC,
    "price": _NUMERIC,
    "wide": _NUMERIC,
    "fine": _NUMERIC,
    "f4": _FLOAT,
    "f8": _FLOAT,
    "b": _BYTEA,
    "local": _TIMESTAMP,
    "d": _DATE,
    "t": _TIME,
    "j": _JSON,
    "jb": _JSON,
    "ints": _arrays(st.integers(-1000, 1000).map(str)),
    "texts": _arrays(_TEXT_ELEMENTS),
    "bools": _arrays(st.sampled_from(["t", "f"])),
    "floats": _arrays(_FLOAT_ELEMENTS),
    "span": st.one_of(st.sampled_from([b"1 day 02:00:00", b"-00:00:01", b"00:00:00"]), _TEXT),
}
_DAY_TYPES = (enc.DATE, enc.TIMESTAMP, enc.TIMESTAMPTZ)


@st.composite
def _rows(draw: st.DrawFn) -> tuple[list[ColumnType], str | None, TupleData]:
    """A few columns of any types, in any order (so that rows without a column the core
    always declines, like JSON or arrays, are common), their values, and a partition column
    among them or none."""
    columns = draw(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=7, unique=True))
    values: TupleData = [draw(st.one_of(st.none(), VALUES[c.name])) for c in columns]
    days = [c.name for c in columns if c.type_oid in _DAY_TYPES and c.element is None]
    return columns, draw(st.sampled_from([None, *days])), values


ROWS = _rows()


def _tuple_bytes(values: list[Value]) -> bytes:
    """TupleData as pgoutput sends it ('t' text, 'n' NULL, 'u' unchanged TOAST)."""
    out = [struct.pack(">H", len(values))]
    for v in values:
        if v is None:
            out.append(b"n")
        elif v is UNCHANGED:
            out.append(b"u")
        else:
            assert isinstance(v, bytes)
            out.append(b"t" + struct.pack(">I", len(v)) + v)
    return b"".join(out)


# -- the row encoder --------------------------------------------------------------------------


@FAST
@given(row=ROWS)
def test_compiled_encode_gives_the_reference_bytes(
    row: tuple[list[ColumnType], str | None, TupleData],
) -> None:
    """``RowEncoder.encode`` through the compiled core gives the same (day, row) as the
    reference (``encode_reference``, field by field) and as the Python fast path, for rows of
    every type with NULLs, '' and values needing quotes, BC / year-10000 / infinite
    timestamps, NaN and Infinity, JSON and nested arrays with NULLs, and every quarantine
    reason; with the day taken from a timestamptz, a timestamp, a date or none."""
    columns, partition, values = row
    compiled, pure = _compiled(columns, partition), RowEncoder(columns, partition, pure=True)
    reference = pure.encode_reference(values)
    assert compiled.encode(values) == reference
    assert pure.encode(values) == reference


@FAST
@given(row=ROWS, op=st.sampled_from([b"I", b"U", b"D"]), lsn=st.integers(0, 2**64 - 1))
def test_compiled_change_line_is_the_reference_line(
    row: tuple[list[ColumnType], str | None, TupleData], op: bytes, lsn: int
) -> None:
    """The core's ``encode_change`` (pgoutput tuple bytes -> the whole object line in one
    call) either declines or gives exactly decode_tuple + encode_reference + ``,op,lsn,ts,\\n``; a
    declined tuple is one the Python path must take (the reference differs from the plain
    join, or a value is empty)."""
    columns, partition, values = row
    encoder = _compiled(columns, partition)
    ts = b",2011-03-27T00:30:00.000000Z,"
    buf = b"I\0\0\0\1N" + _tuple_bytes(values)
    core = _core()
    found = core.encode_change(buf, 6, encoder.plan, encoder.partition_index, op, lsn, ts)
    decoded, end = decode_tuple(buf, 6)
    assert end == len(buf)
    day, line = encoder.encode_reference(decoded)
    if found is not None:
        assert found == (day, b"%s,%s,%d%s\n" % (line, op, lsn, ts))


def test_common_rows_stay_compiled() -> None:
    """The common row of each type goes through the core (it does not decline), else the
    compiled path would be the Python one with extra steps."""
    core = _core()
    plain = {
        "id": b"1",
        "at": b"2010-12-01 08:26:00.5+00",
        "note": b"WHITE HANGING HEART",
        "name": b"x",
        "code": b"85123A  ",
        "small": b"-3",
        "qty": b"6",
        "flag": b"t",
        "u": b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "n": b"1.5",
        "price": b"2.550",
        "f4": b"0.5",
        "f8": b"-1e+30",
        "b": b"\\x00ff",
        "local": b"2011-01-01 10:00:00",
        "d": b"2011-01-02",
        "t": b"12:00:00",
        "span": b"1 day",
    }
    values: TupleData = [plain.get(c.name) for c in COLUMNS]
    plan = RowEncoder(COLUMNS, "at").plan
    assert core.encode_row(plan, 1, values) == RowEncoder(COLUMNS, "at").encode_reference(values)


def test_huge_values_give_the_reference_bytes() -> None:
    """A text past Snowflake's 16 MB (quarantined) and a row past 16 MB whose values each fit
    (not quarantined) give the reference's bytes and day through the compiled path."""
    names = [c.name for c in COLUMNS]
    compiled, pure = _compiled(COLUMNS, "at"), RowEncoder(COLUMNS, "at", pure=True)
    row: TupleData = [None] * len(COLUMNS)
    row[names.index("at")] = b"2010-12-01 08:26:00+00"
    row[names.index("note")] = b"x" * (MAX_TEXT + 1)
    found = compiled.encode(row)
    assert found == pure.encode_reference(row)
    assert found[0].startswith(b"!")
    row[names.index("note")] = b"x" * (MAX_TEXT // 2 + 1)
    row[names.index("span")] = b"y" * (MAX_TEXT // 2 + 1)
    found = compiled.encode(row)
    assert found == pure.encode_reference(row)
    assert found[0] == b"2010-12-01"


# -- the tuple decoder ------------------------------------------------------------------------


@FAST
@given(
    values=st.lists(st.one_of(st.none(), st.just(UNCHANGED), st.binary(max_size=40)), max_size=12),
    cut=st.integers(0, 400),
    junk=st.binary(max_size=3),
)
def test_compiled_decoder_gives_the_python_decoders_values(
    values: list[Value], cut: int, junk: bytes
) -> None:
    """The compiled ``decode_tuple`` gives the Python decoder's values and end position for
    any tuple (NULL, unchanged TOAST, any bytes); for a cut or corrupted one it declines
    (None), so the Python decoder raises its own DecodeError."""
    core = _core()
    whole = b"xx" + _tuple_bytes(values)
    for buf in (whole, whole[: 2 + cut] + junk):
        found = core.decode_tuple(buf, 2, UNCHANGED)
        try:
            expected = decode_tuple(buf, 2)
        except (DecodeError, IndexError, struct.error):
            assert found is None
            continue
        assert found is None or found == expected
        if buf is whole:
            assert found == expected


# -- the change reader, both paths --------------------------------------------------------------

READER_COLUMNS = [c for c in COLUMNS if c.name in ("id", "at", "note", "price", "b", "texts")]
REL = 16500


def _relation_message(identity: bytes) -> bytes:
    out = b"R" + struct.pack(">I", REL) + b"public\0t\0" + identity
    out += struct.pack(">H", len(READER_COLUMNS))
    for c in READER_COLUMNS:
        flag = 1 if identity == b"f" or c.name == "id" else 0
        out += bytes([flag]) + c.name.encode() + b"\0" + struct.pack(">Ii", c.type_oid, c.typmod)
    return out


@contextmanager
def _reader(pure: bool) -> Iterator[tuple[ChangeReader, list[DaySpool]]]:
    previous = os.environ.get(hotpath.PURE_ENV)
    os.environ[hotpath.PURE_ENV] = "1" if pure else "0"
    try:
        settings_ = load_settings(
            None,
            postgres={"dsn": "postgresql://localhost/x", "table": "public.t"},
            s3={"bucket": "b"},
            capture={"mode": "logical", "partition_column": "at"},
        )
        types = {enc.TIMESTAMPTZ: "timestamp with time zone", enc.TEXT: "text"}
        columns = tuple(Column(c.name, types.get(c.type_oid, "text")) for c in READER_COLUMNS)
        table = LogicalTable(
            TableInfo("public", "t", columns, columns[0], columns[1]),
            REL,
            ("id",),
            "d",
            ("note",),
            tuple((c.name, c.type_oid, c.typmod) for c in READER_COLUMNS),
        )
        source = LogicalSource(settings_)
        source._tables, source._by_oid = [table], {REL: table}
        source.array_elements = {TEXT_ARRAY: enc.TEXT}
        spools: list[DaySpool] = []
        with tempfile.TemporaryDirectory(prefix="cdc-hotpath-") as folder:

            def new_spool(header: list[str], judge: QuarantineJudge) -> DaySpool:
                spools.append(DaySpool(Path(folder), "none", 0, b"", judge=judge))
                return spools[-1]

            yield ChangeReader(source, ReadResult(0, None, 0), new_spool, 0, None), spools
    finally:
        if previous is None:
            os.environ.pop(hotpath.PURE_ENV, None)
        else:
            os.environ[hotpath.PURE_ENV] = previous


_HOSTILE_ROW = st.tuples(
    *(
        VALUES[c.name] if c.name == "id" else st.one_of(st.none(), VALUES[c.name])
        for c in READER_COLUMNS
    )
).map(list)
# Rows the core takes whole: the common case, where a mistake in the core would show.
_PLAIN_ROW = st.tuples(
    st.integers(1, 50).map(lambda i: str(i).encode()),
    st.datetimes().map(lambda d: (d.isoformat(sep=" ") + "+00").encode()),
    st.text("abc XYZ\u00e9", min_size=1, max_size=8).map(str.encode),
    st.decimals(places=3, min_value=-(10**8), max_value=10**8).map(lambda d: str(d).encode()),
    st.one_of(
        st.none(), st.binary(min_size=1, max_size=4).map(lambda b: b"\\x" + b.hex().encode())
    ),
    st.none(),
).map(list)
_READER_ROW = st.one_of(_PLAIN_ROW, _HOSTILE_ROW)
# An update's new row, its toastable column (note) sometimes unchanged and not logged.
_MAYBE_UNCHANGED = st.tuples(_READER_ROW, st.booleans()).map(
    lambda p: [*p[0][:2], UNCHANGED, *p[0][3:]] if p[1] else p[0]
)
# (kind, values, old values or None, the old row keeps the new key)
Change = tuple[bytes, list[Value], list[Value] | None, bool]
_CHANGE = st.one_of(
    st.tuples(st.just(b"I"), _READER_ROW, st.none(), st.just(False)),
    st.tuples(st.just(b"U"), _MAYBE_UNCHANGED, st.one_of(st.none(), _READER_ROW), st.booleans()),
    st.tuples(st.just(b"D"), _READER_ROW, st.none(), st.just(False)),
)


def _change_message(identity: bytes, change: Change) -> bytes:
    kind, values, old, same_key = change
    head = kind + struct.pack(">I", REL)
    if kind == b"I":
        return head + b"N" + _tuple_bytes(values)
    if kind == b"D":
        if identity == b"d":
            values = [values[0]] + [None] * (len(values) - 1)
        return head + (b"O" if identity == b"f" else b"K") + _tuple_bytes(values)
    if old is None:
        return head + b"N" + _tuple_bytes(values)
    if same_key:
        old = [values[0], *old[1:]]
    if identity == b"d":
        old = [old[0]] + [None] * (len(old) - 1)
    old_tuple = (b"O" if identity == b"f" else b"K") + _tuple_bytes(old)
    return head + old_tuple + b"N" + _tuple_bytes(values)


def _spooled(pure: bool, messages: list[bytes]) -> dict[str, bytes] | str:
    with _reader(pure) as (reader, spools):
        try:
            for lsn, data in enumerate(messages, start=1000):
                reader.feed(lsn, data, 0, len(data))
        except CdcError as exc:
            reader.discard()
            return f"{type(exc).__name__}: {exc}"
        reader.finish()
        out = {}
        for spool in spools:
            for found in spool.finish():
                out[found.day] = found.path.read_bytes()
            spool.discard()
        return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    identity=st.sampled_from([b"d", b"f"]),
    changes=st.lists(_CHANGE, min_size=1, max_size=8),
)
def test_reader_spools_the_same_bytes_on_both_paths(identity: bytes, changes: list[Change]) -> None:
    """``ChangeReader.feed`` with the compiled core and with CDC_DAEMON_PURE_PYTHON=1 spools
    the same files, byte for byte (or fails the table with the same sentence), for inserts,
    updates (key changes, unchanged TOASTed values named in _cdc_unchanged) and deletes under
    the default identity and REPLICA IDENTITY FULL, with hostile values in every column."""
    _core()
    begin = b"B" + struct.pack(">QqI", 1 << 40, 849_000_000_000_000, 7)
    commit = b"C" + struct.pack(">BQQq", 0, 1 << 40, (1 << 40) + 64, 849_000_000_000_000)
    messages = [_relation_message(identity), begin]
    messages += [_change_message(identity, c) for c in changes]
    messages.append(commit)
    compiled = _spooled(False, messages)
    assert compiled == _spooled(True, messages)
