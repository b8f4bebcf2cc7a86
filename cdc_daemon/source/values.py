"""Which values Snowflake holds exactly, decided from a value's text form. Pure.

The rules are stated once here and applied three ways: as SQL inside the watermark export's
COPY (``source.table.Column.quarantine_checks``, which mirrors these functions), by the
logical encoder (``capture.logical.encode``) on pgoutput's text, and by the quarantine
(``QuarantineJudge``) on the CSV fields of a row already flagged, to find every column that
must be withheld. A value that fails a rule is never altered: its row goes to the quarantine
prefix with its reason, and the row reaches the warehouse with that column NULL and named in
``_cdc_quarantined`` (docs/design.md, "Quarantine").

The rules, from Snowflake's documentation:

- NUMBER holds at most 38 digits, at most 37 after the point ("Numeric data types",
  https://docs.snowflake.com/en/sql-reference/data-types-numeric); a value with more digits
  after the point than the column's scale is rounded ("the scale is reduced by rounding",
  https://docs.snowflake.com/en/sql-reference/functions/to_decimal), so it is refused here.
- FLOAT holds ``NaN``, ``inf`` and ``-inf`` (same page): PostgreSQL's ``Infinity`` is written
  as ``inf``; none is quarantined.
- TIME holds 00:00:00 to 23:59:59.999999999 ("Date & time data types"): ``24:00:00`` is not.
- DATE / TIMESTAMP: years 1-9999.
- VARCHAR: at most 16 MB.
- PARSE_JSON refuses duplicate object keys unless told to keep the last one, and stores a
  number written with an exponent, or one that does not fit a fixed-point NUMBER, as a DOUBLE
  (https://docs.snowflake.com/en/sql-reference/functions/parse_json): such a number must
  come back from the double unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

MAX_PRECISION = 38
MAX_SCALE = 37
# The scale an unconstrained numeric gets (BigQuery's NUMERIC has the same: 29 digits before
# the point, 9 after).
UNCONSTRAINED_SCALE = 9
MAX_TEXT = 16 * 1024 * 1024  # Snowflake's VARCHAR limit, in bytes

Check = Callable[[bytes], "str | None"]

# The normal doubles' range: the SQL form (source.table) uses the same bounds, inside which
# PostgreSQL's cast to float8 cannot fail.
_DOUBLE_MIN = Decimal("2.2250738585072014e-308")
_DOUBLE_MAX = Decimal("1.7976931348623157e308")

_TEXT_TYPES = frozenset({"text", "character varying", "character"})
_DATETIME_TYPES = frozenset({"date", "timestamp without time zone", "timestamp with time zone"})


@dataclass(frozen=True)
class NumberType:
    """The NUMBER(precision, scale) a ``numeric`` column maps to, and what it cannot hold.

    ``numeric(p, s)`` holds ``p - s`` digits before the point and ``s`` after it (a negative
    ``s`` rounds to tens, hundreds...; an ``s`` above ``p`` leaves only zeros before it). The
    NUMBER keeps the scale (at most 37) and as many digits before the point as fit in 38."""

    precision: int
    scale: int
    # A value at or above 10**whole_limit does not fit (None: every value of the column does).
    whole_limit: int | None
    # Digits after the point beyond the scale, trailing zeros aside, would be rounded (only a
    # scale above 37, or an unconstrained numeric, can have them).
    scale_checked: bool

    @property
    def sql(self) -> str:
        return f"NUMBER({self.precision}, {self.scale})"


def number_type(modifiers: tuple[int, ...]) -> NumberType:
    """``modifiers``: (), (p,) or (p, s), as ``format_type`` writes them."""
    if not modifiers:
        whole = MAX_PRECISION - UNCONSTRAINED_SCALE
        return NumberType(MAX_PRECISION, UNCONSTRAINED_SCALE, whole, True)
    p, s = modifiers[0], (modifiers[1] if len(modifiers) > 1 else 0)
    scale = min(max(s, 0), MAX_SCALE)
    whole = max(p - s, 0)
    precision = min(whole + scale, MAX_PRECISION)
    limit = precision - scale if precision - scale < whole else None
    return NumberType(max(precision, 1), scale, limit, s > MAX_SCALE)


def numeric_typmod(typmod: int) -> tuple[int, ...]:
    """A numeric's (p, s) from its typmod, as pgoutput's Relation message sends it
    (PostgreSQL 15: ``((p << 16) | (s & 0x7ff)) + 4``, the scale 11-bit signed)."""
    if typmod < 4:
        return ()
    t = typmod - 4
    return ((t >> 16) & 0xFFFF, ((t & 0x7FF) ^ 1024) - 1024)


def numeric_check(number: NumberType) -> Check:
    def check(value: bytes) -> str | None:
        if value == b"NaN":
            return "nan"
        if value.endswith(b"Infinity"):
            return "numeric_out_of_range"
        whole, _, frac = value.lstrip(b"-").partition(b".")
        if number.whole_limit is not None and len(whole.lstrip(b"0")) > number.whole_limit:
            return "numeric_out_of_range"
        if number.scale_checked and len(frac.rstrip(b"0")) > number.scale:
            return "numeric_inexact"
        return None

    return check


def check_datetime(value: bytes) -> str | None:
    if value[4:5] == b"-" and not value.endswith(b" BC"):
        return None
    if value in (b"infinity", b"-infinity"):
        return "infinite"
    if value.endswith(b" BC"):
        return "before_year_1"
    return "after_year_9999"


def check_time(value: bytes) -> str | None:
    return "time_out_of_range" if value.startswith(b"24:") else None


def check_text(value: bytes) -> str | None:
    return "longer_than_16mb" if len(value) > MAX_TEXT else None


class _Duplicate(Exception):
    pass


def _pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Duplicate
    return out


def json_number_exact(text: str) -> bool:
    """Whether PARSE_JSON keeps the number ``text`` exactly: written without an exponent and
    within NUMBER(38, 37) it is fixed-point; otherwise a DOUBLE, exact only when the double's
    shortest form is the same number."""
    if "e" not in text and "E" not in text:
        whole, _, frac = text.lstrip("-").partition(".")
        if len(whole.lstrip("0")) + len(frac) <= MAX_PRECISION and len(frac) <= MAX_SCALE:
            return True
    try:
        number = Decimal(text)
    except InvalidOperation:
        return False
    if number == 0:
        return True
    if not _DOUBLE_MIN <= abs(number) <= _DOUBLE_MAX:
        return False  # beyond a double, or subnormal (not relied on)
    return Decimal(repr(float(text))) == number


def check_json(value: bytes) -> str | None:
    exact = True

    def number(text: str) -> str:
        nonlocal exact
        exact = exact and json_number_exact(text)
        return text

    try:
        json.loads(value, object_pairs_hook=_pairs, parse_float=number, parse_int=number)
    except _Duplicate:
        return "json_duplicate_key"
    except ValueError:
        return None  # not this rule's concern: PostgreSQL validated it
    return None if exact else "json_number_inexact"


# A jsonb value has no duplicate keys and writes no number with an exponent: a number it holds
# that NUMBER(38, 37) cannot has a run of at least 20 digits (else at most 19 on each side of
# the point), so a text without one needs no parsing (source.table's SQL screens the same way).
_LONG_DIGITS = re.compile(rb"[0-9]{20}").search


def check_jsonb(value: bytes) -> str | None:
    return None if _LONG_DIGITS(value) is None else check_json(value)


def check_for(type_name: str) -> Check | None:
    """The rule for a column of PostgreSQL type ``type_name`` (``format_type`` text), or None
    when every value of the type is held exactly."""
    base = re.sub(r"\([^)]*\)", "", type_name).strip()
    if base == "numeric":
        found = re.fullmatch(r"[^(]*\(([-0-9, ]+)\)", type_name)
        mods = tuple(int(v) for v in found.group(1).split(",")) if found else ()
        return numeric_check(number_type(mods))
    if base in _DATETIME_TYPES:
        return check_datetime
    if base == "time without time zone":
        return check_time
    if base in _TEXT_TYPES:
        return check_text
    if base == "json":
        return check_json
    if base == "jsonb":
        return check_jsonb
    return None


def _split_csv(line: bytes) -> list[bytes | None]:
    """One CSV line as COPY writes it -> its fields, None for NULL (an unquoted empty field),
    b"" for an empty string (``""``). The standard library's reader cannot tell the two apart
    before Python 3.12."""
    fields: list[bytes | None] = []
    i, n = 0, len(line)
    while True:
        if i < n and line[i] == 34:  # '"'
            out = bytearray()
            i += 1
            while True:
                j = line.index(b'"', i)
                out += line[i:j]
                if j + 1 < n and line[j + 1] == 34:
                    out += b'"'
                    i = j + 2
                    continue
                i = j + 1
                break
            fields.append(bytes(out))
        else:
            j = line.find(b",", i)
            j = n if j < 0 else j
            fields.append(line[i:j] or None)
            i = j
        if i >= n:
            return fields
        i += 1  # the comma
        if i == n:
            fields.append(None)
            return fields


_NEEDS_QUOTE = re.compile(rb'[,"\r\n]').search


def quote(value: bytes) -> bytes:
    """A CSV field as COPY quotes it: empty strings and values with a comma, quote, CR or LF
    (the logical encoder writes every field with it)."""
    if not value:
        return b'""'
    if _NEEDS_QUOTE(value) is None:
        return value
    return b'"' + value.replace(b'"', b'""') + b'"'


class QuarantineJudge:
    """Turns a quarantined row (the whole CSV line, its original values) into the row the
    warehouse gets instead: every value Snowflake cannot hold set to NULL, the
    ``_cdc_quarantined`` field naming each such column and its reason (``col:reason;...``),
    and the day the row belongs to. A row whose key holds such a value has no warehouse row
    (None): it stays in the quarantine prefix alone."""

    def __init__(
        self,
        header: Sequence[str],
        checks: dict[str, Check],
        key: Sequence[str],
        partition: str | None,
    ) -> None:
        self._checks = [(i, name, checks[name]) for i, name in enumerate(header) if name in checks]
        header = list(header)
        self._key = {header.index(k) for k in key if k in header}
        self._partition = header.index(partition) if partition in header else None
        self._ts = header.index("_cdc_ts")

    @classmethod
    def for_types(
        cls,
        header: Sequence[str],
        types: Iterable[tuple[str, str]],
        key: Sequence[str],
        partition: str | None,
    ) -> QuarantineJudge:
        """From (name, ``format_type``) pairs."""
        checks = {name: check for name, t in types if (check := check_for(t)) is not None}
        return cls(header, checks, key, partition)

    def derive(self, line: bytes) -> tuple[bytes, bytes] | None:
        """(day, line with the ``_cdc_quarantined`` field appended) for a row line ending in
        a newline."""
        fields = _split_csv(line.rstrip(b"\n"))
        reasons = []
        for i, name, check in self._checks:
            value = fields[i]
            if value is not None and (why := check(value)) is not None:
                if i in self._key:
                    return None
                reasons.append(f"{name}:{why}")
                fields[i] = None
        if not reasons:
            return None  # flagged by a rule this judge does not know: withheld whole
        if self._partition is None:
            day = (fields[self._ts] or b"")[:10] or b"unknown"
        else:
            value = fields[self._partition]
            day = value[:10] if value is not None else b"unknown"
        out = [b"" if v is None else quote(v) for v in fields]
        out.append(quote(";".join(reasons).encode()) if reasons else b"")
        return day, b",".join(out) + b"\n"
