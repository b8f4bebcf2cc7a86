"""Watermark mode on tables keyed by something other than their watermark: a uuid and a text
primary key, each with a column a sequence fills named as ``watermark_column``. The warehouse
merges by the key; the watermark finds new rows, late commits included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from cdc_daemon.cli import init
from cdc_daemon.local.services import LocalS3
from tests.helpers import differences, export_until_idle, make_settings, object_bodies, rebuild

TABLES = {"tickets": "id", "codes": "code"}


def insert(conn: psycopg.Connection[Any], rows: int) -> None:
    conn.execute(
        "INSERT INTO tickets (title) SELECT 'ticket ' || g FROM generate_series(1, %s) g", (rows,)
    )
    conn.execute(
        "INSERT INTO codes (code, label) SELECT md5(random()::text || g), 'label ' || g"
        " FROM generate_series(1, %s) g",
        (rows,),
    )


def exported_rows(s3_client: Any, bucket: str) -> dict[str, int]:
    """Rows in each table's objects (each object's first line is its header)."""
    return {
        table: sum(
            len(body.splitlines()) - 1
            for body in object_bodies(s3_client, bucket, f"public.{table}/").values()
        )
        for table in TABLES
    }


async def test_uuid_and_text_keys_with_a_sequence_watermark_lose_no_late_commit(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A group of a uuid-keyed and a text-keyed table, each with an identity or serial column
    as ``watermark_column``: ``init`` accepts both; a transaction that took lower watermark
    values commits only after higher ones were exported, and its rows still arrive; each
    table rebuilt by its own key equals its source, every row exactly once."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE tickets (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
            " seq bigint GENERATED ALWAYS AS IDENTITY, title text,"
            " opened timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute("CREATE TABLE codes (code text PRIMARY KEY, n bigserial UNIQUE, label text)")
        insert(conn, 40)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[
            {"name": "tickets", "watermark_column": "seq"},
            {"name": "codes", "watermark_column": "n"},
        ],
        capture={"group": "keys"},
        batch={"max_rows": 25},
    )
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0

    with psycopg.connect(pg_dsn) as late, psycopg.connect(pg_dsn, autocommit=True) as conn:
        insert(late, 3)  # takes seq/n 41-43, not committed yet
        insert(conn, 30)  # 44-73, committed
        assert await export_until_idle(settings) == 0
        # The rows after the open transaction's went out without waiting for it.
        assert exported_rows(s3_client, bucket) == {"tickets": 70, "codes": 70}
        late.commit()
    assert await export_until_idle(settings) == 0

    for table, key in TABLES.items():
        rebuild(pg_dsn, object_bodies(s3_client, bucket, f"public.{table}/"), table, (key,))
        source, rebuilt, missing, extra = differences(pg_dsn, table)
        assert (source, missing, extra) == (73, 0, 0), table
        assert rebuilt == source
        with psycopg.connect(pg_dsn) as conn:
            raw = conn.execute(f"SELECT count(*) FROM {table}_raw").fetchone()
        assert raw == (73,), table
