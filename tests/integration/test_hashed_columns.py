"""``hash_columns`` in both capture modes, through S3, the ledger, the logs and the local
warehouse: values leave the daemon only as HMAC-SHA256(salt, their text in the object format),
recomputed here independently of the daemon's code; the merge keys on a hashed key; ``verify``
compares hashed columns as hashes; another salt is refused at start."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from cdc_daemon.capture.backfill import parse_request, run_backfill
from cdc_daemon.cli import init
from cdc_daemon.errors import ConfigError, StateError
from cdc_daemon.local.sample import SAMPLE_TABLE, generate_sales
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.reconcile.verify import verify_group
from cdc_daemon.state.store import SCHEMA_VERSION
from cdc_daemon.worker import Worker
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, make_settings, object_bodies
from tests.integration.test_shaped_columns import ledger_texts, warehouse_texts

pytestmark = pytest.mark.usefixtures("drop_slots")

SYNC = "-c synchronous_commit=on"
MARKER = "HASHED-MARKER-91c4"
SALT = "salt-for-the-hashed-columns-test-7d2"


def hashed(value: object) -> str | None:
    """The expected warehouse value: HMAC-SHA256 of the value's object text, computed here
    (NULL stays NULL; a date as ISO, a timestamptz as ISO-8601 in UTC with ``+00:00`` and
    its fraction's digits only when it has one, as docs/design.md writes it)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        utc = value.astimezone(UTC)
        fraction = f".{utc.microsecond:06d}".rstrip("0") if utc.microsecond else ""
        text = utc.replace(microsecond=0, tzinfo=None).isoformat() + fraction + "+00:00"
    elif isinstance(value, date):
        text = value.isoformat()
    else:
        text = str(value)
    return hmac.new(SALT.encode(), text.encode(), hashlib.sha256).hexdigest()


def create_tables(dsn: str) -> None:
    """people: an excluded column, hashed text (NULLs, empty strings, commas and quotes among
    them), a hashed date and a hashed timestamptz; accounts: a hashed text key (its watermark
    is another column) and a hashed owner."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE people (id bigserial PRIMARY KEY, name text, email text, ssn text,"
            " born date, seen timestamptz)"
        )
        conn.execute(
            "CREATE TABLE accounts (code text PRIMARY KEY, n bigserial UNIQUE, owner text,"
            " balance numeric(12,2))"
        )
        insert_rows(conn, 0, 40)


def insert_rows(conn: psycopg.Connection[Any], first: int, count: int) -> None:
    conn.execute(
        "INSERT INTO people (name, email, ssn, born, seen) SELECT 'name ' || g,"
        " CASE g %% 5 WHEN 0 THEN NULL WHEN 1 THEN '' WHEN 2 THEN %(m)s || ',\"q\"' || g"
        " ELSE %(m)s || '-' || g || '@example.com' END, %(m)s, date '1980-01-01' + g,"
        " timestamptz '2011-03-27 00:30:00+00' + g * interval '1 h 0.25 s'"
        " FROM generate_series(%(a)s::int, %(b)s::int) g",
        {"m": MARKER, "a": first, "b": first + count - 1},
    )
    conn.execute(
        "INSERT INTO accounts (code, owner, balance) SELECT 'acct-' || g, %(m)s || ' ' || g,"
        " g * 1.5 FROM generate_series(%(a)s::int, %(b)s::int) g",
        {"m": MARKER, "a": first, "b": first + count - 1},
    )


@pytest.fixture(params=["watermark", "logical"])
def hashing(
    request: pytest.FixtureRequest,
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    tmp_path: Path,
    warehouse_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[LocalWarehouse]:
    monkeypatch.setenv("CDC_HASH_SALT", SALT)
    create_tables(pg_dsn)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[
            {
                "name": "people",
                "exclude_columns": ["ssn"],
                "hash_columns": ["email", "born", "seen"],
            },
            {"name": "accounts", "watermark_column": "n", "hash_columns": ["code", "owner"]},
        ],
        capture={"mode": request.param, "group": "hashing"},
    )
    wh = start_warehouse(settings, warehouse_dir)
    yield wh
    wh.stop()


def expected_rows(
    dsn: str, table: str, columns: list[str], hashed_: set[str]
) -> set[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall()
    return {
        tuple(hashed(v) if c in hashed_ else v for c, v in zip(columns, row, strict=True))
        for row in rows
    }


def warehouse_rows(wh: LocalWarehouse, table: str, columns: list[str]) -> set[tuple[Any, ...]]:
    rows = wh.query(f"SELECT {', '.join(c.upper() for c in columns)} FROM {table}")
    return {tuple(r[c.upper()] for c in columns) for r in rows}


async def test_hashed_values_are_the_hmac_and_the_clear_value_goes_nowhere(
    pg_dsn: str, hashing: LocalWarehouse, s3_client: Any, bucket: str
) -> None:
    """In watermark and logical mode (the snapshot, then inserts; logical mode also updates of
    hashed and clear columns, deletes and a key change): the marker held in clear by the hashed
    and the excluded columns is in no S3 object, no ledger row, no log line and no warehouse
    table; every hashed value in Snowflake (a VARCHAR(64)) is the HMAC-SHA256 of the source's
    object text computed in this test, NULL stays NULL and an empty string is hashed; the rows
    merged by a hashed key equal the source's; ``verify`` finds the people equal and says it
    cannot match the accounts, whose key is hashed."""
    settings = hashing.settings
    logical = settings.capture.mode == "logical"
    with capture_logs() as logs:
        assert await init(settings) == 0
        assert await export_until_idle(settings) == 0
        with psycopg.connect(pg_dsn, options=SYNC) as conn:
            insert_rows(conn, 100, 15)
            if logical:
                conn.execute(f"UPDATE people SET email = '{MARKER}-new' WHERE id % 3 = 0")
                conn.execute("UPDATE people SET name = name || '!' WHERE id % 4 = 0")
                conn.execute("DELETE FROM people WHERE id % 7 = 0")
                conn.execute("UPDATE accounts SET balance = balance + 1 WHERE n % 2 = 0")
                conn.execute("UPDATE accounts SET code = code || '-moved' WHERE n % 5 = 0")
                conn.execute("DELETE FROM accounts WHERE n % 6 = 0")
            conn.commit()
        assert await export_until_idle(settings) == 0
    bodies = object_bodies(s3_client, bucket)
    assert bodies
    for key, body in bodies.items():
        assert MARKER.encode() not in body, key
        assert b"acct-" not in body, key
    assert MARKER not in ledger_texts(pg_dsn, settings.state.schema_)
    assert logs
    assert MARKER not in repr(logs)
    assert SALT not in repr(logs)
    hashing.pump_until_quiet()
    texts = warehouse_texts(hashing)
    assert MARKER not in texts
    assert "acct-" not in texts
    tables = {t.names.name: t for t in hashing.tables}
    assert {c.source: c.type.final for c in tables["PEOPLE"].columns if c.hashed} == {
        "email": "VARCHAR(64)",
        "born": "VARCHAR(64)",
        "seen": "VARCHAR(64)",
    }
    people = ["id", "name", "email", "born", "seen"]
    got = warehouse_rows(hashing, "PEOPLE", people)
    assert got == expected_rows(pg_dsn, "people", people, {"email", "born", "seen"})
    emails = {r[2] for r in got}
    assert None in emails
    assert hashed("") in emails
    accounts = ["code", "owner", "balance"]
    got = warehouse_rows(hashing, "ACCOUNTS", accounts)
    assert got == expected_rows(pg_dsn, "accounts", accounts, {"code", "owner"})
    assert len(got) >= 40
    results = {r.warehouse_table: r for r in verify_group(settings)}
    assert results["PEOPLE"].equal
    assert not results["PEOPLE"].not_verified
    assert "email" in results["PEOPLE"].null_only_columns
    assert results["ACCOUNTS"].not_verified.startswith("its key column code is hashed")


async def test_verify_reports_a_hashed_value_as_its_hash(
    pg_dsn: str, hashing: LocalWarehouse
) -> None:
    """A row whose hashed email and clear name were both changed in the warehouse: ``verify``
    names both columns, the email with the source's hash (computed from the source's object
    text) and the warehouse's value, never the clear email."""
    settings = hashing.settings
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    hashing.pump_until_quiet()
    hashing.query("UPDATE PEOPLE SET EMAIL = 'tampered', NAME = 'x' WHERE ID = 4")
    results = {r.warehouse_table: r for r in verify_group(settings)}
    (difference,) = results["PEOPLE"].differences
    changed = {c.column: (c.source, c.warehouse) for c in difference.columns}
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT email FROM people WHERE id = 4").fetchone()
    assert row is not None
    assert changed == {"name": ("name 3", "x"), "email": (hashed(row[0]), "tampered")}
    assert MARKER not in "\n".join(results["PEOPLE"].lines())


async def test_another_salt_is_refused_at_start(
    pg_dsn: str, hashing: LocalWarehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a table's values are hashed, a daemon started with another salt stops before
    exporting anything, with the sentence saying why and what to do; the salt is in no
    message; the first salt is accepted again."""
    settings = hashing.settings
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    other = "another-salt-entirely-0000"
    monkeypatch.setenv("CDC_HASH_SALT", other)
    with pytest.raises(ConfigError) as caught:
        await export_until_idle(settings)
    message = str(caught.value)
    assert message.startswith(
        "public.people: the salt of its hash_columns is not the one its values were hashed "
        "with so far"
    )
    assert "restore the previous salt, or export the table again" in message
    assert other not in message
    assert SALT not in message
    monkeypatch.setenv("CDC_HASH_SALT", SALT)
    assert await export_until_idle(settings) == 0


async def test_a_ledger_from_before_hash_columns_is_upgraded_by_init(
    pg_dsn: str, hashing: LocalWarehouse
) -> None:
    """A ledger without ``hash_salts`` (schema 4): a daemon with hash_columns stops with the
    sentence to run ``init``, which adds the table in place (nothing else moves); the daemon
    then records the salt and exports."""
    settings = hashing.settings
    assert await init(settings) == 0
    schema = settings.state.schema_
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {schema}.hash_salts")
        conn.execute(f"UPDATE {schema}.meta SET value = '4' WHERE key = 'schema_version'")
    worker_error = None
    try:
        await Worker(settings, exit_when_idle=True).serve(shutdown_trigger=asyncio.Event().wait)
    except StateError as exc:
        worker_error = str(exc)
    assert worker_error == (
        f"the ledger schema '{schema}' predates hash_columns: run `cdc-daemon init` (it adds "
        "their table)"
    )
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    with psycopg.connect(pg_dsn) as conn:
        salts = conn.execute(f"SELECT table_name FROM {schema}.hash_salts ORDER BY 1").fetchall()
        (version,) = conn.execute(
            f"SELECT value FROM {schema}.meta WHERE key = 'schema_version'"
        ).fetchone() or (None,)
    assert [s[0] for s in salts] == ["public.accounts", "public.people"]
    assert version == str(SCHEMA_VERSION)


async def test_a_backfill_hashes_as_the_export_and_refuses_another_salt(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sample's table with its country and description hashed: the export's and a
    backfill's objects (one more COPY path) hold in those fields only NULL or the HMAC of the
    source's text, the same hash for the same value in both, every country's hash found; a
    backfill under another salt stops before writing anything, with the sentence why."""
    monkeypatch.setenv("CDC_HASH_SALT", SALT)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 1500, days=8)
        conn.execute("UPDATE ecommerce_sales SET description = 'a,\"b\"' WHERE id % 50 = 0")
        countries = {
            str(r[0]) for r in conn.execute("SELECT DISTINCT country FROM ecommerce_sales")
        }
        descriptions = {
            str(r[0])
            for r in conn.execute("SELECT DISTINCT description FROM ecommerce_sales")
            if r[0] is not None
        }
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[{**SAMPLE_TABLE, "hash_columns": ["country", "description"]}],
    )
    assert await export_until_idle(settings) == 0
    request = parse_request("2010-12-02", "2010-12-06", jobs="2")
    assert await run_backfill(settings, request) == 0
    bodies = object_bodies(s3_client, bucket)
    backfilled = [k for k in bodies if "/backfill-" in k]
    assert backfilled
    found: dict[str, set[str]] = {"live": set(), "backfill": set()}
    for key, body in bodies.items():
        header, *rows = csv.reader(io.StringIO(body.decode(), newline=""))
        for row in rows:
            values = dict(zip(header, row, strict=True))
            assert values["country"] in {hashed(c) for c in countries}, key
            assert values["description"] in {hashed(d) for d in descriptions} | {""}, key
            found["backfill" if "/backfill-" in key else "live"].add(values["country"])
    assert found["backfill"] <= found["live"] == {hashed(c) for c in countries}
    monkeypatch.setenv("CDC_HASH_SALT", "another-salt-entirely-0000")
    objects = len(bodies)
    with pytest.raises(ConfigError, match=r"^public\.ecommerce_sales: the salt of its"):
        await run_backfill(settings, parse_request("2010-12-02", "2010-12-04"))
    assert len(object_bodies(s3_client, bucket)) == objects
