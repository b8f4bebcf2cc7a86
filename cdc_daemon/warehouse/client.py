"""Snowflake through snowflake-connector-python: the statements the reconciler and
``cdc-daemon snowflake apply`` run. Synchronous (the connector is); async callers use
``asyncio.to_thread``.

What differs between warehouses that speak Snowflake's wire protocol is behind ``Dialect``:
``SnowflakeDialect`` here, another one registered by an installed extension and named by
``snowflake.dialect`` (the local warehouse of ``cdc_daemon.local`` registers ``emulator``).
The client never asks which one it has.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from cdc_daemon import extensions
from cdc_daemon.config import Settings, SnowflakeSettings
from cdc_daemon.errors import CdcError, ConfigError, from_snowflake
from cdc_daemon.warehouse.model import Names, names

if TYPE_CHECKING:
    # Imported where used: the connector costs ~40 MB of RSS, which a daemon without a
    # warehouse (or before its first reconcile) should not pay.
    from snowflake.connector import SnowflakeConnection

    from cdc_daemon.warehouse.sql import Statement

log = structlog.get_logger()


@dataclass(frozen=True)
class LoadRecord:
    """One file in the load history. ``file`` is relative to the bucket's prefix (the stage):
    ``<schema>.<table>/dt=.../name``."""

    file: str
    status: str  # loaded | load_failed | partially_loaded | load_skipped
    rows_loaded: int
    rows_parsed: int | None  # NULL while a load is in progress
    first_error: str | None
    loaded_at: datetime | None


@dataclass(frozen=True)
class PipeStatus:
    name: str
    execution_state: str  # RUNNING, PAUSED, STOPPED_*, ...
    pending_file_count: int
    last_ingested_at: str | None
    error: str | None

    @property
    def healthy(self) -> bool:
        return self.execution_state == "RUNNING"


@dataclass(frozen=True)
class TaskStatus:
    """A task's state (SHOW TASKS: ``started`` or ``suspended``) and its recent runs
    (TASK_HISTORY): failures in a row since the last success, and the last error."""

    name: str
    state: str
    consecutive_failures: int
    last_error: str | None

    @property
    def healthy(self) -> bool:
        return self.state == "started" and self.consecutive_failures == 0


@dataclass(frozen=True)
class StreamStatus:
    """SHOW STREAMS: whether the stream is stale (its offset fell out of the table's retention
    and it can no longer be read), and when it will be if nothing consumes it."""

    name: str
    stale: bool
    stale_after: datetime | None


# TASK_HISTORY states of a run that failed; FAILED_AND_AUTO_SUSPENDED is the run after which
# SUSPEND_TASK_AFTER_NUM_FAILURES (10 by default) suspended the task (Snowflake: "Tasks:
# Automatically suspend failed task runs").
TASK_FAILED = frozenset({"FAILED", "FAILED_AND_AUTO_SUSPENDED"})


def consecutive_failures(states: Sequence[tuple[str, str | None]]) -> tuple[int, str | None]:
    """(failed runs in a row, the latest error) from (state, error) pairs, newest first;
    skipped, scheduled and running runs are no verdict."""
    failures, error = 0, None
    for state, message in states:
        if state in TASK_FAILED:
            failures += 1
            error = error or message
        elif state == "SUCCEEDED":
            break
    return failures, error


def stage_relative(file_name: str) -> str:
    """``dt=2011-01-04/x.csv.gz`` from whatever form the history gives (a full URL, a path
    under the stage or under the pipe's folder): the partition folder and the object name."""
    return "/".join(posixpath.normpath(file_name).split("/")[-2:])


def object_name(n: Names, file_name: str) -> str:
    """A load-history file of table ``n`` as the ledger names it, relative to the bucket's
    prefix: ``<schema>.<table>/dt=.../name`` (COPY_HISTORY is read per landing table)."""
    return n.folder + stage_relative(file_name)


def normalize_status(status: str) -> str:
    return status.strip().lower().replace(" ", "_")


class Dialect(Protocol):
    """What a warehouse answers in its own way; everything else is plain SQL through the
    connector (``Warehouse.query``).

    - ``load_history``: the files loaded into a table's landing table since a time
      (COPY_HISTORY);
    - ``pipe_status``: the table's pipe's state (SYSTEM$PIPE_STATUS);
    - ``refresh``: ask the pipe to look again at a prefix of the table's folder
      (ALTER PIPE ... REFRESH);
    - ``tasks``: the merge and cleanup tasks' state and recent failures (SHOW TASKS,
      TASK_HISTORY);
    - ``stream``: whether the table's stream is stale or going stale (SHOW STREAMS);
    - ``describe``: an existing object's properties for the plan of ``snowflake apply``;
    - ``execute_ddl`` / ``task_ddl``: run one statement of ``snowflake/`` (a task's apart);
    - ``stage_url``: where the stage points instead of the bucket through the storage
      integration, or None.
    """

    def load_history(self, wh: Warehouse, n: Names, since: datetime) -> list[LoadRecord]: ...
    def pipe_status(self, wh: Warehouse, n: Names) -> PipeStatus: ...
    def refresh(self, wh: Warehouse, n: Names, prefix: str) -> None: ...
    def tasks(self, wh: Warehouse, n: Names) -> list[TaskStatus]: ...
    def stream(self, wh: Warehouse, n: Names) -> StreamStatus | None: ...
    def task_ddl(self, wh: Warehouse, stmt: Statement) -> None: ...
    def execute_ddl(self, wh: Warehouse, stmt: Statement) -> None: ...
    def describe(self, wh: Warehouse, kind: str, name: str) -> Described | None: ...
    def stage_url(self, wh: Warehouse) -> str | None: ...


def dialect_for(sf: SnowflakeSettings) -> Dialect:
    """The dialect ``snowflake.dialect`` names: Snowflake's own, or the one an installed
    extension registers as the entry point ``<name>_dialect`` (``extensions``)."""
    if sf.dialect == "snowflake":
        return SnowflakeDialect()
    factory = extensions.load(f"{sf.dialect}_dialect", f"the warehouse dialect {sf.dialect!r}")
    dialect: Dialect = factory()
    return dialect


# (value, is the property's default) per property of an existing object.
Described = dict[str, tuple[str, bool]]


class SnowflakeDialect:
    def describe(self, wh: Warehouse, kind: str, name: str) -> Described | None:
        """An existing object's properties, None when it does not exist: DESC FILE FORMAT,
        DESC STAGE and DESC TABLE (property, value, default), SHOW PIPES (``definition``: the
        COPY), SHOW STREAMS (``table_name``), SHOW TASKS (warehouse, schedule, condition,
        definition, state)."""
        sf = wh.snowflake
        where = f"{sf.database}.{sf.schema_}"
        if kind in ("PIPE", "STREAM", "TASK"):
            shown = wh.query(f"SHOW {kind}S LIKE %(n)s IN SCHEMA {where}", {"n": name})
            # LIKE ignores case and takes _ for any character: the row of that very name.
            rows = [
                {str(k).lower(): v for k, v in r.items()}
                for r in shown
                if str(r.get("name", r.get("NAME", ""))).upper() == name.upper()
            ]
            if not rows:
                return None
            row = rows[0]
            if kind == "PIPE":
                status = wh.query("SELECT SYSTEM$PIPE_STATUS(%(p)s) AS S", {"p": f"{where}.{name}"})
                state = parse_pipe_status(name, str(status[0]["S"])).execution_state
                return {
                    "COPY": (str(row.get("definition") or ""), False),
                    "STATE": (state, False),
                }
            if kind == "STREAM":
                return {"TABLE": (str(row.get("table_name") or "").split(".")[-1], False)}
            return {
                key.upper(): (str(row.get(key) or ""), False)
                for key in ("warehouse", "schedule", "condition", "definition", "state")
            }
        qualified = name if kind == "INTEGRATION" else f"{where}.{name}"  # account-level
        try:
            rows = wh.query(f"DESC {kind} {qualified}")
        except CdcError as exc:
            if "does not exist" in str(exc):
                return None
            raise
        out: Described = {}
        for raw in rows:
            row = {str(k).lower(): v for k, v in raw.items()}
            if kind == "TABLE":
                out[str(row["name"])] = (str(row["type"]), False)
                continue
            prop = str(row.get("property", "")).upper()
            value = str(row.get("property_value", ""))
            default = str(row.get("property_default", ""))
            if kind == "STAGE":
                if prop == "URL":
                    out["URL"] = (value.strip('[]"'), False)
                elif prop in ("STORAGE_INTEGRATION", "FORMAT_NAME"):
                    out[prop] = (value.split(".")[-1], False)
                continue
            out[prop] = (value, value == default)
        return out

    def stage_url(self, wh: Warehouse) -> str | None:
        """None: the stage points at the bucket through the storage integration."""
        return None

    def execute_ddl(self, wh: Warehouse, stmt: Statement) -> None:
        """A statement of ``snowflake/``."""
        wh.execute(stmt.text)

    def task_ddl(self, wh: Warehouse, stmt: Statement) -> None:
        """A statement of 70_tasks.sql (ALTER TASK ... SUSPEND, CREATE OR ALTER TASK, ALTER
        TASK ... RESUME)."""
        wh.execute(stmt.text)

    def load_history(self, wh: Warehouse, n: Names, since: datetime) -> list[LoadRecord]:
        sf = wh.snowflake
        rows = wh.query(
            f"SELECT FILE_NAME, STATUS, ROW_COUNT, ROW_PARSED, FIRST_ERROR_MESSAGE,"
            f" LAST_LOAD_TIME FROM TABLE({sf.database}.INFORMATION_SCHEMA.COPY_HISTORY("
            f"TABLE_NAME => %(table)s, START_TIME => %(since)s::TIMESTAMP_LTZ))",
            {"table": f"{sf.database}.{sf.schema_}.{n.landing}", "since": since.isoformat()},
        )
        return [load_record(n, row) for row in rows]

    def pipe_status(self, wh: Warehouse, n: Names) -> PipeStatus:
        sf = wh.snowflake
        rows = wh.query(
            "SELECT SYSTEM$PIPE_STATUS(%(pipe)s) AS S",
            {"pipe": f"{sf.database}.{sf.schema_}.{n.pipe}"},
        )
        return parse_pipe_status(n.pipe, str(rows[0]["S"]))

    def refresh(self, wh: Warehouse, n: Names, prefix: str) -> None:
        # PREFIX is appended to the pipe's stage path (the table's folder); Snowflake only
        # queues files staged in the last 7 days that the pipe has not loaded.
        sf = wh.snowflake
        wh.query(
            f"ALTER PIPE {sf.database}.{sf.schema_}.{n.pipe} REFRESH PREFIX = %(p)s",
            {"p": prefix},
        )

    def tasks(self, wh: Warehouse, n: Names) -> list[TaskStatus]:
        sf = wh.snowflake
        shown = {
            str(r["name"]).upper(): str(r["state"]).lower()
            for r in wh.query(
                f"SHOW TASKS LIKE %(t)s IN SCHEMA {sf.database}.{sf.schema_}",
                {"t": f"%{n.name}"},
            )
        }
        out = []
        for name in n.tasks:
            runs = wh.query(
                f"SELECT STATE, ERROR_MESSAGE FROM TABLE({sf.database}.INFORMATION_SCHEMA"
                ".TASK_HISTORY(TASK_NAME => %(t)s, RESULT_LIMIT => 20))"
                " ORDER BY SCHEDULED_TIME DESC",
                {"t": name},
            )
            failures, error = consecutive_failures(
                [(str(r["STATE"]), r["ERROR_MESSAGE"]) for r in runs]
            )
            out.append(TaskStatus(name, shown.get(name.upper(), "missing"), failures, error))
        return out

    def stream(self, wh: Warehouse, n: Names) -> StreamStatus | None:
        sf = wh.snowflake
        rows = wh.query(
            f"SHOW STREAMS LIKE %(s)s IN SCHEMA {sf.database}.{sf.schema_}", {"s": n.stream}
        )
        if not rows:
            return None
        row = rows[0]
        return StreamStatus(
            n.stream, str(row["stale"]).lower() == "true", row.get("stale_after") or None
        )


def parse_pipe_status(name: str, text: str) -> PipeStatus:
    """SYSTEM$PIPE_STATUS's JSON. Its documented problem fields are ``error`` and ``fault``
    (Snowflake: "SYSTEM$PIPE_STATUS", Output); there is no ``lastForwardedMessage``."""
    data: dict[str, Any] = json.loads(text)
    problems = [str(data[k]) for k in ("error", "fault") if data.get(k)]
    return PipeStatus(
        name=name,
        execution_state=str(data.get("executionState", "UNKNOWN")),
        pending_file_count=int(data.get("pendingFileCount", 0)),
        last_ingested_at=data.get("lastIngestedTimestamp"),
        error="; ".join(problems) or None,
    )


def load_record(n: Names, row: dict[str, Any]) -> LoadRecord:
    """One row of COPY_HISTORY (FILE_NAME, STATUS, ROW_COUNT, ROW_PARSED, FIRST_ERROR_MESSAGE,
    LAST_LOAD_TIME) of table ``n``'s landing table."""
    return LoadRecord(
        file=object_name(n, str(row["FILE_NAME"])),
        status=normalize_status(str(row["STATUS"])),
        rows_loaded=int(row["ROW_COUNT"] or 0),
        rows_parsed=None if row["ROW_PARSED"] is None else int(row["ROW_PARSED"]),
        first_error=row["FIRST_ERROR_MESSAGE"],
        loaded_at=row["LAST_LOAD_TIME"],
    )


class Warehouse:
    """One connector session. The constructor does no I/O; ``connect()`` does."""

    def __init__(
        self,
        snowflake: SnowflakeSettings,
        tables: Sequence[Names] = (),
        dialect: Dialect | None = None,
    ) -> None:
        # The session and the dialect use the ``snowflake`` section; ``tables`` are the
        # group's, whose load history, pipes, tasks and streams it reads.
        self.snowflake = snowflake
        self.dialect = dialect_for(snowflake) if dialect is None else dialect
        self.names = list(tables)
        self._conn: SnowflakeConnection | None = None

    @classmethod
    def of_group(cls, settings: Settings, dialect: Dialect | None = None) -> Warehouse:
        """A session on the group's warehouse, for the group's tables."""
        return cls(settings.snowflake, names(settings), dialect)

    def __repr__(self) -> str:
        sf = self.snowflake
        return f"Warehouse(account={sf.account!r}, user={sf.user!r}, database={sf.database!r})"

    def connect(self) -> Warehouse:
        sf = self.snowflake
        if not sf.enabled:
            raise ConfigError("snowflake.account is not set")
        params: dict[str, Any] = {
            "account": sf.account,
            "user": sf.user,
            "login_timeout": max(1, int(sf.login_timeout_s)),
            "network_timeout": max(1, int(sf.query_timeout_s)),
            "socket_timeout": sf.socket_timeout_s,
            "warehouse": sf.warehouse,
            "database": sf.database,
            "schema": sf.schema_,
            "application": "cdc-daemon",
            "session_parameters": {
                "QUERY_TAG": "cdc-daemon",
                "STATEMENT_TIMEOUT_IN_SECONDS": int(sf.query_timeout_s),
                "TIMEZONE": "UTC",
                "CLIENT_OUT_OF_BAND_TELEMETRY_ENABLED": False,
            },
        }
        if sf.role:
            params["role"] = sf.role
        if sf.password is not None:
            params["password"] = sf.password.get_secret_value()
        if sf.private_key_file is not None:
            params["private_key_file"] = str(sf.private_key_file)
            if sf.private_key_passphrase is not None:
                params["private_key_file_pwd"] = sf.private_key_passphrase.get_secret_value()
        if sf.host:
            params.update(host=sf.host, protocol=sf.protocol)
        if sf.port:
            params["port"] = sf.port
        import snowflake.connector

        try:
            self._conn = snowflake.connector.connect(**params)
        except Exception as exc:  # noqa: BLE001 - translated: the connector raises many kinds
            raise from_snowflake(exc, "cannot connect to Snowflake") from None
        return self

    @property
    def conn(self) -> SnowflakeConnection:
        if self._conn is None:
            raise RuntimeError("Warehouse.connect() was not called")
        return self._conn

    def query(
        self, text: str, params: dict[str, Any] | Sequence[Any] | None = None
    ) -> list[dict[str, Any]]:
        from snowflake.connector.cursor import DictCursor

        try:
            with self.conn.cursor(DictCursor) as cur:
                cur.execute(text, params)
                return list(cur.fetchall())
        except Exception as exc:  # noqa: BLE001 - translated at the boundary
            raise from_snowflake(exc, f"Snowflake failed {_verb(text)}") from None

    def execute(self, text: str, params: dict[str, Any] | Sequence[Any] | None = None) -> None:
        self.query(text, params)

    def columns(self, table: str) -> list[str]:
        """A table's columns as Snowflake has them now (a column just added too)."""
        from snowflake.connector.cursor import SnowflakeCursor

        try:
            with self.conn.cursor(SnowflakeCursor) as cur:
                cur.execute(f"SELECT * FROM {table} LIMIT 0")
                return [str(d[0]) for d in cur.description]
        except Exception as exc:  # noqa: BLE001 - translated at the boundary
            raise from_snowflake(exc, f"Snowflake failed reading the columns of {table}") from None

    def load_history(self, since: datetime) -> list[LoadRecord]:
        """Every table's load history."""
        return [r for n in self.names for r in self.dialect.load_history(self, n, since)]

    def pipe_statuses(self) -> list[PipeStatus]:
        return [self.dialect.pipe_status(self, n) for n in self.names]

    def refresh(self, name: str) -> None:
        """Ask the pipe of the object's table to look again: ``name`` is relative to the
        bucket's prefix (``<schema>.<table>/dt=.../x.csv.gz``)."""
        for n in self.names:
            if name.startswith(n.folder):
                self.dialect.refresh(self, n, name.removeprefix(n.folder))
                return
        raise ValueError(f"{name}: no table of the group has this folder")

    def tasks(self) -> list[TaskStatus]:
        return [task for n in self.names for task in self.dialect.tasks(self, n)]

    def streams(self) -> list[tuple[str, StreamStatus | None]]:
        """(stream name, its status or None when it does not exist) per table."""
        return [(n.stream, self.dialect.stream(self, n)) for n in self.names]

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a broken session
                self._conn.close()
            self._conn = None


def _verb(text: str) -> str:
    """The statement's first words for an error message (never its parameters)."""
    return " ".join(text.split()[:3])
