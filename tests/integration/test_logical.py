"""Logical capture against a real PostgreSQL (wal_level=logical) and a real S3 server."""

from __future__ import annotations

import asyncio
import csv
import io
import random
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog

from cdc_daemon.capture.logical.pgoutput import parse_lsn
from cdc_daemon.cli import init
from cdc_daemon.config import Settings
from cdc_daemon.errors import SourceError
from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3
from tests.helpers import (
    assert_rebuilt_equals_source,
    differences,
    export_until_idle,
    make_settings,
    object_bodies,
    rebuild,
    wait_until,
)

# Writers commit synchronously: a peek sees only flushed WAL, and an asynchronous commit is
# flushed up to wal_writer_delay later, after the test's "export until idle" may have run.
SYNC = "-c synchronous_commit=on"

pytestmark = pytest.mark.usefixtures("drop_slots")


def parsed(bodies: dict[str, bytes]) -> list[dict[str, str]]:
    return [r for b in bodies.values() for r in csv.DictReader(io.StringIO(b.decode()))]


def _rows_of(body: bytes) -> list[bytes]:
    """Split CSV bytes into rows, honouring quoted line breaks."""
    rows, start, quoted = [], 0, False
    for i, c in enumerate(body):
        if c == 34:
            quoted = not quoted
        elif c == 10 and not quoted:
            rows.append(body[start:i])
            start = i + 1
    return rows


def logical_settings(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, **capture: Any
) -> Settings:
    return make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        capture={"mode": "logical", **capture},
        batch={"max_rows": 500},
    )


def sales(pg_dsn: str, rows: int) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, rows, days=5)
        conn.execute("ALTER TABLE ecommerce_sales REPLICA IDENTITY FULL")


def random_changes(dsn: str, rng: random.Random, transactions: int) -> None:
    """Inserts, updates (some moving a row to another day), deletes, in transactions of 1-30
    statements; some roll back."""
    with psycopg.connect(dsn, options=SYNC) as conn:
        for _ in range(transactions):
            try:
                _one_transaction(conn, rng)
            except psycopg.errors.DeadlockDetected:
                conn.rollback()  # concurrent writers updating random rows: it happens


def _one_transaction(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    for _ in range(rng.randint(1, 30)):
        pick = rng.random()
        if pick < 0.35:
            conn.execute(
                "INSERT INTO ecommerce_sales (invoice_no, stock_code, description,"
                " quantity, invoice_date, unit_price, customer_id, country) VALUES"
                " (%s, 'S', %s, %s, now() - random() * interval '6 days', 1.25, NULL,"
                " 'UK')",
                (str(rng.randint(1, 10**6)), 'new, "quoted"\nrow', rng.randint(-5, 50)),
            )
        elif pick < 0.6:
            conn.execute(
                "UPDATE ecommerce_sales SET quantity = quantity + 1,"
                " description = coalesce(description, '') || 'u' WHERE id = ("
                " SELECT id FROM ecommerce_sales ORDER BY random() LIMIT 1)"
            )
        elif pick < 0.75:
            # The partition column: the row moves to another day's object.
            conn.execute(
                "UPDATE ecommerce_sales SET invoice_date = invoice_date"
                " + interval '1 day' * %s WHERE id = ("
                " SELECT id FROM ecommerce_sales ORDER BY random() LIMIT 1)",
                (rng.choice([-2, -1, 1, 3]),),
            )
        elif pick < 0.85:
            conn.execute(
                "UPDATE ecommerce_sales SET customer_id = NULL, description = ''"
                " WHERE id = (SELECT id FROM ecommerce_sales ORDER BY random() LIMIT 1)"
            )
        else:
            conn.execute(
                "DELETE FROM ecommerce_sales WHERE id = ("
                " SELECT id FROM ecommerce_sales ORDER BY random() LIMIT 1)"
            )
    if rng.random() < 0.1:
        conn.rollback()
    else:
        conn.commit()


async def test_snapshot_then_changes_rebuild_the_table(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The initial snapshot exports the existing rows as I; then inserts, updates (also of the
    partition column) and deletes from many transactions, some concurrent, are exported as
    I/U/D with the change's LSN: applying them in _cdc_seq order gives exactly the source."""
    sales(pg_dsn, 1500)
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    bodies = assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    assert all("/dt=" in k and "/join-" in k for k in bodies)  # the snapshot's chunks
    assert len({r["_cdc_seq"] for r in parsed(bodies)}) == 1  # one _cdc_seq for the snapshot
    rng = random.Random(7)
    for round_ in range(3):
        writers = [
            threading.Thread(
                target=random_changes, args=(pg_dsn, random.Random(round_ * 10 + i), 40)
            )
            for i in range(3)
        ]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        random_changes(pg_dsn, rng, 10)
        assert await export_until_idle(settings) == 0
        bodies = assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    assert {r["_cdc_op"] for r in parsed(bodies)} == {"I", "U", "D"}
    with psycopg.connect(pg_dsn) as conn:
        statuses = conn.execute("SELECT DISTINCT status FROM cdc.batches").fetchall()
        slot = conn.execute(
            "SELECT confirmed_flush_lsn = (SELECT pg_lsn(to_hex(high >> 32) || '/'"
            " || to_hex(high & 4294967295)) FROM cdc.positions) FROM pg_replication_slots"
        ).fetchone()
    assert statuses == [("uploaded",)]
    assert slot == (True,)


async def test_same_bytes_as_watermark_mode(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """For the same row values, a streamed insert is encoded exactly like the watermark COPY:
    only _cdc_seq and _cdc_ts differ (awkward text, NULL vs '', numerics, timestamps with and
    without fractions or a declared precision, bytea, arrays, quarantined values)."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE ecommerce_sales (id bigint PRIMARY KEY, invoice_date timestamptz,"
            " d text, n numeric, f float8, b bytea, ts timestamp, dt date, ok boolean,"
            " arr int[], j jsonb, tp timestamp(3) with time zone, vs varchar(10)[]) "
        )
        conn.execute("ALTER TABLE ecommerce_sales REPLICA IDENTITY FULL")
    values = (
        " (1, '2011-03-27 00:30:00+00', NULL, 1.5, 0.1, '\\x00ff', '2011-01-01 10:00:00', "
        "  '2011-01-02', true, '{1,2}', '{\"a\": [1, \"x,y\"]}', '2011-03-27 00:30:00.123+00',"
        "  '{a,\"b,c\"}'),"
        " (2, '2011-03-27 01:30:00.25+01', '', -0.001, -1e300, '', '2011-01-01 10:00:00.5',"
        "  NULL, false, '{}', '\"\"', '2011-03-27 00:30:00+00', '{}'),"
        " (3, '2010-12-01 08:26:00.123456+00', 'a,b \"q\"' || chr(13) || chr(10) || '£ 日本',"
        "  12345678901234567890123456789.1234567890, 1.0000000000000002, NULL, NULL, NULL, NULL,"
        "  NULL, NULL, NULL, NULL),"
        " (4, '2011-01-01', 'x', 'NaN', 'Infinity', NULL, 'infinity', NULL, NULL, NULL, NULL,"
        "  'infinity', NULL),"
        " (5, NULL, 'no day', 1e40, 0, NULL, NULL, '10000-01-01', NULL, NULL, NULL, NULL, NULL)"
    )
    watermark = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        capture={"partition_column": "invoice_date"},
        s3={"prefix": "w/"},
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO ecommerce_sales VALUES" + values)
    assert await export_until_idle(watermark) == 0
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE ecommerce_sales")
    logical = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        capture={"mode": "logical"},
        s3={"prefix": "l/"},
        state={"schema": "cdc_l"},
    )
    assert await init(logical) == 0
    assert await export_until_idle(logical) == 0  # the (empty) snapshot
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("INSERT INTO ecommerce_sales VALUES" + values)
    assert await export_until_idle(logical) == 0

    def rows(prefix: str) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        # Logical objects have one more column, _cdc_unchanged (empty here: nothing TOASTed).
        extra = 1 if prefix == "l/" else 0
        for key, body in object_bodies(s3_client, bucket, prefix).items():
            # A day's quarantined rows in their warehouse form (-q) end in _cdc_quarantined.
            withheld = int(key.endswith("-q.csv.gz"))
            folder = key.split("/")[-2] + "-q" * withheld
            # The bytes of each row without _cdc_seq and _cdc_ts (never quoted, no commas).
            header, *lines = _rows_of(body)
            header = header.removesuffix(b",_cdc_quarantined" * withheld)
            if extra:
                assert header.endswith(b",_cdc_unchanged")
                header = header.removesuffix(b",_cdc_unchanged")
            out.setdefault(folder, []).extend(
                [header, *sorted(r.rsplit(b",", 2 + extra + withheld)[0] for r in lines)]
            )
        return out

    assert rows("l/") == rows("w/")
    assert set(rows("l/")) == {
        "dt=2011-03-27",
        "dt=2010-12-01",
        "dt=2011-01-01-q",
        "dt=unknown-q",
        "reason=nan-n",
        "reason=numeric_out_of_range-n",
    }


async def test_unlogged_toast_value_is_named_never_emptied(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """Under the default replica identity an update does not log an unchanged TOASTed value:
    init accepts the table (and says what it means), the change's row leaves that field empty
    and names the column in ``_cdc_unchanged``, and the merge rule (keep the current value of
    a column the change lacks) rebuilds the table exactly, the large value included."""
    sales(pg_dsn, 10)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE ecommerce_sales REPLICA IDENTITY DEFAULT")
        conn.execute("ALTER TABLE ecommerce_sales ALTER COLUMN description SET STORAGE EXTERNAL")
        conn.execute("UPDATE ecommerce_sales SET description = repeat('x', 5000) WHERE id = 1")
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("UPDATE ecommerce_sales SET quantity = 99 WHERE id = 1")
    assert await export_until_idle(settings) == 0
    bodies = object_bodies(s3_client, bucket)
    updates = [
        row
        for body in bodies.values()
        for row in csv.DictReader(io.StringIO(body.decode()))
        if row["_cdc_op"] == "U"
    ]
    assert len(updates) == 1
    assert updates[0]["_cdc_unchanged"] == "description"
    assert updates[0]["description"] == ""
    assert updates[0]["quantity"] == "99"
    rebuild(pg_dsn, bodies)
    source, rebuilt, missing, extra = differences(pg_dsn)
    assert (source, rebuilt, missing, extra) == (10, 10, 0, 0)


def slot_row(dsn: str) -> tuple[Any, ...] | None:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT confirmed_flush_lsn, pg_current_wal_flush_lsn() FROM pg_replication_slots"
            " WHERE database = current_database()"
        ).fetchone()


async def test_init_names_each_missing_prerequisite(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """init refuses, in one message naming each fix: a role without REPLICATION that may not
    create the publication, a table without a primary key whose TOASTable columns an update
    would not log."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE ecommerce_sales (id int, invoice_date date, note text)")
        conn.execute("DROP ROLE IF EXISTS cdc_weak")
        conn.execute("CREATE ROLE cdc_weak LOGIN")
        conn.execute("GRANT SELECT ON ecommerce_sales TO cdc_weak")
        conn.execute("GRANT ALL ON SCHEMA public TO cdc_weak")
    weak = pg_dsn.replace("user=postgres", "user=cdc_weak")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE PUBLICATION cdc_public_ecommerce_sales FOR TABLE ecommerce_sales"
            " WITH (publish = 'insert')"
        )
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path)
    with pytest.raises(SourceError) as caught:
        await init(settings)
    message = str(caught.value)
    assert "no primary key" in message
    assert "ALTER TABLE public.ecommerce_sales REPLICA IDENTITY FULL" in message
    assert "publish = 'insert, update, delete, truncate'" in message
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP PUBLICATION cdc_public_ecommerce_sales")
    weak_settings = make_settings(
        weak, s3_server, bucket, tmp_path, capture={"mode": "logical"}, state={"dsn": pg_dsn}
    )
    with pytest.raises(SourceError) as caught:
        await init(weak_settings)
    message = str(caught.value)
    assert "ALTER ROLE cdc_weak REPLICATION" in message
    assert "CREATE PUBLICATION cdc_public_ecommerce_sales FOR TABLE" in message
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP OWNED BY cdc_weak")
        conn.execute("DROP ROLE cdc_weak")


async def test_lost_slot_stops_with_a_clear_message(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """A slot dropped behind the daemon's back is never silently recreated from "now": the
    daemon stops and says how to re-initialise."""
    sales(pg_dsn, 50)
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        # The walsender of the daemon that just exited may not have ended yet.
        deadline = time.monotonic() + 30
        while conn.execute(
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'cdc_public_ecommerce_sales'"
        ).fetchone() == (True,):
            assert time.monotonic() < deadline, "the slot is still in use"
            await asyncio.sleep(0.05)
        conn.execute("SELECT pg_drop_replication_slot('cdc_public_ecommerce_sales')")
    with pytest.raises(SourceError, match=r"is gone.*teardown"):
        await export_until_idle(settings)


async def test_invalidated_slot_stops_with_a_clear_message(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """A slot the server invalidated (max_slot_wal_keep_size passed: wal_status 'lost') lost
    changes: the daemon stops and says so, it does not carry on from what is left."""
    sales(pg_dsn, 20)
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        conn.execute("SELECT pg_reload_conf()")
        try:
            for _ in range(3):
                conn.execute(
                    "INSERT INTO ecommerce_sales (invoice_no, stock_code, quantity,"
                    " invoice_date, unit_price, country) SELECT 'p', 'p', 1, now(), 1, 'X'"
                    " FROM generate_series(1, 30000)"
                )
                conn.execute("SELECT pg_switch_wal()")
                conn.execute("CHECKPOINT")
            status = conn.execute(
                "SELECT wal_status FROM pg_replication_slots WHERE database = current_database()"
            ).fetchone()
        finally:
            conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            conn.execute("SELECT pg_reload_conf()")
    assert status == ("lost",)
    with pytest.raises(SourceError, match="invalidated"):
        await export_until_idle(settings)


async def test_teardown_then_a_new_snapshot(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """teardown needs --yes; it drops the slot and the publication and forgets the position,
    so init + run start over with a new snapshot (new keys) and the table still rebuilds."""
    from cdc_daemon.capture.logical.setup import teardown
    from cdc_daemon.errors import ConfigError

    sales(pg_dsn, 100)
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with pytest.raises(ConfigError, match="--yes"):
        await teardown(settings, confirmed=False)
    assert slot_row(pg_dsn) is not None
    assert await teardown(settings, confirmed=True) == 0
    assert slot_row(pg_dsn) is None
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
        conn.execute("DELETE FROM ecommerce_sales WHERE id <= 10")
        conn.commit()
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    keys = object_bodies(s3_client, bucket).keys()
    assert len({k.rsplit("/", 1)[1] for k in keys}) == 2  # two snapshots
    # The deletes between the two slots are not streamed: a re-initialised pipeline needs the
    # warehouse table reloaded from the new snapshot (as teardown says). Rebuild from it alone.
    newest = max(k.rsplit("/", 1)[1] for k in keys)
    bodies = {k: v for k, v in object_bodies(s3_client, bucket).items() if k.endswith(newest)}
    from tests.helpers import differences, rebuild

    rebuild(pg_dsn, bodies)
    assert differences(pg_dsn)[2:] == (0, 0)


async def test_idle_table_busy_server_moves_the_slot(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """WAL written for other tables does not pile up behind the slot: a pass that finds no
    change of the table still moves the slot (heartbeat), after the ledger."""
    sales(pg_dsn, 10)
    settings = logical_settings(
        pg_dsn, s3_server, bucket, tmp_path, heartbeat_s=0.01, max_lag_bytes=1_000_000
    )
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute(
            "CREATE TABLE other AS SELECT g, repeat('x', 100) AS pad"
            " FROM generate_series(1, 50000) g"
        )
    before = slot_row(pg_dsn)
    assert before is not None
    with structlog.testing.capture_logs() as logs:
        assert await export_until_idle(settings) == 0
    after = slot_row(pg_dsn)
    # The lag is watched on every pass: a warning above capture.max_lag_bytes.
    (warning,) = [e for e in logs if e["event"] == "slot_lag_high"]
    assert warning["slot_lag_bytes"] > 1_000_000
    assert after is not None
    # confirmed_flush moved past the other table's WAL
    assert parse_lsn(after[0]) >= parse_lsn(before[1])
    with psycopg.connect(pg_dsn) as conn:
        position = conn.execute("SELECT high FROM cdc.positions").fetchone()
    assert position is not None


async def test_schema_changes(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """An added column flows into the header of the objects written after it (a new object
    generation inside the batch); a dropped column is followed (later objects lack it: the
    pipes load by name); a column retyped other than by a widening (integer to numeric(12,2):
    another scale) stops the daemon, also after a restart, until
    capture.schema_change = "follow"."""
    sales(pg_dsn, 5)
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("UPDATE ecommerce_sales SET quantity = 7 WHERE id = 1")
        conn.execute("ALTER TABLE ecommerce_sales ADD COLUMN channel text")
        conn.execute("UPDATE ecommerce_sales SET channel = 'web' WHERE id = 2")
    assert await export_until_idle(settings) == 0
    bodies = object_bodies(s3_client, bucket)
    later = {k: v for k, v in bodies.items() if "/join-" not in k}
    headers = {k.rsplit("/", 1)[1]: v.split(b"\n", 1)[0] for k, v in later.items()}
    assert any(k.endswith("-s1.csv.gz") and b",channel,_cdc_op" in h for k, h in headers.items())
    assert any(not k.endswith("-s1.csv.gz") and b",channel," not in h for k, h in headers.items())
    rows = parsed(later)
    assert {(r["id"], r.get("channel")) for r in rows} == {("1", None), ("2", "web")}
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("ALTER TABLE ecommerce_sales DROP COLUMN country")
        conn.execute("UPDATE ecommerce_sales SET quantity = 8 WHERE id = 3")
    assert await export_until_idle(settings) == 0
    changes = [r for r in parsed(object_bodies(s3_client, bucket)) if r["id"] == "3"]
    last = max(changes, key=lambda r: int(r["_cdc_seq"]))
    assert last["quantity"] == "8"
    assert "country" not in last
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("ALTER TABLE ecommerce_sales ALTER COLUMN quantity TYPE numeric(12,2)")
        conn.execute("UPDATE ecommerce_sales SET quantity = 9 WHERE id = 4")
    refused = r"changed type \(quantity: integer -> numeric\(12,2\), another scale"
    with pytest.raises(SourceError, match=refused):
        await export_until_idle(settings)
    with pytest.raises(SourceError, match=refused):
        await export_until_idle(settings)
    follow = logical_settings(pg_dsn, s3_server, bucket, tmp_path, schema_change="follow")
    assert await export_until_idle(follow) == 0
    changes = [r for r in parsed(object_bodies(s3_client, bucket)) if r["id"] == "4"]
    assert max(changes, key=lambda r: int(r["_cdc_seq"]))["quantity"] == "9.00"


def waits_for(dsn: str, holder: psycopg.Connection[Any]) -> bool:
    """Whether some session is blocked by the transaction open on ``holder`` (a slot being
    created waits for the transactions running at each of its snapshot points to end)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
            (holder.info.backend_pid,),
        ).fetchone()
    return row is not None and row[0] > 0


async def test_handover_transaction_spanning_the_consistent_point(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The hand-over's hard case: a transaction that begins while the slot is being created
    (after its full-snapshot point) and commits after its consistent point. The exported
    snapshot does not see it, the slot streams it, and its change LSN lies *below* the
    consistent point: snapshot rows carry the slot's restart_lsn as _cdc_seq, so the streamed
    change still wins. (Stamped with the consistent point, the old value would win.)"""
    sales(pg_dsn, 10)
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    t0 = psycopg.connect(pg_dsn, options=SYNC)
    t1 = psycopg.connect(pg_dsn, options=SYNC)
    t2 = psycopg.connect(pg_dsn, options=SYNC)
    admin = psycopg.connect(pg_dsn, autocommit=True)
    try:
        t0.execute("SELECT txid_current()")  # running when the slot starts: it must wait
        daemon = asyncio.create_task(export_until_idle(settings))
        # The slot's creation waits for the transactions running at its start to end: t0.
        await wait_until(lambda: waits_for(pg_dsn, t0), seconds=30)
        await asyncio.to_thread(
            t1.execute, "UPDATE ecommerce_sales SET quantity = 1111 WHERE id = 1"
        )
        await asyncio.to_thread(t0.commit)
        await asyncio.to_thread(admin.execute, "CHECKPOINT")  # a running-xacts record: full
        # Full snapshot point passed: the creation now waits for what ran then, t1, to end.
        await wait_until(lambda: waits_for(pg_dsn, t1), seconds=30)
        await asyncio.to_thread(
            t2.execute, "UPDATE ecommerce_sales SET quantity = 2222 WHERE id = 2"
        )
        await asyncio.to_thread(t1.commit)
        await asyncio.to_thread(admin.execute, "CHECKPOINT")  # t1 ended: consistent
        assert await asyncio.wait_for(daemon, 60) == 0
        await asyncio.to_thread(t2.commit)
    finally:
        for conn in (t0, t1, t2, admin):
            conn.close()
    assert await export_until_idle(settings) == 0
    bodies = assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    with psycopg.connect(pg_dsn) as conn:
        found = conn.execute("SELECT since FROM cdc.group_tables").fetchone()
    assert found is not None
    consistent = int(found[0])  # where the table joined: the slot's consistent point
    streamed = [r for r in parsed(bodies) if r["_cdc_op"] == "U"]
    assert [(r["id"], r["quantity"]) for r in streamed] == [("2", "2222")]
    assert int(streamed[0]["_cdc_seq"]) < consistent


async def test_truncate_stops_with_a_clear_message(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """TRUNCATE cannot be exported as row changes: the daemon stops at it, saying how to
    re-initialise (nothing of that read is exported; the slot does not move)."""
    sales(pg_dsn, 20)
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("DELETE FROM ecommerce_sales WHERE id = 1")
        conn.execute("TRUNCATE ecommerce_sales")
    with pytest.raises(SourceError, match=r"truncated.*teardown"):
        await export_until_idle(settings)


async def test_init_accepts_the_default_identity_with_the_warehouse(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With the warehouse configured, a table with TOASTable columns under the default replica
    identity is accepted (the generated merge keeps a value named in _cdc_unchanged:
    tests/integration/test_warehouse_groups.py), and init says what the identity means."""
    sales(pg_dsn, 5)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE ecommerce_sales REPLICA IDENTITY DEFAULT")
    warehouse = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        capture={"mode": "logical"},
        snowflake={"account": "acme-x1"},
    )
    assert await init(warehouse) == 0
    out = capsys.readouterr().out
    assert "the warehouse merge keeps the current value" in out
