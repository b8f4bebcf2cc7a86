"""Shared test helpers: settings for the test services, running the daemon (until idle, or for
a block of the test), and rebuilding the table from the objects in S3 to compare it with the
source."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import structlog
import zstandard
from psycopg import sql
from psycopg.rows import TupleRow

from cdc_daemon.config import Settings, load_settings
from cdc_daemon.local.sample import SAMPLE_TABLE, sample_snowflake
from cdc_daemon.local.services import LocalS3
from cdc_daemon.state.store import Store
from cdc_daemon.worker import Worker

SEED_TABLE = SAMPLE_TABLE["name"]
SEED_PARTITION = SAMPLE_TABLE["partition_column"]
# The seed's table as the demo configures it (``load_settings`` keyword arguments): SALES in the
# warehouse, with the sample's models.
SEED: dict[str, Any] = {"tables": [SAMPLE_TABLE], "snowflake": sample_snowflake()}


def seed_settings(**sections: Any) -> Settings:
    """``load_settings`` on the seed's configuration and ``sections`` (a ``snowflake`` section
    adds to the seed's; ``tables`` replaces them)."""
    merged = {**SEED, **sections}
    merged["snowflake"] = {**SEED["snowflake"], **sections.get("snowflake", {})}
    return load_settings(None, **merged)


def make_settings(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, **sections: Any
) -> Settings:
    batch = {"spool_dir": str(tmp_path), "max_age_s": 0, **sections.pop("batch", {})}
    capture = {"poll_interval_s": 0.05, **sections.pop("capture", {})}
    postgres = {"dsn": pg_dsn, **sections.pop("postgres", {})}
    if "tables" not in sections and "table" not in postgres:
        # The seed's table (tests.schemas / local.sample), as the demo configures it; a
        # ``capture.partition_column`` given stands for the table's own.
        partition = capture.pop("partition_column", SEED_PARTITION)
        sections["tables"] = [{**SAMPLE_TABLE, "partition_column": partition}]
        sections["snowflake"] = {**sample_snowflake(), **sections.get("snowflake", {})}
    return load_settings(
        None,
        postgres=postgres,
        s3={"endpoint_url": s3_server.endpoint_url, "bucket": bucket, **sections.pop("s3", {})},
        batch=batch,
        capture=capture,
        **sections,
    )


def fetch_one(cursor: psycopg.Cursor[TupleRow]) -> TupleRow:
    """The row a query returns: one that returns none fails the test here."""
    row = cursor.fetchone()
    assert row is not None, "the query returned no row"
    return row


async def init_ledger(settings: Settings) -> None:
    store = await Store.from_settings(settings)
    try:
        await store.init_schema()
    finally:
        await store.close()


async def _never() -> None:
    await asyncio.Event().wait()


async def export_until_idle(settings: Settings) -> int:
    """Run the daemon in this process until everything committed is exported."""
    await init_ledger(settings)
    return await Worker(settings, exit_when_idle=True).serve(shutdown_trigger=_never)


class RunningDaemon:
    """The daemon as a task of the test's event loop (what ``running_daemon`` yields)."""

    def __init__(self, task: asyncio.Task[int], stop: asyncio.Event) -> None:
        self.task = task
        self._stop = stop
        self.collected = False

    def done(self) -> bool:
        return self.task.done()

    async def ended(self, seconds: float) -> int:
        """Wait up to ``seconds`` for the daemon to end by itself: its exit code, or what it
        failed with raised here. Leaving the block then checks nothing more."""
        self.collected = True
        return await asyncio.wait_for(self.task, seconds)

    async def stopped(self, seconds: float = 30) -> int:
        """Ask the daemon to stop (what SIGTERM does) and wait up to ``seconds`` for it."""
        self._stop.set()
        return await self.ended(seconds)


@contextlib.asynccontextmanager
async def running_daemon(settings: Settings, stop_s: float = 30) -> AsyncIterator[RunningDaemon]:
    """The daemon in this process (its ledger initialised) for the body of the block. Leaving
    the block stops it and asserts it exits 0 within ``stop_s`` seconds, unless the body
    already took its outcome (``stopped``, ``ended``). If the body fails, the daemon is stopped
    all the same and the body's exception is the one raised, with the daemon's own failure, if
    any, added as a note."""
    await init_ledger(settings)
    stop = asyncio.Event()
    daemon = RunningDaemon(
        asyncio.create_task(Worker(settings).serve(shutdown_trigger=stop.wait)), stop
    )
    try:
        yield daemon
    except BaseException as failure:
        stop.set()
        if not daemon.collected:
            try:
                await asyncio.wait_for(daemon.task, stop_s)
            except Exception as also:  # noqa: BLE001 - reported on the body's failure
                failure.add_note(f"the daemon failed too: {also!r}")
        raise
    if not daemon.collected:
        assert await daemon.stopped(stop_s) == 0


async def wait_until(predicate: Callable[[], object], seconds: float = 60) -> None:
    """Poll a blocking predicate (in a thread) until it holds, or fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def object_bodies(s3_client: Any, bucket: str, prefix: str = "") -> dict[str, bytes]:
    """Every object under the prefix, decompressed, by key."""
    out = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            body = s3_client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            if item["Key"].endswith(".gz"):
                body = gzip.decompress(body)
            elif item["Key"].endswith(".zst"):
                body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
            out[item["Key"]] = body
    return out


def _raw_table(
    conn: psycopg.Connection[TupleRow], schema: str, name: str, more: str = ""
) -> sql.Identifier:
    """``<name>_raw`` (made anew, empty): the table's columns and the objects' ``_cdc_*``
    columns (``more``: the keyless ones), in a session set to UTC."""
    conn.execute("SET TimeZone = 'UTC'")
    raw = sql.Identifier(schema, f"{name}_raw")
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(raw))
    conn.execute(
        sql.SQL(
            "CREATE TABLE {raw} AS SELECT *, ''::text AS _cdc_op, 0::bigint AS _cdc_seq,"
            " now() AS _cdc_ts, ''::text AS _cdc_unchanged, ''::text AS _cdc_quarantined{more}"
            " FROM {t} WITH NO DATA"
        ).format(raw=raw, t=sql.Identifier(schema, name), more=sql.SQL(more))
    )
    return raw


def rebuild(
    dsn: str,
    bodies: dict[str, bytes],
    table: str = "ecommerce_sales",
    key: Sequence[str] = ("id",),
) -> str:
    """Load every object into ``<table>_raw`` with COPY (which, like Snowflake's file format,
    reads an unquoted empty field as NULL and ``""`` as an empty string), by the column names
    of each object's header; keep the row with the highest ``_cdc_seq`` per key unless it is a
    delete (``_cdc_op = 'D'``), a column that row names in ``_cdc_unchanged`` taken from the
    latest row of that key that has it (the warehouse merge's rule); a quarantined row's
    withheld values are NULL there, as in the warehouse; return the view's name.
    ``table`` may be ``schema.table``, each part its exact text unquoted (``adv.Order Lines``);
    the raw table and the view go to the source's schema."""
    schema, _, name = table.rpartition(".")
    schema = schema or "public"
    with psycopg.connect(dsn, autocommit=True) as conn:
        raw = _raw_table(conn, schema, name)
        # The source's columns, in order: (name, type, is bytea, is an array).
        catalog = [
            (str(n), str(t), bool(b), bool(a))
            for n, t, b, a in conn.execute(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod),"
                " a.atttypid = 'bytea'::regtype, t.typinput = 'array_in'::regproc"
                " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
                " WHERE a.attrelid = (quote_ident(%s) || '.' || quote_ident(%s))::regclass"
                " AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                (schema, name),
            )
        ]
        names = [c[0] for c in catalog]
        # bytea is written as hex without PostgreSQL's \x (what BINARY_FORMAT = HEX reads).
        binary = [c[0] for c in catalog if c[2]]
        # Arrays are written as JSON arrays (read back below, for the values these tests use:
        # no brackets or JSON escapes inside strings).
        arrays = {c[0]: c[1] for c in catalog if c[3]}
        for column in [*binary, *arrays]:
            conn.execute(
                sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE text").format(
                    raw, sql.Identifier(column)
                )
            )
        for object_key, body in bodies.items():
            if "_quarantine/" in object_key:
                continue  # never loaded: the rows' warehouse form is in their day's -q object
            header = next(csv.reader([body.split(b"\n", 1)[0].decode()]))
            columns = sql.SQL(", ").join(map(sql.Identifier, header))
            with conn.cursor().copy(
                sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv, HEADER true)").format(raw, columns)
            ) as copy:
                copy.write(body)
        lacking = {
            str(c)
            for (c,) in conn.execute(
                sql.SQL(
                    "SELECT DISTINCT unnest(string_to_array(_cdc_unchanged, ',')) FROM {}"
                ).format(raw)
            )
        }
        keys = sql.SQL(", ").join(map(sql.Identifier, key))
        same_key = sql.SQL(" AND ").join(
            sql.SQL("r.{k} = w.{k}").format(k=sql.Identifier(k)) for k in key
        )
        picked = []
        for column in names:
            c = sql.Identifier(column)
            value: sql.Composable = sql.SQL("w.{}").format(c)
            if column in lacking:
                value = sql.SQL(
                    "(SELECT r.{c} FROM {raw} r WHERE {same} AND NOT ({name} = ANY("
                    "coalesce(string_to_array(r._cdc_unchanged, ','), '{{}}')))"
                    " ORDER BY r._cdc_seq DESC LIMIT 1)"
                ).format(c=c, raw=raw, same=same_key, name=sql.Literal(column))
            if column in binary:
                value = sql.SQL("decode({}, 'hex')").format(value)
            if column in arrays:
                value = sql.SQL("translate({}, '[]', '{{}}')::{}").format(
                    value, sql.SQL(arrays[column])
                )
            picked.append(sql.SQL("{} AS {}").format(value, c))
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE VIEW {v} AS SELECT {picked} FROM (SELECT DISTINCT ON ({k}) *"
                " FROM {raw} ORDER BY {k}, _cdc_seq DESC) w WHERE _cdc_op <> 'D'"
            ).format(
                v=sql.Identifier(schema, f"{name}_rebuilt"),
                raw=raw,
                k=keys,
                picked=sql.SQL(", ").join(picked),
            )
        )
    return f"{name}_rebuilt"


def rebuild_keyless(dsn: str, bodies: dict[str, bytes], table: str) -> str:
    """A keyless table from its objects (docs/logical.md#keyless-tables), by the rule the
    warehouse merge follows: per ``_cdc_row``, the ``S`` rows of the latest snapshot (highest
    consistent point, their ``_cdc_seq``) plus the ``I`` and ``U`` rows minus the ``D`` rows
    committed after it (by ``_cdc_seq``, the commit LSN), each change once (by ``_cdc_seq`` and
    ``_cdc_nth``); each row written as many times as it has copies. Values as ``rebuild``
    reads them (no arrays or bytea here); returns the view's name, ``<table>_rebuilt``."""
    schema, _, name = table.rpartition(".")
    schema = schema or "public"
    with psycopg.connect(dsn, autocommit=True) as conn:
        raw = _raw_table(conn, schema, name, ", 0::bigint AS _cdc_nth, ''::text AS _cdc_row")
        names = [
            str(n)
            for (n,) in conn.execute(
                "SELECT attname FROM pg_attribute"
                " WHERE attrelid = (quote_ident(%s) || '.' || quote_ident(%s))::regclass"
                " AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                (schema, name),
            )
        ]
        for object_key, body in bodies.items():
            if "_quarantine/" in object_key:
                continue
            header = next(csv.reader([body.split(b"\n", 1)[0].decode()]))
            assert header[-1] == "_cdc_row", f"{object_key} is no keyless table's object"
            columns = sql.SQL(", ").join(map(sql.Identifier, header))
            with conn.cursor().copy(
                sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv, HEADER true)").format(raw, columns)
            ) as copy:
                copy.write(body)
        values = sql.SQL(", ").join(sql.SQL("v.{}").format(sql.Identifier(n)) for n in names)
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE VIEW {v} AS"
                " WITH once AS (SELECT DISTINCT ON (_cdc_seq, _cdc_nth) *, _cdc_seq AS _pos"
                "  FROM {raw} ORDER BY _cdc_seq, _cdc_nth),"
                " snap AS (SELECT coalesce(max(_pos), -1) AS _at FROM once WHERE _cdc_op = 'S'),"
                " counted AS (SELECT _cdc_row, sum(CASE WHEN _cdc_op = 'D' THEN -1 ELSE 1 END)"
                "  AS copies FROM once, snap WHERE (_cdc_op = 'S' AND _pos = _at)"
                "  OR (_cdc_op <> 'S' AND _pos > _at) GROUP BY _cdc_row),"
                " one AS (SELECT DISTINCT ON (_cdc_row) * FROM once ORDER BY _cdc_row)"
                " SELECT {values} FROM counted c JOIN one v USING (_cdc_row),"
                " generate_series(1, c.copies::int)"
            ).format(v=sql.Identifier(schema, f"{name}_rebuilt"), raw=raw, values=values)
        )
    return f"{name}_rebuilt"


def differences(dsn: str, table: str = "ecommerce_sales") -> tuple[int, int, int, int]:
    """(source rows, rebuilt rows, rows only in source, rows only in rebuilt): every column of
    every row compared by value (numeric, timestamptz, NULL vs empty)."""
    schema, _, name = table.rpartition(".")
    schema = schema or "public"
    with psycopg.connect(dsn, autocommit=True) as conn:
        t = sql.Identifier(schema, name)
        cols = sql.SQL(", ").join(
            sql.Identifier(r[0])
            for r in conn.execute(
                "SELECT attname FROM pg_attribute"
                " WHERE attrelid = (quote_ident(%s) || '.' || quote_ident(%s))::regclass"
                " AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                (schema, name),
            )
        )
        rebuilt = sql.Identifier(schema, f"{name}_rebuilt")
        row = conn.execute(
            sql.SQL(
                "SELECT (SELECT count(*) FROM {t}), (SELECT count(*) FROM {r}),"
                " (SELECT count(*) FROM (SELECT {c} FROM {t} EXCEPT ALL SELECT {c} FROM {r}) a),"
                " (SELECT count(*) FROM (SELECT {c} FROM {r} EXCEPT ALL SELECT {c} FROM {t}) b)"
            ).format(t=t, r=rebuilt, c=cols)
        ).fetchone()
        assert row is not None
        return (int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def assert_rebuilt_equals_source(dsn: str, s3_client: Any, bucket: str) -> dict[str, bytes]:
    bodies = object_bodies(s3_client, bucket)
    rebuild(dsn, bodies)
    source, rebuilt, missing, extra = differences(dsn)
    assert (missing, extra) == (0, 0), f"{missing} rows missing, {extra} rows different/extra"
    assert source == rebuilt
    return bodies


async def main_in_thread(argv: list[str], env: dict[str, str] | None = None) -> int:
    """``cdc-daemon <argv>`` (``cli.main``, which runs its own event loop) in a thread, with
    ``env`` set for it. main() also points structlog at the stdout of the moment (this test's
    capture): the defaults are restored after it, for the tests that follow."""
    from cdc_daemon.cli import main

    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        return await asyncio.to_thread(main, argv)
    finally:
        structlog.reset_defaults()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
