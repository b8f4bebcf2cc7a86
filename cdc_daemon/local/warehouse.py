"""A local warehouse for tests and the demo: the real connector against fakesnow (DuckDB behind
Snowflake's HTTP API), fed by moto's S3 event notifications through SQS.

fakesnow runs the ``snowflake/`` SQL as written -- the database, file format, stage, tables,
MERGE, QUALIFY -- except four features it does not have. Each is emulated here, and only here:

- **PIPE** (``CREATE PIPE ... AS COPY``, one per table): ``LocalWarehouse.ingest()`` is the
  Snowpipe stand-in. It reads the S3 event notifications from SQS (decoding URL-encoded keys,
  dropping moto's test event and its duplicate event per multipart object), copies each new
  object into a local folder that the stage points at (``file://``, as fakesnow cannot read S3
  offline), and loads it as the pipe of its folder would. fakesnow's CSV COPY has neither
  PARSE_HEADER nor MATCH_BY_COLUMN_NAME nor INCLUDE_METADATA, so the stand-in does what
  Snowflake documents for them: it reads the file's header and matches each name to a landing
  column without regard to case; the file's columns go into a holding table typed as their
  landing columns (by position, read by DuckDB's read_csv with every option of the file
  format given and the header skipped: ``read_csv``), then into the landing table by name,
  with the INCLUDE_METADATA columns (file name, row number, load time). A landing column the
  file lacks is NULL; a file column the table lacks is not loaded ("If additional
  non-matching columns are present in the data files, the values in these columns are not
  loaded":
  https://docs.snowflake.com/en/sql-reference/sql/copy-into-table). A file the pipe already
  loaded is skipped, as Snowpipe does; a recreated pipe (CREATE OR REPLACE) has a load history
  of its own and has lost the files queued for the old one, the worst case the recreation
  procedure in ``warehouse/plan.py`` is built for. A paused pipe (ALTER PIPE ... SET
  PIPE_EXECUTION_PAUSED) queues the files it is notified of and loads them once resumed.
- **COPY_HISTORY / SYSTEM$PIPE_STATUS / ALTER PIPE ... REFRESH**: the stand-in writes each
  file's outcome (status, rows parsed and loaded, first error) to ``_EMU_COPY_HISTORY`` and
  its state as SYSTEM$PIPE_STATUS's JSON to ``_EMU_PIPE_STATUS``; a refresh is a row in
  ``_EMU_PIPE_REFRESH`` that the stand-in serves by listing the prefix in S3.
  ``EmulatorDialect`` reads and writes those tables (``warehouse/client.py`` has the real one).
  With ``load_rounds`` set (tests), a file's row first reads "Load in progress" with a partial
  ROW_COUNT and ROW_PARSED NULL, as Snowflake's does while a load is under way.
- **STREAM** (append-only, one per landing table): a view of the landing rows whose (file,
  row) is not in ``_EMU_STREAM_CONSUMED`` for that stream; the task runner adds the rows it
  merged, which is what moves a real stream's offset.
- **TASK**: ``run_tasks()`` runs the statements between ``BEGIN TRANSACTION`` and ``COMMIT`` of
  each task's body, read from the rendered ``snowflake/70_tasks.sql`` (no second copy of the
  merge), a table's merge only when its stream has data (``SYSTEM$STREAM_HAS_DATA``). One by one,
  not in one transaction: fakesnow's MERGE writes to its catalog database, which DuckDB does
  not allow in a transaction on another database. The body is idempotent, so a run cut short
  is redone whole by the next one (the stream rows are marked consumed last).

Where fakesnow answers otherwise than Snowflake, ``patch_fakesnow`` corrects it (NULL
timestamps, SUM of NUMBER, quotes in column names, errors it does not translate), and
``describe`` shows ARRAY and OBJECT columns as declared (``_EMU_DECLARED``), not as VARIANT. Known
differences (docs/snowflake.md, asserted by ``tests/integration/test_local_differences.py``):
SUM over VARCHAR is refused, a PRIMARY KEY is enforced, ``_LOADED_AT`` is the time of the
emulated load, not METADATA$START_SCAN_TIME.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
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

import structlog

from cdc_daemon.config import Settings, load_settings
from cdc_daemon.errors import CdcError, ConfigError, WarehouseError
from cdc_daemon.local.services import free_port
from cdc_daemon.warehouse import sql
from cdc_daemon.warehouse.client import (
    Described,
    LoadRecord,
    PipeStatus,
    StreamStatus,
    TaskStatus,
    Warehouse,
    consecutive_failures,
    load_record,
    parse_pipe_status,
)
from cdc_daemon.warehouse.evolve import apply_sql
from cdc_daemon.warehouse.model import (
    Names,
    WarehouseTable,
    quote,
    read_catalog,
    same_type,
    widens_in_place,
)
from cdc_daemon.warehouse.plan import Plan, desired

log = structlog.get_logger()

_EMULATION_DDL = [
    # The declared type of each ARRAY or OBJECT column: fakesnow keeps both, and VARIANT, as
    # DuckDB's JSON, so its DESC TABLE shows VARIANT where Snowflake's shows the declared type.
    "CREATE TABLE IF NOT EXISTS _EMU_DECLARED (TABLE_NAME VARCHAR, COLUMN_NAME VARCHAR,"
    " TYPE VARCHAR)",
    """CREATE TABLE IF NOT EXISTS _EMU_COPY_HISTORY (
        TABLE_NAME VARCHAR, FILE_NAME VARCHAR, STATUS VARCHAR, ROW_COUNT NUMBER, ROW_PARSED NUMBER,
        FIRST_ERROR_MESSAGE VARCHAR, LAST_LOAD_TIME TIMESTAMP_TZ)""",
    "CREATE TABLE IF NOT EXISTS _EMU_PIPE_STATUS (PIPE VARCHAR, STATUS VARCHAR)",
    """CREATE TABLE IF NOT EXISTS _EMU_PIPE_REFRESH (
        PIPE VARCHAR, PREFIX VARCHAR, REQUESTED_AT TIMESTAMP_TZ, DONE_AT TIMESTAMP_TZ)""",
    """CREATE TABLE IF NOT EXISTS _EMU_STREAM_CONSUMED (
        STREAM VARCHAR, _FILE VARCHAR, _FILE_ROW NUMBER)""",
    """CREATE TABLE IF NOT EXISTS _EMU_TASK_HISTORY (
        NAME VARCHAR, STATE VARCHAR, ERROR_MESSAGE VARCHAR, SCHEDULED_TIME TIMESTAMP_TZ)""",
    "CREATE TABLE IF NOT EXISTS _EMU_TASK_STATE (NAME VARCHAR, STATE VARCHAR)",
    "CREATE TABLE IF NOT EXISTS _EMU_TASKS (NAME VARCHAR, DEFINITION VARCHAR)",
    """CREATE TABLE IF NOT EXISTS _EMU_PIPES (
        NAME VARCHAR, DEFINITION VARCHAR, CREATED_AT TIMESTAMP_TZ, PAUSED BOOLEAN)""",
    # A local warehouse made by an earlier version has the first two columns only.
    "ALTER TABLE _EMU_PIPES ADD COLUMN IF NOT EXISTS CREATED_AT TIMESTAMP_TZ",
    "ALTER TABLE _EMU_PIPES ADD COLUMN IF NOT EXISTS PAUSED BOOLEAN",
    "CREATE TABLE IF NOT EXISTS _EMU_PIPE_QUEUE (PIPE VARCHAR, KEY VARCHAR)",
    "CREATE TABLE IF NOT EXISTS _EMU_OBJECTS (KIND VARCHAR, NAME VARCHAR, DEFINITION VARCHAR)",
    "CREATE TABLE IF NOT EXISTS _EMU_STREAM_STATE (STREAM VARCHAR, STALE_AFTER TIMESTAMP_TZ)",
    # The stage folder of the serving process (``record_stage``), for `snowflake apply` run
    # from another process.
    "CREATE TABLE IF NOT EXISTS _EMU_STAGE (URL VARCHAR)",
]
# Snowflake's defaults: a task is suspended after this many failed runs in a row
# (SUSPEND_TASK_AFTER_NUM_FAILURES), and a stream not read for the table's retention extended up
# to this long goes stale (MAX_DATA_EXTENSION_TIME_IN_DAYS).
SUSPEND_AFTER_FAILURES = 10
STREAM_EXTENSION = timedelta(days=14)


# The longest line (one row, its quoted newlines included) the stand-in reads from a staged file:
# above Snowflake's largest VARCHAR (128 MB) so that no value the daemon writes is refused here
# first. DuckDB's default (2 MB) failed on a 5 MB value.
MAX_LINE_BYTES = 256 * 1024 * 1024


def patch_fakesnow() -> None:
    """Make fakesnow 0.12's server answer as Snowflake does where it invents values or hides
    errors. Each patch is checked by ``tests/integration/test_local_differences.py``; what
    cannot be fixed is listed in docs/snowflake.md ("Known differences") and asserted there."""
    import duckdb
    import fakesnow.arrow
    import fakesnow.cursor
    import fakesnow.info_schema
    import fakesnow.transforms
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.compute as pc  # type: ignore[import-untyped]
    from snowflake.connector.errors import ProgrammingError
    from sqlglot import exp

    if getattr(fakesnow.cursor.FakeSnowflakeCursor.execute, "_cdc_patched", False):
        return  # once per process: the server module, and these, are shared by every instance

    to_struct = fakesnow.arrow.timestamp_to_sf_struct

    def timestamp_to_sf_struct(ts: Any) -> Any:
        # fakesnow builds Snowflake's (epoch, fraction) struct without a validity mask, so the
        # connector reads a NULL timestamp as epoch 0: 1970-01-01 00:00:00.
        if isinstance(ts, pa.ChunkedArray):
            ts = ts.combine_chunks()
        if not ts.null_count:
            return to_struct(ts)
        filled = to_struct(pc.fill_null(ts, pa.scalar(0, type=ts.type)))
        return pa.StructArray.from_arrays(
            [filled.field(i) for i in range(filled.type.num_fields)],
            fields=list(filled.type),
            mask=ts.is_null(),
        )

    cast_aggregate = fakesnow.transforms.numeric_agg_implicit_cast

    def numeric_agg_implicit_cast(expression: exp.Expr) -> exp.Expr:
        # fakesnow makes SUM(x) SUM(TRY_CAST(x AS DOUBLE)) (for VARCHAR arguments), which turns a
        # sum of NUMBER(38,3) into a float; Snowflake's SUM of NUMBER(p,s) is NUMBER(38,s), as
        # DuckDB's of DECIMAL is. Its result column name is kept.
        already_cast = isinstance(expression, exp.Sum) and isinstance(
            expression.this, (exp.Cast, exp.TryCast)
        )
        out = cast_aggregate(expression)
        summed = out.this if isinstance(out, exp.Alias) else out
        if (
            isinstance(summed, exp.Sum)
            and not already_cast
            and isinstance(summed.this, exp.TryCast)
        ):
            summed.set("this", summed.this.this)
        return out

    insert_lengths = fakesnow.info_schema.insert_text_lengths_sql

    def insert_text_lengths_sql(
        catalog: str, schema: str, table: str, text_lengths: list[tuple[str, int]]
    ) -> str:
        # fakesnow splices column names into a string literal: a column named it's broke the
        # CREATE TABLE half-way (the table made, its catalog entry not).
        quoted = [(n.replace("'", "''"), k) for n, k in text_lengths]
        return insert_lengths(catalog, schema, table, quoted)

    execute = fakesnow.cursor.FakeSnowflakeCursor.execute

    def execute_translated(self: Any, *args: Any, **kwargs: Any) -> Any:
        # DuckDB's data and constraint errors are not translated by fakesnow, and its server
        # answers an untranslated error with HTTP 500, which the connector retries for minutes
        # as if the server were down. Snowflake refuses such a statement at once; 100072 is its
        # NOT NULL violation, which the connector raises as IntegrityError.
        try:
            return execute(self, *args, **kwargs)
        except duckdb.ConstraintException as exc:
            text = str(exc).split("\n")[0]
            if "NOT NULL" in text:
                raise ProgrammingError(
                    msg=f"NULL result in a non-nullable column ({text})",
                    errno=100072,
                    sqlstate="22000",
                ) from None
            # A PRIMARY KEY or UNIQUE constraint, which Snowflake does not enforce (a known
            # difference): no code of Snowflake's fits.
            raise ProgrammingError(msg=text, errno=100000, sqlstate="23000") from None
        except duckdb.OutOfRangeException as exc:
            text = str(exc).split("\n")[0]
            raise ProgrammingError(msg=text, errno=100046, sqlstate="22003") from None
        except (duckdb.DataError, duckdb.InvalidInputException) as exc:
            text = str(exc).split("\n")[0]
            raise ProgrammingError(msg=text, errno=100038, sqlstate="22000") from None

    current_version = fakesnow.transforms.current_version

    def current_version_and_md5_numbers(expression: exp.Expr) -> exp.Expr:
        # MD5_NUMBER_LOWER64 (the digest's low 64 bits, big endian, unsigned: Snowflake's
        # docs), which fakesnow does not know: DuckDB reads the last 16 hex digits as UBIGINT.
        if isinstance(expression, exp.MD5NumberLower64):
            # (a replaced node's children are not visited again by this pass)
            arg = expression.this.transform(current_version_and_md5_numbers)
            digits = exp.Substring(
                this=exp.MD5(this=arg),
                start=exp.Literal.number(17),
                length=exp.Literal.number(16),
            )
            return exp.Cast(
                this=exp.DPipe(this=exp.Literal.string("0x"), expression=digits),
                to=exp.DataType.build("UBIGINT", dialect="duckdb"),
            )
        if isinstance(expression, exp.ToChar) and expression.args.get("format") is not None:
            # TO_VARCHAR(<date or time column>, '<format>'): sqlglot drops the format of a
            # column whose type it cannot see (a cast to text instead); Snowflake applies it.
            # The daemon formats only dates and times so.
            from sqlglot.dialects.snowflake import Snowflake

            return exp.TimeToStr(
                this=expression.this, format=Snowflake.format_time(expression.args["format"])
            )
        return current_version(expression)

    execute_translated._cdc_patched = True  # type: ignore[attr-defined]
    fakesnow.transforms.current_version = current_version_and_md5_numbers
    fakesnow.arrow.timestamp_to_sf_struct = timestamp_to_sf_struct
    fakesnow.transforms.numeric_agg_implicit_cast = numeric_agg_implicit_cast
    fakesnow.info_schema.insert_text_lengths_sql = insert_text_lengths_sql
    fakesnow.cursor.FakeSnowflakeCursor.execute = execute_translated  # type: ignore[method-assign]


def stream_read(wh: Warehouse, stream: str) -> None:
    """The stream was read (consumed, or found empty by SYSTEM$STREAM_HAS_DATA, which also
    keeps it from going stale): it goes stale STREAM_EXTENSION from now. One statement when
    the row exists: SHOW STREAMS never misses an existing stream, and the reconciler reading
    between a delete and an insert would report it missing."""
    params = {"s": stream, "t": (datetime.now(UTC) + STREAM_EXTENSION).isoformat()}
    if wh.query("SELECT 1 FROM _EMU_STREAM_STATE WHERE STREAM = %(s)s", params):
        wh.execute("UPDATE _EMU_STREAM_STATE SET STALE_AFTER = %(t)s WHERE STREAM = %(s)s", params)
    else:
        wh.execute("INSERT INTO _EMU_STREAM_STATE VALUES (%(s)s, %(t)s)", params)


def set_pipe_status(
    wh: Warehouse,
    pipe: str,
    state: str,
    pending: int,
    last: str | None = None,
    error: str | None = None,
) -> None:
    status: dict[str, Any] = {"executionState": state, "pendingFileCount": pending}
    if last:
        status["lastIngestedTimestamp"] = last
    if error:
        status["error"] = error
    # One statement when the row exists: a reader never sees the pipe without a status.
    params = {"p": pipe, "s": json.dumps(status)}
    if wh.query("SELECT 1 FROM _EMU_PIPE_STATUS WHERE PIPE = %(p)s", {"p": pipe}):
        wh.execute("UPDATE _EMU_PIPE_STATUS SET STATUS = %(s)s WHERE PIPE = %(p)s", params)
    else:
        wh.execute("INSERT INTO _EMU_PIPE_STATUS VALUES (%(p)s, %(s)s)", params)


class EmulatorDialect:
    """COPY_HISTORY, SYSTEM$PIPE_STATUS, ALTER PIPE ... REFRESH, TASK_HISTORY and SHOW STREAMS
    of the local warehouse."""

    def load_history(self, wh: Warehouse, n: Names, since: datetime) -> list[LoadRecord]:
        rows = wh.query(
            "SELECT FILE_NAME, STATUS, ROW_COUNT, ROW_PARSED, FIRST_ERROR_MESSAGE, LAST_LOAD_TIME"
            " FROM _EMU_COPY_HISTORY WHERE TABLE_NAME = %(t)s AND LAST_LOAD_TIME >= %(since)s",
            {"t": n.landing, "since": since.isoformat()},
        )
        return [load_record(n, r) for r in rows]

    def pipe_status(self, wh: Warehouse, n: Names) -> PipeStatus:
        rows = wh.query("SELECT STATUS FROM _EMU_PIPE_STATUS WHERE PIPE = %(p)s", {"p": n.pipe})
        if not rows:
            return PipeStatus(n.pipe, "STOPPED_NO_STAND_IN", 0, None, "the pipe stand-in never ran")
        return parse_pipe_status(n.pipe, str(rows[0]["STATUS"]))

    def refresh(self, wh: Warehouse, n: Names, prefix: str) -> None:
        wh.execute(
            "INSERT INTO _EMU_PIPE_REFRESH (PIPE, PREFIX, REQUESTED_AT)"
            " VALUES (%(n)s, %(p)s, %(t)s)",
            {"n": n.pipe, "p": prefix, "t": datetime.now(UTC).isoformat()},
        )

    def tasks(self, wh: Warehouse, n: Names) -> list[TaskStatus]:
        states = {
            str(r["NAME"]): str(r["STATE"])
            for r in wh.query("SELECT NAME, STATE FROM _EMU_TASK_STATE")
        }
        out = []
        for name in n.tasks:
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

    def stream(self, wh: Warehouse, n: Names) -> StreamStatus | None:
        rows = wh.query(
            "SELECT STALE_AFTER FROM _EMU_STREAM_STATE WHERE STREAM = %(s)s", {"s": n.stream}
        )
        if not rows:
            return None
        stale_after = rows[0]["STALE_AFTER"]
        return StreamStatus(n.stream, stale_after <= datetime.now(UTC), stale_after)

    def stage_url(self, wh: Warehouse) -> str:
        """The local folder the stand-in copies new objects to (fakesnow cannot read S3
        offline), as the serving process recorded it."""
        try:
            rows = wh.query("SELECT URL FROM _EMU_STAGE")
        except CdcError:
            rows = []
        if not rows:
            raise ConfigError(
                "the local warehouse has no stage folder recorded: point snowflake.port at "
                "the warehouse of `cdc-daemon local up` (the configuration it wrote)"
            )
        return str(rows[0]["URL"])

    def describe(self, wh: Warehouse, kind: str, name: str) -> Described | None:
        """What the emulation recorded of an object (the statement that made it, read as the
        plan reads a rendered one); a table's columns with their types (fakesnow's DESC TABLE
        gives Snowflake's forms: NUMBER(10,0), VARCHAR(16777216), TIMESTAMP_TZ(9))."""
        if kind == "TABLE":
            try:
                rows = wh.query(f"DESC TABLE {name}")
            except CdcError:
                return None
            lowered = [{str(k).lower(): v for k, v in r.items()} for r in rows]
            declared = {
                str(r["COLUMN_NAME"]): str(r["TYPE"])
                for r in wh.query(
                    "SELECT COLUMN_NAME, TYPE FROM _EMU_DECLARED WHERE TABLE_NAME = %(t)s",
                    {"t": name},
                )
            }
            return {
                str(r["name"]): (
                    declared.get(str(r["name"]), str(r["type"]))
                    if str(r["type"]) == "VARIANT"
                    else str(r["type"]),
                    False,
                )
                for r in lowered
            }
        if kind == "PIPE":
            rows = wh.query("SELECT DEFINITION FROM _EMU_PIPES WHERE NAME = %(n)s", {"n": name})
        elif kind == "TASK":
            rows = wh.query("SELECT DEFINITION FROM _EMU_TASKS WHERE NAME = %(n)s", {"n": name})
        else:
            rows = wh.query(
                "SELECT DEFINITION FROM _EMU_OBJECTS WHERE KIND = %(k)s AND NAME = %(n)s",
                {"k": kind, "n": name},
            )
        if not rows:
            return None
        found = desired(sql.Statement("", str(rows[0]["DEFINITION"])))
        if found is None:
            return None
        out = {k: (v, False) for k, v in found[2].items()}
        if kind == "PIPE":
            status = wh.query("SELECT STATUS FROM _EMU_PIPE_STATUS WHERE PIPE = %(p)s", {"p": name})
            if status:
                shown = parse_pipe_status(name, str(status[0]["STATUS"]))
                out["STATE"] = (shown.execution_state, False)
        if kind == "TASK":
            task = wh.query("SELECT STATE FROM _EMU_TASK_STATE WHERE NAME = %(n)s", {"n": name})
            out["STATE"] = (str(task[0]["STATE"]) if task else "suspended", False)
        return out

    def execute_ddl(self, wh: Warehouse, stmt: sql.Statement) -> None:
        """One statement of ``snowflake/``: what fakesnow has is run; PIPE, STREAM, TASK, the
        warehouse and the file format's header parsing are taken by the emulation, whose
        state is kept in the database (so ``cdc-daemon snowflake apply`` from another process
        sets up the stand-ins of ``cdc-daemon local up``)."""
        head, text = stmt.head, stmt.text
        if head.startswith("CREATE WAREHOUSE"):
            return  # fakesnow has no warehouses
        if head.startswith(("CREATE PIPE", "CREATE OR REPLACE PIPE")):
            replace = head.startswith("CREATE OR REPLACE")
            name = text.split()[4 if replace else 5]  # CREATE [OR REPLACE] PIPE [IF NOT EXISTS]
            _PipeCopy(name, sql.pipe_copy(stmt))  # refuses a COPY the stand-in cannot load
            exists = wh.query("SELECT 1 FROM _EMU_PIPES WHERE NAME = %(n)s", {"n": name})
            if replace:
                # A new pipe: a load history of its own, an empty queue (the files the old one
                # held are dropped), running.
                wh.execute("DELETE FROM _EMU_PIPES WHERE NAME = %(n)s", {"n": name})
                wh.execute("DELETE FROM _EMU_PIPE_QUEUE WHERE PIPE = %(n)s", {"n": name})
            if replace or not exists:
                wh.execute(
                    "INSERT INTO _EMU_PIPES VALUES (%(n)s, %(d)s, %(t)s, FALSE)",
                    {"n": name, "d": text, "t": datetime.now(UTC).isoformat()},
                )
            if replace or not wh.query(
                "SELECT 1 FROM _EMU_PIPE_STATUS WHERE PIPE = %(p)s", {"p": name}
            ):
                set_pipe_status(wh, name, "RUNNING", pending=0)
            return
        if alter := re.match(
            r"ALTER PIPE (\w+) SET PIPE_EXECUTION_PAUSED = (TRUE|FALSE)$", text, re.I
        ):
            name, paused = alter.group(1), alter.group(2).upper() == "TRUE"
            wh.execute(
                "UPDATE _EMU_PIPES SET PAUSED = %(p)s WHERE NAME = %(n)s", {"p": paused, "n": name}
            )
            count = wh.query(
                "SELECT COUNT(*) AS N FROM _EMU_PIPE_QUEUE WHERE PIPE = %(n)s", {"n": name}
            )
            held = int(count[0]["N"])
            # Paused, it has no file pending: those notified from now on are held for it
            # (dropped if it is recreated) and pending again once it is resumed.
            set_pipe_status(
                wh, name, "PAUSED" if paused else "RUNNING", pending=0 if paused else held
            )
            return
        if head.startswith("CREATE STREAM"):
            match = re.match(r"CREATE STREAM IF NOT EXISTS (\w+)\s+ON TABLE (\S+)", text, re.I)
            assert match is not None, text
            stream, table = match.group(1), match.group(2).split(".")[-1]
            wh.execute(
                f"CREATE OR REPLACE VIEW {stream} AS SELECT r.* FROM {table} AS r"
                " WHERE NOT EXISTS (SELECT 1 FROM _EMU_STREAM_CONSUMED AS c"
                f" WHERE c.STREAM = '{stream}' AND c._FILE = r._FILE AND c._FILE_ROW = r._FILE_ROW)"
            )
            if not wh.query("SELECT 1 FROM _EMU_STREAM_STATE WHERE STREAM = %(s)s", {"s": stream}):
                stream_read(wh, stream)
            _record_object(wh, "STREAM", stream, text)
            return
        if "TASK" in head.split()[:4]:
            self.task_ddl(wh, stmt)
            return
        if head.startswith("CREATE OR ALTER FILE"):
            # fakesnow has no CREATE OR ALTER: the format is replaced, and so is the one
            # fakesnow's COPY reads for it (``_PipeCopy``): the header skipped instead of
            # parsed, no ERROR_ON_COLUMN_COUNT_MISMATCH.
            replaced = re.sub(r"^CREATE OR ALTER", "CREATE OR REPLACE", text, count=1)
            wh.execute(replaced)
            emulated = re.sub(
                r"\bPARSE_HEADER\s*=\s*TRUE\b", "SKIP_HEADER = 1", replaced, flags=re.I
            )
            emulated = re.sub(
                r"\s*ERROR_ON_COLUMN_COUNT_MISMATCH\s*=\s*FALSE", "", emulated, flags=re.I
            )
            emulated = re.sub(r"(FILE FORMAT )(\w+)", r"\1_EMU_\2", emulated, count=1, flags=re.I)
            wh.execute(emulated)
            _record_object(wh, "FILE FORMAT", text.split()[5], text)
            return
        if head.startswith("CREATE OR ALTER STAGE"):
            wh.execute(re.sub(r"^CREATE OR ALTER", "CREATE OR REPLACE", text, count=1))
            _record_object(wh, "STAGE", text.split()[4], text)
            return
        if retype := _RETYPE.match(text):
            self._retype(wh, retype.group(1), retype.group(2), retype.group(3))
            try:
                wh.execute(text)
            except CdcError as exc:
                if "PRIMARY KEY" not in str(exc):
                    raise
                _rebuild_retyped(wh, retype.group(1), text)
            return
        existed = head.startswith("CREATE TABLE") and self.describe_exists(wh, text)
        wh.execute(text)
        if head.startswith("USE SCHEMA"):
            for ddl in _EMULATION_DDL:
                wh.execute(ddl)
        if head.startswith(("CREATE TABLE", "ALTER TABLE")) and not existed:
            _declare(wh, text)

    def describe_exists(self, wh: Warehouse, create: str) -> bool:
        """Whether the table a ``CREATE TABLE IF NOT EXISTS`` names exists (the statement
        then changes nothing, its declared types included)."""
        from sqlglot import exp, parse_one

        tree = parse_one(create, read="snowflake")
        table = tree.find(exp.Table)
        return table is not None and self.describe(wh, "TABLE", table.name) is not None

    def _retype(self, wh: Warehouse, table: str, quoted: str, want: str) -> None:
        """Refuse what Snowflake refuses: DuckDB changes a column to any type it can cast to,
        Snowflake only widens a NUMBER's precision (not its scale) or a text's length
        (https://docs.snowflake.com/en/sql-reference/sql/alter-table-column)."""
        column = quoted[1:-1].replace('""', '"') if quoted.startswith('"') else quoted.upper()
        have = (self.describe(wh, "TABLE", table) or {}).get(column, ("", False))[0]
        if have and not same_type(have, want) and not widens_in_place(have, want):
            raise WarehouseError(
                f"Snowflake failed running ALTER TABLE: cannot change column {column} from type "
                f"{have} to {want.strip()} (SQL compilation error)"
            )

    def task_ddl(self, wh: Warehouse, stmt: sql.Statement) -> None:
        """ALTER TASK ... SUSPEND / RESUME set the task's state; CREATE OR ALTER TASK keeps its
        definition, which ``run_tasks`` runs."""
        text = stmt.text
        alter = re.match(r"ALTER TASK (?:IF EXISTS )?(\w+) (SUSPEND|RESUME)$", text, re.I)
        if alter is not None:
            name, action = alter.group(1), alter.group(2).upper()
            state = "started" if action == "RESUME" else "suspended"
            known = wh.query("SELECT 1 FROM _EMU_TASK_STATE WHERE NAME = %(n)s", {"n": name})
            if known:
                wh.execute(
                    "UPDATE _EMU_TASK_STATE SET STATE = %(s)s WHERE NAME = %(n)s",
                    {"s": state, "n": name},
                )
            elif action == "RESUME" or "IF EXISTS" not in text.upper():
                wh.execute(
                    "INSERT INTO _EMU_TASK_STATE VALUES (%(n)s, %(s)s)", {"n": name, "s": state}
                )
            return
        name = sql.task_name(stmt)
        sql.task_body(stmt)  # refuses a body the runner could not run
        wh.execute("DELETE FROM _EMU_TASKS WHERE NAME = %(n)s", {"n": name})
        wh.execute("INSERT INTO _EMU_TASKS VALUES (%(n)s, %(d)s)", {"n": name, "d": text})


# ALTER TABLE <t> ALTER [COLUMN] <c> SET DATA TYPE <type>: the table, the column, the type.
_RETYPE = re.compile(
    r'ALTER TABLE (\w+) ALTER (?:COLUMN )?("(?:[^"]|"")+"|\w+) SET DATA TYPE (.+)$', re.I | re.S
)


def _rebuild_retyped(wh: Warehouse, table: str, alter: str) -> None:
    """A key column retyped: DuckDB cannot change the type of a PRIMARY KEY column, Snowflake
    (whose keys are not enforced) can. The table is copied (rows, columns and types, no
    constraint), the copy altered and put in its place: a known difference of the emulator
    (docs/snowflake.md), which then no longer enforces that table's key. In one transaction,
    as Snowflake's ALTER is one statement: another session never sees the table missing."""
    copy = f"_EMU_RETYPED_{table}"
    wh.execute("BEGIN TRANSACTION")
    try:
        wh.execute(f"DROP TABLE IF EXISTS {copy}")
        wh.execute(f"CREATE TABLE {copy} AS SELECT * FROM {table}")
        wh.execute(alter.replace(f"ALTER TABLE {table} ", f"ALTER TABLE {copy} ", 1))
        wh.execute(f"DROP TABLE {table}")
        wh.execute(f"ALTER TABLE {copy} RENAME TO {table}")
    except BaseException:
        wh.execute("ROLLBACK")
        raise
    wh.execute("COMMIT")


def _declare(wh: Warehouse, text: str) -> None:
    """Record the ARRAY and OBJECT columns a ``CREATE TABLE`` (also ``... LIKE``) or ``ALTER
    TABLE ... ADD COLUMN`` declares, for ``describe`` (``_EMU_DECLARED``)."""
    from sqlglot import exp, parse_one

    tree = parse_one(text, read="snowflake")
    target = tree.find(exp.Table)
    if target is None or not isinstance(tree, (exp.Create, exp.Alter)):
        return
    name = target.name
    like = tree.find(exp.LikeProperty)
    if isinstance(tree, exp.Create):
        wh.execute("DELETE FROM _EMU_DECLARED WHERE TABLE_NAME = %(t)s", {"t": name})
    if like is not None and isinstance(like.this, exp.Table):
        wh.execute(
            "INSERT INTO _EMU_DECLARED SELECT %(t)s, COLUMN_NAME, TYPE FROM _EMU_DECLARED"
            " WHERE TABLE_NAME = %(s)s",
            {"t": name, "s": like.this.name},
        )
    for column in tree.find_all(exp.ColumnDef):
        kind = column.args.get("kind")
        if isinstance(kind, exp.DataType) and kind.this in (
            exp.DataType.Type.ARRAY,
            exp.DataType.Type.OBJECT,
        ):
            wh.execute(
                "INSERT INTO _EMU_DECLARED VALUES (%(t)s, %(c)s, %(k)s)",
                {"t": name, "c": column.this.name, "k": kind.this.name},
            )


def _record_object(wh: Warehouse, kind: str, name: str, text: str) -> None:
    """The statement an object was made with, for ``describe``."""
    wh.execute(
        "DELETE FROM _EMU_OBJECTS WHERE KIND = %(k)s AND NAME = %(n)s", {"k": kind, "n": name}
    )
    wh.execute(
        "INSERT INTO _EMU_OBJECTS VALUES (%(k)s, %(n)s, %(d)s)", {"k": kind, "n": name, "d": text}
    )


class _PipeCopy:
    """A pipe's COPY statement (``COPY INTO <landing> FROM @<stage>/<folder>
    FILE_FORMAT = (...) MATCH_BY_COLUMN_NAME = CASE_INSENSITIVE INCLUDE_METADATA = (...)
    PATTERN = '...'``), read into what the stand-in needs."""

    def __init__(self, name: str, copy_sql: str) -> None:
        self.name = name
        text = " ".join(copy_sql.split())

        def find(pattern: str) -> str:
            match = re.search(pattern, text, re.I)
            if match is None:
                raise ValueError(f"pipe {name}: its COPY has no {pattern!r}")
            return match.group(1)

        self.table = find(r"COPY INTO (\S+)")
        # The stage path, unquoted or as a string literal (``sql.stage_path``), read before
        # the text's spaces are collapsed: a folder may hold spaces.
        quoted = re.search(r"\bFROM '@((?:[^'\\]|\\.)*)'", copy_sql)
        stage_path = re.sub(r"\\(.)", r"\1", quoted.group(1)) if quoted else find(r"FROM @(\S+)")
        self.stage, _, self.folder = stage_path.partition("/")
        self.file_format = find(r"FILE_FORMAT = \(FORMAT_NAME = '([^']+)'\)")
        if find(r"MATCH_BY_COLUMN_NAME = (\w+)").upper() != "CASE_INSENSITIVE":
            raise ValueError(f"pipe {name}: the stand-in loads by case-insensitive name only")
        self.metadata = {
            field.upper(): column
            for column, field in re.findall(
                r"(\w+) = (METADATA\$\w+)", find(r"INCLUDE_METADATA = \(([^)]*)\)")
            )
        }
        self.pattern = find(r"PATTERN = '([^']*)'")
        self.landing = self.table.split(".")[-1]

    def emulated_format(self) -> str:
        """The file format as the stand-in reads it: the header skipped (the stand-in maps
        its names), no ERROR_ON_COLUMN_COUNT_MISMATCH (it has none)."""
        return "_EMU_" + self.file_format.split(".")[-1]

    def holding(self, header: list[str], columns: dict[str, str]) -> tuple[str, list[str], str]:
        """(name, DDL, insert) of the holding table for a file with ``header``: its columns
        by position, each typed as the landing column of its name (ignoring case), VARCHAR
        when the table has none (not loaded). ``columns``: the landing table's, with their
        types, which name the holding table too (a widened column gets a new one)."""
        upper = {c.upper(): c for c in columns}
        matched = [upper.get(h.upper()) for h in header]
        types = [columns[m] if m is not None else None for m in matched]
        named = repr((self.landing, header, matched, types))
        digest = hashlib.sha256(named.encode()).hexdigest()[:12]
        name = f"_EMU_IN_{digest}"
        select = ", ".join(
            f"{quote(m)} AS _C{i}" if m is not None else f"CAST(NULL AS VARCHAR) AS _C{i}"
            for i, m in enumerate(matched)
        )
        ddl = [
            f"CREATE TABLE IF NOT EXISTS {name} AS SELECT {select} FROM {self.landing} WHERE 1 = 0",
        ]
        loaded = [(i, m) for i, m in enumerate(matched) if m is not None]
        meta_values = {
            "METADATA$FILENAME": "%(file)s",
            "METADATA$FILE_ROW_NUMBER": "ROW_NUMBER() OVER ()",
            "METADATA$START_SCAN_TIME": "%(now)s",
        }
        targets = [quote(m) for _, m in loaded] + list(self.metadata.values())
        values = [f"_C{i}" for i, _ in loaded] + [meta_values[f] for f in self.metadata]
        insert = (
            f"INSERT INTO {self.landing} ({', '.join(targets)})"
            f" SELECT {', '.join(values)} FROM {name}"
        )
        return name, ddl, insert


def read_csv(path: Path, width: int, fmt: Any) -> str:
    """DuckDB's read_csv of a staged file as the file format reads it, every option given so
    that nothing is sniffed: DuckDB's sniffer failed on a 5 MB field and on quoted ``"w""2"``
    fields, and guessed column types. ``fmt`` is fakesnow's reading of the file format
    (``ReadCSV``: header lines to skip, quote, delimiter, NULL strings, compression). Each of the
    ``width`` columns is read as text (the holding table's types cast it); a quoted empty
    field is an empty string, never one of the NULL strings, as in Snowflake's CSV ("An empty
    string is typically represented by a quoted empty string", Data unloading considerations:
    https://docs.snowflake.com/en/user-guide/data-unload-considerations); the doubled quote is
    the escape (ESCAPE = NONE with FIELD_OPTIONALLY_ENCLOSED_BY)."""
    from glob import escape

    def literal(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    columns = ", ".join(f"{literal(f'column{i}')}: 'VARCHAR'" for i in range(width))
    nulls = ", ".join(literal(v) for v in fmt.null_if or [])
    options = [
        "header = false",
        f"skip = {int(fmt.skip_header)}",
        f"delim = {literal(fmt.sep)}",
        f"quote = {literal(fmt.quote or '')}",
        f"escape = {literal(fmt.quote or '')}",
        f"nullstr = [{nulls}]",
        "allow_quoted_nulls = false",
        "auto_detect = false",
        f"columns = {{{columns}}}",
        "new_line = '\\n'",
        f"max_line_size = {MAX_LINE_BYTES}",
        "hive_partitioning = false",
    ]
    if fmt.compression:
        options.append(f"compression = {literal(fmt.compression)}")
    return f"read_csv({literal(escape(str(path)))}, {', '.join(options)})"


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
        self._duck: Any = None  # the stand-in's own DuckDB connection (the server's database)
        self._pipes: dict[str, _PipeCopy] = {}  # by folder, relative to the stage
        self._pipe_state: dict[str, tuple[datetime, bool]] = {}  # name -> (created, paused)
        self._ingested: dict[str, str] = {}  # pipe -> its last load this round
        # For tests: a load's history row reads "Load in progress" (a partial ROW_COUNT,
        # ROW_PARSED NULL, as COPY_HISTORY shows a load under way) for this many more rounds
        # before it reads "Loaded".
        self.load_rounds = 0
        self._in_progress: list[list[Any]] = []  # [landing, file, loaded, parsed, rounds left]
        self.tables: list[WarehouseTable] = []
        self._queue_url: str | None = None
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
        patch_fakesnow()
        server = importlib.import_module("fakesnow.server")
        self._server = uvicorn.Server(
            uvicorn.Config(
                server.app,
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
        self._wh = Warehouse.of_group(self.settings).connect()
        self._duck = server.shared_fs.duck_conn.cursor()
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
                "dialect": "emulator",
                "login_timeout_s": 10,
                "query_timeout_s": 30,
            }
        }

    def stop(self) -> None:
        if self._duck is not None:
            self._duck.close()
            self._duck = None
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

    @property
    def duck(self) -> Any:
        assert self._duck is not None, "LocalWarehouse.start() was not called"
        return self._duck

    def query(self, text: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return self.wh.query(text, params)

    # -- setup ------------------------------------------------------------------------------
    def apply(self, tables: list[WarehouseTable] | None = None, *, plan_only: bool = False) -> Plan:
        """``snowflake/`` for the group's tables (read from the catalog unless given), with
        the stage on the local folder, as ``cdc-daemon snowflake apply`` runs it: what
        differs from what exists, made so (``EmulatorDialect`` takes what fakesnow lacks).
        Returns the plan."""
        self.tables = read_catalog(self.settings) if tables is None else tables
        with self._lock:
            return apply_sql(
                self.wh,
                self.settings,
                self.tables,
                stage_url_override=self.stage_url,
                staged=self.staged,
                plan_only=plan_only,
            )

    def staged(self, folder: str, since: datetime) -> list[tuple[str, datetime]]:
        """The bucket's objects under a table's folder modified since ``since``, relative to
        the prefix, with their last modification (what a recreated pipe's refresh looks at)."""
        _, s3 = self._clients()
        prefix = self.settings.s3.prefix
        out = []
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.settings.s3.bucket, Prefix=prefix + folder
        ):
            for item in page.get("Contents", []):
                if item["LastModified"] >= since:
                    out.append((str(item["Key"]).removeprefix(prefix), item["LastModified"]))
        return out

    @property
    def stage_url(self) -> str:
        return self.stage_dir.resolve().as_uri() + "/"

    def record_stage(self) -> None:
        """Keep the stage folder in the warehouse's schema (which exists), where
        ``EmulatorDialect.stage_url`` finds it from any process."""
        with self._lock:
            self.wh.execute("DELETE FROM _EMU_STAGE")
            self.wh.execute("INSERT INTO _EMU_STAGE VALUES (%(u)s)", {"u": self.stage_url})

    def age_stream(self, stale_after: datetime, stream: str | None = None) -> None:
        """For tests: the stream (default: the first table's) goes (or went) stale at
        ``stale_after``."""
        stream = stream or self.tables[0].names.stream
        with self._lock:
            self.wh.execute(
                "UPDATE _EMU_STREAM_STATE SET STALE_AFTER = %(t)s WHERE STREAM = %(s)s",
                {"t": stale_after.isoformat(), "s": stream},
            )

    def drop_stream(self, stream: str) -> None:
        """For tests: ``DROP STREAM stream`` (SHOW STREAMS no longer lists it)."""
        with self._lock:
            self.wh.execute(f"DROP VIEW IF EXISTS {stream}")
            self.wh.execute("DELETE FROM _EMU_STREAM_STATE WHERE STREAM = %(s)s", {"s": stream})
            self.wh.execute(
                "DELETE FROM _EMU_OBJECTS WHERE KIND = 'STREAM' AND NAME = %(s)s", {"s": stream}
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
        """An SQS queue for the bucket's ObjectCreated events under the prefix (what the
        pipes' notification_channel is in Snowflake: one queue per account and region)."""
        sqs, s3 = self._clients()
        self._queue_url = sqs.create_queue(QueueName=self.queue_name)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=self._queue_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        queue: dict[str, Any] = {"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}
        if self.settings.s3.prefix:  # (an empty prefix filters nothing, and S3 refuses it)
            queue["Filter"] = {
                "Key": {"FilterRules": [{"Name": "prefix", "Value": self.settings.s3.prefix}]}
            }
        s3.put_bucket_notification_configuration(
            Bucket=self.settings.s3.bucket,
            NotificationConfiguration={"QueueConfigurations": [queue]},
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
        loaded = 0
        self._finish_loads()  # those under way since an earlier round
        self._load_pipes()
        for key in dict.fromkeys(self._notified_keys()):  # moto may notify twice for one object
            loaded += self._load(key)
        loaded += self._drain_queues()
        loaded += self._serve_refreshes()
        if self._ingested:  # once per round, for each pipe that loaded
            with self._lock:
                for pipe, at in self._ingested.items():
                    set_pipe_status(self.wh, pipe, self._state(pipe), pending=0, last=at)
            self._ingested.clear()
        return loaded

    def _finish_loads(self) -> None:
        """Loads under way a round older: their history row reads "Loaded" when done."""
        for load in list(self._in_progress):
            load[4] -= 1
            if load[4] > 0:
                continue
            self._in_progress.remove(load)
            landing, file, loaded, parsed, _ = load
            self.query(
                "UPDATE _EMU_COPY_HISTORY SET STATUS = 'Loaded', ROW_COUNT = %(l)s,"
                " ROW_PARSED = %(p)s WHERE TABLE_NAME = %(t)s AND FILE_NAME = %(f)s"
                " AND STATUS = 'Load in progress'",
                {"l": loaded, "p": parsed, "t": landing, "f": file},
            )

    def _serve_refreshes(self) -> int:
        requests = self.query("SELECT PIPE, PREFIX FROM _EMU_PIPE_REFRESH WHERE DONE_AT IS NULL")
        if not requests:
            return 0
        _, s3 = self._clients()
        by_name = {c.name: c for c in self._pipes.values()}
        loaded = 0
        for request in requests:
            pipe, prefix = str(request["PIPE"]), str(request["PREFIX"])
            copy = by_name.get(pipe)
            if copy is not None:
                paginator = s3.get_paginator("list_objects_v2")
                for page in paginator.paginate(
                    Bucket=self.settings.s3.bucket,
                    Prefix=self.settings.s3.prefix + copy.folder + prefix,
                ):
                    for item in page.get("Contents", []):
                        loaded += self._load(item["Key"])
            self.query(
                "UPDATE _EMU_PIPE_REFRESH SET DONE_AT = %(t)s"
                " WHERE PIPE = %(n)s AND PREFIX = %(p)s",
                {"t": datetime.now(UTC).isoformat(), "n": pipe, "p": prefix},
            )
            log.info("pipe_refreshed", pipe=pipe, prefix=prefix)
        return loaded

    def _load_pipes(self) -> None:
        """The pipes as they are now (applied by this process or by ``snowflake apply``,
        recreated, paused)."""
        pipes: dict[str, _PipeCopy] = {}
        state: dict[str, tuple[datetime, bool]] = {}
        for row in self.query("SELECT NAME, DEFINITION, CREATED_AT, PAUSED FROM _EMU_PIPES"):
            name = str(row["NAME"])
            copy = _PipeCopy(name, sql.pipe_copy(sql.Statement("50_pipe.sql", row["DEFINITION"])))
            pipes[copy.folder] = copy
            state[name] = (row["CREATED_AT"], bool(row["PAUSED"]))
        self._pipes, self._pipe_state = pipes, state

    def _drain_queues(self) -> int:
        """The files a paused pipe was notified of, once it runs again."""
        loaded = 0
        for name, (_, paused) in self._pipe_state.items():
            if paused:
                continue
            rows = self.query("SELECT KEY FROM _EMU_PIPE_QUEUE WHERE PIPE = %(n)s", {"n": name})
            if rows:
                self.query("DELETE FROM _EMU_PIPE_QUEUE WHERE PIPE = %(n)s", {"n": name})
                loaded += sum(self._load(str(r["KEY"])) for r in rows)
        return loaded

    def _pipe_of(self, relative: str) -> _PipeCopy | None:
        for folder, copy in self._pipes.items():
            if relative.startswith(folder):
                return copy
        return None

    def _load(self, key: str) -> int:
        """One object through its table's pipe. 1 if it loaded, 0 if skipped or failed."""
        relative = key.removeprefix(self.settings.s3.prefix)  # to the stage
        copy = self._pipe_of(relative)
        if copy is None:
            return 0  # no pipe reads this folder (the quarantine, another table's)
        in_folder = relative.removeprefix(copy.folder)
        if not re.fullmatch(copy.pattern, in_folder):
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
        header = _header(target)
        with self._lock:
            if self._held_or_loaded(copy, key, in_folder):
                return 0
            typed = self.wh.query(f"DESC TABLE {copy.landing}")
            columns = {str(r["name"]): str(r["type"]) for r in typed}
            holding, ddl, insert = copy.holding(header, columns)
            try:
                for statement in ddl:
                    self.wh.execute(statement)
                parsed = self._read_file(copy, holding, target, len(header))
            except CdcError as exc:
                self._history(copy, in_folder, "LOAD_FAILED", 0, 0, str(exc), now)
                state = self._state(copy.name)
                set_pipe_status(self.wh, copy.name, state, pending=0, error=str(exc))
                log.warning("pipe_load_failed", file=relative, error=str(exc))
                return 0
            self.wh.execute(insert, {"file": in_folder, "now": now})
            self.wh.execute(f"DELETE FROM {holding}")
            loaded = parsed
            if self.load_rounds:
                self._history(copy, in_folder, "Load in progress", loaded // 2, None, None, now)
                self._in_progress.append(
                    [copy.landing, in_folder, loaded, parsed, self.load_rounds]
                )
            else:
                self._history(copy, in_folder, "Loaded", loaded, parsed, None, now)
            self._ingested[copy.name] = now
        return 1

    def _read_file(self, copy: _PipeCopy, holding: str, path: Path, width: int) -> int:
        """A staged file's rows (its header skipped) into the holding table by position;
        returns their number. In DuckDB itself, beside fakesnow's server in this process:
        fakesnow's COPY lets DuckDB sniff the file, and its SQL translation cannot pass
        read_csv's options through."""
        import duckdb
        from fakesnow.copy_into import handle_csv
        from fakesnow.transforms.file_format import lookup_file_format

        sf = self.settings.snowflake
        database, schema = sf.database.upper(), sf.schema_.upper()
        try:
            options = lookup_file_format(self.duck, copy.emulated_format(), database, schema)
            fmt = handle_csv(options)
            names = ", ".join(f"_C{i}" for i in range(width))
            read = ", ".join(f"column{i}" for i in range(width))
            (count,) = self.duck.execute(
                f'INSERT INTO "{database}"."{schema}".{holding} ({names})'
                f" SELECT {read} FROM {read_csv(path, width, fmt)}"
            ).fetchall()[0]
        except (duckdb.Error, NotImplementedError) as exc:
            raise CdcError(f"loading {path.name}: {str(exc).splitlines()[0]}") from None
        except Exception as exc:  # noqa: BLE001 - fakesnow's errors are the connector's classes
            raise CdcError(f"loading {path.name}: {exc}") from None
        return int(count)

    def _held_or_loaded(self, copy: _PipeCopy, key: str, in_folder: str) -> bool:
        """Under the lock, just before a load, with the pipe as it is now: a paused pipe holds
        the file for when it is resumed (dropped if it is recreated first); a file this pipe
        already loaded is skipped (Snowpipe's load history is the pipe's own, and a recreated
        pipe starts it anew)."""
        rows = self.wh.query(
            "SELECT p.PAUSED, EXISTS (SELECT 1 FROM _EMU_COPY_HISTORY AS h"
            " WHERE h.TABLE_NAME = %(t)s AND h.FILE_NAME = %(f)s"
            " AND h.STATUS IN ('Loaded', 'Load in progress')"
            " AND h.LAST_LOAD_TIME >= COALESCE(p.CREATED_AT, '1970-01-01'::TIMESTAMP_TZ)) AS SEEN"
            " FROM _EMU_PIPES AS p WHERE p.NAME = %(n)s",
            {"n": copy.name, "t": copy.landing, "f": in_folder},
        )
        if not rows:
            return True  # dropped meanwhile
        if rows[0]["PAUSED"]:
            self.wh.execute(
                "INSERT INTO _EMU_PIPE_QUEUE VALUES (%(p)s, %(k)s)", {"p": copy.name, "k": key}
            )
            return True
        return bool(rows[0]["SEEN"])

    def _state(self, pipe: str) -> str:
        rows = self.wh.query("SELECT PAUSED FROM _EMU_PIPES WHERE NAME = %(n)s", {"n": pipe})
        return "PAUSED" if rows and rows[0]["PAUSED"] else "RUNNING"

    def _history(
        self,
        copy: _PipeCopy,
        file: str,
        status: str,
        loaded: int,
        parsed: int | None,
        error: str | None,
        at: str,
    ) -> None:
        self.wh.execute(
            "INSERT INTO _EMU_COPY_HISTORY"
            " VALUES (%(n)s, %(f)s, %(s)s, %(l)s, %(p)s, %(e)s, %(t)s)",
            {
                "n": copy.landing,
                "f": file,
                "s": status,
                "l": loaded,
                "p": parsed,
                "e": error,
                "t": at,
            },
        )

    # -- the task runner --------------------------------------------------------------------
    def run_tasks(self, *, cleanup: bool = False) -> int:
        """Each merge task's statements when its stream has data (the stream its WHEN
        SYSTEM$STREAM_HAS_DATA names), and the other tasks' when ``cleanup`` is asked.
        Returns the number of changes merged."""
        merged = 0
        with self._lock:
            defined = self.wh.query("SELECT NAME, DEFINITION FROM _EMU_TASKS ORDER BY NAME")
            for row in defined:
                name, text = str(row["NAME"]), str(row["DEFINITION"])
                body = sql.task_body(sql.Statement("70_tasks.sql", text))
                when = re.search(r"SYSTEM\$STREAM_HAS_DATA\('([^']+)'\)", text)
                if when is not None:
                    merged += self._merge(name, when.group(1).split(".")[-1], body)
                elif cleanup and self._task_started(name):
                    try:
                        for statement in body:
                            self.wh.execute(statement)
                    except CdcError as exc:
                        self._record_run(name, str(exc))
                    else:
                        self._record_run(name, None)
        return merged

    def _merge(self, task: str, stream: str, body: list[str]) -> int:
        if not self._task_started(task):
            return 0  # suspended: Snowflake schedules no run
        pending = int(self.wh.query(f"SELECT COUNT(*) AS N FROM {stream}")[0]["N"])
        if pending:
            # Statement by statement: fakesnow's MERGE writes to its own catalog database,
            # which DuckDB refuses inside a transaction on another one. The body is
            # idempotent (the stream keeps its rows until they are marked consumed, and
            # a change is applied only over an older one), so a run cut short is redone
            # whole by the next run.
            try:
                for statement in body:
                    self.wh.execute(statement)
            except CdcError as exc:
                self._record_run(task, str(exc))
                return 0
            self.wh.execute(
                f"INSERT INTO _EMU_STREAM_CONSUMED SELECT '{stream}', _FILE, _FILE_ROW"
                f" FROM {stream}"
            )
            self._record_run(task, None)
        stream_read(self.wh, stream)
        return pending

    def pump(self) -> tuple[int, int]:
        """One round: the pipe stand-in, then the tasks. (files loaded, changes merged)"""
        return self.ingest(), self.run_tasks()

    def pump_forever(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        """Rounds until ``stop`` is set (the demo's and ``local up``'s feeder); a failed round
        is logged and the next one goes on, as Snowpipe and the task scheduler do."""
        while not stop.is_set():
            try:
                self.pump()
            except Exception as exc:  # noqa: BLE001 - the stand-in keeps going, like Snowpipe
                log.warning("local_warehouse_pump_failed", error=str(exc))
            stop.wait(interval_s)

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


def _header(path: Path) -> list[str]:
    """A staged object's header line: its column names."""
    opener: Any = open
    if path.suffix == ".gz":
        opener = gzip.open
    elif path.suffix == ".zst":
        return _zstd_first_line(path)
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        return next(csv.reader(handle), [])


def _zstd_first_line(path: Path) -> list[str]:
    import zstandard

    with path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
        text = io.TextIOWrapper(reader, encoding="utf-8", newline="")
        return next(csv.reader(text), [])
