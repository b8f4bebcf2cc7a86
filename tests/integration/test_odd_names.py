"""A table whose quoted name holds a dot, a space and capitals (``"Odd.Schema"."Order Lines"``),
captured in both modes: its objects under the documented folder, its ledger key, and ``status``
naming it as a user writes it; and tables and columns named as PostgreSQL allows (capitals,
spaces, quotes, reserved words, non-ASCII letters) through the generated warehouse to their
current-state tables under the documented Snowflake names (docs/design.md#object-names)."""

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
from cdc_daemon.reconcile.reconciler import Reconciler
from cdc_daemon.reconcile.verify import verify_group
from cdc_daemon.warehouse import sql
from cdc_daemon.warehouse.model import read_catalog
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, main_in_thread, make_settings, object_bodies
from tests.warehouse_checks import assert_table_equals_source

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
    ledger's position is under that key, ``status`` prints the name quoted, and its pipe (on
    warehouse_table ORDER_LINES) names the folder as a quoted stage path."""
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
    # Its pipe reads the folder, which holds a space and a %, as a quoted stage path.
    rendered = sql.render(settings, read_catalog(settings))
    assert f"FROM '@CDC.SALES.CDC_STAGE/{KEY}/'" in rendered
    assert "CREATE PIPE IF NOT EXISTS RAW_ORDER_LINES_PIPE" in rendered


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


# Tables of a non-public schema as a new user has them: capitals, a space, a reserved word;
# the second with columns of every kind of name PostgreSQL allows.
ADV = ['adv."OrderLines"', 'adv."Order Lines"', 'adv."select"']
ODD_COLUMNS = (
    '"first name" text, "we""ird" text, "prix€" numeric(8,2), "Ω" text, "select" text,'
    ' "Amount" integer, "straße" text, "back\\slash" text'
)
# Logical mode reads flushed WAL: writers commit synchronously (see test_logical.py).
SYNC = "-c synchronous_commit=on"


def create_adv_tables(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA adv")
        conn.execute('CREATE TABLE adv."OrderLines" (id bigint PRIMARY KEY, note text)')
        conn.execute(f'CREATE TABLE adv."Order Lines" (id bigint PRIMARY KEY, {ODD_COLUMNS})')
        conn.execute('CREATE TABLE adv."select" ("from" bigint PRIMARY KEY, "Order" text)')
        add_adv_rows(conn, 1, 20)
        # A value stored out of line (TOASTed): a logical change that leaves it unchanged
        # names the column in _cdc_unchanged, and the merge finds it there by its name.
        conn.execute(
            'UPDATE adv."Order Lines" SET "back\\slash" = (SELECT string_agg(md5(g::text), \'\')'
            " FROM generate_series(1, 400) g) WHERE id = 1"
        )


def add_adv_rows(conn: psycopg.Connection[Any], first: int, last: int) -> None:
    span = (first, last)
    conn.execute(
        "INSERT INTO adv.\"OrderLines\" SELECT g, 'n' || g"
        " FROM generate_series(%s::int, %s::int) g",
        span,
    )
    conn.execute(
        "INSERT INTO adv.\"Order Lines\" SELECT g, 'f ' || g, 'w\"' || g, g * 1.25, 'ω',"
        " CASE WHEN g %% 3 = 0 THEN NULL ELSE 's' END, g * 10, 'ß', 'b\\' || g"
        " FROM generate_series(%s::int, %s::int) g",
        span,
    )
    conn.execute(
        "INSERT INTO adv.\"select\" SELECT g, 'o' || g FROM generate_series(%s::int, %s::int) g",
        span,
    )


@pytest.mark.parametrize("mode", ["watermark", "logical"])
async def test_odd_tables_and_columns_reach_their_current_state_tables(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
    warehouse_dir: Path,
    mode: str,
) -> None:
    """``adv."OrderLines"``, ``adv."Order Lines"`` and ``adv."select"`` in one group, without
    warehouse_table: the rendered SQL names them ORDERLINES, ORDER_LINES and SELECT_ (objects
    unquoted), their columns quoted with their exact text upper-cased ("FIRST NAME", "WE""IRD",
    "PRIX€", "Ω", "SELECT", "STRASSE", "BACK\\SLASH"), and the pipe of the folder with a space by
    a quoted stage path; applied to the local warehouse, the objects land under
    ``adv.<name>/``, and after the first export and more changes (inserts in watermark mode;
    updates, one leaving a TOASTed value of "back\\slash" unchanged, and deletes in logical
    mode) each current-state table equals its source value
    for value. The reconciler confirms every object, applying again changes nothing, and
    ``verify`` finds every table equal."""
    create_adv_tables(pg_dsn)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": t} for t in ADV],
        capture={"group": "adv", "mode": mode},
    )
    rendered = sql.render(settings, read_catalog(settings))
    for name in ("ORDERLINES", "ORDER_LINES", "SELECT_"):
        assert f"CREATE TABLE IF NOT EXISTS {name} (" in rendered
        assert f"CREATE PIPE IF NOT EXISTS RAW_{name}_PIPE" in rendered
    for column in ('"FIRST NAME" VARCHAR', '"WE""IRD" VARCHAR', '"PRIX€" NUMBER(8, 2)'):
        assert column in rendered
    for column in ('"Ω" VARCHAR', '"SELECT" VARCHAR', '"STRASSE" VARCHAR', '"AMOUNT" NUMBER'):
        assert column in rendered
    assert '"BACK\\SLASH" VARCHAR' in rendered
    assert "FROM '@CDC.SALES.CDC_STAGE/adv.Order Lines/'" in rendered
    assert "FROM @CDC.SALES.CDC_STAGE/adv.OrderLines/" in rendered
    wh = start_warehouse(settings, warehouse_dir)
    try:
        settings = wh.settings
        assert await init(settings) == 0
        assert await export_until_idle(settings) == 0
        with psycopg.connect(pg_dsn, options=SYNC, autocommit=True) as conn:
            add_adv_rows(conn, 21, 30)
            if mode == "logical":
                conn.execute(
                    'UPDATE adv."Order Lines" SET "we""ird" = \'x,y\', "Ω" = NULL,'
                    ' "prix€" = "prix€" + 1 WHERE id % 4 = 0'
                )
                conn.execute('DELETE FROM adv."Order Lines" WHERE id % 5 = 0')
                conn.execute('DELETE FROM adv."select" WHERE "from" = 2')
                conn.execute('UPDATE adv."Order Lines" SET "first name" = \'n\' WHERE id = 1')
        assert await export_until_idle(settings) == 0
        folders = {k.split("/dt=")[0] for k in object_bodies(s3_client, bucket)}
        assert folders == {"adv.OrderLines", "adv.Order Lines", "adv.select"}
        wh.pump_until_quiet()
        rows = {t.names.name: assert_table_equals_source(pg_dsn, wh, t) for t in wh.tables}
        expected = 30 - (6 if mode == "logical" else 0)
        assert rows == {
            "ORDERLINES": 30,
            "ORDER_LINES": expected,
            "SELECT_": 29 if mode == "logical" else 30,
        }
        reconciler = Reconciler(settings)
        try:
            outcome = await reconciler.run_once()
            assert all(p.healthy for p in outcome.pipes)
            assert not outcome.failed
            assert not outcome.missing
            assert outcome.loaded
        finally:
            await reconciler.close()
        assert wh.apply(plan_only=True).empty
        # `verify`: every value hashed on both sides by its column's quoted name, all equal.
        verified = {r.warehouse_table: r for r in verify_group(settings)}
        assert set(verified) == set(rows)
        for r in verified.values():
            assert r.equal, r.lines()
            assert r.source_rows == r.warehouse_rows == rows[r.warehouse_table]
    finally:
        wh.stop()


async def test_two_tables_on_one_snowflake_name_are_refused_at_init(
    pg_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``adv."Order Lines"`` and ``adv.order_lines`` would both be ORDER_LINES in Snowflake:
    ``init`` and ``snowflake render`` exit 2 with one sentence naming both tables and the fix
    (warehouse_table), no traceback; with warehouse_table set for one, render succeeds."""
    create_adv_tables(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE adv.order_lines (id bigint PRIMARY KEY)")
    config = tmp_path / "cdc.toml"

    def write(extra: str) -> None:
        config.write_text(
            f"[postgres]\ndsn = '{pg_dsn}'\n[s3]\nbucket = 'b'\n[capture]\ngroup = 'adv'\n"
            "[[tables]]\nname = 'adv.\"Order Lines\"'\n"
            f"[[tables]]\nname = 'adv.order_lines'\n{extra}"
        )

    write("")
    for command in (["init"], ["snowflake", "render"]):
        assert await main_in_thread([*command, "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert (
            'adv."Order Lines" and adv.order_lines would both name ORDER_LINES in Snowflake: '
            "set warehouse_table for one of them"
        ) in err
        assert "Traceback" not in err
    write("warehouse_table = 'ORDER_LINES_2'\n")
    assert await main_in_thread(["snowflake", "render", "--config", str(config)]) == 0
    assert "CREATE TABLE IF NOT EXISTS ORDER_LINES_2 (" in capsys.readouterr().out
