"""What the capture needs to know about the source table, read from the catalog.

The configured table name is resolved by ``to_regclass`` (a bound parameter), and from then on
only the catalog's own schema and relation names are used, quoted as identifiers: a name with
quotes or SQL in it can never be spliced into a statement.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time

import psycopg
from psycopg import sql

from cdc_daemon.config import Settings, TableSettings
from cdc_daemon.errors import SourceError
from cdc_daemon.names import TableName
from cdc_daemon.source.catalog import key_of
from cdc_daemon.source.hashing import FieldHasher, Hasher
from cdc_daemon.source.values import MAX_TEXT, QuarantineJudge, number_type

_INTEGER_TYPES = frozenset({"smallint", "integer", "bigint"})
_TIMESTAMP_TYPES = frozenset({"timestamp with time zone", "timestamp without time zone"})
_PARTITION_TYPES = _TIMESTAMP_TYPES | {"date"}
_MAX_TEXT = MAX_TEXT

# A JSON number's text (``{t}``) that PARSE_JSON does not keep exactly: mirrors
# source.values.json_number_exact. The CASE keeps the casts to float8 from values out of its
# range (the cast would fail the COPY). The sessions run with extra_float_digits = 1, so a
# float8's text is its shortest exact form, as Python's repr.
_NUMBER_INEXACT = (
    "CASE WHEN {t} !~ '[eE]'"
    " AND length(ltrim(split_part(ltrim({t}, '-'), '.', 1), '0'))"
    " + length(split_part({t}, '.', 2)) <= 38"
    " AND length(split_part({t}, '.', 2)) <= 37 THEN false"
    " WHEN {t}::numeric = 0 THEN false"
    " WHEN NOT abs({t}::numeric) BETWEEN 2.2250738585072014e-308 AND 1.7976931348623157e308"
    " THEN true"
    " ELSE {t}::numeric::float8::text::numeric <> {t}::numeric END"
)
# Every value inside a json document (objects' values and arrays' elements, at any depth),
# each with its own text: a json value keeps the numbers and keys as written.
_JSON_WALK = (
    "WITH RECURSIVE t(v) AS (SELECT {c} UNION ALL SELECT x.value FROM t CROSS JOIN LATERAL"
    " (SELECT value FROM json_each(CASE WHEN json_typeof(t.v) = 'object' THEN t.v END)"
    " UNION ALL SELECT value FROM json_array_elements("
    "CASE WHEN json_typeof(t.v) = 'array' THEN t.v END)) AS x)"
)
_JSON_DUPLICATE_KEY = (
    "EXISTS (" + _JSON_WALK + " SELECT 1 FROM t WHERE json_typeof(t.v) = 'object' AND"
    " (SELECT count(*) <> count(DISTINCT k) FROM json_object_keys(t.v) AS k))"
)
_JSON_NUMBER_INEXACT = (
    "EXISTS ("
    + _JSON_WALK
    + " SELECT 1 FROM t WHERE json_typeof(t.v) = 'number' AND "
    + _NUMBER_INEXACT.replace("{t}", "t.v::text")
    + ")"
)
# jsonb has no duplicate keys, and its numbers are written without an exponent: only a text
# with a run of 20 digits can hold a number NUMBER(38, 37) cannot (source.values.check_jsonb).
_JSONB_NUMBER_INEXACT = (
    "CASE WHEN {c}::text ~ '[0-9]{{20}}' THEN EXISTS (SELECT 1 FROM jsonb_path_query({c},"
    " 'lax $.** ? (@.type() == \"number\")') AS n(v) WHERE "
    + _NUMBER_INEXACT.replace("{t}", "n.v::text")
    + ") ELSE false END"
)
# Arrays of these become JSON arrays of numbers or booleans; of any other element type, JSON
# arrays of the elements' text (capture.logical.encode.array_json mirrors this).
_JSON_ELEMENTS = frozenset(
    {"smallint", "integer", "bigint", "oid", "numeric", "real", "double precision", "boolean"}
)

# Timestamps in years 1-9999 (the ones Snowflake can hold; others are quarantined).
_IN_RANGE = "{c} >= '0001-01-01' AND {c} < '10000-01-01'"


@dataclass(frozen=True)
class Column:
    name: str
    type_name: str  # format_type(): e.g. "numeric(12,3)", "timestamp with time zone"

    @property
    def base_type(self) -> str:
        """The type without its modifiers: ``numeric(12,3)`` -> ``numeric``,
        ``timestamp(3) with time zone`` -> ``timestamp with time zone``; arrays keep their
        ``[]`` (``character varying(10)[]`` -> ``character varying[]``: no special handling)."""
        return re.sub(r"\([^)]*\)", "", self.type_name).strip()

    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.name)

    def csv_expr(self) -> sql.Composable:
        """The column as it goes into the CSV: Postgres's own text output, except that
        timestamps in years 1-9999 become ISO-8601 with a ``T`` (``2011-03-27T00:30:00`` and
        a fraction only when there is one), timestamptz with its ``+00:00`` offset.

        Built on the session's text output (the daemon's sessions run with TimeZone=UTC and
        DateStyle=ISO, so ``::text`` of a timestamptz ends in ``+00``): a replace and an append
        cost the server about two thirds of what ``to_char`` does. Other values (infinite,
        BC, years past 9999, all quarantined) keep their text form."""
        base = self.base_type
        if base in _TIMESTAMP_TYPES:
            suffix = ":00" if base == "timestamp with time zone" else ""
            return sql.SQL(
                "CASE WHEN " + _IN_RANGE + " THEN replace({c}::text, ' ', 'T') || {s}"
                " ELSE {c}::text END"
            ).format(c=self.ident(), s=sql.Literal(suffix))
        if base in ("real", "double precision"):
            # Snowflake's FLOAT reads NaN, inf and -inf, not PostgreSQL's Infinity.
            return sql.SQL("replace({}::text, 'Infinity', 'inf')").format(self.ident())
        if base == "bytea":
            # Hex without Postgres's \x prefix: what BINARY_FORMAT = HEX reads.
            return sql.SQL("encode({}, 'hex')").format(self.ident())
        if base.endswith("[]"):
            # A JSON array (nested for more dimensions; bounds dropped), what Snowflake's
            # PARSE_JSON reads into an ARRAY.
            if base.removesuffix("[]") in _JSON_ELEMENTS:
                return sql.SQL("array_to_json({})::text").format(self.ident())
            return sql.SQL("array_to_json({}::text[])::text").format(self.ident())
        return self.ident()

    def quarantine_checks(self) -> list[tuple[sql.Composable, sql.Composable]]:
        """(condition, reason) for values Snowflake cannot read back exactly: a row holding
        one goes to the quarantine prefix instead of being altered or failing the load. The
        reason is an expression (``'!<reason>-<column>'``), evaluated only for such a row.

        Checks a column's type rules out are left out (every row pays for each one): the
        range of a ``numeric(p, s)`` that fits NUMBER(38, s), the length of a
        ``varchar(n)`` that cannot reach 16 MB. A timestamp's three reasons share one range
        test."""
        c = self.ident()
        safe = re.sub(r"[^A-Za-z0-9_]", "_", self.name)
        base = self.base_type

        def reason(name: str) -> sql.Composable:
            return sql.Literal(f"!{name}-{safe}")

        checks: list[tuple[str, sql.Composable]] = []
        if base == "numeric":
            # The NUMBER it maps to (source.values.number_type); a constrained numeric holds
            # no infinity, and its own scale unless that is past 37.
            number = number_type(self.modifiers())
            checks = [("{c} = 'NaN'::numeric", reason("nan"))]
            if number.whole_limit is not None:
                checks.append(
                    (
                        f"abs({{c}}) >= 1e{number.whole_limit}",
                        reason("numeric_out_of_range"),
                    )
                )
            if number.scale_checked:
                checks.append((f"{{c}} <> round({{c}}, {number.scale})", reason("numeric_inexact")))
        elif base == "time without time zone":
            checks = [("{c} = '24:00:00'", reason("time_out_of_range"))]
        elif base == "json":
            checks = [
                (_JSON_DUPLICATE_KEY, reason("json_duplicate_key")),
                (_JSON_NUMBER_INEXACT, reason("json_number_inexact")),
            ]
        elif base == "jsonb":
            checks = [(_JSONB_NUMBER_INEXACT, reason("json_number_inexact"))]
        elif base in ("date", *_TIMESTAMP_TYPES):
            which = sql.SQL(
                "CASE WHEN NOT isfinite({c}) THEN {inf} WHEN {c} < '0001-01-01' THEN {bc}"
                " ELSE {late} END"
            ).format(
                c=c,
                inf=reason("infinite"),
                bc=reason("before_year_1"),
                late=reason("after_year_9999"),
            )
            checks = [("NOT (" + _IN_RANGE + ")", which)]
        elif base in ("text", "character varying", "character"):
            (length,) = self.modifiers((0,))
            # A character takes at most 4 bytes in UTF-8.
            if not (length and length * 4 <= _MAX_TEXT):
                checks = [("octet_length({c}) > 16777216", reason("longer_than_16mb"))]
        return [(sql.SQL(cond).format(c=c), why) for cond, why in checks]

    def modifiers(self, default: tuple[int, ...] = ()) -> tuple[int, ...]:
        """The type's modifiers (``numeric(12,3)`` -> (12, 3)), ``default`` filling the
        missing ones."""
        found = re.fullmatch(r"[^(]*\(([-0-9, ]+)\)", self.type_name)
        if found is None:
            return default
        values = tuple(int(v) for v in found.group(1).split(","))
        return values + default[len(values) :]


@dataclass(frozen=True)
class TableInfo:
    schema: str
    name: str
    columns: tuple[Column, ...]
    watermark: Column
    partition: Column | None  # None: the day of the read (watermark) or commit (logical)
    # hash_columns: their values leave as hashes (never checked for the quarantine: a hash is
    # always a valid VARCHAR), with the hasher that makes them.
    hashed: frozenset[str] = frozenset()
    hasher: Hasher | None = field(default=None, repr=False, compare=False)

    def copy_hasher(self) -> FieldHasher | None:
        """What rewrites the hashed fields of a ``copy_query`` row (its first field is the
        day); None when no column is hashed: the rows are then never parsed."""
        if not self.hashed:
            return None
        assert self.hasher is not None, "hash_columns without a salt"
        return FieldHasher(
            self.hasher, [1 + i for i, c in enumerate(self.columns) if c.name in self.hashed]
        )

    @property
    def table(self) -> TableName:
        return TableName(self.schema, self.name)

    @property
    def qualified(self) -> str:
        """The table's ledger key and folder stem (``TableName.key``)."""
        return self.table.key

    def ident(self) -> sql.Identifier:
        return self.table.sql()

    @property
    def header(self) -> list[str]:
        return [c.name for c in self.columns] + ["_cdc_op", "_cdc_seq", "_cdc_ts"]

    def judge(self, key: Sequence[str], header: Sequence[str] | None = None) -> QuarantineJudge:
        """What the warehouse gets for this table's quarantined rows (``header``: the
        objects' header, by default ``self.header``)."""
        return QuarantineJudge.for_types(
            self.header if header is None else header,
            [(c.name, "text" if c.name in self.hashed else c.type_name) for c in self.columns],
            key,
            self.partition_name,
        )

    def utc_day_expr(self) -> sql.Composable:
        """The UTC day of the partition column, as the objects' ``dt=`` folders name it."""
        col = self.partitioned.ident()
        if self.partitioned.base_type == "timestamp with time zone":
            return sql.SQL("({} AT TIME ZONE 'UTC')::date").format(col)
        return sql.SQL("{}::date").format(col)

    def days_between(self, first: date, end: date) -> sql.Composable:
        """Rows whose ``utc_day_expr`` is in ``[first, end)``, as a range on the bare column
        (an index on it can serve it; an expression on the column could not)."""
        col = self.partitioned.ident()
        base = self.partitioned.base_type
        lo: date | datetime = first
        hi: date | datetime = end
        if base == "timestamp with time zone":
            lo, hi = (datetime.combine(d, time(), UTC) for d in (first, end))
        elif base == "timestamp without time zone":
            lo, hi = (datetime.combine(d, time()) for d in (first, end))
        return sql.SQL("{c} >= {lo} AND {c} < {hi}").format(
            c=col, lo=sql.Literal(lo), hi=sql.Literal(hi)
        )

    @property
    def partition_name(self) -> str | None:
        return None if self.partition is None else self.partition.name

    @property
    def partitioned(self) -> Column:
        """The partition column, for what needs one (backfill by day, completeness)."""
        if self.partition is None:
            raise SourceError(
                f"{self.qualified} has no partition column (its objects are named by the day of "
                "the read or commit): set partition_column in its [[tables]] entry (or "
                "capture.partition_column with the postgres.table shorthand)"
            )
        return self.partition

    def day_expr(self, read_ts: str | None = None) -> sql.Composable:
        """The UTC day of the partition column as a date (``YYYY-MM-DD`` in ISO DateStyle;
        empty for NULL, which ``batch.spool`` names ``unknown``). A cast, not to_char: it costs
        the server a third as much. A row to quarantine gets ``!<reason>`` instead. Without a
        partition column: the UTC day of ``read_ts`` (the batch's read time)."""
        if self.partition is None:
            assert read_ts is not None, "a table without a partition column needs the read time"
            day: sql.Composable = sql.Literal(read_ts[:10])
        else:
            day = self.utc_day_expr()
        checks = [
            check
            for column in self.columns
            if column.name not in self.hashed
            for check in column.quarantine_checks()
        ]
        if not checks:
            return day
        whens = sql.SQL(" ").join(
            sql.SQL("WHEN {} THEN {}").format(cond, reason) for cond, reason in checks
        )
        return sql.SQL("CASE {} ELSE {}::text END").format(whens, day)


def setting_name(key: str, in_tables: bool | None) -> str:
    """A table's setting as the user's configuration writes it: ``[[tables]] key`` in a group,
    ``capture.key`` for the ``postgres.table`` shorthand (None: not known, the bare key)."""
    if in_tables is None:
        return key
    return f"[[tables]] {key}" if in_tables else f"capture.{key}"


def _no_watermark(sequenced: Sequence[str], setting: str, why: str, keyless: bool = False) -> str:
    """Why a table has no watermark (``why``), and what can capture it: a column a sequence fills
    (``sequenced``) named in ``setting``, else only logical mode. Watermark mode needs an
    integer that a sequence hands out at insert: the fence catches a late commit because a
    smaller id can only belong to a transaction open when the larger one was read, and the
    gaps it re-reads are the ids absent from a batch (``capture.watermark.fence``). A timestamp
    is neither (rows of one transaction share one; between two rows every instant is "absent"),
    nor is an integer the application assigns. ``keyless``: logical mode captures it keyless,
    under REPLICA IDENTITY FULL (``capture.logical.keyless``)."""
    logical = 'capture it with capture.mode = "logical"'
    if keyless:
        logical += " (keyless, under REPLICA IDENTITY FULL)"
    if not sequenced:
        return (
            f"{why}, and no integer column of it is filled by a sequence (serial or identity), "
            "so it cannot be captured in watermark mode, which needs one to read new rows "
            f"without missing a late commit: {logical}"
        )
    listed = ", ".join(sequenced)
    return (
        f"{why}, so it cannot serve as its watermark: name a column a sequence fills in "
        f"{setting} (here: {listed}), or {logical}"
    )


def _sequenced(conn: psycopg.Connection[tuple[object, ...]], oid: object) -> list[str]:
    """The table's integer columns a sequence fills at insert: identity columns and columns
    whose default is ``nextval`` (serial, or a sequence of the application's)."""
    return [
        str(r[0])
        for r in conn.execute(
            "SELECT a.attname FROM pg_attribute a"
            " LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
            " WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped"
            " AND a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype)"
            " AND (a.attidentity <> '' OR pg_get_expr(d.adbin, d.adrelid) LIKE 'nextval(%%')"
            " ORDER BY a.attnum",
            (oid,),
        )
    ]


def _close(name: str, columns: Sequence[Column]) -> str:
    close = difflib.get_close_matches(name, [c.name for c in columns], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def shape_problem(
    spec: TableSettings | None, table: str, names: Sequence[str], key: Sequence[str] = ()
) -> str | None:
    """Why ``spec``'s ``columns``, ``exclude_columns`` and ``hash_columns`` cannot apply to a
    table with these columns and key (None: they can): a name the table does not have, or a
    key column left out (the warehouse merges by the key)."""
    if spec is None:
        return None
    for setting, listed in (
        ("columns", spec.columns or ()),
        ("exclude_columns", spec.exclude_columns),
        ("hash_columns", spec.hash_columns),
    ):
        unknown = [n for n in listed if n not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"{table} has no column {unknown[0]!r}, named in [[tables]] {setting}{hint}"
    out = [k for k in key if not spec.captures(k)]
    if out:
        return (
            f"{table}: key column {out[0]!r} cannot be left out of the capture (the warehouse "
            "merges by the key): capture it, hashed if it must not leave in clear (hash_columns)"
        )
    return None


def shaped_columns(
    spec: TableSettings | None, table: str, columns: Sequence[Column], key: Sequence[str] = ()
) -> tuple[Column, ...]:
    """The columns the capture reads (``spec``'s ``columns`` / ``exclude_columns``), checked by
    ``shape_problem`` (SourceError)."""
    problem = shape_problem(spec, table, [c.name for c in columns], key)
    if problem is not None:
        raise SourceError(problem)
    if spec is None:
        return tuple(columns)
    return tuple(c for c in columns if spec.captures(c.name))


def describe_table(
    conn: psycopg.Connection[tuple[object, ...]],
    table: str,
    watermark_column: str | None,
    partition_column: str | None,
    *,
    in_tables: bool | None = None,
    spec: TableSettings | None = None,
    hasher: Hasher | None = None,
) -> TableInfo:
    """The table's columns, its watermark and partition columns checked. ``in_tables``: where
    the configuration names the columns (``setting_name``), for the messages. ``spec``: its
    ``[[tables]]`` entry, whose ``columns`` / ``exclude_columns`` leave columns out and whose
    ``hash_columns`` ``hasher`` hashes."""
    row = conn.execute(
        "SELECT c.oid::int8, n.nspname, c.relname, c.relkind::text FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
        (table,),
    ).fetchone()
    if row is None:
        raise SourceError(f"table {table!r} does not exist (or is not visible to this user)")
    oid, schema, name, relkind = row
    if relkind not in ("r", "p"):
        raise SourceError(f"{schema}.{name} is not a table")
    cols = tuple(
        Column(str(n), str(t))
        for n, t in conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (oid,),
        )
    )
    by_name = {c.name: c for c in cols}
    q = TableName(str(schema), str(name)).display
    setting = setting_name("watermark_column", in_tables)
    # The key by the one rule (TableFacts.natural_key): the primary key, else a unique index
    # on NOT NULL columns.
    found = key_of(conn, table)
    keyless = found is None
    if watermark_column is None:
        if found is None:
            why = f"{q} has no primary key (nor a unique index on NOT NULL columns)"
            raise SourceError(_no_watermark(_sequenced(conn, oid), setting, why, keyless))
        pk = found.columns
        what = "primary key" if found.primary else f"key (unique index {found.name})"
        if len(pk) != 1:
            why = f"{q}'s {what} has several columns"
            raise SourceError(_no_watermark(_sequenced(conn, oid), setting, why))
        if by_name[pk[0]].base_type not in _INTEGER_TYPES:
            why = f"{q}'s {what} {pk[0]} is {by_name[pk[0]].type_name}, not an integer"
            raise SourceError(_no_watermark(_sequenced(conn, oid), setting, why))
        watermark_column = pk[0]
    if watermark_column not in by_name:
        raise SourceError(
            f"{q} has no column {watermark_column!r}, named in {setting}"
            + _close(watermark_column, cols)
        )
    watermark = by_name[watermark_column]
    if watermark.base_type not in _INTEGER_TYPES:
        why = f"{q}: {setting} {watermark_column!r} is {watermark.type_name}, not an integer"
        raise SourceError(_no_watermark(_sequenced(conn, oid), setting, why, keyless))
    cached = conn.execute(
        "SELECT s.seqrelid::regclass::text, s.seqcache FROM pg_sequence s"
        " WHERE s.seqrelid = pg_get_serial_sequence(%s, %s)::regclass",
        (sql.Identifier(str(schema), str(name)).as_string(conn), watermark_column),
    ).fetchone()
    if cached is not None and int(str(cached[1])) > 1:
        # Each session would hand out ids from its own cached block: a smaller id could commit
        # after its fence retired, and be skipped. (Ids the application assigns itself cannot
        # be checked here; the README states the assumption.)
        raise SourceError(
            f"sequence {cached[0]} of the watermark column has CACHE {cached[1]}, so ids are not "
            f"assigned in order: ALTER SEQUENCE {cached[0]} CACHE 1"
        )
    partition = partition_of(str(schema), str(name), by_name, partition_column, in_tables=in_tables)
    # A configured watermark or partition column left out is refused by the settings; the
    # merge key by init (source.validate) and the warehouse model.
    if spec is not None and not spec.captures(watermark.name):
        raise SourceError(
            f"{q}: column {watermark.name!r} is its watermark (its key), so it cannot be "
            "left out of the capture"
        )
    cols = shaped_columns(spec, q, cols)
    hashed = frozenset(spec.hash_columns if spec is not None else ())
    if watermark.name in hashed:
        raise SourceError(
            f"{q}: column {watermark.name!r} is its watermark, which is each object's _cdc_seq "
            "and names its objects, so it cannot be hashed: hash it in logical mode, or name "
            "another watermark_column"
        )
    return TableInfo(str(schema), str(name), cols, watermark, partition, hashed, hasher)


def partition_of(
    schema: str,
    name: str,
    by_name: dict[str, Column],
    partition_column: str | None,
    *,
    in_tables: bool | None = None,
) -> Column | None:
    """The configured partition column, checked; none when none is configured."""
    if partition_column is None:
        return None
    setting = setting_name("partition_column", in_tables)
    if partition_column not in by_name:
        raise SourceError(
            f"{schema}.{name} has no column {partition_column!r}, named in {setting}"
            + _close(partition_column, list(by_name.values()))
        )
    partition = by_name[partition_column]
    if partition.base_type not in _PARTITION_TYPES:
        raise SourceError(
            f"{schema}.{name}: {setting} {partition_column!r} is {partition.type_name}; "
            "it must be a date or a timestamp"
        )
    return partition


def describe_configured(
    conn: psycopg.Connection[tuple[object, ...]],
    settings: Settings,
    spec: TableSettings | None = None,
    *,
    hashing: bool = True,
) -> TableInfo:
    """``spec`` (default: the first table of the group) as configured; ``hashing`` false:
    without the hasher of its hash_columns (what only reads the catalog needs no salt)."""
    spec = spec or settings.table_specs[0]
    return describe_table(
        conn,
        spec.table.display,
        spec.watermark_column,
        spec.partition_column,
        in_tables=bool(settings.tables),
        spec=spec,
        hasher=hasher_of(settings) if hashing else None,
    )


def hasher_of(settings: Settings) -> Hasher | None:
    """The hasher of ``hash_columns`` (None when no table hashes a column)."""
    salt = settings.hash_salt()
    return None if salt is None else Hasher(salt)
