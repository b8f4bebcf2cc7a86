"""The value forms of types the warehouse reads as JSON: the logical decoder's conversion of
PostgreSQL's array text output equals what the watermark mode's SQL (``Column.csv_expr``)
makes PostgreSQL write, value for value, on a real server."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from cdc_daemon.capture.logical.encode import array_json
from cdc_daemon.source.table import Column

ARRAYS = [
    ("text[]", "ARRAY['a', NULL, 'b,c', 'q\"x', '', 'back\\slash', 'br[ack]et', 'NULL']"),
    ("text[]", "ARRAY[E'line\\nbreak', E'tab\\there', 'ünï', E'\\x01ctl']"),
    ("character varying(10)[]", "ARRAY['{a}', ' sp ']::varchar(10)[]"),
    ("integer[]", "ARRAY[[1, 2], [3, NULL]]"),
    ("integer[]", "'[0:1]={7,8}'::int[]"),
    ("integer[]", "'{}'::int[]"),
    ("numeric[]", "ARRAY[1.000000000000000000001, -0.5, 'NaN', 1e40]::numeric[]"),
    ("double precision[]", "ARRAY[0.1, 'Infinity', '-Infinity', 'NaN', 1e300, -2.5e-7]::float8[]"),
    ("real[]", "ARRAY[0.1, 3.4e38]::real[]"),
    ("bigint[]", "ARRAY[-9223372036854775808, 9223372036854775807]"),
    ("boolean[]", "ARRAY[true, false, NULL]"),
    ("uuid[]", "ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid]"),
    ("timestamp with time zone[]", "ARRAY['2011-03-27 00:30:00.25+00'::timestamptz, NULL]"),
    ("date[]", "ARRAY['2011-03-27'::date, 'infinity']"),
    ("jsonb[]", "ARRAY['{\"k\": [1, \"two\"]}'::jsonb, 'null'::jsonb]"),
    ("interval[]", "ARRAY['1 day 02:03:04'::interval]"),
    ("inet[]", "ARRAY['10.0.0.1/8'::inet]"),
    ("bytea[]", "ARRAY['\\x00ff'::bytea]"),
    ("text[]", "ARRAY[ARRAY['a', 'b'], ARRAY['c', NULL]]"),
]


@pytest.mark.parametrize(("type_name", "literal"), ARRAYS)
def test_logical_array_form_equals_the_sql_form(pg_dsn: str, type_name: str, literal: str) -> None:
    """array_json(the value's text output) == csv_expr's array_to_json, for arrays of
    numbers (NaN, infinities, 40 digits), booleans, text with quotes, commas, backslashes,
    brackets, the word NULL, control characters and non-ASCII, several dimensions, bounds,
    and element types written as text (uuid, timestamptz, date, jsonb, interval, inet,
    bytea). The session is the capture's (UTC, ISO dates, extra_float_digits 1)."""
    column = Column("v", type_name)
    with psycopg.connect(
        pg_dsn, options="-c TimeZone=UTC -c DateStyle=ISO -c extra_float_digits=1"
    ) as conn:
        conn.execute(
            sql.SQL("CREATE TEMP TABLE t AS SELECT {}::{} AS v").format(
                sql.SQL(literal), sql.SQL(type_name)
            )
        )
        row = conn.execute(
            sql.SQL(
                "SELECT v::text, ({})::text, (SELECT oid FROM pg_type WHERE oid ="
                " (SELECT typelem FROM pg_type WHERE oid = pg_typeof(v)))::int8"
                " FROM t"
            ).format(column.csv_expr())
        ).fetchone()
    assert row is not None
    text, expected, element = row
    assert array_json(str(text).encode(), int(element)) == str(expected).encode()
