"""Which retyped columns are widenings (pure): the PostgreSQL types a column may move between
without a stop, the Relation message's (oid, typmod) read as format_type names them, and the
Snowflake types that ALTER COLUMN ... SET DATA TYPE widens in place."""

from __future__ import annotations

import pytest

from cdc_daemon.capture.logical.tables import type_text
from cdc_daemon.warehouse.model import retype_problem, sf_type, widens_in_place
from cdc_daemon.warehouse.plan import widen_statement

WIDENINGS = [
    ("character varying(10)", "character varying(20)"),
    ("character varying(10)", "character varying(10)"),
    ("character varying(10)", "character varying"),
    ("character varying(10)", "text"),
    ("character varying", "text"),
    ("text", "character varying"),
    ("smallint", "integer"),
    ("smallint", "bigint"),
    ("integer", "bigint"),
    ("integer", "numeric(12,0)"),
    ("numeric(10,2)", "numeric(14,2)"),
    ("numeric(40,2)", "numeric(50,2)"),
    ("timestamp(3) without time zone", "timestamp without time zone"),
    ("timestamp(0) with time zone", "timestamp(6) with time zone"),
]

NOT_WIDENINGS = [
    ("character varying(20)", "character varying(10)", "shorter"),
    ("text", "character varying(10)", "shorter or bounded"),
    ("bigint", "integer", "smaller precision"),
    ("integer", "smallint", "smaller precision"),
    ("numeric(14,2)", "numeric(10,2)", "smaller precision"),
    ("numeric(10,2)", "numeric(12,3)", "another scale"),
    ("integer", "numeric", "another scale"),
    ("numeric(10,2)", "numeric", "another scale"),
    ("integer", "text", "not a number type"),
    ("timestamp without time zone", "timestamp with time zone", "TIMESTAMP_NTZ to TIMESTAMP_TZ"),
    ("timestamp with time zone", "timestamp without time zone", "not a documented widening"),
    ("timestamp(6) without time zone", "timestamp(3) without time zone", "fewer fractional"),
    ("character(5)", "text", "not a documented widening"),
    ("date", "timestamp without time zone", "not a documented widening"),
    ("text", "integer", "not a documented widening"),
]


@pytest.mark.parametrize(("old", "new"), WIDENINGS)
def test_documented_widenings_are_followed(old: str, new: str) -> None:
    """Each documented widening is one (no problem); its Snowflake type is the same or one that
    Snowflake widens in place, on the landing and on the current-state table."""
    assert retype_problem(old, new) is None
    a, b = sf_type(old), sf_type(new)
    assert a.landing == b.landing or widens_in_place(a.landing, b.landing)
    assert a.final == b.final or widens_in_place(a.final, b.final)


@pytest.mark.parametrize(("old", "new", "why"), NOT_WIDENINGS)
def test_other_retypes_are_refused_with_the_reason(old: str, new: str, why: str) -> None:
    """A narrowing, a changed scale, another type (timestamp to timestamptz among them) is not a
    widening: the reason says which."""
    problem = retype_problem(old, new)
    assert problem is not None
    assert why in problem


def test_relation_oids_and_typmods_read_as_format_type_names_them() -> None:
    """A Relation message's (type oid, typmod) gives the name format_type() gives (the one
    retype_problem judges): lengths and precisions from the typmod, none for -1."""
    assert type_text(1043, 14) == "character varying(10)"
    assert type_text(1043, -1) == "character varying"
    assert type_text(25, -1) == "text"
    assert type_text(23, -1) == "integer"
    assert type_text(20, -1) == "bigint"
    assert type_text(1700, ((12 << 16) | 3) + 4) == "numeric(12,3)"
    assert type_text(1700, -1) == "numeric"
    assert type_text(1114, 3) == "timestamp(3) without time zone"
    assert type_text(1184, -1) == "timestamp with time zone"
    assert type_text(869, -1) == "type 869"  # inet: never a widening
    assert retype_problem(type_text(869, -1), type_text(25, -1)) == "not a documented widening"


def test_snowflake_widens_a_number_precision_and_a_text_length_in_place_only() -> None:
    """ALTER COLUMN ... SET DATA TYPE widens NUMBER(P,S) to a larger P at the same S and a
    VARCHAR to a longer or unbounded one (DESC's forms against rendered ones); another scale,
    a smaller precision and another type are not widened, and the same type needs no ALTER."""
    assert widens_in_place("NUMBER(10,0)", "NUMBER(19, 0)")
    assert widens_in_place("NUMBER(8,2)", "NUMBER(12, 2)")
    assert widens_in_place("VARCHAR(36)", "VARCHAR")
    assert widens_in_place("VARCHAR(36)", "VARCHAR(64)")
    assert not widens_in_place("NUMBER(19,0)", "NUMBER(10, 0)")
    assert not widens_in_place("NUMBER(10,2)", "NUMBER(12, 3)")
    assert not widens_in_place("VARCHAR(64)", "VARCHAR(36)")
    assert not widens_in_place("TIMESTAMP_NTZ(9)", "TIMESTAMP_TZ")
    assert not widens_in_place("NUMBER(10,0)", "VARCHAR")
    alter = widen_statement("RAW_SALES", '"QUANTITY"', "NUMBER(10,0)", "NUMBER(19, 0)")
    assert alter == 'ALTER TABLE RAW_SALES ALTER COLUMN "QUANTITY" SET DATA TYPE NUMBER(19, 0)'
    assert widen_statement("SALES", '"QUANTITY"', "NUMBER(19,0)", "NUMBER(19, 0)") is None
    assert widen_statement("SALES", '"NOTE"', "VARCHAR(16777216)", "VARCHAR") is None
    assert widen_statement("SALES", '"AT"', "TIMESTAMP_NTZ(9)", "TIMESTAMP_TZ") is None
    assert widen_statement("SALES", '"QUANTITY"', "", "NUMBER(19, 0)") is None  # no type known
