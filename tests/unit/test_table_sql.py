"""The SQL pieces ``source.table`` builds for a column, by type (no Postgres involved; the
integration suites run them)."""

from __future__ import annotations

import pytest

from cdc_daemon.source.table import Column


def checks(type_name: str) -> list[str]:
    return [cond.as_string(None) for cond, _ in Column("x", type_name).quarantine_checks()]


@pytest.mark.parametrize(
    ("type_name", "base"),
    [
        ("numeric(12,3)", "numeric"),
        ("timestamp(3) with time zone", "timestamp with time zone"),
        ("timestamp(0) without time zone", "timestamp without time zone"),
        ("character varying(10)[]", "character varying[]"),
        ("text", "text"),
    ],
)
def test_base_type_drops_modifiers(type_name: str, base: str) -> None:
    """A column's base type is its type without length, precision or scale modifiers; an array
    keeps its brackets."""
    assert Column("x", type_name).base_type == base


def test_checks_the_type_rules_out_are_left_out() -> None:
    """Only the quarantine checks a column's type can fail are emitted: numeric(12,3) only the
    NaN check, unconstrained numeric the range and scale checks of NUMBER(38, 9), one with more
    than 38 integer digits the range check,
    and varchar the 16 MiB length check only when its declared length could exceed it."""
    assert checks("numeric(12,3)") == ["\"x\" = 'NaN'::numeric"]
    # Unconstrained (NUMBER(38, 9) in Snowflake): NaN, out of range, more than 9 decimals.
    assert len(checks("numeric")) == 3
    assert len(checks("numeric(38,-5)")) == 2  # 43 digits before the point
    assert checks("character varying(100)") == []
    assert checks("character varying") == ['octet_length("x") > 16777216']
    assert checks("character varying(5000000)") == ['octet_length("x") > 16777216']


def test_arrays_get_no_scalar_checks() -> None:
    """octet_length() or = 'NaN' on an array would fail the COPY: arrays get none."""
    assert checks("character varying(10)[]") == []
    assert checks("numeric(12,3)[]") == []
    assert Column("x", "timestamp(3) with time zone[]").csv_expr().as_string(None) == (
        'array_to_json("x"::text[])::text'
    )


def test_arrays_are_json_arrays() -> None:
    """An array of numbers or booleans is array_to_json's JSON (numbers with every digit);
    an array of any other element type a JSON array of the elements' text."""
    assert Column("x", "numeric(12,3)[]").csv_expr().as_string(None) == ('array_to_json("x")::text')
    assert Column("x", "integer[]").csv_expr().as_string(None) == 'array_to_json("x")::text'
    assert Column("x", "boolean[]").csv_expr().as_string(None) == 'array_to_json("x")::text'
    assert Column("x", "uuid[]").csv_expr().as_string(None) == ('array_to_json("x"::text[])::text')


def test_timestamps_with_a_precision_are_converted() -> None:
    """A timestamptz with a declared precision is written from its text with the T and a :00
    offset minute added (ISO-8601, like the unmodified type), and keeps its one quarantine check."""
    expr = Column("x", "timestamp(3) with time zone").csv_expr().as_string(None)
    assert "replace(\"x\"::text, ' ', 'T') || ':00'" in expr
    assert len(checks("timestamp(3) with time zone")) == 1
