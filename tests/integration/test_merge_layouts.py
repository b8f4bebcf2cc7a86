"""The merge task for every column layout, end to end: a group of tables in a schema of their
own, one per combination of fixed-width, variable-width and TOASTed value columns (and none: a
table that is all key), under a one-column and a composite key, captured in logical mode
through S3 and the local warehouse, each current-state table compared with its source value by
value."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.cli import init
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, make_settings, object_bodies
from tests.schemas import BIG_TEXT
from tests.warehouse_checks import assert_table_equals_source

pytestmark = pytest.mark.usefixtures("drop_slots")

SYNC = "-c synchronous_commit=on"
SCHEMA = "layouts"

# Value columns by kind: (column, type, value for row g at version v). Fixed-width types are
# stored inline (attstorage 'p'); the variable-width ones may be TOASTed but these values are
# small; the TOASTed one is large random hex (no compression), stored out of line, so an update
# that leaves it alone does not log it. Names a Snowflake or SQL reader could trip on: a
# reserved word, a mixed-case name, a name with a space.
KINDS: dict[str, list[tuple[str, str, str]]] = {
    "fixed": [
        ("qty", "integer", "{g} * 3 + {v}"),
        (
            '"At"',
            "timestamptz",
            "'2024-02-29 23:30:00+00'::timestamptz + ({g} + {v}) * interval '1 h 1 s'",
        ),
        ('"order"', "boolean", "({g} + {v}) % 2 = 0"),
    ],
    "variable": [
        ('"unit label"', "varchar(20)", "'l,\"' || {g} || '/' || {v}"),
        ("price", "numeric(10,2)", "{g} * 1.25 + {v}"),
        (
            "meta",
            "jsonb",
            "jsonb_build_object('g', {g}, 'v', {v}, 'a', jsonb_build_array({g}, null))",
        ),
    ],
    "toast": [("body", "text", BIG_TEXT)],
}
# (columns, the column a row's number g is) per key.
KEYS: dict[str, tuple[list[tuple[str, str, str]], str]] = {
    "id": ([("id", "bigint", "{g}")], "id"),
    "pair": ([("region", "text", "'r,' || ({g} % 3)"), ("n", "integer", "{g}")], "n"),
}
LAYOUTS = [
    (key, kinds)
    for key in KEYS
    for size in range(len(KINDS) + 1)
    for kinds in itertools.combinations(KINDS, size)
]
ROWS = 20


def table_name(key: str, kinds: tuple[str, ...]) -> str:
    return "_".join([key, *kinds]) if kinds else f"{key}_all_key"


def columns(key: str, kinds: tuple[str, ...]) -> list[tuple[str, str, str]]:
    return KEYS[key][0] + [c for kind in kinds for c in KINDS[kind]]


def insert(conn: psycopg.Connection[Any], key: str, kinds: tuple[str, ...], first: int) -> None:
    cols = columns(key, kinds)
    conn.execute(
        f"INSERT INTO {SCHEMA}.{table_name(key, kinds)} ({', '.join(c for c, _, _ in cols)})"
        f" SELECT {', '.join(e.format(g='g', v=0) for _, _, e in cols)}"
        f" FROM generate_series({first}, {first + ROWS - 1}) g"
    )


def update(
    conn: psycopg.Connection[Any], key: str, kinds: tuple[str, ...], v: int, where: str
) -> None:
    """Version ``v`` of every value column that is not TOASTed, the TOASTed body left as it
    is (not logged); a table with no such column rewrites its body to itself (still not
    logged: the new row keeps the same out-of-line value), and a table that is all key moves
    its rows to new keys."""
    g = KEYS[key][1]
    name = f"{SCHEMA}.{table_name(key, kinds)}"
    plain = [(c, e) for kind in kinds if kind != "toast" for c, _, e in KINDS[kind]]
    if plain:
        sets = ", ".join(f"{c} = {e.format(g=g, v=v)}" for c, e in plain)
    elif kinds:
        sets = "body = body"
    else:
        sets = f"{g} = {g} + {1000 * v}"
    conn.execute(f"UPDATE {name} SET {sets} WHERE {where.format(g=g)}")


@pytest.fixture
def layouts(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> Iterator[LocalWarehouse]:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
        for key, kinds in LAYOUTS:
            cols = columns(key, kinds)
            pk = ", ".join(c for c, _, _ in KEYS[key][0])
            conn.execute(
                f"CREATE TABLE {SCHEMA}.{table_name(key, kinds)}"
                f" ({', '.join(f'{c} {t}' for c, t, _ in cols)}, PRIMARY KEY ({pk}))"
            )
            insert(conn, key, kinds, 1)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": f"{SCHEMA}.{table_name(*layout)}"} for layout in LAYOUTS],
        capture={"mode": "logical", "group": SCHEMA},
    )
    wh = start_warehouse(settings, warehouse_dir)
    yield wh
    wh.stop()


def assert_merged(pg_dsn: str, wh: LocalWarehouse) -> None:
    """Every merge run succeeded and every current-state table equals its source."""
    wh.pump_until_quiet()
    failed = wh.query(
        "SELECT NAME, ERROR_MESSAGE AS E FROM _EMU_TASK_HISTORY WHERE STATE <> 'SUCCEEDED'"
    )
    assert not failed, failed[0]
    assert len(wh.tables) == len(LAYOUTS)
    for t in wh.tables:
        assert assert_table_equals_source(pg_dsn, wh, t) > 0


async def test_every_column_layout_merges_to_the_source_values(
    pg_dsn: str, layouts: LocalWarehouse, s3_client: Any, bucket: str
) -> None:
    """For every combination of fixed-width (integer, timestamptz, boolean), variable-width
    (varchar, numeric, jsonb) and TOASTed text value columns, including none (a table that is
    all key), under a bigint and a composite (text, integer) key: after the snapshot, inserts,
    updates (the TOASTed body replaced in one transaction, then left unchanged by the next,
    both merged in one run; an all-key table's keys moved) and deletes, then a second round
    merged over the first (a body left unchanged taken from the current-state row), each
    table's merge task succeeds every run and its current-state table equals the source row
    for row and value for value."""
    settings = layouts.settings
    assert await init(settings) == 0
    with psycopg.connect(pg_dsn, options=SYNC) as conn:
        for key, kinds in LAYOUTS:
            name = f"{SCHEMA}.{table_name(key, kinds)}"
            g = KEYS[key][1]
            insert(conn, key, kinds, ROWS + 1)
            conn.commit()
            if "toast" in kinds:
                conn.execute(f"UPDATE {name} SET body = {BIG_TEXT} WHERE {g} % 5 = 0")
                conn.commit()
            update(conn, key, kinds, 1, "{g} % 3 = 0 OR {g} % 5 = 0")
            conn.execute(f"DELETE FROM {name} WHERE {g} % 7 = 0")
            conn.commit()
    assert await export_until_idle(settings) == 0
    assert_merged(pg_dsn, layouts)

    with psycopg.connect(pg_dsn, options=SYNC) as conn:
        for key, kinds in LAYOUTS:
            update(conn, key, kinds, 2, "{g} % 2 = 1")
            g = KEYS[key][1]
            conn.execute(f"DELETE FROM {SCHEMA}.{table_name(key, kinds)} WHERE {g} % 11 = 0")
            conn.commit()
    assert await export_until_idle(settings) == 0
    bodies = object_bodies(s3_client, bucket)
    for key, kinds in LAYOUTS:
        if "toast" in kinds:
            folder = f"{SCHEMA}.{table_name(key, kinds)}/"
            assert any(k.startswith(folder) and b",body\n" in v for k, v in bodies.items()), (
                f"{folder}: no change left the TOASTed body unchanged"
            )
    assert_merged(pg_dsn, layouts)
