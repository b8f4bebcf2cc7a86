"""Groups of tables: one daemon, one lock, in logical mode one slot and one publication, on
schemas nobody wrote for this project (pgbench's tables, a table of many types, default
replica identity); a table that joins a running group; watermark groups served fairly."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.capture.logical.setup import resync
from cdc_daemon.cli import init
from cdc_daemon.config import Settings
from cdc_daemon.errors import AlreadyRunningError, SourceError, StateError, TableFailedError
from cdc_daemon.local.services import LocalS3
from cdc_daemon.ops.status import collect, render
from cdc_daemon.worker import Worker
from tests.helpers import (
    differences,
    export_until_idle,
    main_in_thread,
    make_settings,
    object_bodies,
    rebuild,
    running_daemon,
    wait_until,
)
from tests.schemas import (
    MANY_TYPES,
    PGBENCH_KEYS,
    create_many_types,
    pgbench_init,
    random_group_changes,
)

pytestmark = pytest.mark.usefixtures("drop_slots")

SYNC = "-c synchronous_commit=on"
GROUP_TABLES = {**PGBENCH_KEYS, MANY_TYPES: "id"}


def group_settings(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    tmp_path: Path,
    tables: list[str],
    **capture: Any,
) -> Settings:
    return make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": t} for t in tables],
        capture={"mode": "logical", "group": "shop", **capture},
        batch={"max_rows": 2000},
    )


def assert_tables_rebuilt(pg_dsn: str, s3_client: Any, bucket: str, tables: dict[str, str]) -> None:
    """Every table rebuilt from its own objects equals its source, column by column."""
    bodies = object_bodies(s3_client, bucket)
    for table, key in tables.items():
        mine = {k: v for k, v in bodies.items() if k.startswith(f"public.{table}/")}
        rebuild(pg_dsn, mine, table, (key,))
        source, rebuilt, missing, extra = differences(pg_dsn, table)
        assert (missing, extra) == (0, 0), f"{table}: {missing} missing, {extra} extra"
        assert source == rebuilt, table


def slots(pg_dsn: str) -> list[str]:
    with psycopg.connect(pg_dsn) as conn:
        return [
            str(r[0])
            for r in conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
            )
        ]


async def test_a_group_streams_through_one_slot(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """pgbench's three keyed tables and the many-types table, default replica identity, in one
    group: init creates one publication for the four (and explains TOAST under the default
    identity), the run takes one snapshot and one slot; random inserts, updates (some leaving
    a TOASTed value unchanged) and deletes on all of them; every table rebuilt from its own
    folder equals its source, and a table without a partition column has its snapshot under
    the read's day."""
    pgbench_init(pg_dsn)
    create_many_types(pg_dsn, 300)
    settings = group_settings(pg_dsn, s3_server, bucket, tmp_path, list(GROUP_TABLES))
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    assert slots(pg_dsn) == ["cdc_shop"]
    random_group_changes(pg_dsn, random.Random(7), 120)
    assert await export_until_idle(settings) == 0
    assert_tables_rebuilt(pg_dsn, s3_client, bucket, GROUP_TABLES)
    keys = list(object_bodies(s3_client, bucket))
    folders = {k.split("/")[0] for k in keys}
    assert folders == {f"public.{t}" for t in GROUP_TABLES}
    unchanged = [k for k, body in object_bodies(s3_client, bucket).items() if b",body\n" in body]
    assert unchanged, "no change named an unchanged TOASTed value"


async def test_init_brings_the_publication_in_line(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """init creates the group's publication, then adds a table added to the configuration and
    drops one removed from it, printing each change; a second init changes nothing."""
    pgbench_init(pg_dsn)
    two = group_settings(
        pg_dsn, s3_server, bucket, tmp_path, ["pgbench_accounts", "pgbench_tellers"]
    )
    assert await init(two) == 0
    assert "created publication cdc_shop for public.pgbench_accounts, public.pgbench_tellers" in (
        capsys.readouterr().out
    )
    other = group_settings(
        pg_dsn, s3_server, bucket, tmp_path, ["pgbench_accounts", "pgbench_branches"]
    )
    assert await init(other) == 0
    out = capsys.readouterr().out
    assert "added public.pgbench_branches to publication cdc_shop" in out
    assert "dropped public.pgbench_tellers from publication cdc_shop" in out
    assert await init(other) == 0
    again = capsys.readouterr().out
    assert "to publication" not in again
    assert "from publication" not in again
    with psycopg.connect(pg_dsn) as conn:
        published = {
            str(r[0])
            for r in conn.execute(
                "SELECT tablename FROM pg_publication_tables WHERE pubname = 'cdc_shop'"
            )
        }
    assert published == {"pgbench_accounts", "pgbench_branches"}


async def test_a_table_joins_a_running_group(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A table joins a group that already streams (a configuration change, init, a restart):
    its rows are exported in chunks by key while a writer keeps changing the other tables, and
    a transaction on the joining table that began before the join commits after its first
    chunk was exported (updates, inserts and deletes over the whole key range). Both tables
    rebuilt from their objects equal their sources; the ledger records the table streaming."""
    pgbench_init(pg_dsn)
    first = group_settings(pg_dsn, s3_server, bucket, tmp_path, ["pgbench_accounts"])
    assert await init(first) == 0
    assert await export_until_idle(first) == 0
    create_many_types(pg_dsn, 400)
    both = group_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        ["pgbench_accounts", MANY_TYPES],
        snapshot_chunk_rows=50,
    )
    assert await init(both) == 0
    spanning = psycopg.connect(pg_dsn, options=SYNC)
    spanning.execute(f"UPDATE {MANY_TYPES} SET amount = -1, flag = NULL")  # every key
    spanning.execute(f"DELETE FROM {MANY_TYPES} WHERE day < '2011-01-20'")
    spanning.execute(
        f"INSERT INTO {MANY_TYPES} (id, body) VALUES ('ffffffff-ffff-ffff-ffff-ffffffffffff', 'z')"
    )
    stop = threading.Event()

    def writer() -> None:
        rng = random.Random(3)
        while not stop.is_set():
            with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
                conn.execute(
                    "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = %s",
                    (rng.randint(1, 100_000),),
                )

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        async with running_daemon(both):

            def chunks() -> int:
                with psycopg.connect(pg_dsn) as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM cdc.deliveries"
                        " WHERE producer = 'join' AND uploaded_at IS NOT NULL"
                    ).fetchone()
                return int(row[0]) if row else 0

            await wait_until(lambda: chunks() >= 2)
            spanning.commit()
            spanning.close()
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        thread.join()
    assert await export_until_idle(both) == 0
    with psycopg.connect(pg_dsn) as conn:
        state = conn.execute(
            "SELECT status, chunks, rows FROM cdc.group_tables WHERE table_name = %s",
            (f"public.{MANY_TYPES}",),
        ).fetchone()
    assert state is not None
    assert state[0] == "streaming"
    assert state[1] >= 8, state
    report = await collect(both, slot=both.slot_name)
    assert list(report) == ["shop"]
    members = {m["table"]: m for m in report["shop"]["tables"]}
    assert members["public.pgbench_accounts"]["status"] == "streaming"
    assert members[f"public.{MANY_TYPES}"]["rows"] == state[2]
    assert f"table public.{MANY_TYPES}" in render(report)
    assert_tables_rebuilt(pg_dsn, s3_client, bucket, {"pgbench_accounts": "aid", MANY_TYPES: "id"})


async def test_a_table_that_leaves_keeps_its_objects(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A table removed from the configuration leaves the group: the ledger marks it left,
    its later changes are not exported, its objects stay. Configured again, it joins anew:
    its snapshot waits until the slot's restart_lsn is past the position where it left, so
    that its new rows beat every object of its earlier membership, and the table is complete
    again (rows updated while it was out included)."""
    pgbench_init(pg_dsn)
    both = group_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        ["pgbench_accounts", "pgbench_tellers"],
        heartbeat_s=0.2,
    )
    assert await init(both) == 0
    assert await export_until_idle(both) == 0
    one = group_settings(pg_dsn, s3_server, bucket, tmp_path, ["pgbench_accounts"])
    assert await init(one) == 0
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("UPDATE pgbench_tellers SET tbalance = 42")
        conn.execute("UPDATE pgbench_accounts SET abalance = 7 WHERE aid < 10")
    before = set(object_bodies(s3_client, bucket, "public.pgbench_tellers/"))
    assert await export_until_idle(one) == 0
    assert set(object_bodies(s3_client, bucket, "public.pgbench_tellers/")) == before
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            "SELECT status FROM cdc.group_tables WHERE table_name = 'public.pgbench_tellers'"
        ).fetchone()
    assert row == ("left",)
    assert await init(both) == 0
    await until_streaming(pg_dsn, both, "public.pgbench_tellers")
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            "SELECT status, seq > floor FROM cdc.group_tables"
            " WHERE table_name = 'public.pgbench_tellers'"
        ).fetchone()
    assert row == ("streaming", True)
    assert_tables_rebuilt(
        pg_dsn, s3_client, bucket, {"pgbench_accounts": "aid", "pgbench_tellers": "tid"}
    )


async def test_watermark_group_serves_every_table(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """Watermark mode, two tables, one position each: a table with a large backlog does not
    starve a small one (the small one's rows are in S3 after the big one's first batch, long
    before its backlog is done); a table without a date column goes to the read's day."""
    pgbench_init(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE small (id bigserial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO small (note) SELECT 'n' || g FROM generate_series(1, 10) g")
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{"name": "pgbench_accounts", "max_rows": 5000}, {"name": "small"}],
        capture={"group": "wm"},
    )
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with psycopg.connect(pg_dsn) as conn:
        order = [
            str(r[0])
            for r in conn.execute("SELECT table_name FROM cdc.batches ORDER BY created_at")
        ]
        positions: dict[Any, Any] = dict(
            conn.execute("SELECT table_name, high FROM cdc.positions").fetchall()
        )
    assert order.index("public.small") <= 1, order
    assert order.count("public.pgbench_accounts") >= 20
    assert positions == {"public.pgbench_accounts": 100_000, "public.small": 10}
    keys = list(object_bodies(s3_client, bucket, "public.small/"))
    assert len(keys) == 1
    assert "/dt=20" in keys[0]
    assert_tables_rebuilt(pg_dsn, s3_client, bucket, {"pgbench_accounts": "aid", "small": "id"})


async def test_a_ledger_from_before_groups_asks_for_init_then_upgrades(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A logical ledger made before groups existed (no group_tables): the daemon stops with a
    sentence saying to run init; after init the table that was exported before is taken as
    part of the group (no second snapshot) and the rebuilt table is exact."""
    pgbench_init(pg_dsn)
    one = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        postgres={"table": "pgbench_tellers"},
        capture={"mode": "logical"},
    )
    assert await init(one) == 0
    assert await export_until_idle(one) == 0
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("DROP TABLE cdc.group_tables, cdc.join_chunks")
        conn.execute("UPDATE pgbench_tellers SET tbalance = 5")
    # (export_until_idle runs init first: the daemon itself is started here.)
    never = asyncio.Event()
    with pytest.raises(StateError, match="predates table groups: run `cdc-daemon init`"):
        await Worker(one, exit_when_idle=True).serve(shutdown_trigger=never.wait)
    assert await init(one) == 0
    assert await export_until_idle(one) == 0
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT table_name, status, chunks FROM cdc.group_tables").fetchall()
    assert rows == [("public.pgbench_tellers", "streaming", 0)]
    assert_tables_rebuilt(pg_dsn, s3_client, bucket, {"pgbench_tellers": "tid"})


async def test_one_table_failing_leaves_the_others_streaming(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A TRUNCATE of one table of the group marks that table failed (ledger, status, with
    the reason and the fix) and the others go on streaming; ``resync --table`` and a restart
    export it again from a new snapshot, which rebuilds it exactly. A configured table that
    does not exist and never was in the group is refused by init and by run, before the
    ledger changes; the others stream on."""
    pgbench_init(pg_dsn)
    settings = group_settings(
        pg_dsn, s3_server, bucket, tmp_path, ["pgbench_accounts", "pgbench_tellers"]
    )
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("TRUNCATE pgbench_tellers")
        conn.execute("INSERT INTO pgbench_tellers (tid, bid, tbalance) VALUES (1, 1, 5)")
        conn.execute("UPDATE pgbench_accounts SET abalance = 9 WHERE aid <= 5")
    with pytest.raises(TableFailedError, match="pgbench_tellers"):
        await export_until_idle(settings)
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            "SELECT status, error FROM cdc.group_tables WHERE table_name = 'public.pgbench_tellers'"
        ).fetchone()
    assert row is not None
    assert row[0] == "failed"
    assert "truncated" in row[1]
    assert "resync --table public.pgbench_tellers" in row[1]
    report = await collect(settings, slot=settings.slot_name)
    assert "failed" in render(report)
    assert_tables_rebuilt(pg_dsn, s3_client, bucket, {"pgbench_accounts": "aid"})
    capsys.readouterr()
    env = {
        "CDC_POSTGRES__DSN": settings.postgres.dsn.get_secret_value(),
        "CDC_CAPTURE__MODE": settings.capture.mode,
        "CDC_CAPTURE__GROUP": settings.group,
        "CDC_TABLES": json.dumps([{"name": t.name} for t in settings.table_specs]),
    }
    assert await main_in_thread(["resync", "--table", "pgbench_tellers"], env) == 0
    assert "exported again from a new snapshot" in capsys.readouterr().out
    await until_streaming(pg_dsn, settings, "public.pgbench_tellers")
    with psycopg.connect(pg_dsn) as conn:
        found = conn.execute(
            "SELECT status, seq FROM cdc.group_tables WHERE table_name = 'public.pgbench_tellers'"
        ).fetchone()
    assert found is not None
    assert found[0] == "streaming"
    # The warehouse table is emptied before a resync: its rows are those of the new snapshot.
    fresh = {
        k: v
        for k, v in object_bodies(s3_client, bucket, "public.pgbench_tellers/").items()
        if f"/join-{found[1]:020d}-" in k
    }
    rebuild(pg_dsn, fresh, "pgbench_tellers", ("tid",))
    assert differences(pg_dsn, "pgbench_tellers") == (1, 1, 0, 0)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE pgbench_branches")
    three = group_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        ["pgbench_accounts", "pgbench_tellers", "pgbench_branches"],
    )
    with pytest.raises(SourceError, match="does not exist"):
        await init(three)  # init checks every configured name
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute("UPDATE pgbench_accounts SET abalance = 10 WHERE aid <= 5")
    # Nor does run take it (it never was in the group: a configuration mistake), before the
    # ledger changes; the group as it was runs on.
    with pytest.raises(SourceError, match=r"pgbench_branches.*fix the name in \[\[tables\]\]"):
        await export_until_idle(three)
    with psycopg.connect(pg_dsn) as conn:
        gone = conn.execute(
            "SELECT status FROM cdc.group_tables WHERE table_name = 'public.pgbench_branches'"
        ).fetchone()
    assert gone is None
    assert await export_until_idle(settings) == 0
    assert_tables_rebuilt(pg_dsn, s3_client, bucket, {"pgbench_accounts": "aid"})


async def until_streaming(pg_dsn: str, settings: Settings, table: str) -> None:
    """Run until idle until ``table`` streams: a rejoining table's snapshot waits for the
    slot's restart_lsn to pass where it left, which a checkpoint's running-transactions
    record and the next confirmed position move (a drain does not wait for it)."""
    for _ in range(20):
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        assert await export_until_idle(settings) == 0
        with psycopg.connect(pg_dsn) as conn:
            row = conn.execute(
                "SELECT status FROM cdc.group_tables WHERE table_name = %s", (table,)
            ).fetchone()
        if row == ("streaming",):
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{table} did not stream again: {row}")


async def test_a_key_change_leaving_a_toasted_value_fails_only_that_table(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """Under the default replica identity an update that changes the key and leaves a TOASTed
    value unchanged cannot be exported (the new key has no earlier row to keep the value
    from): that table is failed with the fix (REPLICA IDENTITY FULL, resync), never written
    with an empty value; the other table goes on. resync refuses while the daemon runs."""
    pgbench_init(pg_dsn)
    create_many_types(pg_dsn, 20)
    settings = group_settings(pg_dsn, s3_server, bucket, tmp_path, ["pgbench_tellers", MANY_TYPES])
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        conn.execute(
            f"UPDATE {MANY_TYPES} SET id = gen_random_uuid()"
            f" WHERE id = (SELECT id FROM {MANY_TYPES} WHERE length(body) > 5000 LIMIT 1)"
        )
        conn.execute("UPDATE pgbench_tellers SET tbalance = 3")
    with pytest.raises(TableFailedError, match="changed the key"):
        await export_until_idle(settings)
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            "SELECT status, error FROM cdc.group_tables WHERE table_name = %s",
            (f"public.{MANY_TYPES}",),
        ).fetchone()
    assert row is not None
    assert row[0] == "failed"
    assert "changed the key" in row[1]
    assert "REPLICA IDENTITY FULL" in row[1]
    assert_tables_rebuilt(pg_dsn, s3_client, bucket, {"pgbench_tellers": "tid"})
    async with running_daemon(settings) as daemon:

        async def locked() -> bool:
            return bool((await collect(settings))["shop"]["running"])

        for _ in range(100):
            if await locked():
                break
            await asyncio.sleep(0.1)
        with pytest.raises(AlreadyRunningError, match="is running: stop it"):
            await resync(settings, MANY_TYPES)
        with pytest.raises(TableFailedError):
            await daemon.stopped()


def test_snapshot_ranges_and_chunks_follow_the_key_order(pg_dsn: str, tmp_path: Path) -> None:
    """The snapshot's ranges and chunks are cut in the key's own order (an integer key is
    not sorted as text): the cuts of 3,000 ids into 4 ranges grow, each chunk holds exactly
    the rows asked for, and chunks over every range cover each id once."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE numbered (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO numbered SELECT g, 'n' || g FROM generate_series(1, 3000) g")
        conn.execute("ANALYZE numbered")
    from cdc_daemon.batch.spool import DaySpool
    from cdc_daemon.capture.logical.snapshot import copy_chunk, split_keys
    from cdc_daemon.capture.logical.tables import describe
    from cdc_daemon.config import TableSettings

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        table = describe(conn, TableSettings(name="numbered"))
        cuts = split_keys(conn, table, 4)
        assert [int(str(c[0])) for c in cuts] == [751, 1501, 2251]
        bounds = [None, *cuts, None]
        seen: list[int] = []
        for lower, upper in itertools.pairwise(bounds):
            start = lower
            while True:
                spool = DaySpool(tmp_path, "none", 0, b"h\n")
                last = copy_chunk(conn, table, start, upper, 200, 1, "2026-12-02T00:00:00Z", spool)
                rows = [
                    int(line.split(b",")[0])
                    for obj in spool.finish()
                    for line in obj.path.read_bytes().splitlines()[1:]
                ]
                spool.discard()
                assert last is None or len(rows) == 200
                seen += rows
                if last is None:
                    break
                start = last
    assert sorted(seen) == list(range(1, 3001))


async def test_a_mistyped_table_is_refused_before_the_ledger_changes(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """A configuration whose table name is mistyped (a table that does not exist and was never
    in the group) is refused with one sentence that says how to fix it; the table it replaced
    does not leave the group and no table is marked failed; the right configuration runs on."""
    pgbench_init(pg_dsn)
    tables = ["pgbench_branches", "pgbench_tellers"]
    settings = group_settings(pg_dsn, s3_server, bucket, tmp_path, tables)
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with psycopg.connect(pg_dsn) as conn:
        before = conn.execute("SELECT * FROM cdc.group_tables ORDER BY table_name").fetchall()
    typo = group_settings(
        pg_dsn, s3_server, bucket, tmp_path, ["pgbench_branches", "pgbench_tellrs"]
    )
    with pytest.raises(SourceError, match=r"pgbench_tellrs.*fix the name in \[\[tables\]\]"):
        await export_until_idle(typo)
    with psycopg.connect(pg_dsn) as conn:
        after = conn.execute("SELECT * FROM cdc.group_tables ORDER BY table_name").fetchall()
    assert after == before
    assert await export_until_idle(settings) == 0
