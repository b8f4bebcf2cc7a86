"""Issue #25's schemas in one logical group, as a process under SIGKILLs: a range-partitioned
table with a partition attached with its rows and one detached with its rows while the daemon
is killed and restarted, a table keyed only by a unique index, a keyless table with exact
duplicate rows, and a table whose name and columns need quoting. Whatever the crash, every
table rebuilt from its objects, and every current-state table of the local warehouse, equals
its source (a keyless one as a multiset: each row as often as the source has it)."""

from __future__ import annotations

import csv
import io
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.local.services import LocalS3
from tests.e2e.daemon import cli, daemon_process, stop_daemon, wait_for_event, write_config
from tests.fix_warehouse import start_warehouse
from tests.helpers import differences, make_settings, object_bodies, rebuild, rebuild_keyless
from tests.schemas import BIG_TEXT
from tests.warehouse_checks import assert_table_equals_source

pytestmark = pytest.mark.usefixtures("drop_slots")

GROUP = "adv"
EVENTS = "adv.events"  # PARTITION BY RANGE (ts), PRIMARY KEY (id, ts)
STOCK = "adv.stock"  # no primary key: UNIQUE (sku, wh) NOT NULL, REPLICA IDENTITY USING INDEX
LINES = 'adv."Order Lines"'
LOG = "adv.log"  # no key, no unique index: REPLICA IDENTITY FULL, captured keyless
# Each table's folder (its ledger key: design.md, "The table's folder") and merge key.
KEYS = {
    "adv.events": ("id", "ts"),
    "adv.stock": ("sku", "wh"),
    "adv.Order Lines": ("id",),
    "adv.log": (),
}
# The months the root has a partition for; the writers move and insert rows only there.
MONTHS = {1: "2026-01-01 00:00+00", 2: "2026-02-01 00:00+00", 3: "2026-03-01 00:00+00"}
# Logical mode reads flushed WAL: the writers commit synchronously (see test_logical.py).
SYNC = "-c synchronous_commit=on"


def execute(pg_dsn: str, *statements: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        for statement in statements:
            conn.execute(statement)


def create_tables(pg_dsn: str) -> None:
    """The three tables with rows, and adv.events_2026_03 (its columns in another order),
    which holds rows and is attached later. The events fall on the first three days of their
    month: an object per day and batch, and the warehouse loads each file on its own."""
    execute(
        pg_dsn,
        "CREATE SCHEMA adv",
        "CREATE TABLE adv.events (id bigint NOT NULL, ts timestamptz NOT NULL,"
        " amount numeric(12, 2), note text, PRIMARY KEY (id, ts)) PARTITION BY RANGE (ts)",
        "CREATE TABLE adv.events_2026_01 PARTITION OF adv.events"
        f" FOR VALUES FROM ('{MONTHS[1]}') TO ('{MONTHS[2]}')",
        "CREATE TABLE adv.events_2026_02 PARTITION OF adv.events"
        f" FOR VALUES FROM ('{MONTHS[2]}') TO ('{MONTHS[3]}')",
        "INSERT INTO adv.events SELECT g, timestamptz '2026-01-01 00:00+00'"
        " + (g % 2) * interval '1 month' + (g % 3) * interval '1 day' + g * interval '1 minute',"
        " g * 1.5, 'row ' || g FROM generate_series(1, 300) g",
        "CREATE TABLE adv.events_2026_03 (note text, amount numeric(12, 2),"
        " ts timestamptz NOT NULL, id bigint NOT NULL)",
        "INSERT INTO adv.events_2026_03 SELECT 'march ' || g, g,"
        " timestamptz '2026-03-01 00:00+00' + (g % 3) * interval '1 day' + g * interval '1 minute',"
        " 5000 + g"
        " FROM generate_series(1, 120) g",
        "CREATE TABLE adv.stock (sku text NOT NULL, wh int NOT NULL, qty int NOT NULL, note text)",
        "CREATE UNIQUE INDEX stock_sku_wh ON adv.stock (sku, wh)",
        "ALTER TABLE adv.stock REPLICA IDENTITY USING INDEX stock_sku_wh",
        "INSERT INTO adv.stock SELECT 'sku-' || (g % 13), g / 13, g, 'n' || g"
        " FROM generate_series(0, 199) g",
        f'CREATE TABLE {LINES} (id bigint PRIMARY KEY, "first name" text, "we""ird" text,'
        ' "prix€" numeric(8, 2), "Ω" text, body text)',
        # One row in five holds a value stored out of line (TOAST).
        "CREATE TABLE adv.log (kind text, qty int, note text)",
        "ALTER TABLE adv.log REPLICA IDENTITY FULL",
        # Three copies of each row.
        "INSERT INTO adv.log SELECT 'k' || (g % 20), g % 20, NULL FROM generate_series(1, 60) g",
        f"INSERT INTO {LINES} SELECT g, 'f ' || g, 'w\"' || g, g * 1.25,"
        " CASE WHEN g % 3 = 0 THEN NULL ELSE 'ω' END,"
        f" CASE WHEN g % 5 = 0 THEN {BIG_TEXT} ELSE 'short ' || g END"
        " FROM generate_series(1, 150) g",
    )


def _one_change(
    conn: psycopg.Connection[Any], rng: random.Random, fresh: int, months: list[int]
) -> None:
    """One insert, update or delete of one of the tables; ``fresh`` is a number no other
    change uses (a new id, sku or warehouse: no key is taken twice). adv.log's copies of a
    row are told apart by ctid only: a change of it touches one copy."""
    if rng.random() < 0.2:
        one_copy = "ctid = (SELECT ctid FROM adv.log ORDER BY random() LIMIT 1)"
        choice = rng.random()
        if choice < 0.3:
            conn.execute("INSERT INTO adv.log SELECT * FROM adv.log ORDER BY random() LIMIT 1")
        elif choice < 0.4:
            conn.execute(f"INSERT INTO adv.log VALUES ('n{fresh % 7}', 1, 'new')")
        elif choice < 0.75:
            conn.execute(f"UPDATE adv.log SET qty = qty + 1 WHERE {one_copy}")
        else:
            conn.execute(f"DELETE FROM adv.log WHERE {one_copy}")
        return
    pick = rng.random()
    month = MONTHS[rng.choice(months)]
    some_event = "(id, ts) = (SELECT id, ts FROM adv.events ORDER BY random() LIMIT 1)"
    some_stock = "(sku, wh) = (SELECT sku, wh FROM adv.stock ORDER BY random() LIMIT 1)"
    some_line = f"id = (SELECT id FROM {LINES} ORDER BY random() LIMIT 1)"
    offset = f"interval '1 minute' * {rng.randint(0, 3 * 24 * 60 - 1)}"
    if pick < 0.08:
        conn.execute(
            f"INSERT INTO adv.events VALUES ({fresh}, '{month}'::timestamptz + {offset}, 1, 'new')"
        )
    elif pick < 0.16:
        conn.execute(f"UPDATE adv.events SET amount = amount + 1, note = 'u' WHERE {some_event}")
    elif pick < 0.24:
        # The partition key: to another partition, or within one (a key change either way).
        conn.execute(
            f"UPDATE adv.events SET ts = '{month}'::timestamptz + {offset} WHERE {some_event}"
        )
    elif pick < 0.28:
        conn.execute(f"UPDATE adv.events SET id = {fresh} WHERE {some_event}")
    elif pick < 0.32:
        conn.execute(f"DELETE FROM adv.events WHERE {some_event}")
    elif pick < 0.38:
        conn.execute(f"INSERT INTO adv.stock VALUES ('w{fresh}', {rng.randint(0, 20)}, 1, NULL)")
    elif pick < 0.46:
        conn.execute(f"UPDATE adv.stock SET qty = qty + 1, note = '' WHERE {some_stock}")
    elif pick < 0.52:
        conn.execute(f"UPDATE adv.stock SET sku = 'r{fresh}' WHERE {some_stock}")
    elif pick < 0.58:
        conn.execute(f"UPDATE adv.stock SET wh = {fresh} WHERE {some_stock}")
    elif pick < 0.62:
        conn.execute(f"DELETE FROM adv.stock WHERE {some_stock}")
    elif pick < 0.68:
        body = BIG_TEXT if rng.random() < 0.3 else "'short'"
        conn.execute(f"INSERT INTO {LINES} VALUES ({fresh}, 'n', 'a,\"b\"', 2.5, 'Ω', {body})")
    elif pick < 0.82:
        # The TOASTed body left as it is: the change does not log it (_cdc_unchanged).
        conn.execute(
            f'UPDATE {LINES} SET "we""ird" = \'x,y\', "Ω" = NULL, "prix€" = "prix€" + 1,'
            f" \"first name\" = '' WHERE {some_line}"
        )
    elif pick < 0.88:
        conn.execute(f"UPDATE {LINES} SET body = {BIG_TEXT} WHERE {some_line}")
    elif pick < 0.94:
        # A key change with a TOASTed value unchanged cannot be captured under the default
        # identity (the new key has no earlier row to keep it from): the body is rewritten.
        conn.execute(f"UPDATE {LINES} SET id = {fresh}, body = body || '' WHERE {some_line}")
    else:
        conn.execute(f"DELETE FROM {LINES} WHERE {some_line}")


def writer(
    pg_dsn: str,
    seed: int,
    n: int,
    months: list[int],
    writing: threading.Event,
    stop: threading.Event,
) -> None:
    """Transactions of 1-6 changes while ``writing`` is set, until ``stop``; one in ten rolls
    back. A change that meets a deadlock with another writer, or a month whose partition was
    just detached (or is not attached yet), rolls its transaction back."""
    rng = random.Random(seed + n)
    fresh = (n + 1) * 10_000_000
    with psycopg.connect(pg_dsn, options=SYNC) as conn:
        while not stop.is_set():
            if not writing.wait(0.1):
                continue
            try:
                for _ in range(rng.randint(1, 6)):
                    fresh += 1
                    _one_change(conn, rng, fresh, list(months))
                if rng.random() < 0.1:
                    conn.rollback()
                else:
                    conn.commit()
            except (psycopg.errors.DeadlockDetected, psycopg.errors.CheckViolation):
                conn.rollback()
            time.sleep(rng.random() * 0.1)


def kill_rounds(config: Path, pg_dsn: str, rng: random.Random, rounds: int) -> None:
    """``rounds`` times: start the daemon and, once it has started (its imports alone take
    about 2 s on a busy 2-core machine, which would use up a draw from the start), SIGKILL it
    at a moment drawn from the next 2.5 s; check it died of that signal; CHECKPOINT (an
    attached or detached partition's seq waits for the slot's restart_lsn to pass it)."""
    for _ in range(rounds):
        with daemon_process(config) as daemon:
            wait_for_event(daemon, "daemon_started")
            time.sleep(rng.random() * 2.5)
            out, err = stop_daemon(daemon, signal.SIGKILL)
        assert daemon.returncode == -signal.SIGKILL, out[-3000:] + err[-3000:]
        execute(pg_dsn, "CHECKPOINT")


def statuses(pg_dsn: str) -> dict[str, str]:
    with psycopg.connect(pg_dsn) as conn:
        return {
            str(t): str(s)
            for t, s in conn.execute(
                "SELECT table_name, status FROM cdc.group_tables WHERE group_name = %s", (GROUP,)
            )
        }


def run_until_streaming(config: Path, pg_dsn: str) -> None:
    """Runs (``--exit-when-idle``) until every table streams, a CHECKPOINT between them (an
    attached or detached partition's seq waits for the slot's restart_lsn, which an idle
    server moves at a checkpoint: docs/logical.md, "Partitioned tables"); then one more."""
    for _ in range(30):
        done = cli(config, "run", "--exit-when-idle")
        assert done.returncode == 0, done.stderr[-3000:]
        if set(statuses(pg_dsn).values()) == {"streaming"}:
            done = cli(config, "run", "--exit-when-idle")
            assert done.returncode == 0, done.stderr[-3000:]
            return
        execute(pg_dsn, "CHECKPOINT")
    raise AssertionError(f"not every table streams: {statuses(pg_dsn)}")


def assert_every_table_rebuilt(pg_dsn: str, s3_client: Any, bucket: str) -> dict[str, int]:
    """Each table rebuilt from the objects of its own folder (highest _cdc_seq per key wins,
    then drop D) equals its source, column by column; the rows of each. And the partitions
    were followed as such: the attached table's rows are in snapshot chunks of the root, and
    every row left in the detached table has a D row in one (else the test proved less)."""
    bodies = object_bodies(s3_client, bucket)
    assert {k.split("/")[0] for k in bodies} == set(KEYS)
    rows = {}
    for table, key in KEYS.items():
        mine = {k: v for k, v in bodies.items() if k.startswith(f"{table}/")}
        if key:
            rebuild(pg_dsn, mine, table, key)
        else:
            rebuild_keyless(pg_dsn, mine, table)
        source, rebuilt, missing, extra = differences(pg_dsn, table)
        assert (missing, extra) == (0, 0), f"{table}: {missing} missing, {extra} different/extra"
        assert source == rebuilt, table
        rows[table] = source
    chunks = [
        row
        for k, v in bodies.items()
        if k.startswith("adv.events/") and k.rsplit("/", 1)[-1].startswith("join-")
        for row in csv.DictReader(io.StringIO(v.decode()))
    ]
    assert any(r["note"].startswith("march ") and r["_cdc_op"] == "I" for r in chunks)
    with psycopg.connect(pg_dsn) as conn:
        detached = {int(i) for (i,) in conn.execute("SELECT id FROM adv.events_2026_01")}
        pending = conn.execute(
            "SELECT producer, name, table_name, attempts FROM cdc.deliveries"
            " WHERE status = 'pending'"
        ).fetchall()
        redone = conn.execute(
            "SELECT producer, count(*), max(attempts) FROM cdc.deliveries GROUP BY 1"
        ).fetchall()
    print(f"deliveries (producer, count, most attempts): {redone}")
    assert detached
    assert detached <= {int(r["id"]) for r in chunks if r["_cdc_op"] == "D"}
    # Nothing is left awaiting its redo after a clean run.
    assert pending == [], f"pending deliveries after a clean run: {pending}"
    return rows


def test_issue_25_schemas_lose_nothing_under_sigkills(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
    warehouse_dir: Path,
) -> None:
    """In schema adv, one logical group of: adv.events, range-partitioned by a timestamptz
    (primary key (id, ts)), two partitions with rows; adv.stock, no primary key, keyed only by
    a unique index on NOT NULL columns under REPLICA IDENTITY USING INDEX; adv.log, keyless
    (REPLICA IDENTITY FULL), three copies of each row; adv."Order Lines",
    with columns "first name", "we""ird", "prix€", "Ω" and a TOASTed text. Three writers
    insert, update (key columns too: id and ts of events, moving rows across partitions and
    within one; sku and wh of stock; id of "Order Lines"; updates leaving the TOASTed value
    unchanged; one copy of a repeated adv.log row by ctid, or a new copy of one) and delete,
    some transactions rolling back, while the daemon is SIGKILLed 9
    times, each within 2.5 s (a drawn moment) of its start, a CHECKPOINT after each: 3 kills;
    a run until idle (writers paused) so the group's snapshot is done; a table holding 120
    rows ATTACHed as the March partition; 3 kills; the January partition DETACHed with its
    rows; 3 kills. Then runs until idle, CHECKPOINTs between them, until every table streams.

    Pins: every table rebuilt from its S3 objects (latest change per key by _cdc_seq, deletes
    applied, unchanged TOASTed values from the key's earlier row; adv.log's copies counted from
    its latest snapshot and the changes committed after it) equals its source value for value,
    duplicates included: the attached rows in (read from snapshot chunks), the detached rows out
    (a D row for each), no change lost to a kill; no delivery is left pending (every interrupted
    batch redone); and each current-state table of the local warehouse, loaded and merged from
    the same objects, equals its source. The seed is printed; CDC_TEST_SEED replays the kill
    moments and the writers' choices (not the rows they pick, nor the timing)."""
    seed = int(os.environ.get("CDC_TEST_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    create_tables(pg_dsn)
    tables = [
        {"name": EVENTS, "partition_column": "ts"},
        {"name": STOCK},
        {"name": LINES},
        {"name": LOG},
    ]
    capture = {
        "mode": "logical",
        "group": GROUP,
        "poll_interval_s": 0.05,
        "snapshot_chunk_rows": 50,
    }
    batch = {"max_rows": 300, "max_age_s": 0.5}
    config = write_config(
        tmp_path, pg_dsn, s3_server, bucket, tables=tables, capture=capture, batch=batch
    )
    settings = make_settings(
        pg_dsn, s3_server, bucket, tmp_path, tables=tables, capture=capture, batch=batch
    )
    # Before any object: the warehouse is notified of every one.
    wh = start_warehouse(settings, warehouse_dir)
    began = time.monotonic()
    try:
        done = cli(config, "init")
        assert done.returncode == 0, done.stderr
        months = [1, 2]
        writing, stop = threading.Event(), threading.Event()
        writing.set()
        writers = [
            threading.Thread(target=writer, args=(pg_dsn, seed, n, months, writing, stop))
            for n in range(3)
        ]
        for thread in writers:
            thread.start()
        try:
            kill_rounds(config, pg_dsn, rng, 3)
            # The group's own snapshot done (the rounds may have cut it short): January's
            # rows are in S3 before its partition is detached. The writers pause: a run
            # ends idle only after a pass that finds nothing new.
            writing.clear()
            done = cli(config, "run", "--exit-when-idle")
            assert done.returncode == 0, done.stderr[-3000:]
            writing.set()
            execute(
                pg_dsn,
                "ALTER TABLE adv.events ATTACH PARTITION adv.events_2026_03"
                f" FOR VALUES FROM ('{MONTHS[3]}') TO ('2026-04-01 00:00+00')",
            )
            months.append(3)
            kill_rounds(config, pg_dsn, rng, 3)
            months.remove(1)
            execute(pg_dsn, "ALTER TABLE adv.events DETACH PARTITION adv.events_2026_01")
            kill_rounds(config, pg_dsn, rng, 3)
        finally:
            stop.set()
            for thread in writers:
                thread.join()
        killed = time.monotonic()
        run_until_streaming(config, pg_dsn)
        rows = assert_every_table_rebuilt(pg_dsn, s3_client, bucket)
        rebuilt = time.monotonic()
        print(f"rows {rows}")
        wh.pump_until_quiet()
        print(
            f"seconds: {killed - began:.0f} kills, {rebuilt - killed:.0f} to idle and rebuilt,"
            f" {time.monotonic() - rebuilt:.0f} warehouse"
        )
        loaded = {t.names.name: assert_table_equals_source(pg_dsn, wh, t) for t in wh.tables}
        assert loaded == {
            "EVENTS": rows["adv.events"],
            "STOCK": rows["adv.stock"],
            "ORDER_LINES": rows["adv.Order Lines"],
            "LOG": rows["adv.log"],
        }
    finally:
        wh.stop()
