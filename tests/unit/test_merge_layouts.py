"""The merge task rendered for every column layout a table can have: each combination of
fixed-width, variable-width and TOASTable value columns (none at all: a table that is all key),
under a one-column and a composite key. Each body parses as Snowflake SQL and keeps the rules
Snowflake checks only when the task runs."""

from __future__ import annotations

import itertools

import pytest
import sqlglot
from sqlglot import exp

from cdc_daemon.config import Settings, load_settings
from cdc_daemon.warehouse import model, sql
from cdc_daemon.warehouse.model import WarehouseTable

# Value columns by kind, as format_type() names their types: fixed-width types are never
# TOASTed (the model gives them no window); PostgreSQL may TOAST every other (attstorage <> 'p').
KINDS: dict[str, list[tuple[str, str]]] = {
    "fixed": [("qty", "integer"), ("at", "timestamp with time zone"), ("ok", "boolean")],
    "variable": [("label", "character varying(20)"), ("price", "numeric(10,2)")],
    "toast": [("body", "text"), ("doc", "jsonb")],
}
KEYS: dict[str, list[tuple[str, str]]] = {
    "id": [("id", "bigint")],
    "composite": [("region", "text"), ("n", "integer")],
}
LAYOUTS = [
    (key, kinds)
    for key in KEYS
    for size in range(len(KINDS) + 1)
    for kinds in itertools.combinations(KINDS, size)
]


def layout_id(layout: tuple[str, tuple[str, ...]]) -> str:
    key, kinds = layout
    return f"{key}-{'+'.join(kinds) or 'all_key'}"


def table(settings: Settings, key: str, kinds: tuple[str, ...]) -> WarehouseTable:
    (n,) = model.names(settings)
    cols = KEYS[key] + [c for kind in kinds for c in KINDS[kind]]
    return model.from_columns(n, cols, tuple(name for name, _ in KEYS[key]))


def merge_body(key: str, kinds: tuple[str, ...]) -> tuple[WarehouseTable, list[exp.Expr]]:
    """The layout's table and its merge task's statements, parsed."""
    settings = load_settings(
        None,
        tables=[{"name": "layouts.t"}],
        snowflake={"database": "ANALYTICS", "schema": "CDC"},
    )
    t = table(settings, key, kinds)
    task = next(
        s
        for s in sql.statements(settings, [t])
        if s.head.startswith("CREATE OR ALTER TASK") and sql.task_name(s) == t.names.merge_task
    )
    return t, [sqlglot.parse_one(s, read="snowflake") for s in sql.task_body(task)]


def has_window(node: exp.Expr | None) -> bool:
    return node is not None and node.find(exp.Window) is not None


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_every_qualify_has_a_window_in_its_own_select(layout: tuple[str, tuple[str, ...]]) -> None:
    """Each SELECT of the merge task that filters with QUALIFY has a window function in its
    own select list or in the QUALIFY predicate (Snowflake refuses the statement otherwise,
    "at least one window function must appear", and so does the local warehouse's DuckDB),
    whatever value columns the table has; the per-key dedup keeps one row per key in every
    layout (QUALIFY or WHERE on the row number)."""
    _, body = merge_body(*layout)
    filtered = 0
    for statement in body:
        for select in statement.find_all(exp.Select):
            qualify = select.args.get("qualify")
            if qualify is not None:
                assert has_window(qualify) or any(has_window(e) for e in select.expressions), (
                    select.sql(dialect="snowflake")
                )
            where = select.args.get("where")
            for clause in (qualify, where):
                if clause is not None and "_RN" in {c.name for c in clause.find_all(exp.Column)}:
                    filtered += 1
    assert filtered == 1, "the changes' SELECT keeps one row per key exactly once"


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_the_merge_body_matches_the_tables_columns(layout: tuple[str, tuple[str, ...]]) -> None:
    """For every layout, the task body is INSERT, DELETE and MERGE statements; the changes'
    INSERT selects as many values as it names columns; the MERGE's source selects every column
    of the table, updates every value column (none for a table that is all key) and inserts
    every column; a TOASTable value column, and only one, gets a FIRST_VALUE window."""
    t, body = merge_body(*layout)
    assert all(isinstance(s, (exp.Insert, exp.Delete, exp.Merge)) for s in body)
    changes = next(
        s
        for s in body
        if isinstance(s, exp.Insert) and s.this.find(exp.Table).name.endswith("_CHANGES")
    )
    named = changes.this.expressions
    select = changes.expression
    assert isinstance(select, exp.Select)
    assert len(select.expressions) == len(named) == len(t.columns) + 8
    windowed = {
        named[i].name
        for i, e in enumerate(select.expressions)
        if isinstance(e.unnest(), exp.Window) and e.find(exp.FirstValue)
    }
    assert windowed == {c.name for c in t.values if c.toastable}
    merge = next(s for s in body if isinstance(s, exp.Merge) and s.this.name == t.names.name)
    source = merge.args["using"].find(exp.Select)
    assert source is not None
    assert {e.alias_or_name for e in source.expressions} >= {c.name for c in t.columns}
    whens = merge.args["whens"].expressions
    update = next(w.args["then"] for w in whens if isinstance(w.args["then"], exp.Update))
    set_columns = {e.this.name for e in update.expressions}
    daemon = {"_CDC_SEQ", "_CDC_TS", "_CDC_QUARANTINED", "_MERGED_AT", "_CDC_OP", "_CDC_SYNCED_AT"}
    assert set_columns == {c.name for c in t.values} | daemon
    insert = next(w.args["then"] for w in whens if isinstance(w.args["then"], exp.Insert))
    inserted = {c.name for c in insert.this.expressions}
    assert inserted == {c.name for c in t.columns} | daemon
