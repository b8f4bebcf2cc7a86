"""pgoutput tuple values -> the CSV row bytes of the object format. Pure.

The objects of both capture modes must be byte-identical for the same row values, so this
mirrors what ``source.table`` asks PostgreSQL's COPY to produce (``Column.csv_expr``,
``TableInfo.day_expr``, ``Column.quarantine_checks``):

- pgoutput sends every value in its text output form, produced in the capture's session
  (TimeZone=UTC, DateStyle=ISO, extra_float_digits=1, bytea_output=hex), which is what COPY
  writes for the same session, except where ``csv_expr`` converts: a timestamp in years
  1-9999 gets a ``T`` instead of the space (and timestamptz ``+00:00`` instead of ``+00``),
  ``bytea`` is hex without ``\\x``, a float's ``Infinity`` is ``inf``.
- CSV quoting as COPY's: a value is quoted when it is empty (so that ``""`` is an empty string
  and an unquoted empty field is NULL) or holds a comma, a quote, CR or LF.
- A row holding a value Snowflake cannot read back goes to the day ``!<reason>-<column>``
  (the first reason in column order, as the SQL ``CASE`` picks it).

Types are recognised by OID (the built-in types ``csv_expr`` treats specially); an array is
written as a JSON array (``array_json``, what ``array_to_json`` gives in SQL); any other type
(json, enums, domains, uuid, inet, interval, ...) is its text form, quoted as needed, exactly
as COPY writes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cdc_daemon.capture.logical.pgoutput import TupleData
from cdc_daemon.source import hotpath
from cdc_daemon.source.values import (
    MAX_TEXT,
    Check,
    check_datetime,
    check_json,
    check_jsonb,
    check_text,
    check_time,
    number_type,
    numeric_check,
    numeric_typmod,
    quote,
)

# Built-in type OIDs (pg_type.dat).
BOOL, BYTEA, INT8, INT2, INT4, TEXT, OID = 16, 17, 20, 21, 23, 25, 26
FLOAT4, FLOAT8, BPCHAR, VARCHAR, DATE = 700, 701, 1042, 1043, 1082
TIMESTAMP, TIMESTAMPTZ, NUMERIC, UUID = 1114, 1184, 1700, 2950
JSON, TIME, JSONB = 114, 1083, 3802

# Text output that never needs quoting and is never empty.
_BARE = frozenset({BOOL, INT8, INT2, INT4, OID, UUID})


# Arrays of these element types become JSON arrays of numbers / booleans (``array_to_json``);
# of any other element type, JSON arrays of the elements' text (``array_to_json(c::text[])``).
NUMBER_ELEMENTS = frozenset({INT2, INT4, INT8, OID, NUMERIC, FLOAT4, FLOAT8})
BOOL_ELEMENTS = frozenset({BOOL})
_JSON_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?").fullmatch


def array_json(value: bytes, element: int) -> bytes:
    """PostgreSQL's array text output (``{a,"b c",NULL}``, ``{{1,2},{3,4}}``, optionally after
    ``[0:1]=`` bounds) -> the JSON array ``array_to_json`` writes (no spaces, ``null``, every
    digit kept; numbers that are not JSON numbers, like NaN, as strings, as PostgreSQL does).
    Element type ``element`` decides: numbers, booleans (``t``/``f``), else strings."""
    text = value.decode()
    if text.startswith("["):
        text = text[text.index("=") + 1 :]
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "{":
            out.append("[")
            i += 1
        elif c == "}":
            out.append("]")
            i += 1
        elif c == ",":
            out.append(",")
            i += 1
        elif c == '"':
            i += 1
            chars = []
            while text[i] != '"':
                if text[i] == "\\":
                    i += 1
                chars.append(text[i])
                i += 1
            i += 1
            out.append(_element("".join(chars), element, quoted=True))
        else:
            end = i
            while text[end] not in ",}":
                end += 1
            out.append(_element(text[i:end], element, quoted=False))
            i = end
    return "".join(out).encode()


def _element(item: str, element: int, quoted: bool) -> str:
    if not quoted and item.upper() == "NULL":
        return "null"
    if element in NUMBER_ELEMENTS and _JSON_NUMBER(item.encode()):
        return item
    if element in BOOL_ELEMENTS:
        return "true" if item == "t" else "false"
    return json.dumps(item, ensure_ascii=False)


def _bare(value: bytes) -> bytes:
    return value


def _float(value: bytes) -> bytes:
    """Snowflake's FLOAT reads ``NaN``, ``inf`` and ``-inf`` (the watermark export's
    ``csv_expr`` writes the same)."""
    return value.replace(b"Infinity", b"inf") if value.endswith(b"Infinity") else value


def _bytea(value: bytes) -> bytes:
    return value[2:] or b'""'  # hex without \x; an empty bytea is an empty string


def _timestamp(value: bytes, zone: bytes) -> bytes:
    """``2011-03-27 00:30:00.25+00`` -> ``2011-03-27T00:30:00.25+00:00`` (``+00``: the session
    is in UTC); ``zone`` is b"" for ``timestamp``. Like csv_expr, only years 1-9999: other
    values (infinite, BC, five-digit years) keep their text."""
    if value[4:5] != b"-" or value.endswith(b" BC"):
        return value
    return value.replace(b" ", b"T") + zone


def _timestamptz(value: bytes) -> bytes:
    return _timestamp(value, b":00")


def _timestamp_local(value: bytes) -> bytes:
    return _timestamp(value, b"")


_BARE_CONVERT: dict[int, Callable[[bytes], bytes]] = dict.fromkeys(_BARE, _bare)
_CONVERT: dict[int, Callable[[bytes], bytes]] = _BARE_CONVERT | {
    BYTEA: _bytea,
    TIMESTAMPTZ: _timestamptz,
    TIMESTAMP: _timestamp_local,
    NUMERIC: _bare,
    FLOAT4: _float,
    FLOAT8: _float,
    DATE: _bare,
}

_CHECKS: dict[int, Check] = {
    DATE: check_datetime,
    TIMESTAMP: check_datetime,
    TIMESTAMPTZ: check_datetime,
    TIME: check_time,
    TEXT: check_text,
    VARCHAR: check_text,
    BPCHAR: check_text,
    JSON: check_json,
    JSONB: check_jsonb,
}

_PARTITION_TYPES = frozenset({DATE, TIMESTAMP, TIMESTAMPTZ})


def _timestamptz_fast(value: bytes) -> bytes | None:
    """The common ``2011-03-27 00:30:00[.ffffff]+00`` (a 4-digit year, not BC: no quarantine
    reason), else None: the careful path decides. Byte indexing: ints, no slices."""
    if len(value) < 22 or value[4] != 45 or value[10] != 32 or value[-1] == 67:  # "-", " ", "BC"
        return None
    return value[:10] + b"T" + value[11:] + b":00"


def _timestamp_fast(value: bytes) -> bytes | None:
    if len(value) < 19 or value[4] != 45 or value[10] != 32 or value[-1] == 67:
        return None
    return value[:10] + b"T" + value[11:]


def _date_fast(value: bytes) -> bytes | None:
    return value if len(value) == 10 and value[4] == 45 else None


def _number_fast(value: bytes) -> bytes | None:
    # NaN and [-]Infinity do not end in a digit (then the careful path converts or checks).
    return value if 48 <= value[-1] <= 57 else None


def _unconstrained_fast(value: bytes) -> bytes | None:
    # Fits NUMBER(38, 9) for sure: at most 29 characters before the point, 9 after it.
    if not 48 <= value[-1] <= 57:
        return None
    dot = value.find(b".")
    if dot < 0:
        return value if len(value) <= 29 else None
    return value if dot <= 29 and len(value) - dot <= 10 else None


def _bytea_fast(value: bytes) -> bytes | None:
    return value[2:] if len(value) > 2 else None


def _time_fast(value: bytes) -> bytes | None:
    return None if value.startswith(b"24:") else value


def _careful(value: bytes) -> bytes | None:
    """Always the careful path: JSON is checked there (and holds commas and quotes)."""
    return None


# The hot path's version of _CONVERT + _CHECKS for the types that have either: the output
# bytes when the value is in its common form and has no quarantine reason, else None (then
# the row takes the careful path, ``RowEncoder.encode_reference``).
_FAST: dict[int, Callable[[bytes], bytes | None]] = {
    BYTEA: _bytea_fast,
    TIMESTAMPTZ: _timestamptz_fast,
    TIMESTAMP: _timestamp_fast,
    DATE: _date_fast,
    FLOAT4: _number_fast,
    FLOAT8: _number_fast,
    TIME: _time_fast,
    JSON: _careful,
    JSONB: _careful,
}


# The compiled core's code for each fast function (source/_hotpath.c, enum PLAN_*): a column
# takes in C exactly the path its fast function takes here, so what the core refuses is what
# the Python fast path refuses (both then go to ``encode_reference``).
_PLAN_CODES: dict[Callable[[bytes], bytes | None] | None, int] = {
    None: 0,
    _bytea_fast: 1,
    _timestamptz_fast: 2,
    _timestamp_fast: 3,
    _date_fast: 4,
    _number_fast: 5,
    _unconstrained_fast: 6,
    _time_fast: 7,
    _careful: 8,
}


def _array(element: int) -> Callable[[bytes], bytes]:
    def convert(value: bytes) -> bytes:
        return quote(array_json(value, element))

    return convert


@dataclass(frozen=True)
class ColumnType:
    name: str
    type_oid: int
    element: int | None = None  # an array's element type
    typmod: int = -1  # -1: none (an unconstrained numeric)

    def check(self) -> Check | None:
        if self.element is not None:
            return None
        if self.type_oid == NUMERIC:
            return numeric_check(number_type(numeric_typmod(self.typmod)))
        return _CHECKS.get(self.type_oid)

    def fast(self) -> Callable[[bytes], bytes | None] | None:
        if self.element is not None:
            return _careful
        if self.type_oid == NUMERIC:
            number = number_type(numeric_typmod(self.typmod))
            if self.typmod == -1:
                return _unconstrained_fast
            # A numeric(p, s) NUMBER(p, s) holds whole: only NaN needs the careful path.
            if number.whole_limit is None and not number.scale_checked:
                return _number_fast
            return _careful
        fast = _FAST.get(self.type_oid)
        if fast is None and self.check() not in (None, check_text):
            return _careful  # a rule the hot path does not apply
        return fast


class RowEncoder:
    """Encodes one relation's tuples: ``encode(values)`` -> (day key, CSV fields joined by
    commas, without the ``_cdc_*`` columns and line end).

    ``encode`` is the hot path: it handles the common row (values in their usual form, none
    needing quotes) with a few bytes operations per row (in the compiled core when there is
    one, ``source.hotpath``, else ``encode_python``), and hands any other row to
    ``encode_reference``, which converts, quotes and checks field by field. All give the same
    bytes for every row (tests/unit/test_encode.py and test_hotpath.py check it on arbitrary
    rows).
    """

    def __init__(
        self,
        columns: Sequence[ColumnType],
        partition_column: str | None,
        unchecked: frozenset[str] = frozenset(),
        *,
        pure: bool = False,
    ) -> None:
        """``unchecked``: columns never quarantined (hash_columns: the warehouse gets their
        hash, which it can always hold). ``pure``: never the compiled core (else it is used
        when built and not refused by CDC_DAEMON_PURE_PYTHON)."""
        names = [c.name for c in columns]
        # No partition column: the day is b"" (the caller names it: the commit's day).
        self._partition: int | None = None
        if partition_column is not None:
            if partition_column not in names:
                raise ValueError(f"no column {partition_column!r}")
            self._partition = names.index(partition_column)
            if columns[self._partition].type_oid not in _PARTITION_TYPES:
                raise ValueError(f"partition column {partition_column!r} is not a date/timestamp")
        self._convert = [
            _CONVERT.get(c.type_oid, quote) if c.element is None else _array(c.element)
            for c in columns
        ]
        fasts = [c.fast() for c in columns]
        self._fast = [(i, fast) for i, fast in enumerate(fasts) if fast is not None]
        self.core = None if pure else hotpath.core()
        # What the core needs (``source.hotpath``): each column's fast path, the day's column.
        self.plan = bytes(_PLAN_CODES[fast] for fast in fasts)
        self.partition_index = -1 if self._partition is None else self._partition
        checks = [
            (i, check, f"{{}}-{re.sub(r'[^A-Za-z0-9_]', '_', c.name)}")
            for i, c in enumerate(columns)
            if (check := c.check()) is not None and c.name not in unchecked
        ]
        self._by_name = {columns[i].name: check for i, check, _ in checks}
        self._checks = [c for c in checks if c[1] is not check_text]
        self._text_checks = [c for c in checks if c[1] is check_text]
        self._commas = len(columns) - 1
        self.width = len(columns)

    def checks(self) -> dict[str, Check]:
        """Each column's rule (``source.values``), by name: the quarantine's judge uses them."""
        return dict(self._by_name)

    def encode(self, values: TupleData) -> tuple[bytes, bytes]:
        """Values must be bytes or None (UNCHANGED resolved by the caller)."""
        if self.core is None:
            return self.encode_python(values)
        found = self.core.encode_row(self.plan, self.partition_index, values)
        return self.encode_reference(values) if found is None else found

    def encode_python(self, values: TupleData) -> tuple[bytes, bytes]:
        """``encode`` in Python: the common row with a few bytes operations."""
        fields: list[Any] = values.copy()
        for i, fast in self._fast:
            value = fields[i]
            if value is not None:
                value = fast(value)
                if value is None:
                    return self.encode_reference(values)
                fields[i] = value
        # all(): no NULL (None) and no empty string (written as ""), in one pass.
        if all(values):
            row = b",".join(fields)
        elif b"" in values:
            return self.encode_reference(values)
        else:
            row = b",".join([b"" if v is None else v for v in fields])  # NULL: empty, unquoted
        # Quotes needed (or a text value past 16 MB): the careful path. Int membership is a
        # memchr; ``b'"' in row`` costs several times more.
        if row.count(44) != self._commas or 34 in row or 10 in row or 13 in row:
            return self.encode_reference(values)
        if len(row) > MAX_TEXT:
            return self.encode_reference(values)
        if self._partition is None:
            return b"", row
        day = values[self._partition]
        return (b"" if day is None else day[:10]), row  # type: ignore[index]

    def encode_reference(self, values: TupleData) -> tuple[bytes, bytes]:
        """Field by field: convert, quote as needed, check every quarantine reason."""
        row = b",".join(
            [
                b"" if v is None else convert(v)  # type: ignore[arg-type]
                for convert, v in zip(self._convert, values, strict=True)
            ]
        )
        for i, check, label in self._checks:
            value = values[i]
            if value is not None and (reason := check(value)) is not None:  # type: ignore[arg-type]
                return b"!" + label.format(reason).encode(), row
        if len(row) > MAX_TEXT:
            for i, check, label in self._text_checks:
                value = values[i]
                if value is not None and (reason := check(value)) is not None:  # type: ignore[arg-type]
                    return b"!" + label.format(reason).encode(), row
        if self._partition is None:
            return b"", row
        day = values[self._partition]
        return (b"" if day is None else day[:10]), row  # type: ignore[index]
