"""Keyless tables in logical mode (docs/logical.md#keyless-tables): a table with no primary key
and no usable unique index, under REPLICA IDENTITY FULL, captured with each row known by its
values and exact duplicate rows kept as copies, in the snapshot, the stream and the merge;
against a real PostgreSQL 15, S3 and the local warehouse."""

from __future__ import annotations

import asyncio
import csv
import io
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.capture.backfill import parse_request, run_backfill
from cdc_daemon.capture.logical.setup import resync
from cdc_daemon.cli import init
from cdc_daemon.cli import verify as cli_verify
from cdc_daemon.config import Settings
from cdc_daemon.errors import ConfigError, SourceError, TableFailedError
from cdc_daemon.local.services import LocalS3
from cdc_daemon.reconcile.verify import verify_group
from tests.fix_warehouse import start_warehouse
from tests.helpers import (
    differences,
    export_until_idle,
    make_settings,
    object_bodies,
    rebuild_keyless,
)
from tests.warehouse_checks import assert_table_equals_source

pytestmark = pytest.mark.usefixtures("drop_slots")

SYNC = "-c synchronous_commit=on"


def one(where: str) -> str:
    """Copies of one row are told apart by ctid only: the first copy matching ``where``."""
    return f"ctid = (SELECT min(ctid) FROM kl.events WHERE {where})"


def run_sql(pg_dsn: str, *statements: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        for statement in statements:
            conn.execute(statement)


def one_table(pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, name: str) -> Settings:
    """A logical group ``kl`` of the one table ``name``."""
    return make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": name}],
        capture={"mode": "logical", "group": "kl"},
    )


def create_events(pg_dsn: str, identity: str = "FULL") -> None:
    """kl.events: no key, no unique index; rows that repeat exactly (3 copies of each of the 5
    kinds' first row), NULLs, an empty string, numbers, jsonb and a TOASTable text body."""
    run_sql(
        pg_dsn,
        "CREATE SCHEMA kl",
        "CREATE TABLE kl.events (kind text, amount numeric(10, 2), at timestamptz,"
        " payload jsonb, body text)",
        f"ALTER TABLE kl.events REPLICA IDENTITY {identity}",
        "INSERT INTO kl.events SELECT 'k' || (g % 5), (g % 5) * 1.5, '2024-03-01 10:00:00+00',"
        " '{\"n\": 1}', NULL FROM generate_series(1, 15) g",
        "INSERT INTO kl.events SELECT 'u' || g, g, '2024-03-02 11:00:00+00', NULL, ''"
        " FROM generate_series(1, 10) g",
        "INSERT INTO kl.events VALUES (NULL, NULL, NULL, NULL, NULL), (NULL, NULL, NULL, NULL,"
        " NULL)",
    )


def change_events(pg_dsn: str) -> None:
    """One copy of a repeated row updated, one deleted, a new copy of it inserted, a unique row
    deleted, a value of a TOASTed body left unchanged by an update, all copies of a row
    updated in one statement, a row updated to equal another, in a few transactions."""
    big = "repeat('toast-', 20000)"
    run_sql(
        pg_dsn,
        f"UPDATE kl.events SET body = {big} WHERE kind = 'u1'",
        "UPDATE kl.events SET amount = 99 WHERE " + one("kind = 'k1'"),
        "DELETE FROM kl.events WHERE " + one("kind = 'k2'"),
        "INSERT INTO kl.events VALUES ('k3', 4.50, '2024-03-01 10:00:00+00', '{\"n\": 1}', NULL)",
        "DELETE FROM kl.events WHERE kind = 'u2'",
        "UPDATE kl.events SET amount = amount + 1 WHERE kind = 'u1'",  # body unchanged (TOAST)
        "UPDATE kl.events SET at = '2024-03-05 00:00:00+00' WHERE kind = 'k4'",  # all 3 copies
        "UPDATE kl.events SET kind = 'u4', amount = 4 WHERE kind = 'u3'",  # now twice 'u4'
        "BEGIN",
        "INSERT INTO kl.events VALUES ('twice', 1, NULL, NULL, 'x'), ('twice', 1, NULL, NULL, 'x')",
        "DELETE FROM kl.events WHERE " + one("kind = 'twice'"),
        "COMMIT",
        "DELETE FROM kl.events WHERE " + one("kind IS NULL"),
    )


async def test_a_keyless_table_is_captured_with_its_duplicates_and_merged(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
    warehouse_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """kl.events has no key at all and REPLICA IDENTITY FULL: init accepts it and says so in
    one line with the identity's cost; its objects carry _cdc_row; after the snapshot and
    changes that touch single copies of repeated rows (by ctid), the rebuild from S3 and the
    warehouse's current-state table both hold every row as often as the source does, and
    verify finds them equal without fetching a row. One copy deleted from the warehouse and
    one added are found (missing and extra, named by their values); verify --repair reads the
    table again and the warehouse equals the source once more."""
    create_events(pg_dsn)
    wh = start_warehouse(one_table(pg_dsn, s3_server, bucket, tmp_path, "kl.events"), warehouse_dir)
    try:
        (table,) = wh.tables
        assert table.keyless
        capsys.readouterr()
        assert await init(wh.settings) == 0
        (line,) = [x for x in capsys.readouterr().out.splitlines() if "kl.events:" in x]
        assert "captured keyless" in line
        assert "REPLICA IDENTITY FULL" in line
        assert await export_until_idle(wh.settings) == 0  # the snapshot
        wh.pump_until_quiet()
        assert assert_table_equals_source(pg_dsn, wh, table) == 27
        change_events(pg_dsn)
        assert await export_until_idle(wh.settings) == 0
        bodies = object_bodies(s3_client, bucket)
        rebuild_keyless(pg_dsn, bodies, "kl.events")
        assert differences(pg_dsn, "kl.events") == (26, 26, 0, 0)
        wh.pump_until_quiet()
        assert assert_table_equals_source(pg_dsn, wh, table) == 26
        (verified,) = verify_group(wh.settings)
        assert verified.equal
        assert (verified.source_rows, verified.warehouse_rows, verified.rows_fetched) == (26, 26, 0)
        # One copy of a repeated row gone from the warehouse, one copy too many of another.
        wh.query(
            "DELETE FROM EVENTS WHERE KIND = 'k4' AND _CDC_NTH = (SELECT MIN(_CDC_NTH)"
            " FROM EVENTS WHERE KIND = 'k4')"
        )
        wh.query(
            'INSERT INTO EVENTS SELECT KIND, AMOUNT, "AT", PAYLOAD, BODY, _CDC_ROW, 1, 1, _CDC_TS,'
            " _CDC_QUARANTINED, _MERGED_AT, _CDC_OP, _CDC_SYNCED_AT FROM EVENTS WHERE KIND = 'u4'"
            " LIMIT 1"
        )
        (tampered,) = verify_group(wh.settings)
        # The repair reads the table whole again, in a new snapshot that replaces the first.
        assert await asyncio.to_thread(cli_verify, wh.settings, "kl.events", 0.0, False, True) == 1
        wh.pump_until_quiet()
        assert assert_table_equals_source(pg_dsn, wh, table) == 26
        assert all(r.equal for r in verify_group(wh.settings))
    finally:
        wh.stop()
    assert [(d.kind, d.key["kind"]) for d in tampered.differences] == [
        ("missing", "k4"),
        ("extra", "u4"),
    ]
    assert tampered.differences[0].key["at"] == "2024-03-05 00:00:00.000000"
    headers = {b.split(b"\n", 1)[0] for b in bodies.values()}
    assert headers == {
        b"kind,amount,at,payload,body,_cdc_op,_cdc_seq,_cdc_ts,_cdc_unchanged,_cdc_nth,_cdc_row"
    }


async def test_a_keyless_table_without_full_identity_is_refused_with_the_statement(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """Under REPLICA IDENTITY DEFAULT a keyless table's updates and deletes would log nothing
    of the old row: init refuses it in one sentence naming ALTER TABLE ... REPLICA IDENTITY
    FULL, and leaves the table as it was."""
    create_events(pg_dsn, identity="DEFAULT")
    with pytest.raises(SourceError) as refused:
        await init(one_table(pg_dsn, s3_server, bucket, tmp_path, "kl.events"))
    assert "ALTER TABLE kl.events REPLICA IDENTITY FULL" in str(refused.value)
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT relreplident FROM pg_class WHERE oid = 'kl.events'::regclass")
        assert row.fetchone() == ("d",)


async def test_a_keyless_table_joining_while_a_transaction_on_it_commits_counts_it_once(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
    warehouse_dir: Path,
) -> None:
    """kl.events joins a running group while a transaction that inserted a duplicate and
    deleted a copy is still open: the snapshot's temporary slot waits for it, so it commits
    after the group's position and before the snapshot's consistent point. Its changes are
    then both streamed and in the snapshot; the rebuild from S3 and the warehouse count them
    once. A resync reads a new snapshot at a later consistent point, which replaces the first
    one whole, and the warehouse still equals the source. A column added stops the table
    (every row's identity changes) with the way back; after apply and resync it equals the
    source again."""
    create_events(pg_dsn)
    run_sql(pg_dsn, "CREATE TABLE kl.other (id int PRIMARY KEY, v text)")
    other = {"name": "kl.other"}
    capture = {"mode": "logical", "group": "kl"}
    first = make_settings(pg_dsn, s3_server, bucket, tmp_path, tables=[other], capture=capture)
    both = make_settings(
        pg_dsn, s3_server, bucket, tmp_path, tables=[other, {"name": "kl.events"}], capture=capture
    )
    wh = start_warehouse(both, warehouse_dir)
    try:
        assert await init(wh.settings.model_copy(update={"tables": first.tables})) == 0
        assert await export_until_idle(wh.settings.model_copy(update={"tables": first.tables})) == 0
        assert await init(wh.settings) == 0
        with psycopg.connect(pg_dsn, options=SYNC) as open_txn:
            open_txn.execute(
                "INSERT INTO kl.events VALUES ('k1', 1.50, '2024-03-01 10:00:00+00', '{\"n\": 1}',"
                " NULL)"
            )
            open_txn.execute("DELETE FROM kl.events WHERE " + one("kind = 'k2'"))
            daemon = asyncio.create_task(export_until_idle(wh.settings))
            await asyncio.sleep(3)
            assert not daemon.done()
            open_txn.commit()
            assert await asyncio.wait_for(daemon, 120) == 0
        bodies = object_bodies(s3_client, bucket, "kl.events/")
        rebuild_keyless(pg_dsn, bodies, "kl.events")
        assert differences(pg_dsn, "kl.events") == (27, 27, 0, 0)
        # The transaction's changes were streamed too, below the snapshot's consistent point.
        (snapshot,) = {r[2] for r in rows_of(bodies) if r[0] == "S"}
        streamed = [r for r in rows_of(bodies) if r[0] != "S"]
        assert sorted(r[0] for r in streamed) == ["D", "I"]
        assert all(r[2] < snapshot for r in streamed)
        wh.pump_until_quiet()
        (table,) = [t for t in wh.tables if t.names.name == "EVENTS"]
        assert assert_table_equals_source(pg_dsn, wh, table) == 27
        assert await resync(wh.settings, "kl.events") == 0
        run_sql(pg_dsn, "DELETE FROM kl.events WHERE kind = 'u5'")
        await read_again(wh.settings, pg_dsn, s3_client, bucket, snapshots=2)
        wh.pump_until_quiet()
        assert assert_table_equals_source(pg_dsn, wh, table) == 26
        assert wh.apply(plan_only=True).empty
        # A column added changes every row's identity: the table fails, naming the way back.
        run_sql(
            pg_dsn,
            "ALTER TABLE kl.events ADD COLUMN note text",
            "INSERT INTO kl.events (kind, note) VALUES ('k1', 'new')",
        )
        with pytest.raises(TableFailedError) as failed:
            await export_until_idle(wh.settings)
        assert "added or dropped" in str(failed.value)
        assert "resync --table kl.events" in str(failed.value)
        wh.apply()
        assert await resync(wh.settings, "kl.events") == 0
        await read_again(wh.settings, pg_dsn, s3_client, bucket, snapshots=3)
        wh.pump_until_quiet()
        (table,) = [t for t in wh.tables if t.names.name == "EVENTS"]
        assert assert_table_equals_source(pg_dsn, wh, table) == 27
    finally:
        wh.stop()


async def read_again(
    settings: Settings, pg_dsn: str, s3_client: Any, bucket: str, snapshots: int
) -> None:
    """Export until kl.events' objects hold ``snapshots`` snapshots: a rejoin's seq waits for
    the slot's restart_lsn to pass the table's floor, which a CHECKPOINT (its
    running-transactions record) brings about on an idle server."""
    for _ in range(30):
        assert await export_until_idle(settings) == 0
        found = object_bodies(s3_client, bucket, "kl.events/")
        if len({r[2] for r in rows_of(found) if r[0] == "S"}) == snapshots:
            return
        run_sql(pg_dsn, "CHECKPOINT")
    raise AssertionError("kl.events was not read again")


def rows_of(bodies: dict[str, bytes]) -> list[tuple[str, str, int]]:
    """(_cdc_op, _cdc_row, _cdc_seq: the commit LSN or the snapshot's consistent point) of
    every row of the objects."""
    out = []
    for body in bodies.values():
        for row in csv.DictReader(io.StringIO(body.decode())):
            out.append((row["_cdc_op"], row["_cdc_row"], int(row["_cdc_seq"])))
    return out


async def test_a_keyless_row_with_a_value_snowflake_cannot_hold_keeps_its_copies(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
    warehouse_dir: Path,
) -> None:
    """Two copies of a keyless row holding numeric NaN (which Snowflake cannot hold): the
    warehouse has both copies with AMOUNT NULL and _CDC_QUARANTINED naming it, the originals
    are in the quarantine prefix; deleting one copy in the source leaves one copy, and verify
    counts them as quarantined, not as differences. A backfill of the table is refused (it
    would add copies) with the way forward."""
    run_sql(
        pg_dsn,
        "CREATE SCHEMA kl",
        "CREATE TABLE kl.readings (sensor text, amount numeric)",
        "ALTER TABLE kl.readings REPLICA IDENTITY FULL",
        "INSERT INTO kl.readings VALUES ('a', 'NaN'), ('a', 'NaN'), ('b', 1.5)",
    )
    wh = start_warehouse(
        one_table(pg_dsn, s3_server, bucket, tmp_path, "kl.readings"), warehouse_dir
    )
    try:
        assert await init(wh.settings) == 0
        assert await export_until_idle(wh.settings) == 0
        run_sql(
            pg_dsn,
            "INSERT INTO kl.readings VALUES ('a', 'NaN')",
            "DELETE FROM kl.readings WHERE ctid = (SELECT min(ctid) FROM kl.readings"
            " WHERE sensor = 'a')",
            "DELETE FROM kl.readings WHERE ctid = (SELECT min(ctid) FROM kl.readings"
            " WHERE sensor = 'a')",
        )
        assert await export_until_idle(wh.settings) == 0
        wh.pump_until_quiet()
        rows = wh.query("SELECT SENSOR AS S, AMOUNT AS A, _CDC_QUARANTINED AS Q FROM READINGS")
        (verified,) = verify_group(wh.settings)
    finally:
        wh.stop()
    assert sorted((r["S"], r["A"], r["Q"]) for r in rows) == [
        ("a", None, "amount:nan"),
        ("b", Decimal("1.5"), None),
    ]
    quarantined = [k for k in object_bodies(s3_client, bucket) if k.startswith("_quarantine/")]
    assert any("reason=nan-amount/" in k for k in quarantined), quarantined
    # A backfill would read rows again as new copies: refused with the way forward.
    with pytest.raises(ConfigError, match=r"keyless: a backfill would add copies.*resync"):
        await run_backfill(wh.settings, parse_request("2024-01-01", "2024-01-02"))
    assert verified.source_rows == verified.warehouse_rows == 2
    assert verified.equal, verified.differences
    assert [(k["sensor"], mark) for k, mark in verified.quarantined] == [("a", "amount:nan")]
