"""Partitioned tables in logical mode, against a real PostgreSQL 15 and a real S3 server: the
publication publishes through the root, every partition's changes arrive as the root's, the
snapshot reads the root by key, and partitions created, attached with rows and detached with
rows while the daemon runs are followed; the warehouse has one table, and the objects rebuild
the root after each step."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc_daemon.cli import init
from cdc_daemon.config import Settings
from cdc_daemon.errors import SourceError
from cdc_daemon.local.services import LocalS3
from tests.helpers import (
    differences,
    export_until_idle,
    make_settings,
    object_bodies,
    rebuild,
    running_daemon,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("drop_slots")

ROOT = "sales.events"
KEY = ("id", "ts")


def create_events(pg_dsn: str) -> None:
    """``sales.events``, range-partitioned by a timestamptz, primary key (id, ts), with a
    January and a February partition of 150 rows each."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA sales")
        conn.execute(
            "CREATE TABLE sales.events (id bigint NOT NULL, ts timestamptz NOT NULL,"
            " amount numeric(12, 2), note text, PRIMARY KEY (id, ts)) PARTITION BY RANGE (ts)"
        )
        for name, lo, hi in (
            ("events_2026_01", "2026-01-01", "2026-02-01"),
            ("events_2026_02", "2026-02-01", "2026-03-01"),
        ):
            conn.execute(
                f"CREATE TABLE sales.{name} PARTITION OF sales.events"
                f" FOR VALUES FROM ('{lo}') TO ('{hi}')"
            )
        conn.execute(
            "INSERT INTO sales.events SELECT g, timestamptz '2026-01-01 00:00+00'"
            " + (g * interval '4 hours'), g * 1.5, 'row ' || g FROM generate_series(1, 300) g"
        )


def settings_for(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, **capture: Any
) -> Settings:
    return make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": ROOT, "partition_column": "ts"}],
        capture={"mode": "logical", "group": "parts", "snapshot_chunk_rows": 70, **capture},
        batch={"max_rows": 100},
    )


def execute(pg_dsn: str, *statements: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True, options="-c synchronous_commit=on") as conn:
        for statement in statements:
            conn.execute(statement)


def assert_root_rebuilt(pg_dsn: str, s3_client: Any, bucket: str) -> dict[str, bytes]:
    """The root rebuilt from every object ("highest _cdc_seq per key wins, then drop D")
    equals the source root, column by column; every object is under the root's one folder."""
    bodies = object_bodies(s3_client, bucket)
    assert {k.split("/")[0] for k in bodies} == {ROOT}
    rebuild(pg_dsn, bodies, ROOT, KEY)
    source, rebuilt, missing, extra = differences(pg_dsn, ROOT)
    assert (missing, extra) == (0, 0), f"{missing} rows missing, {extra} rows different/extra"
    assert source == rebuilt
    return bodies


def status(pg_dsn: str) -> str:
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            "SELECT status FROM cdc.group_tables WHERE group_name = 'parts' AND table_name = %s",
            (ROOT,),
        ).fetchone()
        assert row is not None
        return str(row[0])


async def export_until_streaming(settings: Settings, pg_dsn: str) -> None:
    """Export until the root's partition ranges are read: their seq waits for the slot's
    restart_lsn to pass the attach or detach, which a CHECKPOINT (its running-transactions
    record, read and confirmed by the next pass) brings about on an idle server."""
    for _ in range(30):
        assert await export_until_idle(settings) == 0
        if status(pg_dsn) == "streaming":
            assert await export_until_idle(settings) == 0
            return
        execute(pg_dsn, "CHECKPOINT")
    raise AssertionError(f"{ROOT} is still {status(pg_dsn)}")


async def test_partitioned_table_snapshot_stream_and_new_partition(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A range-partitioned table in a non-public schema is captured through its root: init
    creates the publication with publish_via_partition_root; the snapshot (chunks by key over
    the root) and then inserts, updates and deletes in both partitions, including an update
    that moves a row to the other partition (sent as a delete and an insert of the root), and
    rows of a partition created while the daemon runs, all land in the root's one folder and
    rebuild the root."""
    create_events(pg_dsn)
    settings = settings_for(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    with psycopg.connect(pg_dsn) as conn:
        via_root = conn.execute(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = 'cdc_parts'"
        ).fetchone()
        assert via_root == (True,)
    assert await export_until_idle(settings) == 0
    assert_root_rebuilt(pg_dsn, s3_client, bucket)
    execute(
        pg_dsn,
        "INSERT INTO sales.events VALUES (1001, '2026-01-20 10:00+00', 3, 'jan'),"
        " (1002, '2026-02-20 10:00+00', 4, 'feb')",
        "UPDATE sales.events SET amount = amount + 1, note = 'updated' WHERE id % 10 = 3",
        "DELETE FROM sales.events WHERE id % 17 = 0",
        # Cross-partition: January to February.
        "UPDATE sales.events SET ts = ts + interval '31 days', note = 'moved'"
        " WHERE id IN (5, 6, 1001)",
    )
    async with running_daemon(settings):
        execute(
            pg_dsn,
            "CREATE TABLE sales.events_2026_03 PARTITION OF sales.events"
            " FOR VALUES FROM ('2026-03-01') TO ('2026-04-01')",
            "INSERT INTO sales.events VALUES (2001, '2026-03-02 00:00+00', 9, 'march')",
            "UPDATE sales.events SET ts = '2026-03-15 00:00+00', note = 'to march' WHERE id = 7",
        )

        def march_exported() -> bool:
            rows = b"".join(object_bodies(s3_client, bucket).values())
            return b"to march" in rows and b"2001" in rows

        await wait_until(march_exported)
    assert await export_until_idle(settings) == 0
    bodies = assert_root_rebuilt(pg_dsn, s3_client, bucket)
    rows = b"".join(bodies.values())
    assert b",moved," in rows
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM sales.events_2026_03").fetchone() == (2,)


async def test_partitions_attached_and_detached_while_running(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A table holding rows attached as a partition (its columns in another order) brings no
    insert into the WAL: the daemon notices the new leaf, reads its rows into the root's
    objects, and the root rebuilds with them; a later update of one of them wins over that
    snapshot. A partition detached with its rows brings no delete: the daemon writes a D row
    for each of its keys, so the warehouse loses them (the detached table keeps them), and the
    root rebuilds without them."""
    create_events(pg_dsn)
    settings = settings_for(pg_dsn, s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    assert_root_rebuilt(pg_dsn, s3_client, bucket)
    execute(
        pg_dsn,
        "CREATE TABLE sales.events_2026_04 (note text, ts timestamptz NOT NULL,"
        " id bigint NOT NULL, amount numeric(12, 2))",
        "INSERT INTO sales.events_2026_04 SELECT 'april ' || g,"
        " timestamptz '2026-04-01 00:00+00' + g * interval '1 hour', 5000 + g, g"
        " FROM generate_series(1, 120) g",
        "ALTER TABLE sales.events ATTACH PARTITION sales.events_2026_04"
        " FOR VALUES FROM ('2026-04-01') TO ('2026-05-01')",
        "UPDATE sales.events SET note = 'after attach' WHERE id = 5003",
    )
    await export_until_streaming(settings, pg_dsn)
    bodies = assert_root_rebuilt(pg_dsn, s3_client, bucket)
    # Its rows come from a snapshot chunk of the partition, never from the stream.
    assert any(k.split("/")[-1].startswith("join-") and b"april 7," in v for k, v in bodies.items())
    execute(pg_dsn, "UPDATE sales.events SET amount = 0 WHERE id BETWEEN 5010 AND 5020")
    assert await export_until_idle(settings) == 0
    assert_root_rebuilt(pg_dsn, s3_client, bucket)

    execute(
        pg_dsn,
        "ALTER TABLE sales.events DETACH PARTITION sales.events_2026_02",
        # Changes of the detached table are not the root's any more.
        "UPDATE sales.events_2026_02 SET note = 'detached'",
    )
    await export_until_streaming(settings, pg_dsn)
    bodies = assert_root_rebuilt(pg_dsn, s3_client, bucket)
    with psycopg.connect(pg_dsn) as conn:
        kept = conn.execute("SELECT count(*) FROM sales.events_2026_02").fetchone()
        assert kept is not None
        assert kept[0] > 0
        deletes = sum(
            1
            for body in bodies.values()
            for line in body.decode().splitlines()
            if ",D," in line and "detached" in line
        )
        assert deletes == kept[0]
    # Attached again: its rows come back.
    execute(
        pg_dsn,
        "ALTER TABLE sales.events ATTACH PARTITION sales.events_2026_02"
        " FOR VALUES FROM ('2026-02-01') TO ('2026-03-01')",
    )
    await export_until_streaming(settings, pg_dsn)
    assert_root_rebuilt(pg_dsn, s3_client, bucket)


async def test_init_checks_every_partition_and_publishes_through_the_root(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """PostgreSQL checks a partition's own replica identity when the application updates or
    deletes through the root: a partition with REPLICA IDENTITY NOTHING is named by init, which
    then creates no publication, and the application's DELETE on the root still works. Fixed,
    and a publication made by hand without publish_via_partition_root (it would send each
    partition's changes under the partition's name): run refuses to start, init switches it
    to publish through the root and the run captures the rows."""
    create_events(pg_dsn)
    execute(pg_dsn, "ALTER TABLE sales.events_2026_02 REPLICA IDENTITY NOTHING")
    settings = settings_for(pg_dsn, s3_server, bucket, tmp_path)
    with pytest.raises(SourceError) as caught:
        await init(settings)
    assert "sales.events_2026_02 has REPLICA IDENTITY NOTHING" in str(caught.value)
    assert "ALTER TABLE sales.events_2026_02 REPLICA IDENTITY DEFAULT" in str(caught.value)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
    execute(pg_dsn, "DELETE FROM sales.events WHERE id = 1")

    execute(
        pg_dsn,
        "ALTER TABLE sales.events_2026_02 REPLICA IDENTITY DEFAULT",
        "CREATE PUBLICATION cdc_parts FOR TABLE sales.events",
    )
    with pytest.raises(SourceError, match="publish_via_partition_root"):
        await export_until_idle(settings)
    assert await init(settings) == 0
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = 'cdc_parts'"
        ).fetchone() == (True,)
        assert conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables"
        ).fetchall() == [(ROOT,)]
    assert await export_until_idle(settings) == 0
    execute(pg_dsn, "DELETE FROM sales.events WHERE id = 40")
    assert await export_until_idle(settings) == 0
    assert_root_rebuilt(pg_dsn, s3_client, bucket)


async def test_a_role_granted_the_root_only_reads_an_attached_partition_through_it(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The least-privilege role (SELECT on the root, as deploy/postgres/cdc_role.sql grants)
    may not read a partition attached later by its own name: the daemon reads that
    partition's rows through the root (restricted to the partition), and the root rebuilds
    with them."""
    create_events(pg_dsn)
    role = f"cdc_{uuid.uuid4().hex[:8]}"
    execute(
        pg_dsn,
        f"CREATE ROLE {role} LOGIN REPLICATION",
        f"GRANT CREATE ON DATABASE {conninfo_to_dict(pg_dsn)['dbname']} TO {role}",
        f"GRANT USAGE ON SCHEMA sales TO {role}",
        f"GRANT SELECT ON sales.events TO {role}",
        "CREATE PUBLICATION cdc_parts FOR TABLE sales.events"
        " WITH (publish_via_partition_root = true)",
    )
    params = conninfo_to_dict(pg_dsn)
    params["user"] = role
    settings = settings_for(make_conninfo("", **params), s3_server, bucket, tmp_path)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    execute(
        pg_dsn,
        "CREATE TABLE sales.events_2026_04 (LIKE sales.events)",
        "INSERT INTO sales.events_2026_04 SELECT 7000 + g, timestamptz '2026-04-02 00:00+00'"
        " + g * interval '1 hour', g, 'april' FROM generate_series(1, 90) g",
        "ALTER TABLE sales.events ATTACH PARTITION sales.events_2026_04"
        " FOR VALUES FROM ('2026-04-01') TO ('2026-05-01')",
    )
    await export_until_streaming(settings, pg_dsn)
    assert_root_rebuilt(pg_dsn, s3_client, bucket)


async def test_writers_during_an_attached_partitions_snapshot(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """While the daemon reads an attached partition's 400 rows in chunks of 20, a writer
    updates, deletes and inserts rows of it and moves rows between it and another partition:
    the snapshot rows (one seq) lose to every change streamed after they were read, and the
    root rebuilt from the objects equals the source."""
    create_events(pg_dsn)
    settings = settings_for(pg_dsn, s3_server, bucket, tmp_path, snapshot_chunk_rows=20)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    stop = threading.Event()

    def writer() -> None:
        rng = random.Random(3)
        with psycopg.connect(pg_dsn, autocommit=True, options="-c synchronous_commit=on") as c:
            n = 0
            while not stop.is_set():
                n += 1
                pick = rng.random()
                key = 6000 + rng.randint(1, 400)
                if pick < 0.4:
                    c.execute("UPDATE sales.events SET amount = %s WHERE id = %s", (n, key))
                elif pick < 0.55:
                    c.execute("DELETE FROM sales.events WHERE id = %s", (key,))
                elif pick < 0.7:
                    c.execute(
                        "INSERT INTO sales.events VALUES (%s, '2026-04-20 00:00+00', 1, 'new')",
                        (100000 + n,),
                    )
                elif pick < 0.85:
                    # Between the attached partition and January, both ways.
                    c.execute(
                        "UPDATE sales.events SET ts = CASE WHEN ts >= '2026-04-01'"
                        " THEN ts - interval '80 days' ELSE ts + interval '80 days' END"
                        " WHERE id = %s",
                        (key,),
                    )
                else:
                    c.execute("CHECKPOINT")
                time.sleep(0.005)

    execute(
        pg_dsn,
        "CREATE TABLE sales.events_2026_04 (LIKE sales.events)",
        "INSERT INTO sales.events_2026_04 SELECT 6000 + g, timestamptz '2026-04-01 00:00+00'"
        " + g * interval '1 hour', g, 'april' FROM generate_series(1, 400) g",
    )
    thread = threading.Thread(target=writer)
    async with running_daemon(settings):
        thread.start()
        try:
            execute(
                pg_dsn,
                "ALTER TABLE sales.events ATTACH PARTITION sales.events_2026_04"
                " FOR VALUES FROM ('2026-04-01') TO ('2026-05-01')",
            )
            await wait_until(lambda: status(pg_dsn) == "joining", 30)
            await wait_until(lambda: status(pg_dsn) == "streaming", 120)
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)
    assert await export_until_idle(settings) == 0
    bodies = assert_root_rebuilt(pg_dsn, s3_client, bucket)
    # The attached rows the writer never touched come from the partition's chunks only.
    assert any(k.split("/")[-1].startswith("join-") and b",april," in v for k, v in bodies.items())
