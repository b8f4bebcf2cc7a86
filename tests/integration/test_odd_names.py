"""A table whose quoted name holds a dot, a space and capitals (``"Odd.Schema"."Order Lines"``),
captured in both modes: its objects under the documented folder, its ledger key, and ``status``
naming it as a user writes it (docs/design.md#object-names)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.cli import init
from cdc_daemon.config import Settings
from cdc_daemon.local.services import LocalS3
from cdc_daemon.ops.status import collect, render
from tests.helpers import export_until_idle, make_settings, object_bodies

pytestmark = pytest.mark.usefixtures("drop_slots")

ODD = '"Odd.Schema"."Order Lines"'
KEY = "Odd%2ESchema.Order Lines"  # the ledger key and the folder without its slash
# Another table whose unquoted ``schema.table`` text is the same as ODD's.
TWIN = '"Odd"."Schema.Order Lines"'
TWIN_KEY = "Odd.Schema%2EOrder Lines"


def create_odd_table(dsn: str) -> None:
    """The table, with rows on two days."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "Odd.Schema"')
        conn.execute(
            f'CREATE TABLE {ODD} (id bigserial PRIMARY KEY, "Placed At" timestamptz NOT NULL,'
            ' "Note ""quoted""" text)'
        )
        add_rows(conn, 1, 30)


def add_rows(conn: psycopg.Connection[Any], first: int, last: int) -> None:
    conn.execute(
        f'INSERT INTO {ODD} ("Placed At", "Note ""quoted""")'
        " SELECT timestamptz '2024-03-01 12:00+00' + (g %% 2) * interval '1 day', 'n' || g"
        " FROM generate_series(%s::int, %s::int) g",
        (first, last),
    )


def odd_settings(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, **capture: Any
) -> Settings:
    return make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": ODD, "partition_column": "Placed At", "warehouse_table": "ORDER_LINES"}],
        capture=capture,
    )


def exported_ids(s3_client: Any, bucket: str) -> tuple[set[str], list[int]]:
    """(the folders of every object, the ids of the rows in them)."""
    bodies = object_bodies(s3_client, bucket)
    folders = {k.split("/dt=")[0] for k in bodies}
    ids = [int(r["id"]) for b in bodies.values() for r in csv.DictReader(io.StringIO(b.decode()))]
    return folders, ids


def source_ids(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [int(r[0]) for r in conn.execute(f"SELECT id FROM {ODD} ORDER BY id")]


async def assert_status_names_it(settings: Settings) -> None:
    report = await collect(settings)
    assert list(report) == [KEY]
    assert f'"Odd.Schema"."Order Lines"  ({settings.capture.mode} mode)' in render(report)


async def test_watermark_mode_captures_a_quoted_name_with_a_dot(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """Watermark mode reads the table by its two quoted parts: every row lands under
    ``Odd%2ESchema.Order Lines/dt=<day>/`` (one folder per day of ``"Placed At"``), the
    ledger's position is under that key, and ``status`` prints the name quoted."""
    create_odd_table(pg_dsn)
    settings = odd_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    keys = list(object_bodies(s3_client, bucket))
    assert {k.split("/")[1] for k in keys} == {"dt=2024-03-01", "dt=2024-03-02"}
    folders, ids = exported_ids(s3_client, bucket)
    assert folders == {KEY}
    assert sorted(ids) == sorted(source_ids(pg_dsn))  # every row once
    with psycopg.connect(pg_dsn) as conn:
        positions = conn.execute("SELECT table_name, high FROM cdc.positions").fetchall()
    assert positions == [(KEY, 30)]
    await assert_status_names_it(settings)


async def test_two_tables_with_the_same_unquoted_text_stay_apart(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """``"Odd.Schema"."Order Lines"`` and ``"Odd"."Schema.Order Lines"`` print the same
    unquoted ``schema.table``; in one group each still gets its own folder and ledger key, and
    each folder holds exactly its own table's rows."""
    create_odd_table(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "Odd"')
        conn.execute(f"CREATE TABLE {TWIN} (id bigint PRIMARY KEY, note text)")
        conn.execute(f"INSERT INTO {TWIN} SELECT g, 't' FROM generate_series(1001, 1005) g")
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[
            {"name": ODD, "warehouse_table": "ORDER_LINES"},
            {"name": TWIN, "warehouse_table": "TWIN_LINES"},
        ],
        capture={"group": "odd"},
    )
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    bodies = object_bodies(s3_client, bucket)
    by_folder: dict[str, set[int]] = {}
    for key, body in bodies.items():
        rows = csv.DictReader(io.StringIO(body.decode()))
        by_folder.setdefault(key.split("/dt=")[0], set()).update(int(r["id"]) for r in rows)
    assert by_folder == {KEY: set(source_ids(pg_dsn)), TWIN_KEY: set(range(1001, 1006))}
    report = await collect(settings)
    assert sorted(report) == sorted([KEY, TWIN_KEY])
    shown = render(report)
    assert f"{ODD}  (watermark mode)" in shown
    assert f"{TWIN}  (watermark mode)" in shown


async def test_logical_mode_captures_a_quoted_name_with_a_dot(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """Logical mode: init publishes the table by its two quoted parts (a second init finds it
    published and changes nothing), the snapshot and the streamed inserts land under the same
    folder as in watermark mode, the ledger's records are under the key, and ``status`` prints
    the name quoted."""
    create_odd_table(pg_dsn)
    settings = odd_settings(pg_dsn, s3_server, bucket, tmp_path, mode="logical")
    assert await init(settings) == 0
    assert await init(settings) == 0
    with psycopg.connect(pg_dsn) as conn:
        published = conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
            (settings.publication_name,),
        ).fetchall()
    assert published == [("Odd.Schema", "Order Lines")]
    assert await export_until_idle(settings) == 0
    # Committed with synchronous_commit on: the test cluster runs it off, and a drain ends at
    # the server's flushed position (an unflushed commit is the next run's).
    with psycopg.connect(pg_dsn, autocommit=True, options="-c synchronous_commit=on") as conn:
        add_rows(conn, 31, 40)
    assert await export_until_idle(settings) == 0
    folders, ids = exported_ids(s3_client, bucket)
    assert folders == {KEY}
    assert sorted(ids) == sorted(source_ids(pg_dsn))  # the snapshot's rows and the stream's, once
    with psycopg.connect(pg_dsn) as conn:
        names = {r[0] for r in conn.execute("SELECT table_name FROM cdc.batches")}
    assert names == {KEY}
    await assert_status_names_it(settings)
