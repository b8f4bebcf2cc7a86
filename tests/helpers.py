"""Shared test helpers: settings for the test services, running the daemon until idle, and
rebuilding the table from the objects in S3 to compare it with the source."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import zstandard
from psycopg import sql

from cdc_daemon.config import Settings, load_settings
from cdc_daemon.local.services import LocalS3
from cdc_daemon.state.store import Store
from cdc_daemon.worker import Worker


def make_settings(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, **sections: dict[str, Any]
) -> Settings:
    batch = {"spool_dir": str(tmp_path), "max_age_s": 0, **sections.pop("batch", {})}
    capture = {"poll_interval_s": 0.05, **sections.pop("capture", {})}
    return load_settings(
        None,
        postgres={"dsn": pg_dsn, **sections.pop("postgres", {})},
        s3={"endpoint_url": s3_server.endpoint_url, "bucket": bucket, **sections.pop("s3", {})},
        batch=batch,
        capture=capture,
        **sections,
    )


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


async def run_daemon(settings: Settings) -> tuple[asyncio.Task[int], asyncio.Event]:
    """The daemon in this process, running until the returned event is set."""
    await init_ledger(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(Worker(settings).serve(shutdown_trigger=stop.wait))
    return task, stop


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


def rebuild(dsn: str, bodies: dict[str, bytes], table: str = "ecommerce_sales") -> str:
    """Load every object into ``<table>_rebuilt`` with COPY (which, like Snowflake's file
    format, reads an unquoted empty field as NULL and ``""`` as an empty string), keep the row
    with the highest ``_cdc_seq`` per id unless it is a delete (``_cdc_op = 'D'``), and return
    the name of that view."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        t = sql.Identifier(table)
        raw = sql.Identifier(f"{table}_raw")
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(raw))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {raw} AS SELECT *, ''::text AS _cdc_op, 0::bigint AS _cdc_seq,"
                " now() AS _cdc_ts FROM {t} WITH NO DATA"
            ).format(raw=raw, t=t)
        )
        for body in bodies.values():
            with conn.cursor().copy(
                sql.SQL("COPY {} FROM STDIN (FORMAT csv, HEADER match)").format(raw)
            ) as copy:
                copy.write(body)
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE VIEW {v} AS SELECT * FROM (SELECT DISTINCT ON (id) *"
                " FROM {raw} ORDER BY id, _cdc_seq DESC) w WHERE _cdc_op <> 'D'"
            ).format(v=sql.Identifier(f"{table}_rebuilt"), raw=raw)
        )
    return f"{table}_rebuilt"


def differences(dsn: str, table: str = "ecommerce_sales") -> tuple[int, int, int, int]:
    """(source rows, rebuilt rows, rows only in source, rows only in rebuilt): every column of
    every row compared by value (numeric, timestamptz, NULL vs empty)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        t = sql.Identifier(table)
        cols = sql.SQL(", ").join(
            sql.Identifier(r[0])
            for r in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
                " AND NOT attisdropped ORDER BY attnum",
                (table,),
            )
        )
        rebuilt = sql.Identifier(f"{table}_rebuilt")
        row = conn.execute(
            sql.SQL(
                "SELECT (SELECT count(*) FROM {t}), (SELECT count(*) FROM {r}),"
                " (SELECT count(*) FROM (SELECT {c} FROM {t} EXCEPT ALL SELECT {c} FROM {r}) a),"
                " (SELECT count(*) FROM (SELECT {c} FROM {r} EXCEPT ALL SELECT {c} FROM {t}) b)"
            ).format(t=t, r=rebuilt, c=cols)
        ).fetchone()
        assert row is not None
        return (int(row[0]), int(row[1]), int(row[2]), int(row[3]))  # type: ignore[call-overload]


def assert_rebuilt_equals_source(dsn: str, s3_client: Any, bucket: str) -> dict[str, bytes]:
    bodies = object_bodies(s3_client, bucket)
    rebuild(dsn, bodies)
    source, rebuilt, missing, extra = differences(dsn)
    assert (missing, extra) == (0, 0), f"{missing} rows missing, {extra} rows different/extra"
    assert source == rebuilt
    return bodies
