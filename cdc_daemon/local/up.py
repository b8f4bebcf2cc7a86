"""``cdc-daemon local up --dir DIR`` / ``local down --dir DIR``: the three local services left
running in the background, for pointing the daemon at your own tables.

``up`` starts ``cdc-daemon local serve --dir DIR`` as a process of its own session (it
survives the shell), which starts a PostgreSQL cluster (a temporary one, removed by ``down``),
moto's S3 server
with S3 -> SQS notifications, and the local warehouse (fakesnow's HTTP server, the Snowpipe
stand-in and the task runner, the same code the demo runs), then writes ``DIR/cdc.toml`` (a
daemon configuration for them, to which you add ``[[tables]]``) and ``DIR/local.json`` (how to
reach each, with the keyword arguments ``snowflake.connector.connect()`` takes for the local
warehouse). ``up`` returns once that file is there: every service answered. The serving
process then feeds the warehouse every second (new objects through the pipes, the merge tasks)
until ``down`` sends it SIGTERM.

The warehouse starts empty: ``cdc-daemon --config DIR/cdc.toml snowflake apply`` creates the
objects for the configured tables, as against a real account.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from cdc_daemon.errors import ConfigError
from cdc_daemon.local.services import LocalPostgres

log = structlog.get_logger()

BUCKET = "cdc-local"
STATE = "local.json"
CONFIG = "cdc.toml"
PREVIOUS_CONFIG = "cdc.toml.previous"


def _running(folder: Path) -> dict[str, Any] | None:
    """DIR's local.json when the process that wrote it is alive."""
    path = folder / STATE
    if not path.exists():
        return None
    info: dict[str, Any] = json.loads(path.read_text())
    try:
        os.kill(int(info["pid"]), 0)
    except (ProcessLookupError, PermissionError, KeyError, ValueError):
        return None
    return info


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (killed, not yet reaped by its parent) answers signal 0 too
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def up(folder: Path, timeout_s: float = 180) -> int:
    folder = folder.resolve()
    running = _running(folder)
    if running is not None:
        raise ConfigError(
            f"{folder} already holds running services (pid {running['pid']}): "
            f"cdc-daemon local down --dir {folder} stops them"
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STATE).unlink(missing_ok=True)
    with (folder / "local.log").open("ab") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "cdc_daemon", "local", "serve", "--dir", str(folder)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while not (folder / STATE).exists():
        if child.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            tail = (folder / "local.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise ConfigError(
                f"the local services did not start (see {folder / 'local.log'}): "
                + " / ".join(tail)
            )
        time.sleep(0.2)
    info = json.loads((folder / STATE).read_text())
    print(json.dumps(info, indent=2))
    print(
        f"\nRunning (pid {info['pid']}). Add your [[tables]] to {folder / CONFIG}, then:\n"
        "  export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local\n"
        f"  cdc-daemon --config {folder / CONFIG} init\n"
        f"  cdc-daemon --config {folder / CONFIG} snowflake apply\n"
        f"  cdc-daemon --config {folder / CONFIG} run\n"
        f"Stop with: cdc-daemon local down --dir {folder}"
    )
    return 0


def down(folder: Path, timeout_s: float = 30) -> int:
    folder = folder.resolve()
    running = _running(folder)
    if running is None:
        (folder / STATE).unlink(missing_ok=True)
        raise ConfigError(f"no local services are running in {folder}")
    pid = int(running["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:  # until the services are stopped
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    # S3 and the warehouse are threads of the serving process and end with it; PostgreSQL runs
    # on its own (pg_ctl starts it detached), so a serving process killed while stuck (in a
    # statement, or stopped) leaves it running: stop it here, whatever the serving process did.
    cluster = running.get("postgres_folder")
    if cluster:
        port = int(running.get("postgres_port") or 0)
        LocalPostgres.existing(Path(cluster), port).stop()
    (folder / STATE).unlink(missing_ok=True)
    print(f"stopped the local services of {folder}")
    return 0


def _toml(value: object) -> str:
    return json.dumps(value)  # a TOML basic string or integer is the same as JSON's


def serve(folder: Path) -> int:
    """The serving process: start the three services, write DIR/cdc.toml and DIR/local.json,
    feed the warehouse until SIGTERM."""
    from cdc_daemon.config import load_settings
    from cdc_daemon.local.sample import SAMPLE_TABLE
    from cdc_daemon.local.services import LocalS3
    from cdc_daemon.local.warehouse import LocalWarehouse
    from cdc_daemon.warehouse.sql import Statement

    folder = folder.resolve()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # The cluster in the system's temporary folder: initdb runs as the postgres user when
    # this runs as root, and DIR's parents may not be open to it.
    pg = LocalPostgres()
    s3 = LocalS3()
    warehouse: LocalWarehouse | None = None
    try:
        pg.start()
        s3.start()
        import boto3  # type: ignore[import-untyped]

        boto3.client("s3", endpoint_url=s3.endpoint_url, region_name="us-east-1").create_bucket(
            Bucket=BUCKET
        )
        spool = folder / "spool"
        spool.mkdir(exist_ok=True)
        # The serving process applies nothing (the user's `snowflake apply` does, for the tables
        # of DIR/cdc.toml): the sample's table only completes its settings and is never read.
        base = load_settings(
            None,
            postgres={"dsn": pg.dsn},
            tables=[SAMPLE_TABLE],
            s3={"endpoint_url": s3.endpoint_url, "bucket": BUCKET},
            batch={"spool_dir": str(spool)},
        )
        warehouse = LocalWarehouse(base, folder / "warehouse").start()
        warehouse.connect_notifications()
        sf = warehouse.settings.snowflake
        # The database and schema, and the stand-ins' tables, before anything is applied.
        for text in (
            f"CREATE DATABASE IF NOT EXISTS {sf.database}",
            f"CREATE SCHEMA IF NOT EXISTS {sf.database}.{sf.schema_}",
            f"USE SCHEMA {sf.database}.{sf.schema_}",
        ):
            warehouse.wh.dialect.execute_ddl(warehouse.wh, Statement("00_database.sql", text))
        warehouse.record_stage()
        if (folder / CONFIG).exists():
            # A configuration of an earlier `local up` (with the user's [[tables]]) names
            # services that are gone: kept beside the new one rather than lost.
            (folder / CONFIG).replace(folder / PREVIOUS_CONFIG)
            log.warning("local_config_kept", previous=str(folder / PREVIOUS_CONFIG))
        (folder / CONFIG).write_text(
            "# cdc-daemon against the local services of `cdc-daemon local up`.\n"
            "# Name the tables to capture (there is no default table), e.g.:\n"
            '#   [[tables]]\n#   name = "public.orders"\n#   partition_column = "placed"\n'
            "[postgres]\n"
            f"dsn = {_toml(pg.dsn)}\n\n"
            "[s3]\n"
            f"endpoint_url = {_toml(s3.endpoint_url)}\nbucket = {_toml(BUCKET)}\n\n"
            "[batch]\n"
            f"spool_dir = {_toml(str(spool))}\n\n"
            "[snowflake]\n"
            f'account = "fakesnow"\nuser = "fake"\npassword = "snow"\n'
            f'host = "127.0.0.1"\nport = {sf.port}\nprotocol = "http"\ndialect = "emulator"\n'
            "reconcile_interval_s = 5\n"
        )
        info = {
            "pid": os.getpid(),
            "postgres_dsn": pg.dsn,
            "s3_endpoint_url": s3.endpoint_url,
            "bucket": BUCKET,
            "config": str(folder / CONFIG),
            "postgres_folder": str(pg.folder),
            "postgres_port": pg.port,
            "snowflake": {
                "account": "fakesnow",
                "user": "fake",
                "password": "snow",
                "host": "127.0.0.1",
                "port": sf.port,
                "protocol": "http",
                "database": sf.database,
                "schema": sf.schema_,
            },
        }
        partial = folder / (STATE + ".part")
        partial.write_text(json.dumps(info, indent=2) + "\n")
        partial.replace(folder / STATE)  # `up` waits for it: all three answered
        log.info("local_services_started", **{k: v for k, v in info.items() if k != "snowflake"})
        warehouse.pump_forever(stop, 1.0)
        return 0
    finally:
        (folder / STATE).unlink(missing_ok=True)
        if warehouse is not None:
            warehouse.stop()
        s3.stop()
        pg.stop()


def command(action: str, folder: Path) -> int:
    """``cdc-daemon local up|down|serve --dir DIR``."""
    if action == "up":
        return up(folder)
    if action == "down":
        return down(folder)
    return serve(folder)
