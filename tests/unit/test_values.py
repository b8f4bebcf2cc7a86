"""The rules deciding which values Snowflake holds exactly (``source.values``), the NUMBER a
numeric maps to, and the quarantine's judge that gives a flagged row its warehouse form. Pure;
the same rules as SQL are compared with these on a real PostgreSQL in
tests/integration/test_value_rules.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_daemon.capture.logical.encode import JSON, JSONB, NUMERIC, TIME, ColumnType, RowEncoder
from cdc_daemon.source.values import (
    QuarantineJudge,
    _split_csv,
    check_for,
    json_number_exact,
    number_type,
    numeric_typmod,
)


@pytest.mark.parametrize(
    ("modifiers", "sql", "whole_limit", "scale_checked"),
    [
        ((), "NUMBER(38, 9)", 29, True),
        ((12, 3), "NUMBER(12, 3)", None, False),
        ((38, 37), "NUMBER(38, 37)", None, False),
        ((45, 15), "NUMBER(38, 15)", 23, False),
        ((40, 2), "NUMBER(38, 2)", 36, False),
        ((5, -2), "NUMBER(7, 0)", None, False),
        ((38, -2), "NUMBER(38, 0)", 38, False),
        ((3, 5), "NUMBER(5, 5)", None, False),
        ((40, 40), "NUMBER(37, 37)", None, True),
        ((7,), "NUMBER(7, 0)", None, False),
    ],
)
def test_number_type(
    modifiers: tuple[int, ...], sql: str, whole_limit: int | None, scale_checked: bool
) -> None:
    """Every numeric(p, s) PostgreSQL accepts maps to a NUMBER Snowflake accepts (precision
    1-38, scale 0-37, scale <= precision), holding every value of the column unless a range
    or scale check says which ones it cannot."""
    number = number_type(modifiers)
    assert (number.sql, number.whole_limit, number.scale_checked) == (
        sql,
        whole_limit,
        scale_checked,
    )
    assert 1 <= number.precision <= 38
    assert 0 <= number.scale <= min(37, number.precision)


@pytest.mark.parametrize(
    ("type_name", "value", "reason"),
    [
        ("numeric(45,15)", b"12345678901234567890123.5", None),
        ("numeric(45,15)", b"123456789012345678901234.5", "numeric_out_of_range"),
        ("numeric(40,2)", b"-" + b"9" * 37 + b".99", "numeric_out_of_range"),
        ("numeric(40,2)", b"9" * 36 + b".99", None),
        ("numeric(5,-2)", b"9999900", None),
        ("numeric(3,5)", b"0.00123", None),
        ("numeric(40,40)", b"0." + b"1" * 37 + b"000", None),
        ("numeric(40,40)", b"0." + b"1" * 38 + b"00", "numeric_inexact"),
        ("numeric(12,3)", b"NaN", "nan"),
        ("time without time zone", b"24:00:00", "time_out_of_range"),
        ("time(3) without time zone", b"23:59:59.999", None),
        ("json", b'{"a": 1, "a": 2}', "json_duplicate_key"),
        ("json", b'{"a": {"b": 1, "b": 1}}', "json_duplicate_key"),
        ("json", b'[{"a": 1}, {"a": 2}]', None),
        ("json", b'{"x": 0.1000000000000000055511151231257827}', None),
        ("json", b'{"x": 0.100000000000000005551115123125782711111}', "json_number_inexact"),
        ("json", b'{"x": 1e-400}', "json_number_inexact"),
        ("json", b'{"x": 1.5e2}', None),
        ("json", b'{"x": 1.2345678901234567890e5}', "json_number_inexact"),
        ("jsonb", b'{"x": 123456789012345678901234567890123456789}', "json_number_inexact"),
        ("jsonb", b'{"x": [1, 2.50, -0]}', None),
        ("double precision", b"NaN", None),
    ],
)
def test_rules(type_name: str, value: bytes, reason: str | None) -> None:
    """Each rule flags exactly the values its Snowflake type cannot hold (numbers past the
    NUMBER's digits, TIME 24:00, JSON that PARSE_JSON refuses or turns into a different
    number) and passes the ones it can."""
    check = check_for(type_name)
    assert (check(value) if check else None) == reason


@given(st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False))
def test_json_number_exact_for_any_double(value: float) -> None:
    """A normal double's shortest text is always held exactly (as NUMBER or as the same
    double); subnormals are treated as inexact (docs/design.md, "Quarantine")."""
    assert json_number_exact(repr(value))


def test_logical_encoder_uses_the_same_numeric_rules() -> None:
    """The logical encoder reads numeric(p, s) from the Relation message's typmod and applies
    the same rule as the catalog's type name: numeric(45,15) past 23 digits is quarantined."""
    typmod = ((45 << 16) | 15) + 4
    assert numeric_typmod(typmod) == (45, 15)
    assert numeric_typmod(((5 << 16) | (-2 & 0x7FF)) + 4) == (5, -2)
    encoder = RowEncoder(
        [
            ColumnType("n", NUMERIC, typmod=typmod),
            ColumnType("t", TIME),
            ColumnType("j", JSON),
            ColumnType("b", JSONB),
        ],
        None,
    )
    assert encoder.encode([b"1" * 23, b"10:00:00", b"{}", b"{}"])[0] == b""
    assert encoder.encode([b"1" * 24, None, None, None])[0] == b"!numeric_out_of_range-n"
    assert encoder.encode([b"1", b"24:00:00", None, None])[0] == b"!time_out_of_range-t"
    assert encoder.encode([b"1", None, b'{"a":1,"a":1}', None])[0] == b"!json_duplicate_key-j"
    # jsonb writes numbers without an exponent: 1e-400 as 0.000...1.
    tiny = b"[0." + b"0" * 399 + b"1]"
    assert encoder.encode([b"1", None, None, tiny])[0] == b"!json_number_inexact-b"


@given(
    st.recursive(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.decimals(allow_nan=False, allow_infinity=False),
            st.text(max_size=5),
        ),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)
        ),
        max_leaves=8,
    )
)
def test_jsonb_screen_never_hides_an_inexact_number(value: object) -> None:
    """The jsonb rule's screen (no run of 20 digits: nothing to parse) gives the verdict the
    full parse gives, for any document written without exponents as jsonb writes it."""
    import json
    from decimal import Decimal

    from cdc_daemon.source.values import check_json, check_jsonb

    def plain(v: object) -> str:
        if isinstance(v, Decimal):
            return format(v, "f")
        if isinstance(v, list):
            return "[" + ", ".join(plain(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)}: {plain(x)}" for k, x in v.items()) + "}"
        return json.dumps(v)

    text = plain(value).encode()
    assert check_jsonb(text) == check_json(text)


@given(st.lists(st.one_of(st.none(), st.binary(max_size=6)), min_size=1, max_size=5))
def test_split_csv_tells_null_from_empty(fields: list[bytes | None]) -> None:
    """The judge's CSV splitter reads back what COPY wrote: NULL (unquoted empty) and ''
    (``""``) apart, quotes, commas and line breaks inside quoted fields."""
    from cdc_daemon.source.values import quote

    line = b",".join(b"" if f is None else quote(f) for f in fields)
    assert _split_csv(line) == fields


def test_judge_withholds_every_bad_value() -> None:
    """A quarantined row's warehouse form: every value Snowflake cannot hold is NULL and
    named with its reason in _cdc_quarantined, the other values as they were; its day is the
    partition value's, or 'unknown' when that value itself is withheld."""
    header = ["id", "at", "n", "t", "note", "_cdc_op", "_cdc_seq", "_cdc_ts"]
    judge = QuarantineJudge.for_types(
        header,
        [
            ("id", "bigint"),
            ("at", "timestamp with time zone"),
            ("n", "numeric(40,2)"),
            ("t", "time without time zone"),
            ("note", "text"),
        ],
        ("id",),
        "at",
    )
    big = b"9" * 37
    line = (
        b"7,2011-03-27T00:30:00+00:00," + big + b',24:00:00,"a,b",U,5,2026-01-01T00:00:00+00:00\n'
    )
    derived = judge.derive(line)
    assert derived == (
        b"2011-03-27",
        b'7,2011-03-27T00:30:00+00:00,,,"a,b",U,5,2026-01-01T00:00:00+00:00,'
        b"n:numeric_out_of_range;t:time_out_of_range\n",
    )
    infinite = b"8,infinity,1,10:00:00,,D,6,2026-01-01T00:00:00+00:00\n"
    assert judge.derive(infinite) == (
        b"unknown",
        b"8,,1,10:00:00,,D,6,2026-01-01T00:00:00+00:00,at:infinite\n",
    )


def test_judge_leaves_a_row_with_a_bad_key_in_quarantine_alone() -> None:
    """A row whose key holds a value Snowflake cannot hold has no warehouse form (the merge
    needs the key): the judge returns None and the row stays in the quarantine prefix."""
    header = ["k", "_cdc_op", "_cdc_seq", "_cdc_ts"]
    judge = QuarantineJudge.for_types(header, [("k", "date")], ("k",), None)
    assert judge.derive(b"infinity,I,1,2026-01-01T00:00:00+00:00\n") is None
