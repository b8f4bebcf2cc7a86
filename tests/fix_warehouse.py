"""The local warehouse (fakesnow's server, the Snowpipe stand-in, the task runner) for a test:
its own database, queue and stage folder, notifications from the test's bucket."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest

from cdc_daemon.config import Settings
from cdc_daemon.local.sample import create_sales_table
from cdc_daemon.local.warehouse import LocalWarehouse


def start_warehouse(
    settings: Settings, workdir: Path, port: int | None = None, database: str | None = None
) -> LocalWarehouse:
    """Apply ``snowflake/`` to a fresh database and subscribe to the settings' bucket. The
    returned warehouse's ``settings`` point the daemon and the reconciler at it. The warehouse
    is generated from the source tables' catalog: ``ecommerce_sales`` is created (empty) when
    it is the configured table and does not exist yet."""
    if settings.table == "public.ecommerce_sales":
        with psycopg.connect(settings.postgres.dsn.get_secret_value(), autocommit=True) as conn:
            create_sales_table(conn)
    name = database or f"T_{uuid.uuid4().hex[:10].upper()}"
    settings = settings.model_copy(
        update={"snowflake": settings.snowflake.model_copy(update={"database": name})}
    )
    wh = LocalWarehouse(settings, workdir, queue=f"snowpipe-{name.lower()}").start(port)
    wh.apply()
    wh.connect_notifications()
    return wh


@pytest.fixture
def warehouse_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """fakesnow keeps internal stages under tempfile's folder: keep them in the test's."""
    folder = tmp_path / "warehouse"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder
