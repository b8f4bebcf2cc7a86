"""A table of a logical group as the capture sees it: its columns as pgoutput sends them, its
key and replica identity, read from the catalog (``describe``), and the header of its objects.
The checks ``init`` makes on it are in ``source.validate``."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from cdc_daemon.config import TableSettings
from cdc_daemon.errors import SourceError
from cdc_daemon.names import TableName
from cdc_daemon.source.catalog import TableFacts, read_facts
from cdc_daemon.source.hashing import FieldHasher, Hasher
from cdc_daemon.source.table import Column, TableInfo, partition_of, shape_problem
from cdc_daemon.source.values import QuarantineJudge, numeric_typmod


@dataclass(frozen=True)
class LogicalTable:
    info: TableInfo  # columns in table order, the partition column (for the snapshot's COPY)
    oid: int
    key: tuple[str, ...]
    replica_identity: str
    toastable: tuple[str, ...]
    columns: tuple[tuple[str, int, int], ...]  # (name, type oid, typmod), as Relation sends
    has_primary_key: bool = True
    facts: TableFacts | None = None  # what the catalog said when described (None: made by hand)
    configured_key: bool = False  # the key is [[tables]] key, not the table's own
    spec: TableSettings | None = None  # its [[tables]] entry: the columns left out, hashed
    # A partitioned table: captured through its root (the publication's
    # publish_via_partition_root), its partitions followed by ``capture.logical.partitions``.
    partitioned: bool = False

    def captures(self, column: str) -> bool:
        """Whether ``column`` goes into the objects (``columns`` / ``exclude_columns``): the
        others are dropped from each change before it is spooled."""
        return self.spec is None or self.spec.captures(column)

    def field_hasher(self, columns: list[str]) -> FieldHasher | None:
        """What rewrites the hashed fields of a row of ``columns`` (``encode``'s fields, no
        day in front); None when the table hashes no column."""
        info = self.info
        if not info.hashed:
            return None
        assert info.hasher is not None, "hash_columns without a salt"
        return FieldHasher(info.hasher, [i for i, c in enumerate(columns) if c in info.hashed])

    @property
    def table(self) -> TableName:
        return self.info.table

    @property
    def qualified(self) -> str:
        """The table's ledger key (``TableName.key``)."""
        return self.info.qualified

    @property
    def keyless(self) -> bool:
        """No key at all: captured under REPLICA IDENTITY FULL, each row known by its values
        (``_cdc_row``), exact duplicates kept as copies (docs/logical.md#keyless-tables)."""
        return not self.key

    @property
    def header(self) -> list[str]:
        return logical_header([c[0] for c in self.columns], self.keyless)

    def judge(self) -> QuarantineJudge:
        """What the warehouse gets for the snapshot's quarantined rows."""
        return self.info.judge(self.key, self.header)


# The daemon's own columns of a logical object, after the table's: the operation, the change's
# LSN, its commit time, and the columns whose unchanged TOASTed values the change lacks.
CDC_COLUMNS = ("_cdc_op", "_cdc_seq", "_cdc_ts", "_cdc_unchanged")
# A keyless table's objects end with the change's number within its transaction (or the
# snapshot row's within its read) and the row's identity (``capture.logical.keyless``).
KEYLESS_COLUMNS = ("_cdc_nth", "_cdc_row")


def logical_header(columns: list[str], keyless: bool = False) -> list[str]:
    return [*columns, *CDC_COLUMNS, *(KEYLESS_COLUMNS if keyless else ())]


def describe(
    conn: psycopg.Connection[tuple[object, ...]],
    spec: TableSettings,
    hasher: Hasher | None = None,
) -> LogicalTable:
    """The table as logical mode captures it, from its catalog facts (read once; ``init``
    checks them with ``source.validate``). Generated columns are left out: pgoutput
    (PostgreSQL < 18) does not send them, so neither the snapshot nor the objects carry them,
    and a Relation message without them is no column change. ``hasher``: what hashes
    ``spec``'s ``hash_columns``."""
    table = spec.table.display
    facts = read_facts(conn, table)
    if facts is None:
        raise SourceError(f"table {table!r} does not exist (or is not visible to this user)")
    schema, name = facts.schema, facts.name
    if facts.kind not in ("r", "p"):
        raise SourceError(f"{schema}.{name} is not a table")
    natural = facts.key_columns()  # the same choice init checks and the warehouse keys by
    key = natural if spec.key is None else spec.key
    problem = shape_problem(spec, f"{schema}.{name}", [c.name for c in facts.columns], key)
    if problem is not None:
        raise SourceError(problem)
    captured = tuple(c for c in facts.captured(logical=True) if spec.captures(c.name))
    columns = tuple(Column(c.name, c.type_name) for c in captured)
    by_name = {c.name: c for c in columns}
    missing = [k for k in key if k not in by_name]
    if missing:
        generated = facts.column(missing[0]) is not None
        raise SourceError(
            f"{schema}.{name}: key column {missing[0]!r} is a generated column, which logical "
            "mode leaves out (pgoutput does not send it): name other key columns in [[tables]] "
            'key, or use capture.mode = "watermark"'
            if generated
            else f"{schema}.{name} has no column {missing[0]!r} (key)"
        )
    partition = partition_of(schema, name, by_name, spec.partition_column)
    # TableInfo's watermark is meaningless here; the first key column stands in.
    info = TableInfo(
        schema,
        name,
        columns,
        by_name[key[0]] if key else columns[0],
        partition,
        frozenset(spec.hash_columns),
        hasher,
    )
    toastable = tuple(c.name for c in captured if c.toastable)
    catalog = tuple((c.name, c.type_oid, c.typmod) for c in captured)
    return LogicalTable(
        info,
        facts.oid,
        key,
        facts.identity,
        toastable,
        catalog,
        facts.primary_key is not None,
        facts,
        spec.key is not None,
        spec,
        facts.kind == "p",
    )


# Built-in types by pg_type oid, as format_type names them: a Relation message sends a column's
# type oid and typmod only, and a retyped column is judged by these names
# (``warehouse.model.retype_problem``).
_TYPE_NAMES = {
    16: "boolean",
    17: "bytea",
    20: "bigint",
    21: "smallint",
    23: "integer",
    25: "text",
    114: "json",
    700: "real",
    701: "double precision",
    1042: "character",
    1043: "character varying",
    1082: "date",
    1083: "time without time zone",
    1114: "timestamp without time zone",
    1184: "timestamp with time zone",
    1700: "numeric",
    2950: "uuid",
    3802: "jsonb",
}


def type_text(oid: int, typmod: int) -> str:
    """``format_type(oid, typmod)`` of a built-in type (another one as ``type <oid>``, which is
    never a widening)."""
    name = _TYPE_NAMES.get(oid)
    if name is None:
        return f"type {oid}"
    if typmod < 0:
        return name
    if name == "numeric":
        return "numeric(" + ",".join(str(m) for m in numeric_typmod(typmod)) + ")"
    if name in ("character varying", "character"):
        return f"{name}({typmod - 4})"  # the typmod of a length is the length + 4
    if name.startswith(("timestamp", "time ")):
        head, _, tail = name.partition(" ")
        return f"{head}({typmod}) {tail}"  # the typmod of a precision is the precision
    return name
