"""The daemon's start lines name the group and its tables, with each table's partition and
watermark columns: never one table standing for the group."""

from __future__ import annotations

from pathlib import Path

import psycopg
from structlog.testing import capture_logs

from cdc_daemon.local.services import LocalS3
from tests.helpers import export_until_idle, make_settings


async def test_start_lines_name_the_group_and_its_tables(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """A watermark group of two tables (one partitioned by a date, one not, one with its own
    watermark column): ``daemon_starting`` and ``daemon_started`` carry the group and both
    tables, ``daemon_started`` each table's partition and watermark column, and neither has a
    ``table`` field."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA shop")
        conn.execute("CREATE TABLE shop.orders (id bigserial PRIMARY KEY, placed date)")
        conn.execute("CREATE TABLE shop.items (code text PRIMARY KEY, n bigserial)")
        conn.execute("INSERT INTO shop.orders (placed) VALUES ('2024-03-01')")
        conn.execute("INSERT INTO shop.items (code) VALUES ('a')")
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        capture={"group": "shop"},
        tables=[
            {"name": "shop.orders", "partition_column": "placed"},
            {"name": "shop.items", "watermark_column": "n"},
        ],
    )
    with capture_logs() as logs:
        assert await export_until_idle(settings) == 0
    (starting,) = [e for e in logs if e["event"] == "daemon_starting"]
    (started,) = [e for e in logs if e["event"] == "daemon_started"]
    for line in (starting, started):
        assert line["group"] == "shop"
        assert line["tables"] == ["shop.orders", "shop.items"]
        assert "table" not in line
    assert started["partition_columns"] == {"shop.orders": "placed", "shop.items": None}
    assert started["watermark_columns"] == {"shop.orders": "id", "shop.items": "n"}
