"""A local warehouse for tests and the demo: the real connector against fakesnow (DuckDB behind
Snowflake's HTTP API), fed by moto's S3 event notifications through SQS.

fakesnow runs the ``snowflake/`` SQL as written -- the database, file format, stage, tables,
MERGE, QUALIFY -- except four features it does not have. Each is emulated here, and only here:

- **PIPE** (``CREATE PIPE ... AS COPY``): ``LocalWarehouse.ingest()`` is the Snowpipe
  stand-in. It reads the S3 event notifications from SQS (decoding URL-encoded keys, dropping
  moto's test event and its duplicate event per multipart object), copies each new object
  into a local folder that the stage points at (``file://``, as fakesnow cannot read S3
  offline), and runs the pipe's own COPY for that one file. fakesnow's COPY cannot take a
  transformation (``SELECT $1, ..., METADATA$FILENAME ...``), so the pipe's COPY is split
  where it names stage columns: the ``$n`` columns are copied into a holding table with the
  same column list, file format and FILES, then inserted into the target with the metadata
  columns (file name, row number, load time). A file already loaded is skipped, as Snowpipe
  does: that is fakesnow's own COPY load metadata.
- **COPY_HISTORY / SYSTEM$PIPE_STATUS / ALTER PIPE ... REFRESH**: the stand-in writes each
  file's outcome (status, rows parsed and loaded, first error) to ``_EMU_COPY_HISTORY`` and
  its state as SYSTEM$PIPE_STATUS's JSON to ``_EMU_PIPE_STATUS``; a refresh is a row in
  ``_EMU_PIPE_REFRESH`` that the stand-in serves by listing the prefix in S3.
  ``EmulatorDialect`` reads and writes those tables (``warehouse/client.py`` has the real one).
- **STREAM** (append-only, on ``RAW_SALES``): a view of the landing rows whose (file, row)
  is not in ``_EMU_STREAM_CONSUMED``; the task runner adds the rows it merged, in the task's
  own transaction, which is what moves a real stream's offset.
- **TASK**: ``run_tasks()`` runs the statements between ``BEGIN TRANSACTION`` and ``COMMIT`` of
  each task's body, read from the rendered ``snowflake/70_tasks.sql`` (no second copy of the
  merge), the merge only when the stream has data (``SYSTEM$STREAM_HAS_DATA``). One by one,
  not in one transaction: fakesnow's MERGE writes to its catalog database, which DuckDB does
  not allow in a transaction on another database. The body is idempotent, so a run cut short
  is redone whole by the next one (the stream rows are marked consumed last).

Known differences from Snowflake: DuckDB reads a quoted empty field ("") as NULL, like an
unquoted one; ``_LOADED_AT`` is the time of the emulated COPY, not METADATA$START_SCAN_TIME.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import shutil
import threading
import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlglot
import structlog
from sqlglot import exp

from cdc_daemon.config import Settings, load_settings
from cdc_daemon.errors import CdcError
from cdc_daemon.local.services import free_port
from cdc_daemon.warehouse import sql
from cdc_daemon.warehouse.client import (
    LoadRecord,
    PipeStatus,
    StreamStatus,
    TaskStatus,
    Warehouse,
    consecutive_failures,
    load_record,
    parse_pipe_status,
)

log = structlog.get_logger()

_EMULATION_DDL = [
    """CREATE TABLE IF NOT EXISTS _EMU_COPY_HISTORY (
        FILE_NAME VARCHAR, STATUS VARCHAR, ROW_COUNT NUMBER, ROW_PARSED NUMBER,
        FIRST_ERROR_MESSAGE VARCHAR, LAST_LOAD_TIME TIMESTAMP_TZ)""",
    "CREATE TABLE IF NOT EXISTS _EMU_PIPE_STATUS (PIPE VARCHAR, STATUS VARCHAR)",
    """CREATE TABLE IF NOT EXISTS _EMU_PIPE_REFRESH (
        PREFIX VARCHAR, REQUESTED_AT TIMESTAMP_TZ, DONE_AT TIMESTAMP_TZ)""",
    "CREATE TABLE IF NOT EXISTS _EMU_STREAM_CONSUMED (_FILE VARCHAR, _FILE_ROW NUMBER)",
    """CREATE TABLE IF NOT EXISTS _EMU_TASK_HISTORY (
        NAME VARCHAR, STATE VARCHAR, ERROR_MESSAGE VARCHAR, SCHEDULED_TIME TIMESTAMP_TZ)""",
    "CREATE TABLE IF NOT EXISTS _EMU_TASK_STATE (NAME VARCHAR, STATE VARCHAR)",
    "CREATE TABLE IF NOT EXISTS _EMU_STREAM_STATE (STREAM VARCHAR, STALE_AFTER TIMESTAMP_TZ)",
]
# Snowflake's defaults: a task is suspended after this many failed runs in a row
# (SUSPEND_TASK_AFTER_NUM_FAILURES), and a stream not read for the table's retention extended up
# to this long goes stale (MAX_DATA_EXTENSION_TIME_IN_DAYS).
SUSPEND_AFTER_FAILURES = 10
STREAM_EXTENSION = timedelta(days=14)


class EmulatorDialect:
    """COPY_HISTORY, SYSTEM$PIPE_STATUS and ALTER PIPE ... REFRESH of the local warehouse."""

    def load_history(self, wh: Warehouse, since: datetime) -> list[LoadRecord]:
        rows = wh.query(
            "SELECT FILE_NAME, STATUS, ROW_COUNT, ROW_PARSED, FIRST_ERROR_MESSAGE, LAST_LOAD_TIME"
            " FROM _EMU_COPY_HISTORY WHERE LAST_LOAD_TIME >= %(since)s",
            {"since": since.isoformat()},
        )
        return [load_record(r) for r in rows]

    def pipe_status(self, wh: Warehouse) -> PipeStatus:
        rows = wh.query(
            "SELECT STATUS FROM _EMU_PIPE_STATUS WHERE PIPE = %(p)s",
            {"p": wh.settings.snowflake.pipe},
        )
        if not rows:
            return PipeStatus("STOPPED_NO_STAND_IN", 0, None, "the pipe stand-in never ran")
        return parse_pipe_status(str(rows[0]["STATUS"]))

    def refresh(self, wh: Warehouse, prefix: str) -> None:
        wh.execute(
            "INSERT INTO _EMU_PIPE_REFRESH (PREFIX, REQUESTED_AT) VALUES (%(p)s, %(t)s)",
            {"p": prefix, "t": datetime.now(UTC).isoformat()},
        )

    def tasks(self, wh: Warehouse) -> list[TaskStatus]:
        sf = wh.settings.snowflake
        states = {
            str(r["NAME"]): str(r["STATE"])
            for r in wh.query("SELECT NAME, STATE FROM _EMU_TASK_STATE")
        }
        out = []
        for name in (sf.merge_task, sf.cleanup_task):
            runs = wh.query(
                "SELECT STATE, ERROR_MESSAGE FROM _EMU_TASK_HISTORY WHERE NAME = %(t)s"
                " ORDER BY SCHEDULED_TIME DESC LIMIT 20",
                {"t": name},
            )
            failures, error = consecutive_failures(
                [(str(r["STATE"]), r["ERROR_MESSAGE"]) for r in runs]
            )
            out.append(TaskStatus(name, states.get(name, "missing"), failures, error))
        return out

    def stream(self, wh: Warehouse) -> StreamStatus | None:
        sf = wh.settings.snowflake
        rows = wh.query(
            "SELECT STALE_AFTER FROM _EMU_STREAM_STATE WHERE STREAM = %(s)s", {"s": sf.stream}
        )
        if not rows:
            return None
        stale_after = rows[0]["STALE_AFTER"]
        return StreamStatus(sf.stream, stale_after <= datetime.now(UTC), stale_after)


class _PipeCopy:
    """The pipe's COPY statement, split where fakesnow needs it split."""

    def __init__(self, copy_sql: str) -> None:
        tree = sqlglot.parse_one(copy_sql, read="snowflake")
        assert isinstance(tree, exp.Copy)
        target = tree.this
        assert isinstance(target, exp.Schema)
        self.table = target.this.sql("snowflake")
        columns = [c.name for c in target.expressions]
        (source,) = tree.args["files"]
        select = source.this if isinstance(source, exp.Subquery) else source
        assert isinstance(select, exp.Select)
        self.positional: list[tuple[int, str]] = []  # ($n, column)
        self.metadata: dict[str, str] = {}  # METADATA$... -> column
        for column, expr in zip(columns, select.expressions, strict=True):
            if isinstance(expr, exp.Parameter):
                self.positional.append((int(expr.this.name), column))
            else:
                self.metadata[expr.sql("snowflake").upper()] = column
        self.positional.sort()
        from_ = select.find(exp.From)
        assert from_ is not None
        stage = from_.this
        self.stage = stage.sql("snowflake").lstrip("@")
        fmt = copy_sql[copy_sql.upper().index("FILE_FORMAT") :].split(")")[0] + ")"
        self.file_format = fmt
        match = re.search(r"PATTERN\s*=\s*'([^']*)'", copy_sql, re.I)
        self.pattern = match.group(1) if match else ".*"

    @property
    def columns(self) -> str:
        return ", ".join(c for _, c in self.positional)

    def holding(self, width: int) -> str:
        """The holding table for files of ``width`` columns. A COPY with a transformation
        reads only the file columns it names ("There is no requirement for your data files to
        have the same number and ordering of columns as your target table"; the
        ERROR_ON_COLUMN_COUNT_MISMATCH option is ignored then:
        https://docs.snowflake.com/user-guide/data-load-transform), so a file with more
        columns than the pipe selects (a logical object's ``_cdc_unchanged``) lands in a table
        with room for them."""
        extra = max(0, width - len(self.positional))
        return "_EMU_PIPE_IN" if not extra else f"_EMU_PIPE_IN_{width}"

    def holding_ddl(self, width: int | None = None) -> list[str]:
        # DuckDB adds the hive partition folder (dt=...) as a last column: _EMU_DT takes it.
        width = len(self.positional) if width is None else width
        name = self.holding(width)
        extra = [
            f"ALTER TABLE {name} ADD COLUMN IF NOT EXISTS _EMU_X{n} VARCHAR"
            for n in range(len(self.positional) + 1, width + 1)
        ]
        return [
            f"CREATE TABLE IF NOT EXISTS {name} AS SELECT {self.columns}"
            f" FROM {self.table} WHERE 1 = 0",
            *extra,
            f"ALTER TABLE {name} ADD COLUMN IF NOT EXISTS _EMU_DT VARCHAR",
        ]

    def copy_file(self, relative: str, width: int | None = None) -> str:
        # No column list: fakesnow 0.12 names read_csv's columns column0..columnN, which DuckDB
        # zero-pads from ten columns on; without a list it inserts them by position.
        quoted = relative.replace("'", "''")
        name = self.holding(len(self.positional) if width is None else width)
        return f"COPY INTO {name} FROM @{self.stage} FILES = ('{quoted}') {self.file_format}"

    def insert_target(self, relative: str, width: int | None = None) -> tuple[str, dict[str, Any]]:
        meta_values = {
            "METADATA$FILENAME": "%(file)s",
            "METADATA$FILE_ROW_NUMBER": "ROW_NUMBER() OVER ()",
            "METADATA$START_SCAN_TIME": "%(now)s",
        }
        extra_cols = list(self.metadata.values())
        extra_vals = [meta_values[m] for m in self.metadata]
        text = (
            f"INSERT INTO {self.table} ({self.columns}, {', '.join(extra_cols)})"
            f" SELECT {self.columns}, {', '.join(extra_vals)}"
            f" FROM {self.holding(len(self.positional) if width is None else width)}"
        )
        return text, {"file": relative, "now": datetime.now(UTC).isoformat()}


class LocalWarehouse:
    """fakesnow's HTTP server in a thread of this process, and the stand-ins that feed it.
    ``start()`` does the I/O; ``settings_overrides()`` points a daemon at it."""

    def __init__(self, settings: Settings, workdir: Path, queue: str = "cdc-snowpipe") -> None:
        self._base = settings
        self.workdir = workdir
        self.stage_dir = workdir / "stage"
        self.queue_name = queue
        self.port: int | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._wh: Warehouse | None = None
        self._copy: _PipeCopy | None = None
        self._queue_url: str | None = None
        self._last_ingested: str | None = None
        self._lock = threading.Lock()
        self.settings = settings

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, port: int | None = None) -> LocalWarehouse:
        import importlib
        import logging

        import uvicorn

        # uvicorn logs every request at INFO on stdout, where the daemon's JSON lines go.
        for name in ("uvicorn", "uvicorn.access", "uvicorn.error", "fakesnow"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        # fakesnow's own fakesnow.server() helper does this, but importing it once shadows it
        # with the module of the same name: run its ASGI app in a thread here.
        self.port = port or free_port()
        self._server = uvicorn.Server(
            uvicorn.Config(
                importlib.import_module("fakesnow.server").app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
            )
        )
        self._thread = threading.Thread(target=self._server.run, name="fakesnow", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the local warehouse (fakesnow) did not start")
            time.sleep(0.05)
        self.settings = load_settings(
            None,
            **{
                **self._base.model_dump(by_alias=True, exclude={"snowflake"}),
                "snowflake": {
                    **self._base.snowflake.model_dump(by_alias=True, exclude_none=True),
                    **self.settings_overrides()["snowflake"],
                },
            },
        )
        self._wh = Warehouse(self.settings).connect()
        return self

    def settings_overrides(self) -> dict[str, dict[str, Any]]:
        return {
            "snowflake": {
                "account": "fakesnow",
                "user": "fake",
                "password": "snow",
                "host": "127.0.0.1",
                "port": self.port,
                "protocol": "http",
                "emulator": True,
                "login_timeout_s": 10,
                "query_timeout_s": 30,
            }
        }

    def stop(self) -> None:
        if self._wh is not None:
            self._wh.close()
            self._wh = None
        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(10)
            self._server = None

    @property
    def wh(self) -> Warehouse:
        assert self._wh is not None, "LocalWarehouse.start() was not called"
        return self._wh

    def query(self, text: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return self.wh.query(text, params)

    # -- setup ------------------------------------------------------------------------------
    def apply(self) -> None:
        """The ``snowflake/`` statements, with the stage on the local folder; PIPE, STREAM
        and TASK statements are taken by the emulation instead."""
        stage_url = self.stage_dir.resolve().as_uri() + "/"
        with self._lock:
            for stmt in sql.statements(self.settings, stage_url_override=stage_url):
                head = stmt.head
                if head.startswith("CREATE PIPE"):
                    self._copy = _PipeCopy(sql.pipe_copy(stmt))
                    continue
                if head.startswith(("CREATE STREAM", "CREATE WAREHOUSE")):
                    continue  # a view stands in for the stream; fakesnow has no warehouses
                if "TASK" in head.split()[:4]:
                    continue
                self.wh.execute(stmt.text)
            for ddl in _EMULATION_DDL:
                self.wh.execute(ddl)
            assert self._copy is not None, "snowflake/ has no CREATE PIPE"
            for ddl in self._copy.holding_ddl():
                self.wh.execute(ddl)
            sf = self.settings.snowflake
            self.wh.execute(
                f"CREATE VIEW IF NOT EXISTS {sf.stream} AS SELECT r.* FROM RAW_SALES AS r"
                " WHERE NOT EXISTS (SELECT 1 FROM _EMU_STREAM_CONSUMED AS c"
                " WHERE c._FILE = r._FILE AND c._FILE_ROW = r._FILE_ROW)"
            )
            self._set_pipe_status("RUNNING", pending=0)
            for name in (sf.merge_task, sf.cleanup_task):
                self.wh.execute("DELETE FROM _EMU_TASK_STATE WHERE NAME = %(n)s", {"n": name})
                self.wh.execute(
                    "INSERT INTO _EMU_TASK_STATE VALUES (%(n)s, 'started')", {"n": name}
                )
            self._stream_read()

    def _stream_read(self) -> None:
        """The stream was read (consumed, or found empty by SYSTEM$STREAM_HAS_DATA, which also
        keeps it from going stale): it goes stale STREAM_EXTENSION from now."""
        stream = self.settings.snowflake.stream
        self.wh.execute("DELETE FROM _EMU_STREAM_STATE WHERE STREAM = %(s)s", {"s": stream})
        self.wh.execute(
            "INSERT INTO _EMU_STREAM_STATE VALUES (%(s)s, %(t)s)",
            {"s": stream, "t": (datetime.now(UTC) + STREAM_EXTENSION).isoformat()},
        )

    def age_stream(self, stale_after: datetime) -> None:
        """For tests: the stream goes (or went) stale at ``stale_after``."""
        with self._lock:
            self.wh.execute(
                "UPDATE _EMU_STREAM_STATE SET STALE_AFTER = %(t)s WHERE STREAM = %(s)s",
                {"t": stale_after.isoformat(), "s": self.settings.snowflake.stream},
            )

    def resume_task(self, name: str) -> None:
        """``ALTER TASK name RESUME``."""
        with self._lock:
            self.wh.execute(
                "UPDATE _EMU_TASK_STATE SET STATE = 'started' WHERE NAME = %(n)s", {"n": name}
            )

    def _task_started(self, name: str) -> bool:
        rows = self.wh.query("SELECT STATE FROM _EMU_TASK_STATE WHERE NAME = %(n)s", {"n": name})
        return bool(rows) and rows[0]["STATE"] == "started"

    def _record_run(self, name: str, error: str | None) -> None:
        """One run in TASK_HISTORY; the SUSPEND_AFTER_FAILURES-th failure in a row suspends
        the task, and that run's state says so."""
        state = "SUCCEEDED"
        if error is not None:
            runs = self.wh.query(
                "SELECT STATE, ERROR_MESSAGE FROM _EMU_TASK_HISTORY WHERE NAME = %(n)s"
                " ORDER BY SCHEDULED_TIME DESC LIMIT %(k)s",
                {"n": name, "k": SUSPEND_AFTER_FAILURES},
            )
            failed, _ = consecutive_failures([(str(r["STATE"]), None) for r in runs])
            state = "FAILED"
            if failed + 1 >= SUSPEND_AFTER_FAILURES:
                state = "FAILED_AND_AUTO_SUSPENDED"
                self.wh.execute(
                    "UPDATE _EMU_TASK_STATE SET STATE = 'suspended' WHERE NAME = %(n)s",
                    {"n": name},
                )
        self.wh.execute(
            "INSERT INTO _EMU_TASK_HISTORY VALUES (%(n)s, %(s)s, %(e)s, %(t)s)",
            {"n": name, "s": state, "e": error, "t": datetime.now(UTC).isoformat()},
        )

    def connect_notifications(self) -> None:
        """An SQS queue for the bucket's ObjectCreated events under the table's folder (what
        the pipe's notification_channel is in Snowflake)."""
        sqs, s3 = self._clients()
        self._queue_url = sqs.create_queue(QueueName=self.queue_name)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=self._queue_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        s3.put_bucket_notification_configuration(
            Bucket=self.settings.s3.bucket,
            NotificationConfiguration={
                "QueueConfigurations": [
                    {
                        "QueueArn": arn,
                        "Events": ["s3:ObjectCreated:*"],
                        "Filter": {
                            "Key": {
                                "FilterRules": [
                                    {"Name": "prefix", "Value": sql.table_folder(self.settings)}
                                ]
                            }
                        },
                    }
                ]
            },
        )

    def _clients(self) -> tuple[Any, Any]:
        import boto3  # type: ignore[import-untyped]

        s3cfg = self.settings.s3
        kw = {"region_name": s3cfg.region, "endpoint_url": s3cfg.endpoint_url}
        return boto3.client("sqs", **kw), boto3.client("s3", **kw)

    # -- the Snowpipe stand-in --------------------------------------------------------------
    def _notified_keys(self) -> Iterator[str]:
        sqs, _ = self._clients()
        assert self._queue_url is not None, "connect_notifications() was not called"
        while True:
            got = sqs.receive_message(
                QueueUrl=self._queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0
            )
            messages = got.get("Messages", [])
            if not messages:
                return
            for message in messages:
                body = json.loads(message["Body"])
                for record in body.get("Records", []):  # an s3:TestEvent has none
                    if not str(record.get("eventName", "")).startswith("ObjectCreated"):
                        continue
                    yield urllib.parse.unquote_plus(record["s3"]["object"]["key"])
                sqs.delete_message(QueueUrl=self._queue_url, ReceiptHandle=message["ReceiptHandle"])

    def drop_notifications(self) -> int:
        """Lose every queued notification (for tests of a pipe that missed files)."""
        return sum(1 for _ in self._notified_keys())

    def ingest(self) -> int:
        """Load every newly notified object, then serve refresh requests. Returns the number
        of files loaded."""
        folder = sql.table_folder(self.settings)
        loaded = 0
        keys = [k for k in self._notified_keys() if k.startswith(folder)]
        for key in dict.fromkeys(keys):  # moto may notify twice for one object
            loaded += self._load(key)
        loaded += self._serve_refreshes()
        if loaded:
            with self._lock:
                self._set_pipe_status("RUNNING", pending=0, last=self._last_ingested)
        return loaded

    def _serve_refreshes(self) -> int:
        requests = self.query("SELECT PREFIX FROM _EMU_PIPE_REFRESH WHERE DONE_AT IS NULL")
        if not requests:
            return 0
        _, s3 = self._clients()
        folder = sql.table_folder(self.settings)
        loaded = 0
        for request in requests:
            prefix = str(request["PREFIX"])
            paginator = s3.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.settings.s3.bucket, Prefix=folder + prefix):
                for item in page.get("Contents", []):
                    loaded += self._load(item["Key"])
            self.query(
                "UPDATE _EMU_PIPE_REFRESH SET DONE_AT = %(t)s WHERE PREFIX = %(p)s",
                {"t": datetime.now(UTC).isoformat(), "p": prefix},
            )
            log.info("pipe_refreshed", prefix=prefix)
        return loaded

    def _load(self, key: str) -> int:
        """One object through the pipe's COPY. 1 if it loaded, 0 if skipped or failed."""
        assert self._copy is not None, "apply() was not called"
        relative = key.removeprefix(sql.table_folder(self.settings))
        if not re.fullmatch(self._copy.pattern, relative):
            return 0  # not matched by the pipe's PATTERN
        _, s3 = self._clients()
        target = self.stage_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            body = s3.get_object(Bucket=self.settings.s3.bucket, Key=key)["Body"]
        except s3.exceptions.NoSuchKey:
            return 0  # gone before it was loaded
        with target.open("wb") as out:
            shutil.copyfileobj(body, out)
        now = datetime.now(UTC).isoformat()
        width = _header_width(target)
        holding = self._copy.holding(width)
        with self._lock:
            try:
                for ddl in self._copy.holding_ddl(width):
                    self.wh.execute(ddl)
                result = self.wh.query(self._copy.copy_file(relative, width))
            except CdcError as exc:
                self._history(relative, "LOAD_FAILED", 0, 0, str(exc), now)
                self._set_pipe_status("RUNNING", pending=0, error=str(exc))
                log.warning("pipe_load_failed", file=relative, error=str(exc))
                return 0
            # fakesnow answers like Snowflake: file, status, rows_parsed, rows_loaded, ...
            values = list(result[0].values()) if result else []
            status = str(values[1]) if len(values) > 1 else "LOAD_SKIPPED"
            if status.upper() != "LOADED":
                self.wh.execute(f"DELETE FROM {holding}")
                return 0  # already loaded: Snowpipe skips it and records nothing new
            text, params = self._copy.insert_target(relative, width)
            self.wh.execute(text, params)
            self.wh.execute(f"DELETE FROM {holding}")
            self._history(relative, "Loaded", int(values[3]), int(values[2]), None, now)
            self._last_ingested = now
        return 1

    def _history(
        self, file: str, status: str, loaded: int, parsed: int, error: str | None, at: str
    ) -> None:
        self.wh.execute(
            "INSERT INTO _EMU_COPY_HISTORY VALUES (%(f)s, %(s)s, %(l)s, %(p)s, %(e)s, %(t)s)",
            {"f": file, "s": status, "l": loaded, "p": parsed, "e": error, "t": at},
        )

    def _set_pipe_status(
        self, state: str, pending: int, last: str | None = None, error: str | None = None
    ) -> None:
        status: dict[str, Any] = {"executionState": state, "pendingFileCount": pending}
        if last:
            status["lastIngestedTimestamp"] = last
        if error:
            status["error"] = error
        pipe = self.settings.snowflake.pipe
        self.wh.execute("DELETE FROM _EMU_PIPE_STATUS WHERE PIPE = %(p)s", {"p": pipe})
        self.wh.execute(
            "INSERT INTO _EMU_PIPE_STATUS VALUES (%(p)s, %(s)s)",
            {"p": pipe, "s": json.dumps(status)},
        )

    # -- the task runner --------------------------------------------------------------------
    def run_tasks(self, *, cleanup: bool = False) -> int:
        """The merge task's statements in one transaction when the stream has data (and the
        cleanup task's when asked). Returns the number of changes merged."""
        sf = self.settings.snowflake
        tasks = {
            sql.task_name(s): sql.task_body(s)
            for s in sql.statements(self.settings, stage_url_override="file:///unused/")
            if s.head.startswith("CREATE OR ALTER TASK")
        }
        merged = 0
        with self._lock:
            if not self._task_started(sf.merge_task):
                return 0  # suspended: Snowflake schedules no run
            pending = self.wh.query(f"SELECT COUNT(*) AS N FROM {sf.stream}")[0]["N"]
            if pending:
                # Statement by statement: fakesnow's MERGE writes to its own catalog database,
                # which DuckDB refuses inside a transaction on another one. The body is
                # idempotent (the stream keeps its rows until they are marked consumed, and
                # a change is applied only over an older one), so a run cut short is redone
                # whole by the next run.
                try:
                    for statement in tasks[sf.merge_task]:
                        self.wh.execute(statement)
                except CdcError as exc:
                    self._record_run(sf.merge_task, str(exc))
                    return 0
                self.wh.execute(
                    f"INSERT INTO _EMU_STREAM_CONSUMED SELECT _FILE, _FILE_ROW FROM {sf.stream}"
                )
                self._record_run(sf.merge_task, None)
                merged = int(pending)
            self._stream_read()
            if cleanup and self._task_started(sf.cleanup_task):
                try:
                    for statement in tasks[sf.cleanup_task]:
                        self.wh.execute(statement)
                except CdcError as exc:
                    self._record_run(sf.cleanup_task, str(exc))
                else:
                    self._record_run(sf.cleanup_task, None)
        return merged

    def pump(self) -> tuple[int, int]:
        """One round: the pipe stand-in, then the tasks. (files loaded, changes merged)"""
        return self.ingest(), self.run_tasks()

    def pump_until_quiet(self, timeout_s: float = 600, idle_rounds: int = 2) -> None:
        deadline = time.monotonic() + timeout_s
        quiet = 0
        while quiet < idle_rounds:
            if time.monotonic() > deadline:
                raise TimeoutError("the local warehouse kept receiving files")
            files, merged = self.pump()
            quiet = 0 if files or merged else quiet + 1
            if quiet:
                time.sleep(0.2)


def _header_width(path: Path) -> int:
    """The number of columns in a staged object's header line."""
    opener: Any = open
    if path.suffix == ".gz":
        opener = gzip.open
    elif path.suffix == ".zst":
        return len(_zstd_first_line(path))
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        return len(next(csv.reader(handle), []))


def _zstd_first_line(path: Path) -> list[str]:
    import zstandard

    with path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
        text = io.TextIOWrapper(reader, encoding="utf-8", newline="")
        return next(csv.reader(text), [])
