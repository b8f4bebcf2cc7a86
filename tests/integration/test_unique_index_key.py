"""A table without a primary key, keyed by a unique index on NOT NULL columns: the index is its
key everywhere (init, logical and watermark capture, the warehouse model), init says which key
and identity each table gets, and refuses with the exact statement what would break the
application's writes, changing nothing on the source; against a real PostgreSQL 15, S3 and
the local warehouse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog

from cdc_daemon.cli import init
from cdc_daemon.errors import SourceError
from cdc_daemon.local.services import LocalS3
from cdc_daemon.names import TableName
from cdc_daemon.warehouse.model import Names, from_catalog
from tests.fix_warehouse import start_warehouse
from tests.helpers import differences, export_until_idle, make_settings, object_bodies, rebuild
from tests.warehouse_checks import assert_table_equals_source

pytestmark = pytest.mark.usefixtures("drop_slots")

SYNC = "-c synchronous_commit=on"


def run_sql(pg_dsn: str, *statements: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        for statement in statements:
            conn.execute(statement)


def create_stock(pg_dsn: str) -> None:
    """inv.stock: no primary key; keyed by the unique index stock_sku_wh on (sku, wh) under
    REPLICA IDENTITY USING INDEX. Beside it a nullable unique index (barcode) and a partial one,
    neither of which can be the key, and a usable one-column unique index (row_no) that the
    fewest-columns rule would pick if the identity's index did not come first."""
    run_sql(
        pg_dsn,
        "CREATE SCHEMA inv",
        "CREATE TABLE inv.stock (sku text NOT NULL, wh int NOT NULL, barcode text,"
        " qty int NOT NULL, note text, row_no int GENERATED ALWAYS AS IDENTITY)",
        "CREATE UNIQUE INDEX stock_sku_wh ON inv.stock (sku, wh)",
        "CREATE UNIQUE INDEX stock_row_no ON inv.stock (row_no)",
        "CREATE UNIQUE INDEX stock_barcode ON inv.stock (barcode)",
        "CREATE UNIQUE INDEX stock_big ON inv.stock (sku) WHERE qty > 1000",
        "ALTER TABLE inv.stock REPLICA IDENTITY USING INDEX stock_sku_wh",
        "INSERT INTO inv.stock SELECT 'sku-' || (g % 7), g / 7, NULL, g, 'n' || g"
        " FROM generate_series(0, 59) g",
    )


def change_stock(pg_dsn: str) -> None:
    """Inserts, updates of a value and of each key column, deletes, in a few transactions."""
    run_sql(
        pg_dsn,
        "INSERT INTO inv.stock VALUES ('sku-new', 1, 'b1', 5, 'new')",
        "UPDATE inv.stock SET qty = qty + 100, note = 'more' WHERE wh = 2",
        "UPDATE inv.stock SET sku = 'renamed-' || sku WHERE wh = 3",
        "UPDATE inv.stock SET wh = wh + 100 WHERE sku = 'sku-4'",
        "DELETE FROM inv.stock WHERE wh = 5",
        "DELETE FROM inv.stock WHERE sku = 'renamed-sku-1'",
        "INSERT INTO inv.stock VALUES ('sku-1', 5, NULL, 1, 'back')",
    )


def catalog_of(pg_dsn: str, publications: bool = True) -> list[tuple[Any, ...]]:
    """What init could change on the source: the relations of schema inv with their replica
    identity, their indexes and constraints, NOT NULL columns, and (``publications``) the
    publications and slots."""
    with psycopg.connect(pg_dsn) as conn:
        return [
            tuple(row)
            for query in (
                "SELECT c.relname, c.relkind, c.relreplident FROM pg_class c"
                " WHERE c.relnamespace = 'inv'::regnamespace ORDER BY 1",
                "SELECT x.relname, i.indisunique, i.indisreplident, i.indisvalid FROM pg_index i"
                " JOIN pg_class x ON x.oid = i.indexrelid"
                " WHERE x.relnamespace = 'inv'::regnamespace ORDER BY 1",
                "SELECT conname, contype FROM pg_constraint"
                " WHERE connamespace = 'inv'::regnamespace ORDER BY 1",
                "SELECT attrelid::regclass::text, attname, attnotnull FROM pg_attribute"
                " WHERE attrelid IN (SELECT oid FROM pg_class"
                " WHERE relnamespace = 'inv'::regnamespace) AND attnum > 0 ORDER BY 1, 2",
                *(
                    (
                        "SELECT pubname FROM pg_publication ORDER BY 1",
                        "SELECT prrelid::regclass::text FROM pg_publication_rel ORDER BY 1",
                        "SELECT slot_name FROM pg_replication_slots ORDER BY 1",
                    )
                    if publications
                    else ()
                ),
            )
            for row in conn.execute(query)
        ]


def assert_writes_work(pg_dsn: str, table: str, where: str) -> None:
    """The application's UPDATE and DELETE on ``table`` succeed; rolled back."""
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(f"UPDATE {table} SET v = 'x' WHERE {where}").rowcount == 1
        assert conn.execute(f"DELETE FROM {table} WHERE {where}").rowcount == 1
        conn.rollback()


async def test_a_unique_index_key_is_captured_in_logical_mode_and_merged(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
    warehouse_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """inv.stock has no primary key, only unique indexes: the one named by REPLICA IDENTITY
    USING INDEX (sku, wh) is its key, not the nullable, the partial or the one-column one.
    init says so in one line with the identity and its cost, leaving the table, its indexes
    and identity as they were; the warehouse keys its current-state table by (sku, wh); after
    the snapshot, inserts, updates (of a value and of each key column) and deletes, the S3
    rebuild by (sku, wh) and the merged table both equal the source."""
    create_stock(pg_dsn)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": "inv.stock"}],
        capture={"mode": "logical", "group": "inv"},
    )
    wh = start_warehouse(settings, warehouse_dir)
    try:
        (table,) = wh.tables
        assert [c.source for c in table.columns if c.key] == ["sku", "wh"]
        capsys.readouterr()
        before = catalog_of(pg_dsn, publications=False)
        assert await init(wh.settings) == 0
        assert catalog_of(pg_dsn, publications=False) == before
        (line,) = [x for x in capsys.readouterr().out.splitlines() if "key (" in x]
        assert line == (
            "inv.stock: key (sku, wh) from unique index stock_sku_wh; REPLICA IDENTITY USING "
            "INDEX stock_sku_wh: an update or delete logs only the old key (the least WAL on "
            "the source)"
        )
        assert await export_until_idle(wh.settings) == 0  # the snapshot
        change_stock(pg_dsn)
        assert await export_until_idle(wh.settings) == 0
        rebuild(pg_dsn, object_bodies(s3_client, bucket), "inv.stock", ("sku", "wh"))
        assert differences(pg_dsn, "inv.stock") == (55, 55, 0, 0)
        wh.pump_until_quiet()
        assert assert_table_equals_source(pg_dsn, wh, table) == 55
    finally:
        wh.stop()


async def test_a_unique_index_key_is_the_watermark_and_key_in_watermark_mode(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
    warehouse_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Watermark mode on inv.parts, whose only key is the unique index on its identity column
    part_id (REPLICA IDENTITY DEFAULT, which watermark mode does not need): init accepts it and
    says which key it has, the watermark defaults to that key's column, the warehouse keys its
    current-state table by it, and new rows read in two passes rebuild exactly from S3 and
    merge into a table equal to the source."""
    run_sql(
        pg_dsn,
        "CREATE SCHEMA inv",
        "CREATE TABLE inv.parts (part_id bigint GENERATED ALWAYS AS IDENTITY, name text NOT NULL,"
        " price numeric(10, 2))",
        "CREATE UNIQUE INDEX parts_id ON inv.parts (part_id)",
        "CREATE UNIQUE INDEX parts_name ON inv.parts (name) WHERE price IS NOT NULL",
        "INSERT INTO inv.parts (name, price) SELECT 'p' || g, g FROM generate_series(1, 30) g",
    )
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": "inv.parts"}],
        capture={"mode": "watermark", "group": "inv"},
    )
    wh = start_warehouse(settings, warehouse_dir)
    try:
        (table,) = wh.tables
        assert [c.source for c in table.columns if c.key] == ["part_id"]
        capsys.readouterr()
        with structlog.testing.capture_logs() as logs:
            assert await init(wh.settings) == 0
        lines = capsys.readouterr().out.splitlines()
        assert await export_until_idle(wh.settings) == 0
        run_sql(pg_dsn, "INSERT INTO inv.parts (name) SELECT 'q' || g FROM generate_series(1, 9) g")
        assert await export_until_idle(wh.settings) == 0
        wh.pump_until_quiet()
        assert assert_table_equals_source(pg_dsn, wh, table) == 39
    finally:
        wh.stop()
    assert [x for x in lines if "key (" in x] == [
        "inv.parts: key (part_id) from unique index parts_id; watermark mode reads the rows "
        "themselves, so no replica identity is needed"
    ]
    (ready,) = [e for e in logs if e["event"] == "ledger_ready"]
    assert ready["watermark_column"] == "part_id"
    bodies = object_bodies(s3_client, bucket)
    assert {b.split(b"\n", 1)[0] for b in bodies.values()} == {
        b"part_id,name,price,_cdc_op,_cdc_seq,_cdc_ts"
    }
    rebuild(pg_dsn, bodies, "inv.parts", ("part_id",))
    assert differences(pg_dsn, "inv.parts") == (39, 39, 0, 0)


async def test_identities_that_would_break_writes_are_refused_with_the_statement(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """Logical mode: a table keyed by a unique index under REPLICA IDENTITY DEFAULT (no primary
    key) or NOTHING would make the application's UPDATE and DELETE fail once published; a
    keyless one cannot be merged. init refuses all three in one message, each naming its
    statement (USING INDEX that index; for the keyless one SET NOT NULL on its unique index's
    column, a new index, a primary key or FULL with a configured key; the warehouse model
    refuses it alike), and changes nothing on the source: the catalog is the same before and
    after, and the application's writes still work. Once the statements named are run, init
    accepts the keyed tables and their writes still work."""
    run_sql(
        pg_dsn,
        "CREATE SCHEMA inv",
        "CREATE TABLE inv.defaulted (code int NOT NULL, v text)",
        "CREATE UNIQUE INDEX defaulted_code ON inv.defaulted (code)",
        "CREATE TABLE inv.nothing (code int NOT NULL, v text)",
        "CREATE UNIQUE INDEX nothing_code ON inv.nothing (code)",
        "ALTER TABLE inv.nothing REPLICA IDENTITY NOTHING",
        "CREATE TABLE inv.keyless (code int, v text)",
        "CREATE UNIQUE INDEX keyless_code ON inv.keyless (code)",
        "ALTER TABLE inv.keyless REPLICA IDENTITY NOTHING",
        *(f"INSERT INTO inv.{t} VALUES (1, 'a')" for t in ("defaulted", "nothing", "keyless")),
    )
    names = ["inv.defaulted", "inv.nothing", "inv.keyless"]
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": n} for n in names],
        capture={"mode": "logical", "group": "inv"},
    )
    before = catalog_of(pg_dsn)
    with pytest.raises(SourceError) as caught:
        await init(settings)
    assert catalog_of(pg_dsn) == before
    problems = str(caught.value).split("; ")
    assert len(problems) == 3
    by_table = {n: p for n in names for p in problems if f"{n} " in p}
    assert "has no primary key and REPLICA IDENTITY DEFAULT" in by_table["inv.defaulted"]
    assert "has REPLICA IDENTITY NOTHING" in by_table["inv.nothing"]
    for table, index in (("defaulted", "defaulted_code"), ("nothing", "nothing_code")):
        assert "the application's UPDATE and DELETE would fail" in by_table[f"inv.{table}"]
        assert by_table[f"inv.{table}"].endswith(
            f": ALTER TABLE inv.{table} REPLICA IDENTITY USING INDEX {index} (or REPLICA "
            "IDENTITY FULL)"
        )
    keyless = by_table["inv.keyless"]
    for fix in (
        "ALTER TABLE inv.keyless ALTER COLUMN code SET NOT NULL (then unique index "
        "keyless_code is its key)",
        "ALTER TABLE inv.keyless ADD PRIMARY KEY (...)",
        "CREATE UNIQUE INDEX CONCURRENTLY keyless_cdc_key ON inv.keyless (...) on NOT NULL "
        "columns then ALTER TABLE inv.keyless REPLICA IDENTITY USING INDEX keyless_cdc_key",
        "ALTER TABLE inv.keyless REPLICA IDENTITY FULL",
    ):
        assert fix in keyless
    # The warehouse side refuses the keyless table with the same sentence (no identity to
    # name in watermark mode).
    with psycopg.connect(pg_dsn) as conn, pytest.raises(SourceError) as unmodelled:
        from_catalog(conn, Names(TableName("inv", "keyless"), "KEYLESS"), None)
    assert str(unmodelled.value).startswith("inv.keyless has no primary key and no unique index")
    assert "ADD PRIMARY KEY" in str(unmodelled.value)
    assert "REPLICA IDENTITY" not in str(unmodelled.value)
    for name in names:  # unpublished, so even NOTHING's writes work
        assert_writes_work(pg_dsn, name, "code = 1")
    fixes = [by_table[t].rsplit(": ", 1)[1].split(" (or ")[0] for t in names[:2]]
    run_sql(pg_dsn, *fixes)
    keyed = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": n} for n in names[:2]],
        capture={"mode": "logical", "group": "inv"},
    )
    assert await init(keyed) == 0
    for name in names[:2]:
        assert_writes_work(pg_dsn, name, "code = 1")
