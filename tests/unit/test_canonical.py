"""The canonical text of each type of the mapping, as SQL on both sides
(``warehouse.canonical``): pinned here so that a change to one side shows up beside the other."""

from __future__ import annotations

import pytest

from cdc_daemon.warehouse.canonical import Canon, canon, pg_row_hash, sf_row_hash
from cdc_daemon.warehouse.model import column_of

# (PostgreSQL type, PostgreSQL canonical SQL, Snowflake canonical SQL, exact, numeric order)
CASES = [
    ("smallint", '"c"::text', 'TO_VARCHAR("C")', True, True),
    ("integer", '"c"::text', 'TO_VARCHAR("C")', True, True),
    ("bigint", '"c"::text', 'TO_VARCHAR("C")', True, True),
    ("numeric(12,3)", 'round("c", 3)::text', 'TO_VARCHAR("C")', True, False),
    ("numeric(10,0)", 'round("c", 0)::text', 'TO_VARCHAR("C")', True, True),
    ("numeric", 'round("c", 9)::text', 'TO_VARCHAR("C")', True, False),
    (
        "boolean",
        "CASE WHEN \"c\" THEN 'true' WHEN NOT \"c\" THEN 'false' END",
        "IFF(\"C\", 'true', 'false')",
        True,
        False,
    ),
    ("date", "to_char(\"c\", 'YYYY-MM-DD')", "TO_VARCHAR(\"C\", 'YYYY-MM-DD')", True, False),
    (
        "timestamp without time zone",
        "to_char(\"c\", 'YYYY-MM-DD HH24:MI:SS.US')",
        "TO_VARCHAR(\"C\", 'YYYY-MM-DD HH24:MI:SS.FF6')",
        True,
        False,
    ),
    (
        "timestamp with time zone",
        "to_char(\"c\" AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')",
        "TO_VARCHAR(CONVERT_TIMEZONE('UTC', \"C\"), 'YYYY-MM-DD HH24:MI:SS.FF6')",
        True,
        False,
    ),
    (
        "time without time zone",
        "to_char(\"c\", 'HH24:MI:SS.US')",
        "TO_VARCHAR(TIMESTAMP_NTZ_FROM_PARTS('1970-01-01'::DATE, \"C\"), 'HH24:MI:SS.FF6')",
        True,
        False,
    ),
    ("bytea", "encode(\"c\", 'hex')", 'HEX_ENCODE("C", 0)', True, False),
    ("text", 'CASE WHEN "c" IS NOT NULL THEN concat("c") END', '"C"', True, False),
    ("character(3)", 'CASE WHEN "c" IS NOT NULL THEN concat("c") END', '"C"', True, False),
    ("uuid", 'CASE WHEN "c" IS NOT NULL THEN concat("c") END', '"C"', True, False),
    ("interval", 'CASE WHEN "c" IS NOT NULL THEN concat("c") END', '"C"', True, False),
    ("real", "''", "''", False, False),
    ("double precision", "''", "''", False, False),
    ("jsonb", "''", "''", False, False),
    ("json", "''", "''", False, False),
    ("integer[]", "''", "''", False, False),
]


def _pg(k: Canon) -> str:
    return k.pg.as_string(None)


@pytest.mark.parametrize(("pg_type", "pg", "sf", "exact", "numeric_order"), CASES)
def test_each_type_has_its_canonical_text_on_both_sides(
    pg_type: str, pg: str, sf: str, exact: bool, numeric_order: bool
) -> None:
    """Every type of the mapping has one canonical form per side; floats, JSON and arrays are
    the ones hashed by NULL or not."""
    k = canon(column_of("c", pg_type))
    assert (_pg(k), k.sf, k.exact, k.numeric_order) == (pg, sf, exact, numeric_order)


def test_the_row_hash_joins_values_and_marks_null_the_same_way_on_both_sides() -> None:
    """A row's text joins its values with CHR(31) and writes NULL as CHR(30) on both sides;
    the hash is the last 15 hex digits of its MD5 (MD5_NUMBER_LOWER64 modulo 2^60)."""
    canons = [canon(column_of("id", "bigint", key=True)), canon(column_of("r", "real"))]
    pg = pg_row_hash(canons).as_string(None)
    assert pg == (
        "('x' || substr(md5(coalesce(\"id\"::text, chr(30)) || chr(31) || "
        "CASE WHEN \"r\" IS NULL THEN chr(30) ELSE '' END), 18, 15))::bit(60)::bigint"
    )
    assert sf_row_hash(canons) == (
        'MOD(MD5_NUMBER_LOWER64(COALESCE(TO_VARCHAR("ID"), CHR(30)) || CHR(31) || '
        "IFF(\"R\" IS NULL, CHR(30), '')), 1152921504606846976)"
    )
