"""``cdc-daemon reconcile`` without ``--once``: the reconciler on its own, as a process, until
it is told to stop."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import psycopg

from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3
from cdc_daemon.state.ledger import Status
from cdc_daemon.state.store import Store
from tests.e2e.daemon import start, stop_daemon, wait_for_event, write_config
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, make_settings


async def test_reconcile_runs_rounds_until_sigterm(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> None:
    """Started without ``--once``, reconcile confirms the batches Snowpipe loaded (its round's
    ``reconciled`` line), keeps going (a ``completeness_checked`` line, from the loop's
    schedule), and on SIGTERM logs ``reconciler_stopped`` and exits 0; the ledger then holds
    every batch as loaded."""
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path, batch={"max_rows": 1_500})
    wh = start_warehouse(settings, warehouse_dir)
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            generate_sales(conn, 3_000, days=5)
        assert await export_until_idle(wh.settings) == 0
        wh.pump_until_quiet()
        snowflake = {
            **wh.settings_overrides()["snowflake"],
            "database": wh.settings.snowflake.database,
            "reconcile_interval_s": 0.2,
        }
        config = write_config(
            tmp_path,
            pg_dsn,
            s3_server,
            bucket,
            snowflake=snowflake,
            capture={"partition_column": "invoice_date"},
        )
        proc = start(config, command="reconcile")
        try:
            seen = wait_for_event(proc, "reconciled")
            loaded = seen[-1]["loaded"]
            seen += wait_for_event(proc, "completeness_checked")
            out, err = stop_daemon(proc, signal.SIGTERM)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-3000:]
        events = [r["event"] for r in seen] + [json.loads(x)["event"] for x in out.splitlines()]
        assert events[0] == "reconciler_started"
        assert events[-1] == "reconciler_stopped"
        assert "shutdown_requested" in events
        store = await Store.from_settings(settings)
        try:
            batches = await store.batches(settings.table)
        finally:
            await store.close()
        assert loaded == len(batches) > 1
        assert {b.status for b in batches} == {Status.LOADED}
    finally:
        wh.stop()
