"""``init`` refuses, with the fix, every table whose capture would give wrong data, and never
adds a table to the publication whose writes would then fail; on tables not written for this
project (pgbench-like, odd identifiers, schemas other than public), against a real
PostgreSQL and S3."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog

from cdc_daemon.cli import init
from cdc_daemon.config import Settings
from cdc_daemon.errors import SourceError
from cdc_daemon.local.services import LocalS3
from tests.helpers import differences, export_until_idle, make_settings, object_bodies, rebuild

pytestmark = pytest.mark.usefixtures("drop_slots")

SYNC = "-c synchronous_commit=on"


def settings_for(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    tmp_path: Path,
    tables: list[dict[str, Any]],
    mode: str = "logical",
) -> Settings:
    return make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=tables,
        capture={"mode": mode, "group": "crm"},
    )


def run_sql(pg_dsn: str, *statements: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True, options=SYNC) as conn:
        for statement in statements:
            conn.execute(statement)


def published(pg_dsn: str) -> list[str] | None:
    """The tables of publication cdc_crm, None when it does not exist."""
    with psycopg.connect(pg_dsn) as conn:
        if not conn.execute("SELECT 1 FROM pg_publication WHERE pubname = 'cdc_crm'").fetchone():
            return None
        return sorted(
            f"{s}.{t}"
            for s, t in conn.execute(
                "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = 'cdc_crm'"
            )
        )


def fix_of(message: str, table: str) -> list[str]:
    """The statements a refusal names for ``table`` (its problem ends with them)."""
    (problem,) = [p for p in message.split("; ") if table in p]
    return problem.rsplit(": ", 1)[1].split(", then ")


def assert_writes_work(pg_dsn: str, table: str, where: str, change: str) -> None:
    """The application's UPDATE and DELETE on ``table`` succeed (they fail on a published
    table without a usable replica identity); rolled back."""
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(f"UPDATE {table} SET {change} WHERE {where}").rowcount == 1
        assert conn.execute(f"DELETE FROM {table} WHERE {where}").rowcount == 1
        conn.rollback()


async def test_a_key_the_replica_identity_does_not_send_is_refused_then_exact(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """key = ["E-Mail"] on a table whose primary key is member_id (default identity): a key
    change would write no delete and a delete would carry no e-mail, leaving ghost rows. init
    refuses, naming the statement, and creates no publication; once that statement is run,
    init accepts the table and a key change, a delete and an insert rebuild exactly."""
    run_sql(
        pg_dsn,
        "CREATE SCHEMA crm",
        'CREATE TABLE crm.members (member_id int PRIMARY KEY, "E-Mail" text NOT NULL UNIQUE,'
        ' "Name" text)',
        "INSERT INTO crm.members SELECT g, 'm' || g || '@x.org', 'n' || g"
        " FROM generate_series(1, 3) g",
    )
    settings = settings_for(
        pg_dsn, s3_server, bucket, tmp_path, [{"name": "crm.members", "key": ["E-Mail"]}]
    )
    with pytest.raises(SourceError) as caught:
        await init(settings)
    assert 'not the key ("E-Mail")' in str(caught.value)
    assert published(pg_dsn) is None
    (statement, _) = fix_of(str(caught.value), "crm.members")[0].split(" (or ")
    assert statement == 'ALTER TABLE crm.members REPLICA IDENTITY USING INDEX "members_E-Mail_key"'
    run_sql(pg_dsn, statement)
    assert await init(settings) == 0
    assert published(pg_dsn) == ["crm.members"]
    assert await export_until_idle(settings) == 0
    run_sql(
        pg_dsn,
        "UPDATE crm.members SET \"E-Mail\" = 'moved@x.org' WHERE member_id = 1",
        "DELETE FROM crm.members WHERE member_id = 2",
        "INSERT INTO crm.members VALUES (4, 'm4@x.org', NULL)",
    )
    assert await export_until_idle(settings) == 0
    rebuild(pg_dsn, object_bodies(s3_client, bucket), "crm.members", ("E-Mail",))
    assert differences(pg_dsn, "crm.members") == (3, 3, 0, 0)


async def test_nullable_and_non_unique_keys_are_refused_in_both_modes(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """A pgbench_history-like table keyed by (tid, bid): nullable columns would lose the NULL-key
    rows and a key without a unique index would collapse rows. Refused in logical mode (init)
    and in watermark mode (the check init runs), each with its statement; a second table's
    problem is reported in the same message."""
    run_sql(
        pg_dsn,
        'CREATE SCHEMA "Bench Mark"',
        'CREATE TABLE "Bench Mark".history (hid bigserial PRIMARY KEY, tid int, bid int,'
        " delta int, mtime timestamp)",
        'CREATE INDEX ON "Bench Mark".history (tid, bid)',
        'CREATE TABLE "Bench Mark".tellers (tid int PRIMARY KEY, "Code" int NOT NULL,'
        " filler char(84))",
        'CREATE UNIQUE INDEX tellers_code ON "Bench Mark".tellers ("Code") WHERE "Code" > 0',
    )
    tables = [
        {"name": '"Bench Mark".history', "key": ["tid", "bid"]},
        {"name": '"Bench Mark".tellers', "key": ["Code"]},
    ]
    logical = settings_for(pg_dsn, s3_server, bucket, tmp_path, tables)
    with pytest.raises(SourceError) as caught:
        await init(logical)
    watermark = settings_for(pg_dsn, s3_server, bucket, tmp_path, tables, mode="watermark")
    with pytest.raises(SourceError) as caught_watermark:
        await init(watermark)
    for message in (str(caught.value), str(caught_watermark.value)):
        assert (
            'ALTER TABLE "Bench Mark".history ALTER COLUMN tid SET NOT NULL, ALTER COLUMN bid'
            " SET NOT NULL" in message
        )
        assert (
            'CREATE UNIQUE INDEX CONCURRENTLY history_cdc_key ON "Bench Mark".history (tid, bid)'
            in message
        )
        assert "only the unique index tellers_code, which is partial" in message
    assert published(pg_dsn) is None


async def test_a_deferrable_primary_key_never_joins_the_publication(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """A running group gains a table whose primary key is DEFERRABLE: once published, the
    application's UPDATE and DELETE on it would fail. init refuses it before touching the
    publication (which keeps its one table), and the application's writes still work; the
    statements init names make it capturable, and its writes still work once published."""
    run_sql(
        pg_dsn,
        "CREATE SCHEMA crm",
        "CREATE TABLE crm.branches (bid int PRIMARY KEY, bbalance int)",
        "INSERT INTO crm.branches VALUES (1, 0)",
        'CREATE TABLE crm."Deferred Accounts" (aid int PRIMARY KEY DEFERRABLE INITIALLY'
        " DEFERRED, abalance int, filler text)",
        "INSERT INTO crm.\"Deferred Accounts\" SELECT g, 0, 'f' FROM generate_series(1, 5) g",
    )
    one = settings_for(pg_dsn, s3_server, bucket, tmp_path, [{"name": "crm.branches"}])
    assert await init(one) == 0
    assert published(pg_dsn) == ["crm.branches"]
    both = settings_for(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        [{"name": "crm.branches"}, {"name": 'crm."Deferred Accounts"'}],
    )
    with pytest.raises(SourceError) as caught:
        await init(both)
    message = str(caught.value)
    assert "DEFERRABLE" in message
    assert "the application's UPDATE and DELETE would fail" in message
    assert published(pg_dsn) == ["crm.branches"]
    accounts = 'crm."Deferred Accounts"'
    assert_writes_work(pg_dsn, accounts, "aid = 3", "abalance = abalance + 1")
    run_sql(pg_dsn, *fix_of(message, accounts))
    assert await init(both) == 0
    assert published(pg_dsn) == ["crm.Deferred Accounts", "crm.branches"]
    assert_writes_work(pg_dsn, accounts, "aid = 3", "abalance = abalance + 1")


async def test_every_table_whose_writes_would_fail_is_refused_and_reported(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """Four tables whose UPDATE and DELETE would fail once published (a deferrable primary key,
    REPLICA IDENTITY NOTHING, DEFAULT without a primary key, USING INDEX on an index dropped
    since) beside a good one: init names all four in one message, creates no publication, and
    every table's UPDATE and DELETE still work."""
    run_sql(
        pg_dsn,
        'CREATE SCHEMA "Odd Shop"',
        'CREATE TABLE "Odd Shop".deferpk (id int PRIMARY KEY DEFERRABLE, v text)',
        'CREATE TABLE "Odd Shop"."Nothing" (id int PRIMARY KEY, v text)',
        'ALTER TABLE "Odd Shop"."Nothing" REPLICA IDENTITY NOTHING',
        'CREATE TABLE "Odd Shop".nopk (sku text NOT NULL, v text)',
        'CREATE UNIQUE INDEX nopk_sku ON "Odd Shop".nopk (sku)',
        'CREATE TABLE "Odd Shop".dropped (id int PRIMARY KEY, code int NOT NULL, v text)',
        'CREATE UNIQUE INDEX dropped_code ON "Odd Shop".dropped (code)',
        'ALTER TABLE "Odd Shop".dropped REPLICA IDENTITY USING INDEX dropped_code',
        'DROP INDEX "Odd Shop".dropped_code',
        'CREATE TABLE "Odd Shop".good (id int PRIMARY KEY, v text)',
    )
    names = ["deferpk", '"Nothing"', "nopk", "dropped", "good"]
    for name in names:
        if name == "nopk":
            run_sql(pg_dsn, "INSERT INTO \"Odd Shop\".nopk VALUES ('1', 'a')")
        elif name == "dropped":
            run_sql(pg_dsn, "INSERT INTO \"Odd Shop\".dropped VALUES (1, 1, 'a')")
        else:
            run_sql(pg_dsn, f"INSERT INTO \"Odd Shop\".{name} VALUES (1, 'a')")
    tables: list[dict[str, Any]] = [
        {"name": f'"Odd Shop".{n}', **({"key": ["sku"]} if n == "nopk" else {})} for n in names
    ]
    settings = settings_for(pg_dsn, s3_server, bucket, tmp_path, tables)
    with pytest.raises(SourceError) as caught:
        await init(settings)
    problems = str(caught.value).split("; ")
    assert len(problems) == 4
    for name, words in [
        ("deferpk", "DEFERRABLE"),
        ('"Nothing"', "REPLICA IDENTITY NOTHING"),
        ("nopk", "no primary key and REPLICA IDENTITY DEFAULT"),
        ("dropped", "USING INDEX was dropped"),
    ]:
        (problem,) = [p for p in problems if f'"Odd Shop".{name}' in p]
        assert words in problem
        assert "the application's UPDATE and DELETE would fail" in problem
    assert published(pg_dsn) is None
    for name in names:
        key = "sku = '1'" if name == "nopk" else "id = 1"
        assert_writes_work(pg_dsn, f'"Odd Shop".{name}', key, "v = 'b'")


async def test_generated_columns_are_left_out_and_said_so(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """pgoutput (PostgreSQL < 18) does not send a stored generated column, so logical mode
    leaves it out everywhere: init prints one line for it, the snapshot's and the stream's
    objects lack it (never a NULL standing for its value), no columns_changed is logged, and
    every other column rebuilds exactly."""
    run_sql(
        pg_dsn,
        "CREATE SCHEMA shop",
        "CREATE TABLE shop.order_lines (line_id bigint PRIMARY KEY, qty int NOT NULL,"
        ' price numeric(10, 2), "Line Total" numeric GENERATED ALWAYS AS (qty * price) STORED,'
        " note text)",
        "INSERT INTO shop.order_lines (line_id, qty, price, note)"
        " SELECT g, g, 1.25, 'n' || g FROM generate_series(1, 4) g",
    )
    settings = settings_for(pg_dsn, s3_server, bucket, tmp_path, [{"name": "shop.order_lines"}])
    assert await init(settings) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "Line Total" in x]
    assert "generated column Line Total is left out of the capture" in line
    with structlog.testing.capture_logs() as logs:
        assert await export_until_idle(settings) == 0
        run_sql(
            pg_dsn,
            "UPDATE shop.order_lines SET qty = 10 WHERE line_id = 1",
            "DELETE FROM shop.order_lines WHERE line_id = 2",
            "INSERT INTO shop.order_lines (line_id, qty, price) VALUES (5, 2, 3.5)",
        )
        assert await export_until_idle(settings) == 0
    assert not [e for e in logs if e["event"] == "columns_changed"]
    bodies = object_bodies(s3_client, bucket)
    headers = {body.split(b"\n", 1)[0] for body in bodies.values()}
    assert headers == {b"line_id,qty,price,note,_cdc_op,_cdc_seq,_cdc_ts,_cdc_unchanged"}
    ops = {r["_cdc_op"] for b in bodies.values() for r in csv.DictReader(io.StringIO(b.decode()))}
    assert ops == {"I", "U", "D"}
    rebuild(pg_dsn, bodies, "shop.order_lines", ("line_id",))
    with psycopg.connect(pg_dsn) as conn:
        only = conn.execute(
            "SELECT count(*) FROM (SELECT line_id, qty, price, note FROM shop.order_lines"
            " EXCEPT ALL SELECT line_id, qty, price, note FROM shop.order_lines_rebuilt) a"
        ).fetchone()
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM shop.order_lines),"
            " (SELECT count(*) FROM shop.order_lines_rebuilt)"
        ).fetchone()
    assert only == (0,)
    assert counts == (4, 4)


async def test_colliding_column_names_are_refused_in_both_modes(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """Columns named like the daemon's own (any case: Snowflake upper-cases names) and two
    columns equal but for case would be one Snowflake column: refused at init in logical mode
    and by watermark mode's check, one sentence each with the rename; nothing is published."""
    run_sql(
        pg_dsn,
        'CREATE SCHEMA "Sign Ups"',
        'CREATE TABLE "Sign Ups"."Users" (id bigserial PRIMARY KEY, "userId" int, userid int,'
        ' "_CDC_op" text, _loaded_at timestamptz, "_Merged_At" text)',
    )
    tables = [{"name": '"Sign Ups"."Users"'}]
    with pytest.raises(SourceError) as caught:
        await init(settings_for(pg_dsn, s3_server, bucket, tmp_path, tables))
    watermark = settings_for(pg_dsn, s3_server, bucket, tmp_path, tables, mode="watermark")
    with pytest.raises(SourceError) as caught_watermark:
        await init(watermark)
    for message in (str(caught.value), str(caught_watermark.value)):
        problems = message.split("; ")
        assert len(problems) == 4
        for column in ('"_CDC_op"', "_loaded_at", '"_Merged_At"'):
            assert any(
                f"column {column} has the name of the daemon's own column" in p for p in problems
            )
        assert any('"userId" and userid differ only in case' in p for p in problems)
        assert all(
            re.search(r'ALTER TABLE "Sign Ups"\."Users" RENAME COLUMN \S+ TO \.\.\.', p)
            for p in problems
        )
    assert published(pg_dsn) is None


async def test_watermark_mode_accepts_a_deferrable_primary_key(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """Watermark mode reads committed rows only, where a deferred uniqueness check holds: its
    check accepts a deferrable primary key (what logical mode refuses) and a good key."""
    run_sql(
        pg_dsn,
        'CREATE SCHEMA "Odd Shop"',
        'CREATE TABLE "Odd Shop".deferpk (id bigserial PRIMARY KEY DEFERRABLE, v text)',
    )
    tables = [{"name": '"Odd Shop".deferpk'}]
    assert await init(settings_for(pg_dsn, s3_server, bucket, tmp_path, tables, "watermark")) == 0
