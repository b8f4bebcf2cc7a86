"""The warehouse side of each table of the group, generated from the PostgreSQL catalog: its
Snowflake objects' names (from the settings alone: the reconciler needs no catalog) and its
columns with their Snowflake types (from the catalog: ``snowflake render`` / ``apply`` and the
daemon's schema evolution).

The type mapping (docs/snowflake.md, "Type mapping", shows the same table):

=============================  ==================  ==================  ========================
PostgreSQL                     landing (RAW_<T>)   current state (<T>) loaded as
=============================  ==================  ==================  ========================
smallint / integer / bigint    NUMBER(5/10/19, 0)  same                the text
numeric(p, s)                  NUMBER(P, S)        same                the text (values it
                               (source.values.number_type)             cannot hold quarantined)
numeric                        NUMBER(38, 9)       same                (values it cannot hold
                                                                       exactly quarantined)
real / double precision        FLOAT               same                the text, inf for Infinity
text / varchar(n) / char(n)    VARCHAR             same                the text
boolean                        BOOLEAN             same                t / f
date                           DATE                same                ISO-8601
timestamp                      TIMESTAMP_NTZ       same                ISO-8601
timestamptz                    TIMESTAMP_TZ        same                ISO-8601 with +00:00
time                           TIME                same                the text (24:00 quarantined)
uuid                           VARCHAR(36)         same                the text
json / jsonb                   VARCHAR             VARIANT             PARSE_JSON in the merge
arrays                         VARCHAR             ARRAY               PARSE_JSON in the merge
bytea                          VARCHAR             BINARY              TO_BINARY(hex) in merge
anything else (enum, inet,     VARCHAR             VARCHAR             the text
interval, timetz, domains...)
any type in hash_columns       VARCHAR(64)         VARCHAR(64)         HMAC-SHA256, hex
=============================  ==================  ==================  ========================

JSON, arrays and bytea land as text and are converted by the merge: what a CSV field holding
JSON becomes in a VARIANT column is not documented for COPY, while PARSE_JSON and TO_BINARY are.
Numbers are never rounded: Snowflake rounds a value with more fractional digits than the
column's scale ("the scale is reduced by rounding", TO_DECIMAL:
https://docs.snowflake.com/en/sql-reference/functions/to_decimal), so a value that a column
cannot hold exactly goes to the quarantine prefix with its reason (``source.table``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from cdc_daemon.config import Settings, TableSettings
from cdc_daemon.errors import ConfigError, SourceError
from cdc_daemon.names import (
    SNOWFLAKE_PLAIN,
    SNOWFLAKE_RESERVED,
    TableName,
    warehouse_column,
    warehouse_identifier,
)
from cdc_daemon.source.catalog import read_facts
from cdc_daemon.source.table import Column, shape_problem
from cdc_daemon.source.validate import keyless, keyless_capture
from cdc_daemon.source.values import number_type

# snowflake/models/ of this checkout: the sample's models (INVOICES and PRODUCTS on SALES), which
# the demo and ``local up`` configure as ``snowflake.models_dir``.
MODELS_DIR = Path(__file__).resolve().parents[2] / "snowflake" / "models"

# Columns the daemon adds to every object, and the landing table's own.
DAEMON_COLUMNS = ("_CDC_OP", "_CDC_SEQ", "_CDC_TS", "_CDC_UNCHANGED", "_CDC_QUARANTINED")
LOAD_COLUMNS = ("_FILE", "_FILE_ROW", "_LOADED_AT")

# Types whose values are never TOASTed (fixed length): only other columns can be named in a
# change's _cdc_unchanged.
_FIXED = frozenset(
    {
        "smallint",
        "integer",
        "bigint",
        "oid",
        "real",
        "double precision",
        "boolean",
        "date",
        "timestamp without time zone",
        "timestamp with time zone",
        "time without time zone",
        "time with time zone",
        "uuid",
        "money",
        "interval",
    }
)


@dataclass(frozen=True)
class SfType:
    landing: str
    final: str
    convert: str = "{}"  # landing value -> final value, in the merge

    def converted(self, value: str) -> str:
        return self.convert.format(value)


def base_type(type_name: str) -> str:
    return Column("", type_name).base_type


def sf_type(type_name: str) -> SfType:
    """The Snowflake types of a PostgreSQL column (``format_type`` text)."""
    base = base_type(type_name)
    if base.endswith("[]"):
        return SfType("VARCHAR", "ARRAY", "PARSE_JSON({})::ARRAY")
    fixed = {
        "smallint": "NUMBER(5, 0)",
        "integer": "NUMBER(10, 0)",
        "bigint": "NUMBER(19, 0)",
        "oid": "NUMBER(10, 0)",
        "real": "FLOAT",
        "double precision": "FLOAT",
        "boolean": "BOOLEAN",
        "date": "DATE",
        "timestamp without time zone": "TIMESTAMP_NTZ",
        "timestamp with time zone": "TIMESTAMP_TZ",
        "time without time zone": "TIME",
        "uuid": "VARCHAR(36)",
    }
    if base in fixed:
        return SfType(fixed[base], fixed[base])
    if base == "numeric":
        precision, scale = numeric_number(type_name)
        number = f"NUMBER({precision}, {scale})"
        return SfType(number, number)
    if base in ("json", "jsonb"):
        return SfType("VARCHAR", "VARIANT", "PARSE_JSON({})")
    if base == "bytea":
        return SfType("VARCHAR", "BINARY", "TO_BINARY({}, 'HEX')")
    return SfType("VARCHAR", "VARCHAR")


# Retyped columns (docs/snowflake.md, "Schema evolution"). A widening keeps every value and its
# text in the objects, so the rows already in Snowflake stay right; Snowflake follows it either
# with no change (both types map to the same Snowflake type) or with ALTER COLUMN ... SET DATA
# TYPE, which allows only "Increase the length of a text string column" and "Increase the
# precision of a number column" (a changed scale and a change to another type are unsupported:
# https://docs.snowflake.com/en/sql-reference/sql/alter-table-column).
_INTEGERS = {"smallint": 5, "integer": 10, "bigint": 19}
_TEXT = frozenset({"character varying", "text"})
_TIMESTAMPS = frozenset({"timestamp without time zone", "timestamp with time zone"})


def retype_problem(old: str, new: str) -> str | None:
    """None when a column retyped from ``old`` to ``new`` (``format_type`` texts) is a
    documented widening; else why it is not, as a phrase."""
    a, b = Column("", old), Column("", new)
    base_a, base_b = a.base_type, b.base_type
    if base_a in _TEXT and base_b in _TEXT:
        # character varying(n) -> (m >= n), unbounded, text; text -> unbounded varchar.
        length_a, length_b = a.modifiers((0,))[0], b.modifiers((0,))[0]
        if length_b == 0 or 0 < length_a <= length_b:
            return None
        return "a shorter or bounded text type"
    if base_a in _INTEGERS or base_a == "numeric":
        if base_b not in _INTEGERS and base_b != "numeric":
            return "not a number type any more"
        (pa, sa), (pb, sb) = _number(a), _number(b)
        if sa != sb:
            return "another scale (Snowflake cannot change a NUMBER's scale)"
        if pb < pa:
            return "a smaller precision"
        return None
    if base_a in _TIMESTAMPS and base_a == base_b:
        # More fractional digits: the same Snowflake type (fewer round the source's values).
        return None if _digits(old) <= _digits(new) else "fewer fractional digits"
    if base_a == "timestamp without time zone" and base_b == "timestamp with time zone":
        return (
            "TIMESTAMP_NTZ to TIMESTAMP_TZ, which Snowflake cannot change in place (and "
            "PostgreSQL reads the old values in its session's time zone)"
        )
    return "not a documented widening"


def _digits(timestamp: str) -> int:
    """A timestamp type's fractional digits (``timestamp(3) with time zone``: 3; default 6)."""
    found = re.search(r"\((\d+)\)", timestamp)
    return int(found.group(1)) if found else 6


def _number(column: Column) -> tuple[int, int]:
    """(precision, scale) of an integer or numeric column's NUMBER; an unconstrained numeric
    counts as the largest precision (38) at its scale."""
    if column.base_type in _INTEGERS:
        return _INTEGERS[column.base_type], 0
    return numeric_number(column.type_name)


def widens_in_place(have: str, want: str) -> bool:
    """Whether Snowflake's column of type ``have`` (DESC's text) is brought to ``want`` (a
    rendered type) by ALTER COLUMN ... SET DATA TYPE without losing a value: the same text type
    with a length at least as long, or the same NUMBER scale with a precision at least as
    large."""
    a, b = _sf_parts(have), _sf_parts(want)
    if a[0] in ("VARCHAR", "STRING", "TEXT") and b[0] == "VARCHAR":
        return not b[1] or (bool(a[1]) and a[1][0] <= b[1][0])
    if a[0] == b[0] == "NUMBER" and len(a[1]) == len(b[1]) == 2:
        return a[1][1] == b[1][1] and a[1][0] <= b[1][0]
    return False


def same_type(have: str, want: str) -> bool:
    """Snowflake's DESC type against the rendered one. DESC gives every type its size or
    precision (VARCHAR(16777216), TIMESTAMP_TZ(9), BINARY(8388608)); a rendered type without
    one is that type at any size. NUMBER(38,0) is NUMBER(38, 0)."""
    a, b = _sf_parts(have), _sf_parts(want)
    return a == b if b[1] else a[0] == b[0]


def _sf_parts(kind: str) -> tuple[str, tuple[int, ...]]:
    """A Snowflake type as (name, its numbers): ``NUMBER(10, 0)`` -> ("NUMBER", (10, 0))."""
    found = re.fullmatch(r"\s*([A-Za-z_]+)\s*(?:\(([0-9, ]+)\))?\s*", kind)
    if found is None:
        return kind.strip().upper(), ()
    numbers = tuple(int(v) for v in (found.group(2) or "").split(",") if v.strip())
    return found.group(1).upper(), numbers


def numeric_number(type_name: str) -> tuple[int, int]:
    """(precision, scale) of the NUMBER a ``numeric`` column maps to
    (``source.values.number_type``: the quarantine rules use the same)."""
    number = number_type(Column("", type_name).modifiers())
    return number.precision, number.scale


def quote(name: str) -> str:
    """A Snowflake identifier, quoted (``"INVOICE_NO"`` is the unquoted INVOICE_NO)."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Names:
    """A table's Snowflake objects, from the settings alone."""

    table: TableName  # the source table
    name: str  # the current-state table, e.g. SALES

    @property
    def source(self) -> str:
        """The source table's ledger key (``schema.table`` for a plain name)."""
        return self.table.key

    @property
    def folder(self) -> str:
        """Relative to the stage (the bucket's prefix): ``public.ecommerce_sales/``."""
        return self.table.folder

    @property
    def landing(self) -> str:
        return f"RAW_{self.name}"

    @property
    def pipe(self) -> str:
        return f"RAW_{self.name}_PIPE"

    @property
    def stream(self) -> str:
        return f"RAW_{self.name}_STREAM"

    @property
    def merge_task(self) -> str:
        return f"MERGE_{self.name}"

    @property
    def cleanup_task(self) -> str:
        return f"CLEANUP_RAW_{self.name}"

    @property
    def tombstones(self) -> str:
        return f"{self.name}_TOMBSTONES"

    @property
    def changes(self) -> str:
        return f"{self.name}_CHANGES"

    @property
    def touched(self) -> str:
        return f"{self.name}_TOUCHED"

    @property
    def merge_log(self) -> str:
        return f"{self.name}_MERGE_LOG"

    @property
    def history(self) -> str:
        """``history = true``: every version of each row (``WarehouseTable.history``)."""
        return f"{self.name}_HISTORY"

    @property
    def rows(self) -> str:
        """A keyless table's count of every change (``WarehouseTable.keyless``)."""
        return f"{self.name}_ROWS"

    @property
    def tasks(self) -> tuple[str, str]:
        return self.merge_task, self.cleanup_task


def warehouse_name(spec: TableSettings) -> str:
    """The table's current-state table in Snowflake, upper-cased as Snowflake resolves an
    unquoted identifier: ``warehouse_table``, which must be a plain identifier and no reserved
    word, or the default from the source name (``TableName.warehouse_default``, always one)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in spec.table.key):
        # The name is printed in the SQL's comments, where a newline would end the comment.
        raise ConfigError(
            f"{spec.table}: a table name holding a control character (a newline, a tab) "
            "cannot be named in Snowflake's SQL: rename the table (ALTER TABLE ... RENAME TO)"
        )
    if spec.warehouse_table is None:
        return spec.table.warehouse_default
    name = spec.warehouse_table
    if not SNOWFLAKE_PLAIN.match(name) or name.upper() in SNOWFLAKE_RESERVED:
        raise ConfigError(
            f"{spec.table}: warehouse_table {name!r} is not a plain Snowflake identifier "
            "(a letter or _, then letters, digits, _ and $, and no reserved word such as "
            "SELECT): choose one like "
            f"{warehouse_identifier(name)}"
        )
    return name.upper()


def names(settings: Settings) -> list[Names]:
    """Every table of the group, in the configured order. Two tables whose Snowflake objects
    would share a name (``ORDER_LINES`` from both ``"Order Lines"`` and ``order_lines``, or a
    table named like another's work table) are refused with the fix."""
    specs = settings.table_specs
    out = [Names(s.table, warehouse_name(s)) for s in specs]
    owner: dict[str, Names] = {}
    for n, spec in zip(out, specs, strict=True):
        for obj in _objects(n, spec.history):
            other = owner.setdefault(obj, n)
            if other is not n:
                raise ConfigError(
                    f"{other.table} and {n.table} would both name {obj} in Snowflake: set "
                    f"warehouse_table for one of them in [[tables]] (e.g. {n.name}_2)"
                )
    return out


def _objects(n: Names, history: bool) -> tuple[str, ...]:
    """The names of the table's own Snowflake objects (tables, pipe, stream, tasks; its
    history table with ``history = true``), the current-state table first."""
    return (
        n.name,
        n.landing,
        n.pipe,
        n.stream,
        n.merge_task,
        n.cleanup_task,
        n.tombstones,
        n.changes,
        n.touched,
        n.merge_log,
        *((n.history,) if history else ()),
    )


@dataclass(frozen=True)
class SfColumn:
    source: str  # the PostgreSQL name (the objects' header)
    name: str  # upper case
    pg_type: str
    type: SfType
    key: bool
    toastable: bool
    hashed: bool = False  # hash_columns: the warehouse holds the value's HMAC, VARCHAR(64)

    @property
    def q(self) -> str:
        return quote(self.name)

    @property
    def needle(self) -> str:
        """``,name,`` as a SQL string's content: how the merge finds the column in a change's
        ``_cdc_unchanged`` (names separated by commas)."""
        # A backslash escapes in a Snowflake string literal too (data-types-text).
        return f",{self.source},".replace("\\", "\\\\").replace("'", "''")


# The change metadata of every current-state table beside _CDC_SEQ (the source position):
# the operation of the change merged last, and when it was merged (_MERGED_AT, which earlier
# warehouses have, holds the same time).
METADATA_COLUMNS = (("_CDC_OP", "VARCHAR(1)"), ("_CDC_SYNCED_AT", "TIMESTAMP_LTZ"))
# deletes = "soft": the current-state table's column for the delete's commit time.
DELETED_AT = "_CDC_DELETED_AT"
# history = true: the history table's columns after the source's (docs/snowflake.md#history-tables).
HISTORY_COLUMNS = (
    ("_CDC_OP", "VARCHAR(1) NOT NULL"),
    ("_CDC_SEQ", "NUMBER(38, 0) NOT NULL"),
    ("_CDC_QUARANTINED", "VARCHAR"),
    ("_CDC_VALID_FROM", "TIMESTAMP_TZ NOT NULL"),
    ("_CDC_VALID_TO", "TIMESTAMP_TZ"),
    ("_CDC_IS_CURRENT", "BOOLEAN NOT NULL"),
    ("_CDC_SYNCED_AT", "TIMESTAMP_LTZ"),
)


@dataclass(frozen=True)
class WarehouseTable:
    names: Names
    columns: tuple[SfColumn, ...]
    models: tuple[Path, ...] = ()
    soft_deletes: bool = False  # deletes = "soft": a deleted row stays, _CDC_DELETED_AT set
    history: bool = False  # history = true: <T>_HISTORY holds every version

    @property
    def live(self) -> str:
        """The condition of the current-state table's rows that exist in the source (every
        row with hard deletes), for what compares it with the source."""
        return f"{DELETED_AT} IS NULL" if self.soft_deletes else "TRUE"

    def own_columns(self, table: str) -> list[tuple[str, str]]:
        """The daemon's columns of one of the Snowflake tables (``column_tables``) that a
        warehouse made by an earlier version may lack: the current-state table's (and its copy
        of the touched rows') change metadata, and ``_CDC_DELETED_AT`` with soft deletes."""
        if table not in (self.names.name, self.names.touched):
            return []
        return [*METADATA_COLUMNS, *([(DELETED_AT, "TIMESTAMP_TZ")] if self.soft_deletes else [])]

    @property
    def key(self) -> tuple[SfColumn, ...]:
        return tuple(c for c in self.columns if c.key)

    @property
    def keyless(self) -> bool:
        """No key (logical mode, REPLICA IDENTITY FULL): one row per copy of each source row,
        known by ``_CDC_ROW`` (``capture.logical.keyless``)."""
        return not self.key

    @property
    def values(self) -> tuple[SfColumn, ...]:
        return tuple(c for c in self.columns if not c.key)

    def column(self, name: str) -> SfColumn:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def column_tables(self) -> list[tuple[str, bool]]:
        """The Snowflake tables that hold the source's columns, each with whether it is the
        landing table (its types are ``SfType.landing``, the others' ``final``)."""
        n = self.names
        out = [(n.landing, True), (n.name, False), (n.changes, False)]
        if self.models:
            out.append((n.touched, False))
        if self.history:
            out.append((n.history, False))
        return out

    def typed_tables(self) -> list[tuple[str, bool, tuple[SfColumn, ...]]]:
        """Every Snowflake table holding source columns, with whether it is the landing table
        and the columns it holds: ``column_tables`` (every column) and the tombstones (the
        key's), which a widened column is widened in."""
        typed = [(table, landing, self.columns) for table, landing in self.column_tables()]
        if self.keyless:
            return typed
        return [*typed, (self.names.tombstones, False, self.key)]


def folder_of(relative: str) -> str:
    """The table folder of an object named relative to the bucket's prefix
    (``<schema>.<table>/dt=.../x.csv.gz`` -> ``<schema>.<table>/``), as ``Names.folder``."""
    return relative.split("/", 1)[0] + "/"


# A hashed column's type: the 64 hex digits of its HMAC-SHA256.
HASHED = SfType("VARCHAR(64)", "VARCHAR(64)")


def column_of(source: str, pg_type: str, *, key: bool = False, hashed: bool = False) -> SfColumn:
    name = warehouse_column(source)
    if "," in source:
        raise SourceError(
            f"column {source!r}: a name with a comma cannot be named in _cdc_unchanged"
        )
    if (
        name in DAEMON_COLUMNS
        or name in LOAD_COLUMNS
        or name in ("_MERGED_AT", DELETED_AT)
        or name in dict(METADATA_COLUMNS)
        or name in dict(HISTORY_COLUMNS)
        or name in ("_CDC_ROW", "_CDC_NTH")
    ):
        raise SourceError(
            f"column {source!r} has the name of one of the daemon's own columns in Snowflake"
        )
    kind = HASHED if hashed else sf_type(pg_type)
    return SfColumn(source, name, pg_type, kind, key, base_type(pg_type) not in _FIXED, hashed)


def from_catalog(
    conn: psycopg.Connection[tuple[object, ...]],
    n: Names,
    key: tuple[str, ...] | None,
    models: tuple[Path, ...] = (),
    logical: bool = False,
    spec: TableSettings | None = None,
) -> WarehouseTable:
    """The table's columns and key, read from the catalog (the configured key, else the
    primary key). ``logical``: stored generated columns are left out, as the logical capture
    leaves them out (pgoutput before PostgreSQL 18 does not send them). ``spec``: the table's
    ``[[tables]]`` entry, whose left-out columns the warehouse never has."""
    found = conn.execute("SELECT to_regclass(%s)::oid::int8", (n.table.display,)).fetchone()
    if found is None or found[0] is None:
        raise SourceError(f"table {n.table} does not exist (or is not visible to this user)")
    oid = found[0]
    cols = [
        (str(a), str(t))
        for a, t in conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped"
            " AND (attgenerated = '' OR NOT %s) ORDER BY attnum",
            (oid, logical),
        )
    ]
    if key is None:
        # The one rule of the capture and init: the primary key, else a unique index.
        facts = read_facts(conn, n.table.display)
        key = () if facts is None else facts.key_columns()
        if not key and not (logical and facts is not None and keyless_capture(facts)):
            raise SourceError(keyless(facts, logical) if facts else f"{n.source} has no key")
    if not key and spec is not None:
        refused = [
            what
            for what, on in (
                ('deletes = "soft"', spec.deletes == "soft"),
                ("history = true", spec.history),
                (f"models ({', '.join(m.name for m in models)})", bool(models)),
            )
            if on
        ]
        if refused:
            raise ConfigError(
                f"{n.source} is keyless (no primary key, no usable unique index), and "
                f"{refused[0]} needs a key to follow a row: give the table a key (ALTER TABLE "
                f"{n.table.display} ADD PRIMARY KEY (...)), or leave {refused[0].split(' ')[0]} "
                "out of its [[tables]] entry"
            )
    if spec is not None:
        problem = shape_problem(spec, n.source, [a for a, _ in cols], key)
        if problem is not None:
            raise SourceError(problem)
        cols = [(a, t) for a, t in cols if spec.captures(a)]
    if spec is None:
        return from_columns(n, cols, key, models)
    return from_columns(
        n, cols, key, models, spec.hash_columns, spec.deletes == "soft", spec.history
    )


def from_columns(
    n: Names,
    cols: list[tuple[str, str]],
    key: tuple[str, ...],
    models: tuple[Path, ...] = (),
    hashed: tuple[str, ...] = (),
    soft_deletes: bool = False,
    history: bool = False,
) -> WarehouseTable:
    """The table from its (name, ``format_type``) columns and key columns (``hashed``: its
    hash_columns; ``soft_deletes``: deletes = "soft"; ``history``: history = true)."""
    missing = [k for k in key if k not in dict(cols)]
    if missing:
        raise SourceError(f"{n.source} has no column {missing[0]!r} (key)")
    columns = tuple(column_of(a, t, key=a in key, hashed=a in hashed) for a, t in cols)
    upper = [c.name for c in columns]
    twice = sorted({u for u in upper if upper.count(u) > 1})
    if twice:
        raise SourceError(
            f"{n.source}: columns differing only in case would be one Snowflake column: "
            f"{', '.join(twice)}"
        )
    return WarehouseTable(n, columns, models, soft_deletes, history)


def model_files(settings: Settings, n: Names) -> tuple[Path, ...]:
    """The models on the table (``<models dir>/<TABLE>/NN_*.sql``), in order."""
    if settings.snowflake.models_dir is None:
        return ()
    folder = settings.snowflake.models_dir / n.name
    return tuple(sorted(folder.glob("[0-9][0-9]_*.sql"))) if folder.is_dir() else ()


def describe(
    settings: Settings,
    conn: psycopg.Connection[tuple[object, ...]],
    only: set[str] | None = None,
) -> list[WarehouseTable]:
    """Every table of the group as the warehouse sees it, from the catalog (``only``: those
    whose ledger keys it names)."""
    specs = {s.qualified: s for s in settings.table_specs}
    every = names(settings)
    tables = [
        from_catalog(
            conn,
            n,
            specs[n.source].key,
            model_files(settings, n),
            logical=settings.capture.mode == "logical",
            spec=specs[n.source],
        )
        for n in every
        if only is None or n.source in only
    ]
    taken = {o: n for n in every for o in _objects(n, specs[n.source].history)}
    for t in tables:
        other = taken.get(t.names.rows) if t.keyless else None
        if other is not None:
            raise ConfigError(
                f"{other.table} and the keyless {t.names.table} would both name {t.names.rows} "
                f"in Snowflake: set warehouse_table for one of them in [[tables]] (e.g. "
                f"{t.names.name}_2)"
            )
    return tables


def read_catalog(settings: Settings, only: set[str] | None = None) -> list[WarehouseTable]:
    """``describe`` on a session of its own."""
    try:
        with psycopg.connect(
            settings.postgres.dsn.get_secret_value(),
            connect_timeout=max(1, int(settings.postgres.connect_timeout_s)),
        ) as conn:
            return describe(settings, conn, only)
    except psycopg.Error as exc:
        from cdc_daemon.errors import from_psycopg

        raise from_psycopg(exc, "reading the tables' columns for the warehouse") from None
