"""The quarantine rules as the watermark export runs them (SQL inside COPY, from
``Column.quarantine_checks`` / ``TableInfo.day_expr``) give the same verdict as the Python
rules the logical encoder and the judge run (``source.values``), value for value, on a real
PostgreSQL 15; and a float's text is what Snowflake's FLOAT reads."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from cdc_daemon.source.table import Column, TableInfo
from cdc_daemon.source.values import check_for

# (type, SQL literal): values each rule must pass or flag, including the ones that would
# make a careless SQL form fail the whole COPY (float8 casts out of range).
CASES = [
    ("numeric(45,15)", "12345678901234567890123.5"),
    ("numeric(45,15)", "123456789012345678901234.5"),
    ("numeric(45,15)", "'NaN'"),
    ("numeric(40,2)", "-9999999999999999999999999999999999999.99"),
    ("numeric(40,2)", "999999999999999999999999999999999999.99"),
    ("numeric(5,-2)", "9999900"),
    ("numeric(3,5)", "0.00123"),
    ("numeric(40,40)", "0.1111111111111111111111111111111111111000"),
    ("numeric(40,40)", "0.1111111111111111111111111111111111111100"),
    ("numeric", "'Infinity'"),
    ("numeric", "123456789012345678901234567890"),
    ("numeric", "1.0000000001"),
    ("numeric", "1.000000000000"),
    ("time", "'24:00:00'"),
    ("time(3)", "'23:59:59.999'"),
    ("json", """'{"a": 1, "a": 2}'"""),
    ("json", """'{"a": {"b": [1, {"c": 1, "c": 1}]}}'"""),
    ("json", """'[{"a": 1}, {"a": 2}]'"""),
    ("json", """'{"x": 0.1000000000000000055511151231257827}'"""),
    ("json", """'{"x": 0.100000000000000005551115123125782711111}'"""),
    ("json", """'{"x": 1e-400}'"""),
    ("json", """'{"x": 1e400}'"""),
    ("json", """'{"x": 1.5e2, "y": -0}'"""),
    ("json", """'{"x": 1.2345678901234567890e5}'"""),
    ("json", """'"just a string"'"""),
    ("jsonb", """'{"x": 123456789012345678901234567890123456789}'"""),
    ("jsonb", """'{"x": [1, 2.50, -0, {"deep": 1e-400}]}'"""),
    ("jsonb", """'{"x": 1e300}'"""),
    ("jsonb", """'{"x": 0.1000000000000000055511151231257827}'"""),
    ("timestamptz", "'infinity'"),
    ("date", "'0044-03-15 BC'"),
    ("double precision", "'NaN'"),
    ("double precision", "'-Infinity'"),
]


@pytest.mark.parametrize(("type_name", "literal"), CASES)
def test_sql_and_python_rules_agree(pg_dsn: str, type_name: str, literal: str) -> None:
    """For each value: the reason the watermark export's SQL gives (its day expression) is
    the one ``source.values.check_for`` gives on the value's text as COPY writes it, and the
    COPY never fails on it."""
    with psycopg.connect(
        pg_dsn, options="-c TimeZone=UTC -c DateStyle=ISO -c extra_float_digits=1"
    ) as conn:
        conn.execute(
            sql.SQL("CREATE TEMP TABLE t AS SELECT {}::{} AS v").format(
                sql.SQL(literal), sql.SQL(type_name)
            )
        )
        (formatted,) = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = 't'::regclass AND attname = 'v'"
        ).fetchone() or ("",)
        column = Column("v", str(formatted))
        table = TableInfo("pg_temp", "t", (column,), column, None)
        row = conn.execute(
            sql.SQL("SELECT ({})::text, ({})::text FROM t").format(
                table.day_expr("2026-12-07T00:00:00+00:00"), column.csv_expr()
            )
        ).fetchone()
    assert row is not None
    day, text = row
    sql_reason = day[1:].removesuffix("-v") if day.startswith("!") else None
    check = check_for(str(formatted))
    assert sql_reason == (check(text.encode()) if check else None)


@pytest.mark.parametrize(("literal", "written"), [("'NaN'", "NaN"), ("'Infinity'", "inf")])
def test_float_specials_are_written_as_snowflake_reads_them(
    pg_dsn: str, literal: str, written: str
) -> None:
    """A float's NaN and infinities are exported, not quarantined, as ``NaN``, ``inf`` and
    ``-inf``: the special values Snowflake's FLOAT documents."""
    column = Column("v", "double precision")
    with psycopg.connect(pg_dsn, options="-c extra_float_digits=1") as conn:
        row = conn.execute(
            sql.SQL("SELECT {} FROM (SELECT {}::float8 AS v) AS t").format(
                column.csv_expr(), sql.SQL(literal)
            )
        ).fetchone()
        negative = conn.execute(
            sql.SQL("SELECT {} FROM (SELECT '-Infinity'::float8 AS v) AS t").format(
                column.csv_expr()
            )
        ).fetchone()
    assert row == (written,)
    assert negative == ("-inf",)
    assert not column.quarantine_checks()
