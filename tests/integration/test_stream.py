"""Logical capture over the streaming replication protocol, against a real PostgreSQL: the
stream survives what a long-running session meets (a terminated walsender, a slow upload under
a short wal_sender_timeout, WAL written by others) without losing or doubling a change."""

from __future__ import annotations

import asyncio
import csv
import io
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from cdc_daemon.batch.csv import header_line
from cdc_daemon.batch.spool import DaySpool
from cdc_daemon.capture.logical.pgoutput import Begin, Commit, decode, parse_lsn
from cdc_daemon.capture.logical.source import LogicalSource
from cdc_daemon.capture.logical.stream import XLOG_HEADER, Keepalive, ReplicationStream
from cdc_daemon.cli import init
from cdc_daemon.errors import TransientError
from cdc_daemon.local.services import LocalS3
from cdc_daemon.source.values import QuarantineJudge
from tests.helpers import (
    assert_rebuilt_equals_source,
    differences,
    export_until_idle,
    fetch_one,
    make_settings,
    object_bodies,
    rebuild,
    running_daemon,
    wait_until,
)
from tests.integration.test_logical import SYNC, logical_settings, random_changes, sales

pytestmark = pytest.mark.usefixtures("drop_slots")

STREAM_PID = (
    "SELECT pid FROM pg_stat_replication WHERE application_name = 'cdc-daemon-stream'"
    " AND pid IN (SELECT active_pid FROM pg_replication_slots WHERE database = current_database())"
)


def spools_in(folder: Path) -> Callable[[list[str], QuarantineJudge], DaySpool]:
    """A spool factory for reading with ``LogicalSource.read`` directly (gzip, in ``folder``)."""

    def new_spool(header: list[str], judge: QuarantineJudge) -> DaySpool:
        return DaySpool(folder, "gzip", 1, header_line(header), None, judge)

    return new_spool


def stream_pid(dsn: str) -> int | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(STREAM_PID).fetchone()
    return int(row[0]) if row else None


def flush_lsn(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(fetch_one(conn.execute("SELECT pg_current_wal_flush_lsn() - '0/0'"))[0])


def ledger_at_least(dsn: str, lsn: int) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT high FROM cdc.positions WHERE table_name = 'public.ecommerce_sales'"
        ).fetchone()
    return row is not None and row[0] is not None and int(row[0]) >= lsn


def slot_confirmed(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(
            fetch_one(
                conn.execute(
                    "SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots"
                    " WHERE slot_name = 'cdc_public_ecommerce_sales'"
                )
            )[0]
        )


@pytest.fixture
def short_sender_timeout(pg_dsn: str) -> Iterator[None]:
    """wal_sender_timeout = 1s for the test (a server setting: reset afterwards)."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET wal_sender_timeout = '1s'")
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET wal_sender_timeout")
            conn.execute("SELECT pg_reload_conf()")


async def test_a_terminated_walsender_is_reconnected_and_nothing_is_lost(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The walsender serving the daemon's stream is terminated while changes flow: the daemon
    notices the broken stream, starts a new one at the ledger's position, and every change
    arrives: the objects rebuild the source exactly (a change read twice has one _cdc_seq)."""
    sales(pg_dsn, 50)
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path, heartbeat_s=0.2)
    assert await init(settings) == 0
    rng = random.Random(7)
    with capture_logs() as logs:
        async with running_daemon(settings):
            await wait_until(lambda: stream_pid(pg_dsn) is not None)
            random_changes(pg_dsn, rng, 5)
            first = stream_pid(pg_dsn)
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (first,))
            random_changes(pg_dsn, rng, 5)
            end = flush_lsn(pg_dsn)
            await wait_until(lambda: ledger_at_least(pg_dsn, end))
            assert stream_pid(pg_dsn) not in (None, first)
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    failures = [e for e in logs if e["event"] == "step_failed"]
    assert any("replication stream" in e["error"] for e in failures), failures
    assert any(e["event"] == "step_recovered" for e in logs)


@pytest.mark.usefixtures("short_sender_timeout")
async def test_status_updates_keep_the_stream_alive_while_a_batch_uploads(
    pg_dsn: str,
    s3_server: LocalS3,
    s3_proxy: Any,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    """With wal_sender_timeout = 1s, uploads held for 3 s each: nobody reads the stream while a
    batch uploads, yet the status updates sent meanwhile keep the walsender from dropping it:
    one stream for the whole run, and every change arrives."""
    sales(pg_dsn, 20)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        capture={"mode": "logical", "heartbeat_s": 0.2},
        batch={"max_rows": 500},
        s3={"endpoint_url": s3_proxy.endpoint_url},
    )
    assert await init(settings) == 0
    with capture_logs() as logs:
        async with running_daemon(settings):
            await wait_until(lambda: stream_pid(pg_dsn) is not None)
            first = stream_pid(pg_dsn)
            s3_proxy.delay_next(4, 3.0)
            random_changes(pg_dsn, random.Random(3), 4)
            end = flush_lsn(pg_dsn)
            await wait_until(lambda: ledger_at_least(pg_dsn, end))
            assert stream_pid(pg_dsn) == first
    assert s3_proxy.injected >= 1  # an upload was held past the timeout
    assert not [e for e in logs if e["event"] == "step_failed"]
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


async def test_wal_written_by_others_does_not_stay_pinned_by_an_idle_table(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The captured table is idle while another table takes writes: the keepalives' walEnd
    moves the position (ledger, then slot) past that WAL every heartbeat_s, so the slot
    holds none of it back, and no batch is written for it."""
    sales(pg_dsn, 10)
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path, heartbeat_s=0.2)
    assert await init(settings) == 0
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("CREATE TABLE other (id serial PRIMARY KEY, payload text)")
    with capture_logs() as logs:
        async with running_daemon(settings):
            await wait_until(lambda: stream_pid(pg_dsn) is not None)
            with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
                for _ in range(20):
                    conn.execute(
                        "INSERT INTO other (payload) SELECT repeat('x', 1000)"
                        " FROM generate_series(1, 200)"
                    )
            end = flush_lsn(pg_dsn)
            await wait_until(lambda: ledger_at_least(pg_dsn, end) and slot_confirmed(pg_dsn) >= end)
    batches = [e for e in logs if e["event"] == "batch_uploaded" and e["reason"] != "snapshot"]
    assert batches == []
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


async def test_wal_of_another_database_does_not_stay_pinned(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The source database is idle while another database of the cluster takes writes: the
    walsender reads that WAL too, its keepalives' walEnd passes it, and the slot moves past it
    every heartbeat_s: an idle source database pins no WAL."""
    sales(pg_dsn, 10)
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path, heartbeat_s=0.2)
    assert await init(settings) == 0
    other_db = f"{psycopg.conninfo.conninfo_to_dict(pg_dsn)['dbname']}_other"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{other_db}"')
    other_dsn = psycopg.conninfo.make_conninfo(pg_dsn, dbname=other_db)
    try:
        async with running_daemon(settings):
            await wait_until(lambda: stream_pid(pg_dsn) is not None)
            with psycopg.connect(other_dsn, autocommit=True, options=SYNC) as conn:
                conn.execute("CREATE TABLE t (payload text)")
                for _ in range(20):
                    conn.execute(
                        "INSERT INTO t SELECT repeat('x', 1000) FROM generate_series(1, 200)"
                    )
            end = flush_lsn(pg_dsn)
            await wait_until(lambda: ledger_at_least(pg_dsn, end) and slot_confirmed(pg_dsn) >= end)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{other_db}" WITH (FORCE)')
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


async def test_a_postgres_restart_is_waited_out_by_the_stream(
    pg_dsn: str, local_pg: Any, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The source server restarts under a streaming daemon: the stream breaks, the daemon
    reconnects (ledger, lock, a new stream at the ledger's position) and exports what was
    committed before and after, each change once: the objects rebuild the source."""
    if local_pg is None:
        pytest.skip("CDC_TEST_PG_DSN points at a server this test must not restart")
    sales(pg_dsn, 30)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        capture={"mode": "logical", "heartbeat_s": 0.2},
        batch={"max_rows": 500},
        daemon={"retry_max_wait_s": 0.5, "retry_attempts": 60},
    )
    assert await init(settings) == 0
    rng = random.Random(11)
    async with running_daemon(settings):
        await wait_until(lambda: stream_pid(pg_dsn) is not None)
        random_changes(pg_dsn, rng, 4)
        await asyncio.to_thread(local_pg.restart)
        random_changes(pg_dsn, rng, 4)
        end = flush_lsn(pg_dsn)
        await wait_until(lambda: ledger_at_least(pg_dsn, end))
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


@pytest.fixture
def odd_server_settings(pg_dsn: str) -> Iterator[None]:
    """A server whose defaults differ from what the encoding needs: another time zone, a
    non-ISO DateStyle, escaped bytea, fewer float digits (reset afterwards)."""
    odd = {
        "timezone": "'Asia/Kolkata'",
        "datestyle": "'SQL, DMY'",
        "bytea_output": "'escape'",
        "extra_float_digits": "0",
        "intervalstyle": "'sql_standard'",
    }
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for name, value in odd.items():
            conn.execute(f"ALTER SYSTEM SET {name} = {value}")
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for name in odd:
                conn.execute(f"ALTER SYSTEM RESET {name}")
            conn.execute("SELECT pg_reload_conf()")


@pytest.mark.usefixtures("odd_server_settings")
async def test_streamed_values_do_not_depend_on_the_servers_settings(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """pgoutput formats values in the walsender, with the stream session's settings: whatever
    the server's defaults (time zone, DateStyle, bytea_output), a streamed row is written
    exactly as the snapshot writes the same values, in the same day's folder."""
    sales(pg_dsn, 1)
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute(
            "INSERT INTO ecommerce_sales (invoice_no, stock_code, description, quantity,"
            " invoice_date, unit_price, customer_id, country) SELECT invoice_no, stock_code,"
            " description, quantity, invoice_date, unit_price, customer_id, country"
            " FROM ecommerce_sales WHERE id = 1"
        )
    assert await export_until_idle(settings) == 0
    bodies = object_bodies(s3_client, bucket)
    rows: dict[str, tuple[str, dict[str, str]]] = {}
    for key, body in bodies.items():
        for row in csv.DictReader(io.StringIO(body.decode())):
            rows[row["id"]] = (key.split("/")[1], row)
    (day_1, first), (day_2, second) = rows["1"], rows["2"]
    assert day_1 == day_2
    for column in ("invoice_date", "unit_price", "quantity", "description", "country"):
        assert first[column] == second[column], column


async def test_a_stream_started_past_the_ledger_reports_only_the_ledgers_position(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """A stream opened at a position past the ledger's (a stretch where nothing of the table
    commits, not yet confirmed) reports the ledger's position as flushed, not its own start:
    the slot never passes what the ledger holds."""
    sales(pg_dsn, 5)
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    ledger = slot_confirmed(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("CREATE TABLE other (payload text)")
        conn.execute("INSERT INTO other SELECT repeat('x', 100) FROM generate_series(1, 500)")
    source = LogicalSource(settings)
    source.connect()

    new_spool = spools_in(tmp_path)

    try:
        idle = source.read(ledger, new_spool, wait_s=0.5)
        assert idle.rows == 0
        assert idle.hi is not None
        assert idle.hi > ledger
        source.close_stream()
        again = source.read(idle.hi, new_spool, wait_s=0.5, confirmed=ledger)
        assert again.rows == 0
    finally:
        source.close()
    assert slot_confirmed(pg_dsn) == ledger


async def test_a_retried_batch_with_an_added_column_is_redone_without_a_false_drop(
    pg_dsn: str,
    s3_server: LocalS3,
    s3_proxy: Any,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    """A batch holding changes before and after ADD COLUMN fails its upload (S3 answers 503
    past botocore's own retries, after the intent record): the retry redoes it, comparing its
    first column list with the one the ledger exported last, not with what the failed attempt
    read, so no column is taken for dropped; every change arrives, the later ones with the new
    column."""
    sales(pg_dsn, 5)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        capture={"mode": "logical", "heartbeat_s": 0.2},
        batch={"max_rows": 500, "max_age_s": 2},
        s3={"endpoint_url": s3_proxy.endpoint_url},
        daemon={"retry_max_wait_s": 0.2},
    )
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    insert = (
        "INSERT INTO ecommerce_sales (invoice_no, stock_code, description, quantity,"
        " invoice_date, unit_price, customer_id, country{}) VALUES ('1', 'S', 'd', 1, now(),"
        " 1.25, NULL, 'UK'{})"
    )
    with capture_logs() as logs:
        async with running_daemon(settings):
            await wait_until(lambda: stream_pid(pg_dsn) is not None)
            s3_proxy.fail_next(8, 503, "SlowDown")
            with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
                conn.execute(insert.format("", ""))
                conn.execute("ALTER TABLE ecommerce_sales ADD COLUMN extra int")
                conn.execute(insert.format(", extra", ", 7"))
            end = flush_lsn(pg_dsn)
            await wait_until(lambda: ledger_at_least(pg_dsn, end))
    assert s3_proxy.injected == 8
    assert any(e["event"] == "batch_redone" for e in logs)
    assert not [e for e in logs if e["event"] == "step_failed" and "dropped" in e["error"]]
    rows = {}
    for body in object_bodies(s3_client, bucket).values():
        for row in csv.DictReader(io.StringIO(body.decode())):
            rows[row["id"]] = row
    with psycopg.connect(pg_dsn) as conn:
        ids = {str(r[0]) for r in conn.execute("SELECT id FROM ecommerce_sales").fetchall()}
    assert set(rows) == ids
    assert rows[max(ids, key=int)]["extra"] == "7"


async def test_a_partitioned_table_is_captured_through_its_root(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A partitioned table named by ``postgres.table`` (a group of one), one of its partitions
    itself partitioned: init publishes through the root, and the snapshot and the changes of
    every leaf, two levels down included, go to the root's one folder and rebuild it."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE ev (id bigint, at timestamptz NOT NULL, v text, PRIMARY KEY (id, at))"
            " PARTITION BY RANGE (at)"
        )
        conn.execute(
            "CREATE TABLE ev_2011 PARTITION OF ev FOR VALUES FROM ('2011-01-01') TO ('2012-01-01')"
            " PARTITION BY HASH (id)"
        )
        for r in range(2):
            conn.execute(
                f"CREATE TABLE ev_2011_{r} PARTITION OF ev_2011"
                f" FOR VALUES WITH (MODULUS 2, REMAINDER {r})"
            )
        conn.execute(
            "CREATE TABLE ev_2012 PARTITION OF ev FOR VALUES FROM ('2012-01-01') TO ('2013-01-01')"
        )
        conn.execute(
            "INSERT INTO ev SELECT g, timestamptz '2011-06-01 00:00+00' + g * interval '1 day',"
            " 'v' FROM generate_series(1, 400) g"
        )
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        postgres={"table": "public.ev"},
        capture={"mode": "logical", "partition_column": "at"},
    )
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("UPDATE ev SET v = 'u' WHERE id % 3 = 0")
        conn.execute("DELETE FROM ev WHERE id % 7 = 0")
        conn.execute("UPDATE ev SET at = at - interval '200 days' WHERE id IN (300, 301)")
    assert await export_until_idle(settings) == 0
    bodies = object_bodies(s3_client, bucket)
    assert {k.split("/")[0] for k in bodies} == {"public.ev"}
    rebuild(pg_dsn, bodies, "ev", ("id", "at"))
    source, rebuilt, missing, extra = differences(pg_dsn, "ev")
    assert (source, missing, extra) == (rebuilt, 0, 0)


async def test_changes_of_other_tables_in_the_publication_are_left_out(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A publication made by hand may hold more tables than the captured one: their changes
    are left out (not an error), and the captured table's arrive exactly."""
    sales(pg_dsn, 5)
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("CREATE TABLE other (id serial PRIMARY KEY, payload text)")
        conn.execute(
            "CREATE PUBLICATION cdc_public_ecommerce_sales FOR TABLE ecommerce_sales, other"
        )
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("INSERT INTO other (payload) VALUES ('a'), ('b')")
        random_changes(pg_dsn, random.Random(5), 3)
        conn.execute("INSERT INTO other (payload) VALUES ('c')")
    assert await export_until_idle(settings) == 0
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


def test_a_keepalive_outside_a_transaction_comes_after_every_commit_before_its_wal_end(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """What the reader relies on and PostgreSQL's protocol page does not promise: a keepalive
    received with no transaction open comes after every transaction of the publication whose
    commit starts before its walEnd, and one inside a transaction never passes that
    transaction's commit, also while a large transaction (spilled to disk) of another table or
    of this one is decoded."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("CREATE TABLE o (id int PRIMARY KEY, v text)")
        conn.execute("CREATE PUBLICATION p FOR TABLE t")
    with psycopg.connect(pg_dsn, autocommit=True, replication="database") as repl:
        created = fetch_one(repl.execute("CREATE_REPLICATION_SLOT s LOGICAL pgoutput"))
    start = parse_lsn(str(created[1]))
    with psycopg.connect(pg_dsn, options=SYNC + " -c logical_decoding_work_mem=64kB") as conn:
        conn.execute("INSERT INTO o SELECT g, repeat('x', 200) FROM generate_series(1, 40000) g")
        conn.execute("INSERT INTO t VALUES (0, 'late')")
        conn.commit()
        conn.execute("INSERT INTO t SELECT g, repeat('y', 200) FROM generate_series(1, 30000) g")
        conn.commit()
        for i in range(5):
            conn.execute("INSERT INTO t VALUES (%s, 'z')", (1_000_000 + i,))
            conn.commit()
    end = flush_lsn(pg_dsn)
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path, postgres={"table": "t"})
    stream = ReplicationStream(settings, "s", "p")
    stream.open(start, start)
    begin: int | None = None
    commits: list[int] = []
    keepalives: list[tuple[int, int | None, int]] = []  # walEnd, open txn's commit, commits so far
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            stream.confirm(start, reply=True)
            message = stream.receive(0.05)
            if isinstance(message, bytes):
                decoded = decode(message[XLOG_HEADER:])
                if isinstance(decoded, Begin):
                    begin = decoded.final_lsn
                elif isinstance(decoded, Commit):
                    begin = None
                    commits.append(decoded.commit_lsn)
            elif isinstance(message, Keepalive):
                keepalives.append((message.wal_end, begin, len(commits)))
                if begin is None and message.wal_end >= end and len(commits) >= 7:
                    break
    finally:
        stream.close()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            # Its walsender may not have ended yet: the slot is busy until it has.
            deadline = time.monotonic() + 30
            while (
                conn.execute(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = 's'"
                ).fetchone()
                == (True,)
                and time.monotonic() < deadline
            ):
                time.sleep(0.05)
            conn.execute("SELECT pg_drop_replication_slot('s')")
    assert len(commits) == 7
    assert keepalives
    for wal_end, open_commit, seen in keepalives:
        if open_commit is not None:
            assert wal_end <= open_commit
        else:
            assert not [c for c in commits[seen:] if c < wal_end]


async def test_a_long_read_reports_progress_while_it_lasts(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """A read that goes on (here an idle one of 2.5 s) calls ``on_progress`` about every
    second from its thread, which the worker turns into the capture loop's heartbeat: a large
    transaction read whole does not look like a stalled daemon."""
    sales(pg_dsn, 3)
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    source = LogicalSource(settings)
    source.connect()
    beats: list[float] = []
    source.on_progress = lambda: beats.append(time.monotonic())

    new_spool = spools_in(tmp_path)

    try:
        source.read(slot_confirmed(pg_dsn), new_spool, wait_s=2.5)
    finally:
        source.close()
    assert len(beats) >= 2


async def test_a_cancellation_before_a_read_begins_is_not_lost(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """A cancellation (a shutdown past its grace) that arrives before the read's thread takes
    its first step stops that read at once; the flag is cleared only when the next read is
    started through ``run``, which then reads normally."""
    sales(pg_dsn, 2)
    settings = logical_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    source = LogicalSource(settings)
    source.connect()

    new_spool = spools_in(tmp_path)

    lsn = slot_confirmed(pg_dsn)
    try:
        source.cancel()
        started = time.monotonic()
        with pytest.raises(TransientError, match="cancelled"):
            source.read(lsn, new_spool, wait_s=30)
        assert time.monotonic() - started < 5
        result = await source.run(lambda: source.read(lsn, new_spool, wait_s=0.3))
        assert result.rows == 0
    finally:
        source.close()


@pytest.mark.usefixtures("odd_server_settings")
async def test_a_table_of_many_types_streams_as_its_snapshot_reads(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A table not written for this project (uuid key, numeric, float, arrays, jsonb, bytea,
    interval, inet, time, boolean, an enum), on a server with other defaults: a row streamed
    after the snapshot is written value for value as the snapshot wrote the same values, in
    the same day's folder, with its own key."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TYPE mood AS ENUM ('ok', 'sad')")
        conn.execute(
            "CREATE TABLE orders (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
            " placed timestamptz NOT NULL, day date, amount numeric(12,3), ratio float8,"
            " tags text[], doc jsonb, raw bytea, wait interval, addr inet, at time,"
            " paid boolean, m mood, note text)"
        )
        conn.execute("ALTER TABLE orders REPLICA IDENTITY FULL")
        conn.execute(
            "INSERT INTO orders (placed, day, amount, ratio, tags, doc, raw, wait, addr, at,"
            " paid, m, note) VALUES ('2011-03-27 00:30:00.25+00', '2011-03-27', 1234.5,"
            " 0.1, ARRAY['a,b', 'c\"d'], '{\"k\": [1, 2.5, null]}', '\\x00ff10', '1 day 02:03:04',"
            " '10.0.0.1/8', '23:59:59.5', true, 'sad', E'line\\nbreak, \"quoted\"')"
        )
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        postgres={"table": "public.orders"},
        capture={"mode": "logical", "partition_column": "placed"},
    )
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute(
            "INSERT INTO orders (placed, day, amount, ratio, tags, doc, raw, wait, addr, at,"
            " paid, m, note) SELECT placed, day, amount, ratio, tags, doc, raw, wait, addr, at,"
            " paid, m, note FROM orders"
        )
    assert await export_until_idle(settings) == 0
    rows: list[tuple[str, dict[str, str]]] = []
    for key, body in object_bodies(s3_client, bucket).items():
        rows += [(key.split("/")[1], r) for r in csv.DictReader(io.StringIO(body.decode()))]
    assert len(rows) == 2
    (day_1, first), (day_2, second) = sorted(rows, key=lambda r: r[1]["_cdc_seq"])
    assert day_1 == day_2 == "dt=2011-03-27"
    assert first["id"] != second["id"]
    for column in first.keys() - {"id", "_cdc_seq", "_cdc_ts"}:
        assert first[column] == second[column], column
