"""A table's identity: ``TableName(schema, name)``, parsed once by PostgreSQL's rules and
printed once per use (SQL, display, the S3 folder and ledger key, the warehouse's default name).

The S3 folder of a plain name (no ``.``, ``/`` or ``%`` in either part) is ``<schema>.<name>/``;
any other name gets its parts percent-encoded. The default Snowflake name is always a plain
Snowflake identifier (``warehouse_identifier``) and a column keeps its exact text upper-cased
(``warehouse_column``), quoted (docs/design.md#object-names)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from psycopg import sql

# PostgreSQL's reserved key words (and those reserved as a table name): unquoted, they would
# not name a table, so the display form quotes them.
_RESERVED = frozenset(
    """all analyse analyze and any array as asc asymmetric authorization binary both case cast
    check collate collation column concurrently constraint create cross current_catalog
    current_date current_role current_schema current_time current_timestamp current_user
    default deferrable desc distinct do else end except false fetch for foreign freeze from
    full grant group having ilike in initially inner intersect into is isnull join lateral
    leading left like limit localtime localtimestamp natural not notnull null offset on only
    or order outer overlaps placing primary references returning right select session_user
    similar some symmetric system_user table tablesample then to trailing true union unique
    user using variadic verbose when where window with""".split()  # noqa: SIM905
)
_PLAIN_PART = re.compile(r"[a-z_][a-z0-9_$]*\Z")
# An unquoted part: up to a dot, a quote or a space. Wider than PostgreSQL's scanner (which
# wants a letter, digits, _ and $) because the catalog lookup takes the name as a value, and a
# configured ``shop.order-lines`` has always named the table ``order-lines``.
_UNQUOTED = re.compile(r'[^\s."]+')
_QUOTED = re.compile(r'"((?:[^"]|"")*)"')
_UNREADABLE = (
    "{text!r} is not a table name: write schema.table, quoting a part that holds anything but "
    'letters, digits, _ and $ ("Odd.Schema"."Order Lines")'
)
# Snowflake's reserved keywords ("Reserved & limited keywords":
# https://docs.snowflake.com/en/sql-reference/reserved-keywords): unquoted, not a table's name.
SNOWFLAKE_RESERVED = frozenset(
    """ACCOUNT ALL ALTER AND ANY AS ASC BETWEEN BY CASE CAST CHECK COLUMN CONNECT CONNECTION
    CONSTRAINT CREATE CROSS CURRENT CURRENT_DATE CURRENT_TIME CURRENT_TIMESTAMP CURRENT_USER
    DATABASE DELETE DESC DISTINCT DROP ELSE EXISTS FALSE FOLLOWING FOR FROM FULL GRANT GROUP
    GSCLUSTER HAVING ILIKE IN INCREMENT INNER INSERT INTERSECT INTO IS ISSUE JOIN LATERAL LEFT
    LIKE LOCALTIME LOCALTIMESTAMP MINUS NATURAL NOT NULL OF ON OR ORDER ORGANIZATION OUTER
    QUALIFY REGEXP REVOKE RIGHT RLIKE ROW ROWS SAMPLE SCHEMA SELECT SET SOME START TABLE
    TABLESAMPLE THEN TO TRIGGER TRUE TRY_CAST UNION UNIQUE UPDATE USING VALUES VIEW WHEN
    WHENEVER WHERE WINDOW WITH""".split()  # noqa: SIM905
)
# An unquoted Snowflake identifier: "Start with a letter (A-Z, a-z) or an underscore (_).
# Contain only letters, underscores, decimal digits (0-9), and dollar signs ($)", stored and
# resolved upper-cased (https://docs.snowflake.com/en/sql-reference/identifiers-syntax).
SNOWFLAKE_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*\Z")
_NOT_PLAIN_UPPER = re.compile(r"[^A-Z0-9_$]")
_ESCAPE = re.compile("%2E|%2F|%25")
_UNESCAPED = {"%2E": ".", "%2F": "/", "%25": "%"}
_MAX_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL would truncate a longer name


def _fold(part: str) -> str:
    # PostgreSQL folds only ASCII letters of an unquoted name (downcase_identifier).
    return part.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _encode(part: str) -> str:
    """A part of a name that is not plain, in its folder and ledger key: ``%``, ``.`` and
    ``/`` percent-encoded, so the key has one dot and no slash and maps back to one name."""
    return part.replace("%", "%25").replace(".", "%2E").replace("/", "%2F")


@dataclass(frozen=True, order=True)
class TableName:
    """A PostgreSQL table: its schema and its name, exactly as the catalog holds them."""

    schema: str
    name: str

    def __post_init__(self) -> None:
        for part in (self.schema, self.name):
            if not part:
                raise ValueError("a table's schema and name cannot be empty")
            if "\x00" in part:
                raise ValueError("a table's name cannot hold a NUL character")
            if len(part.encode()) > _MAX_BYTES:
                raise ValueError(
                    f"{part!r} is longer than PostgreSQL's {_MAX_BYTES} bytes for a name"
                )

    @classmethod
    def parse(cls, text: str) -> TableName:
        """``[schema.]name`` by PostgreSQL's rules: unquoted parts fold to lower case, quoted
        ones keep their case and may hold dots, spaces and quotes (``""``); no schema is
        ``public``. Raises ValueError with one sentence."""
        parts: list[str] = []
        pos, end = 0, len(text)
        while True:
            while pos < end and text[pos].isspace():
                pos += 1
            quoted = _QUOTED.match(text, pos)
            unquoted = _UNQUOTED.match(text, pos)
            if quoted:
                parts.append(quoted.group(1).replace('""', '"'))
                if not parts[-1]:
                    raise ValueError(f'{text!r} holds an empty quoted name ("")')
                pos = quoted.end()
            elif unquoted:
                parts.append(_fold(unquoted.group()))
                pos = unquoted.end()
            else:
                raise ValueError(_UNREADABLE.format(text=text))
            while pos < end and text[pos].isspace():
                pos += 1
            if pos == end:
                break
            if text[pos] != ".":
                raise ValueError(_UNREADABLE.format(text=text))
            if len(parts) == 2:
                raise ValueError(
                    f"{text!r} is not a table name: write schema.table (two parts at most, "
                    "quote a part that holds a dot)"
                )
            pos += 1
        if len(parts) == 1:
            return cls("public", parts[0])
        return cls(parts[0], parts[1])

    def sql(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def display(self) -> str:
        """``schema.name`` with each part quoted where PostgreSQL needs it: what a user
        writes, and what ``parse`` reads back to this name."""
        return f"{_display(self.schema)}.{_display(self.name)}"

    def __str__(self) -> str:
        return self.display

    @property
    def qualified(self) -> str:
        """``schema.name`` unquoted: ambiguous when a part holds a dot, so only for text
        already written by this form (``key`` is the same text for a plain name)."""
        return f"{self.schema}.{self.name}"

    @property
    def plain(self) -> bool:
        """No dot, slash or percent sign in either part: the folder and ledger key are
        ``qualified``. (Every other name's key holds a ``%``, so the two kinds never meet.)"""
        return not any(c in part for part in (self.schema, self.name) for c in "./%")

    @property
    def key(self) -> str:
        """The table's ledger key and its S3 folder without the slash: ``schema.name`` for a
        plain name, each part percent-encoded otherwise (one dot, no slash: one name)."""
        if self.plain:
            return self.qualified
        return f"{_encode(self.schema)}.{_encode(self.name)}"

    @classmethod
    def from_key(cls, key: str) -> TableName | None:
        """The table a ledger key names (``key``'s inverse); None for a key that names no
        table (a group's)."""
        schema, dot, name = key.partition(".")
        if not dot or "." in name or not schema or not name:
            return None
        if "%" in key:
            schema, name = _decode(schema), _decode(name)
        try:
            table = cls(schema, name)
        except ValueError:
            return None
        return table if table.key == key else None

    @property
    def folder(self) -> str:
        """The folder of the table's objects under the bucket's prefix (and the stage)."""
        return f"{self.key}/"

    @property
    def warehouse_default(self) -> str:
        """The default name of the table in Snowflake (``warehouse_identifier`` of its name):
        always a plain identifier, so the objects named after it need no quotes."""
        return warehouse_identifier(self.name)


def warehouse_identifier(name: str) -> str:
    """A plain Snowflake identifier for ``name``: upper-cased (Python's ``str.upper``, which
    is what a plain name's unquoted identifier resolves to), every character but A-Z, 0-9,
    ``_`` and ``$`` (a space, a dot, a quote, a non-ASCII letter) replaced by ``_``, a ``_``
    before a leading digit or ``$``, and a ``_`` after a reserved word (``select`` ->
    ``SELECT_``, ``Order Lines`` -> ``ORDER_LINES``, ``2024`` -> ``_2024``). Different names
    may map to one identifier: the group's tables are checked for that
    (``warehouse.model.names``)."""
    out = _NOT_PLAIN_UPPER.sub("_", name.upper())
    if not out[:1].isalpha() and not out.startswith("_"):
        out = "_" + out
    return out + "_" if out in SNOWFLAKE_RESERVED else out


def warehouse_column(name: str) -> str:
    """A column's name in Snowflake: its exact text upper-cased by Python's ``str.upper``,
    always quoted in the SQL. That is Snowflake's UPPER, Unicode included (``ß`` -> ``SS``,
    ``é`` -> ``É``, ``Ω`` unchanged, ``€`` and spaces kept:
    https://docs.snowflake.com/en/sql-reference/functions/upper), and what the pipes'
    case-insensitive match by name maps the objects' header (the source's names) onto."""
    return name.upper()


def _decode(part: str) -> str:
    return _ESCAPE.sub(lambda m: _UNESCAPED[m.group()], part)


def _display(part: str) -> str:
    if _PLAIN_PART.match(part) and part not in _RESERVED:
        return part
    return '"' + part.replace('"', '""') + '"'
