"""Prerequisites of a table's capture: what ``init`` refuses because the capture would give
wrong data, or because adding the table to the publication would break the application.

The catalog is read once per table (``read_facts``); every check is a pure function over those
facts and returns its problems, each one sentence that ends with the fix. ``init`` reports every
problem of every table before it changes anything on the source.

The rules, and why:

- A key (the configured ``[[tables]] key``, else the table's own: the primary key or a unique
  index, ``TableFacts.natural_key``) is what the warehouse merge keeps one row per. A NULL in
  it cannot be merged, and a key two rows share collapses them: the key must be NOT NULL and
  have a unique, non-partial, valid, non-deferrable index on exactly its columns. Deferrable
  is refused in logical mode: a deferred check lets one statement move a row onto a key
  another row still holds (``UPDATE t SET id = id + 1``), and the changes, applied by LSN,
  then delete the moved row. Watermark mode reads committed rows only, where a deferred
  constraint holds.
- Logical mode: a delete and a key change carry only what the replica identity sends, so the
  key must be it (the primary key under DEFAULT, the index of USING INDEX, anything under FULL):
  with ``key = email`` under a primary key ``id`` a deleted row stays in the warehouse.
- Logical mode: once a table is in a publication that publishes updates and deletes,
  PostgreSQL refuses the application's own UPDATE and DELETE unless the replica identity is
  usable (FULL, or a valid, unique, non-partial, non-deferrable index: the primary key under
  DEFAULT). NOTHING, DEFAULT without a primary key, a DEFERRABLE primary key, USING INDEX on an
  index dropped since: refused before the publication is touched.
- Logical mode: pgoutput in PostgreSQL < 18 does not send stored generated columns, so they
  are left out of the capture (``captured``) and ``init`` says so per column.
- Both modes: a column named like one of the daemon's own columns, or two columns whose names
  differ only in case, would be one Snowflake column (Snowflake upper-cases unquoted names).
"""

from __future__ import annotations

import re

import psycopg

from cdc_daemon.config import Settings, TableSettings
from cdc_daemon.errors import SourceError, from_psycopg
from cdc_daemon.source.catalog import ColumnFacts, TableFacts, read_facts
from cdc_daemon.source.session import connect
from cdc_daemon.source.table import describe_configured, shape_problem

# The daemon's own columns in objects and in Snowflake (compared upper-cased, as Snowflake
# stores them).
RESERVED = (
    "_cdc_op",
    "_cdc_seq",
    "_cdc_ts",
    "_cdc_unchanged",
    "_cdc_quarantined",
    "_file",
    "_file_row",
    "_loaded_at",
    "_merged_at",
    "_cdc_deleted_at",
    "_cdc_synced_at",
)
_RESERVED_UPPER = {r.upper(): r for r in RESERVED}
_NO_RENAME = (
    "or leave the column out ([[tables]] exclude_columns), or the table out of [[tables]] (the "
    "daemon has no setting to rename a column)"
)
_MAX_IDENT = 63  # NAMEDATALEN - 1: PostgreSQL cuts longer names, silently but for a NOTICE


def quote_ident(name: str) -> str:
    """A name for a statement, quoted unless it is a plain lower-case one (for names this
    module makes up; the catalog's are quoted by PostgreSQL's own quote_ident)."""
    if re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _new_index_name(facts: TableFacts) -> str:
    suffix = "_cdc_key"
    base = facts.name.encode()[: _MAX_IDENT - len(suffix)].decode(errors="ignore")
    return quote_ident(base + suffix)


def _listed(facts: TableFacts, names: tuple[str, ...] | list[str]) -> str:
    quoted = [c.quoted if (c := facts.column(n)) is not None else quote_ident(n) for n in names]
    return ", ".join(quoted)


def name_problems(facts: TableFacts, logical: bool, spec: TableSettings | None = None) -> list[str]:
    """Columns that would be the same Snowflake column as one of the daemon's own or as each
    other (``spec``: the columns it leaves out are not checked)."""
    q = facts.quoted
    problems = []
    by_upper: dict[str, list[ColumnFacts]] = {}
    for c in facts.captured(logical):
        if spec is not None and not spec.captures(c.name):
            continue
        upper = c.name.upper()
        by_upper.setdefault(upper, []).append(c)
        if upper in _RESERVED_UPPER:
            problems.append(
                f"{q}: column {c.quoted} has the name of the daemon's own column "
                f"{_RESERVED_UPPER[upper]} (Snowflake upper-cases names): rename it (ALTER TABLE "
                f"{q} RENAME COLUMN {c.quoted} TO ...) " + _NO_RENAME
            )
    for upper, same in by_upper.items():
        if len(same) > 1:
            names = " and ".join(c.quoted for c in same)
            problems.append(
                f"{q}: columns {names} differ only in case and would be one Snowflake column "
                f"{upper}: rename all but one (ALTER TABLE {q} RENAME COLUMN {same[-1].quoted} "
                "TO ...) " + _NO_RENAME
            )
    return problems


def _identity_text(facts: TableFacts) -> str:
    if facts.identity == "i":
        named = next((i for i in facts.indexes if i.replica_identity), None)
        return "REPLICA IDENTITY USING INDEX" + ("" if named is None else f" {named.name}")
    return {
        "d": "REPLICA IDENTITY DEFAULT",
        "n": "REPLICA IDENTITY NOTHING",
        "f": "REPLICA IDENTITY FULL",
    }.get(facts.identity, f"replica identity {facts.identity!r}")


def _identity_breaks(facts: TableFacts) -> str | None:
    """Why the application's UPDATE and DELETE would fail once the table is published, if
    they would."""
    if facts.identity == "f" or facts.identity_index() is not None:
        return None
    if facts.identity == "n":
        return f"{facts.quoted} has REPLICA IDENTITY NOTHING"
    if facts.identity == "d":
        pk = facts.primary_key
        if pk is None:
            return f"{facts.quoted} has no primary key and REPLICA IDENTITY DEFAULT"
        return f"the primary key {pk.name} of {facts.quoted} is {pk.flaw()}"
    named = next((i for i in facts.indexes if i.replica_identity), None)
    if named is None:
        return f"the index of {facts.quoted}'s REPLICA IDENTITY USING INDEX was dropped"
    return f"the index {named.name} of {facts.quoted}'s REPLICA IDENTITY is {named.flaw()}"


def key_problems(
    facts: TableFacts, key: tuple[str, ...], configured: bool, logical: bool
) -> list[str]:
    """The key (configured, or the primary key's columns) checked for the merge, and in logical
    mode against the replica identity; the identity checked for the application's writes."""
    q = facts.quoted
    breaks = _identity_breaks(facts) if logical else None
    if not key:
        if not logical:
            return []  # no merge key: the warehouse side refuses to render the table
        if keyless_capture(facts):
            return []  # captured keyless: each row is known by its values (docs/logical.md)
        return [keyless(facts, logical)]
    natural = None if configured else facts.natural_key()
    if natural is None or natural.primary:
        what = "key" if configured else "primary key"
    else:
        what = f"key (unique index {natural.name})"
    missing = [k for k in key if facts.column(k) is None]
    if missing:
        return [f"{q} has no column {quote_ident(missing[0])}, named in [[tables]] key"]
    if logical:
        generated = [k for k in key if (c := facts.column(k)) is not None and c.generated]
        if generated:
            return [
                f"{q}: {what} column {_listed(facts, generated)} is a generated column, which "
                "logical mode leaves out (pgoutput does not send it): name other key columns "
                'in [[tables]] key, or use capture.mode = "watermark"'
            ]
    problems = []
    nullable = [k for k in key if (c := facts.column(k)) is not None and not c.not_null]
    if nullable:
        alters = ", ".join(f"ALTER COLUMN {_listed(facts, [n])} SET NOT NULL" for n in nullable)
        columns = "column" if len(nullable) == 1 else "columns"
        problems.append(
            f"{q}: {what} {columns} {_listed(facts, nullable)} may be NULL, and a row whose key "
            f"is NULL cannot be merged: ALTER TABLE {q} {alters}"
        )
    wanted = set(key)
    exact = [i for i in facts.indexes if set(i.columns) == wanted and not i.expressions]
    holding = next((i for i in exact if i.holds_a_key(deferrable_ok=not logical)), None)
    if holding is None:
        new = _new_index_name(facts)
        flawed = next((i for i in exact if i.unique), None)
        cols = _listed(facts, key)
        if flawed is None:
            why = f"{q}: the {what} ({cols}) has no unique index on exactly its columns"
        else:
            why = (
                f"{q}: the {what} ({cols}) has only the unique index {flawed.name}, which is "
                f"{flawed.flaw()}"
            )
        harm = (
            "rows sharing a key would be merged into one"
            if flawed is None or not flawed.deferrable
            # Two rows hold one key between a change and the deferred check: applied by LSN,
            # the changes then delete the row that moved onto the key.
            else "a row moved onto a key another row still held would be deleted in the warehouse"
        )
        # CONCURRENTLY: the application's writes go on while it is built.
        fix = f"CREATE UNIQUE INDEX CONCURRENTLY {new} ON {q} ({cols})"
        if logical and facts.identity != "f":
            fix += f", then ALTER TABLE {q} REPLICA IDENTITY USING INDEX {new}"
            if breaks is not None:
                harm += (
                    ", and once the table is in the publication the application's UPDATE and "
                    "DELETE would fail"
                )
                if not (flawed is not None and flawed.primary and facts.identity == "d"):
                    harm += f" ({breaks})"
        return [*problems, f"{why}, so {harm}: {fix}"]
    if not logical:
        return problems
    # The fix that makes the identity send this key, never breaking writes.
    if holding.primary:
        fix = f"ALTER TABLE {q} REPLICA IDENTITY DEFAULT (or REPLICA IDENTITY FULL)"
    else:
        fix = (
            f"ALTER TABLE {q} REPLICA IDENTITY USING INDEX {holding.name} (or REPLICA IDENTITY "
            "FULL)"
        )
    if breaks is not None:
        return [
            *problems,
            f"{breaks}, so once the table is in the publication the application's UPDATE and "
            f"DELETE would fail: {fix}",
        ]
    sent = facts.identity_index()
    if sent is not None and set(sent.columns) != wanted:
        problems.append(
            f"{q}: its {_identity_text(facts)} sends ({_listed(facts, sent.columns)}) with a "
            f"delete or a key change, not the {what} ({_listed(facts, key)}), so deleted rows and "
            f"old keys would stay in the warehouse: {fix}"
            + ("" if configured else f", or name {_listed(facts, sent.columns)} in [[tables]] key")
        )
    return problems


def keyless_capture(facts: TableFacts) -> bool:
    """Whether logical mode captures the keyless table (``capture.logical.keyless``): under
    REPLICA IDENTITY FULL, and not partitioned."""
    return facts.identity == "f" and facts.kind != "p"


def keyless(facts: TableFacts, logical: bool = True) -> str:
    """Why a table with no key (``natural_key`` None, none configured) cannot be merged, and
    the ways to give it one, in one sentence (``logical``: with the replica identity each
    needs)."""
    q = facts.quoted
    new = _new_index_name(facts)
    # A unique index that only lacks NOT NULL columns is the cheapest way forward.
    almost = next((i for i in facts.indexes if i.holds_a_key() and not facts.usable_key(i)), None)
    nearly = ""
    if almost is not None:
        nullable = [n for n in almost.columns if (c := facts.column(n)) is None or not c.not_null]
        alters = ", ".join(f"ALTER COLUMN {_listed(facts, [n])} SET NOT NULL" for n in nullable)
        nearly = f"ALTER TABLE {q} {alters} (then unique index {almost.name} is its key), or "
    index = f"CREATE UNIQUE INDEX CONCURRENTLY {new} ON {q} (...) on NOT NULL columns"
    configured = "name its key columns in [[tables]] key (NOT NULL, with a unique index)"
    if logical:
        index += f" then ALTER TABLE {q} REPLICA IDENTITY USING INDEX {new}"
        configured += f" and ALTER TABLE {q} REPLICA IDENTITY FULL"
        if facts.kind == "p":
            return (
                f"{q} is a partitioned table with no primary key and no unique index on NOT "
                "NULL columns only (valid, not partial, not DEFERRABLE), and logical mode "
                "captures a keyless table only unpartitioned: "
                f"{nearly}ALTER TABLE {q} ADD PRIMARY KEY (...), or {configured}"
            )
        return (
            f"{q} has no primary key and no unique index on NOT NULL columns only (valid, not "
            "partial, not DEFERRABLE), so logical mode captures it keyless, which needs every "
            "update and delete to log the whole old row: ALTER TABLE "
            f"{q} REPLICA IDENTITY FULL (or give it a key: {nearly}ALTER TABLE {q} ADD PRIMARY "
            f"KEY (...), or {index}, or {configured})"
        )
    return (
        f"{q} has no primary key and no unique index on NOT NULL columns only (valid, not "
        "partial, not DEFERRABLE), and the warehouse merge needs a key: "
        f"{nearly}ALTER TABLE {q} ADD PRIMARY KEY (...), or {index}, or {configured}, or "
        'capture it keyless in capture.mode = "logical"'
    )


def identity_line(facts: TableFacts, key: tuple[str, ...], configured: bool, logical: bool) -> str:
    """What ``init`` prints for a table it accepted: its key and where it comes from, and the
    replica identity that sends it with what that costs the source (watermark mode needs
    none)."""
    head = f"{facts.qualified}: "
    if not key and logical:
        return head + (
            "no key: captured keyless (each row known by _cdc_row, a hash of its values; exact "
            "duplicate rows kept as copies); REPLICA IDENTITY FULL: every update and delete "
            "logs the whole old row (more WAL on the source)"
        )
    if not key:
        # Accepted in watermark mode only (its objects need no key); the warehouse refuses.
        return head + "no key: it " + keyless(facts, logical).removeprefix(f"{facts.quoted} ")
    head += f"key ({_listed(facts, key)}) from {facts.key_origin(configured)}; "
    if not logical:
        return head + "watermark mode reads the rows themselves, so no replica identity is needed"
    if facts.identity == "f":
        return (
            head + "REPLICA IDENTITY FULL: every update and delete logs the whole old row (more "
            "WAL on the source), so no value is ever unchanged"
        )
    return (
        head + f"{_identity_text(facts)}: an update or delete logs only the old key (the "
        "least WAL on the source)"
    )


def logical_problems(
    facts: TableFacts,
    key: tuple[str, ...],
    configured: bool,
    spec: TableSettings | None = None,
) -> list[str]:
    """Every reason the table cannot be captured in logical mode (empty: it can)."""
    return name_problems(facts, True, spec) + key_problems(facts, key, configured, logical=True)


def generated_notes(facts: TableFacts) -> list[str]:
    """One line per generated column logical mode leaves out (``init`` prints them)."""
    return [
        f"{facts.qualified}: generated column {c.name} is left out of the capture (pgoutput "
        "does not send generated columns before PostgreSQL 18, so its value would be NULL after "
        'a change): compute it in the warehouse, or use capture.mode = "watermark", which '
        "copies its stored value"
        for c in facts.columns
        if c.generated
    ]


def watermark_problems(
    facts: TableFacts, key: tuple[str, ...] | None, spec: TableSettings | None = None
) -> list[str]:
    """Every reason the table cannot be captured in watermark mode that this module checks
    (the watermark and partition columns are checked by ``source.table.describe_table``)."""
    merge_key = key if key is not None else facts.key_columns()
    return name_problems(facts, False, spec) + key_problems(
        facts, merge_key, key is not None, logical=False
    )


class TablesRefused(SourceError):
    """Every problem of every table ``init`` checked, raised once: a user fixes them all in one
    go instead of re-running init once per table. The message joins them with ``"; "``; the
    command line prints ``lines()``, one problem a line."""

    def __init__(self, what: str, problems: list[str]) -> None:
        self.what = what
        self.problems = problems
        super().__init__(f"{what}: " + "; ".join(problems))

    def lines(self) -> list[str]:
        """One line for one problem (the one sentence of any refusal); a list for several."""
        if len(self.problems) == 1:
            return [str(self)]
        count = f"{len(self.problems)} problems"
        return [f"{self.what} ({count}):", *(f"  - {p}" for p in self.problems)]


def check_watermark_tables(settings: Settings) -> list[str]:
    """``init`` in watermark mode: every configured table checked on one session (its key and
    names here, its watermark and partition columns by ``describe_configured``), every problem
    of every table raised in one ``TablesRefused``; else each table's ``identity_line``."""
    problems: list[str] = []
    lines: list[str] = []
    conn = connect(settings.postgres)
    try:
        for spec in settings.table_specs:
            try:
                facts = read_facts(conn, spec.table.display)
            except psycopg.Error as exc:
                raise from_psycopg(exc, f"reading the catalog of {spec.name}") from None
            if facts is None:
                problems.append(
                    f"table {spec.name!r} does not exist (or is not visible to this user)"
                )
                continue
            problems += watermark_problems(facts, spec.key, spec)
            merge_key = spec.key or facts.key_columns()
            lines.append(identity_line(facts, merge_key, spec.key is not None, logical=False))
            shape = shape_problem(spec, facts.qualified, [c.name for c in facts.columns], merge_key)
            if shape is not None:
                problems.append(shape)
                continue
            try:
                describe_configured(conn, settings.for_table(spec), spec)
            except SourceError as exc:
                problems.append(str(exc))
            except psycopg.Error as exc:
                raise from_psycopg(exc, f"reading the catalog of {spec.name}") from None
    finally:
        conn.close()
    if problems:
        raise TablesRefused(f"{settings.group} cannot be captured yet", problems)
    return lines


def partition_problems(
    conn: psycopg.Connection[tuple[object, ...]],
    root: int,
    key: tuple[str, ...],
    configured: bool = False,
) -> list[str]:
    """A partitioned table's leaf partitions, each checked as a table (``key_problems``).

    Published through the root, an UPDATE or DELETE still runs on the leaf: PostgreSQL checks
    the leaf's replica identity, not the root's (so a leaf with REPLICA IDENTITY NOTHING makes
    the application's deletes on it fail), and the old key pgoutput sends is the leaf's
    identity's columns, converted to the root's row (a leaf identity without a key column
    sends NULL for it). A partition attached or created later is not checked here: ATTACH
    gives it the root's primary key index, whose columns its default identity sends."""
    problems = []
    for (name,) in conn.execute(
        "SELECT relid::regclass::text FROM pg_partition_tree(%s)"
        " WHERE isleaf AND relid <> %s::oid ORDER BY relid",
        (root, root),
    ).fetchall():
        facts = read_facts(conn, str(name))
        if facts is None or facts.kind != "r":
            continue  # a foreign table: its rows change elsewhere, never through this WAL
        problems += key_problems(facts, key, configured, logical=True)
    return problems
