"""The daemon's start lines name the group and its tables, with each table's partition and
watermark columns (never one table standing for the group), and in logical mode the hot path."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from structlog.testing import capture_logs

from cdc_daemon.cli import init
from cdc_daemon.local.services import LocalS3
from cdc_daemon.source import hotpath
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


async def test_logical_start_line_names_the_hot_path(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In logical mode ``daemon_started`` says once which hot path the changes take: the
    compiled core when it was built (``compiled``), the pure-Python path and why under
    CDC_DAEMON_PURE_PYTHON=1; it carries no watermark columns."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.t (id bigserial PRIMARY KEY, v text)")
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        postgres={"table": "public.t"},
        capture={"mode": "logical"},
    )
    assert await init(settings) == 0
    for pure in (False, True):
        monkeypatch.setenv(hotpath.PURE_ENV, "1" if pure else "0")
        with capture_logs() as logs:
            assert await export_until_idle(settings) == 0
        (started,) = [e for e in logs if e["event"] == "daemon_started"]
        assert "watermark_columns" not in started
        if pure:
            assert started["hot_path"] == "python (CDC_DAEMON_PURE_PYTHON=1)"
        else:
            built = hotpath.built() is not None
            assert started["hot_path"] == (
                "compiled" if built else "python (the C extension was not built)"
            )
