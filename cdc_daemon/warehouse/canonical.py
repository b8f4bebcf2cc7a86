"""One canonical text per value, written once for PostgreSQL and once for Snowflake, so that
``verify`` can hash a row inside each database and compare the sums (docs/snowflake.md,
"Verification"). Beside the type mapping of ``warehouse.model``: each Snowflake type there has
its form here.

=============================  =============================================  =============
PostgreSQL (warehouse type)    canonical text                                 in the hash
=============================  =============================================  =============
integers (NUMBER(p, 0))        the digits                                     the value
numeric(p, s) (NUMBER(P, S))   the value with exactly S fraction digits       the value
text, varchar, char(n), uuid,  the type's output text (char(n) padded, as     the value
enum, inet, interval... (VAR-  the objects carry it)
CHAR)
boolean                        ``true`` / ``false``                           the value
date                           ``YYYY-MM-DD``                                 the value
timestamp                      ``YYYY-MM-DD HH24:MI:SS.ffffff``               the value
timestamptz                    the same, in UTC                               the value
time                           ``HH24:MI:SS.ffffff``                          the value
bytea (BINARY)                 lower-case hex                                 the value
real, double (FLOAT)           (text forms differ between engines)            NULL or not
json, jsonb (VARIANT), arrays  (key order and number forms differ)            NULL or not
(ARRAY)
hash_columns (VARCHAR(64))     (the HMAC is computed in the daemon only)      NULL or not
=============================  =============================================  =============

A row's text is its columns' canonical texts joined by CHR(31), NULL written CHR(30). Its hash
is the low 60 bits of the MD5 of that text (the last 15 hex digits; Snowflake's
``MD5_NUMBER_LOWER64`` modulo 2^60), summed per key range: exact on both sides. Columns hashed
by NULL-or-not only are compared by value when a range's rows are fetched (``reconcile.verify``
parses floats and JSON on both sides), so a change confined to such a column is found only in a
range that differs for another reason: ``verify`` names those columns in its output.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from cdc_daemon.warehouse.model import SfColumn, base_type

SEPARATOR = 31  # CHR(31) between a row's values
NULL_MARK = 30  # CHR(30) for NULL
HASH_BITS = 60

_INTEGERS = frozenset({"smallint", "integer", "bigint", "oid"})
_TIMESTAMP = "YYYY-MM-DD HH24:MI:SS.US"
_SF_TIMESTAMP = "YYYY-MM-DD HH24:MI:SS.FF6"


@dataclass(frozen=True)
class Canon:
    """How one column is hashed: its canonical text on each side, or (``exact`` false) only
    whether it is NULL; ``numeric_order`` for a key compared as a number, not as text."""

    column: SfColumn
    pg: sql.Composable
    sf: str
    exact: bool
    numeric_order: bool


def canon(column: SfColumn) -> Canon:
    """The column's canonical text as SQL on each side (NULL stays NULL)."""
    c = sql.Identifier(column.source)
    q = column.q
    base = base_type(column.pg_type)
    if column.hashed:
        # The source cannot compute the HMAC in SQL (pgcrypto may be missing, and the salt
        # would be sent to the server): NULL or not in the sums, the hash compared where a
        # range's rows are fetched (``reconcile.verify`` hashes the source's text).
        return Canon(column, sql.SQL("''"), "''", False, False)
    if base in _INTEGERS:
        return Canon(column, sql.SQL("{}::text").format(c), f"TO_VARCHAR({q})", True, True)
    if base == "numeric":
        scale = _scale(column.type.final)
        return Canon(
            column,
            sql.SQL("round({}, {})::text").format(c, sql.Literal(scale)),
            f"TO_VARCHAR({q})",
            True,
            scale == 0,
        )
    if base == "boolean":
        return Canon(
            column,
            sql.SQL("CASE WHEN {c} THEN 'true' WHEN NOT {c} THEN 'false' END").format(c=c),
            f"IFF({q}, 'true', 'false')",
            True,
            False,
        )
    if base == "date":
        return Canon(
            column,
            sql.SQL("to_char({}, 'YYYY-MM-DD')").format(c),
            f"TO_VARCHAR({q}, 'YYYY-MM-DD')",
            True,
            False,
        )
    if base == "timestamp without time zone":
        return Canon(
            column,
            sql.SQL("to_char({}, {})").format(c, sql.Literal(_TIMESTAMP)),
            f"TO_VARCHAR({q}, '{_SF_TIMESTAMP}')",
            True,
            False,
        )
    if base == "timestamp with time zone":
        return Canon(
            column,
            sql.SQL("to_char({} AT TIME ZONE 'UTC', {})").format(c, sql.Literal(_TIMESTAMP)),
            f"TO_VARCHAR(CONVERT_TIMEZONE('UTC', {q}), '{_SF_TIMESTAMP}')",
            True,
            False,
        )
    if base == "time without time zone":
        # TIME has no format of its own in TO_VARCHAR's documented elements beyond the
        # session's TIME_OUTPUT_FORMAT (seconds only): it is read as a time of day 1970-01-01.
        return Canon(
            column,
            sql.SQL("to_char({}, 'HH24:MI:SS.US')").format(c),
            f"TO_VARCHAR(TIMESTAMP_NTZ_FROM_PARTS('1970-01-01'::DATE, {q}), 'HH24:MI:SS.FF6')",
            True,
            False,
        )
    if base == "bytea":
        return Canon(
            column, sql.SQL("encode({}, 'hex')").format(c), f"HEX_ENCODE({q}, 0)", True, False
        )
    if column.type.final in ("FLOAT", "VARIANT", "ARRAY"):
        return Canon(column, sql.SQL("''"), "''", False, False)
    # VARCHAR: the type's output text, as the objects carry it (concat keeps char(n)'s padding,
    # which a cast to text drops).
    return Canon(
        column,
        sql.SQL("CASE WHEN {c} IS NOT NULL THEN concat({c}) END").format(c=c),
        q,
        True,
        False,
    )


def _scale(number: str) -> int:
    """S of ``NUMBER(P, S)``."""
    return int(number.rsplit(",", 1)[1].rstrip(") "))


def pg_value(k: Canon) -> sql.Composable:
    """The column's part of the row text in PostgreSQL."""
    if not k.exact:
        c = sql.Identifier(k.column.source)
        return sql.SQL("CASE WHEN {} IS NULL THEN chr({}) ELSE '' END").format(
            c, sql.Literal(NULL_MARK)
        )
    return sql.SQL("coalesce({}, chr({}))").format(k.pg, sql.Literal(NULL_MARK))


def sf_value(k: Canon) -> str:
    """The column's part of the row text in Snowflake."""
    if not k.exact:
        return f"IFF({k.column.q} IS NULL, CHR({NULL_MARK}), '')"
    return f"COALESCE({k.sf}, CHR({NULL_MARK}))"


def pg_row_hash(canons: list[Canon]) -> sql.Composable:
    """The row's hash in PostgreSQL: a bigint in [0, 2^60)."""
    text = sql.SQL(f" || chr({SEPARATOR}) || ").join(pg_value(k) for k in canons)
    return sql.SQL("('x' || substr(md5({}), 18, 15))::bit(60)::bigint").format(text)


def sf_row_hash(canons: list[Canon]) -> str:
    """The row's hash in Snowflake: MD5_NUMBER_LOWER64 is the digest's low 64 bits as an
    unsigned number (docs: "MD5_NUMBER_LOWER64"); modulo 2^60, the last 15 hex digits."""
    text = f" || CHR({SEPARATOR}) || ".join(sf_value(k) for k in canons)
    return f"MOD(MD5_NUMBER_LOWER64({text}), {1 << HASH_BITS})"
