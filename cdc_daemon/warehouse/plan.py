"""``cdc-daemon snowflake apply [--plan]``: what exists in Snowflake against what ``snowflake/``
renders, and the changes that bring the first to the second.

Each rendered statement is one object. What exists is read through the dialect's
``describe`` (SHOW / DESC in Snowflake, the emulation's records locally) and compared
property by property; only a difference becomes a change, so applying twice changes nothing:

- database, schema, warehouse: ``IF NOT EXISTS``, run every time (no-ops once they exist;
  their properties are not compared);
- storage integration: created when missing; a changed role ARN or allowed location is set
  with ``ALTER STORAGE INTEGRATION ... SET`` (which keeps its external ID);
- file format and stage: ``CREATE OR ALTER`` when they differ (Snowflake brings the object to
  the definition in place: https://docs.snowflake.com/en/sql-reference/sql/create-or-alter);
- tables: created when missing (with the ``INSERT`` that follows a table's ``CREATE`` in
  ``snowflake/``, which fills a new history table); a column the catalog has and the table
  lacks is added (``ADD COLUMN IF NOT EXISTS``); a column of a narrower type that Snowflake
  widens in place (a larger NUMBER precision at the same scale, a longer VARCHAR) is altered
  (``ALTER COLUMN ... SET DATA TYPE``); a column of another type is reported with the way
  forward, never changed (``CREATE OR ALTER TABLE`` would drop the columns a definition omits);
- pipe: created when missing; when its COPY differs, or its stage's URL or integration
  changes ("you must recreate the pipe": https://docs.snowflake.com/en/user-guide/
  data-load-snowpipe-manage), recreated by Snowflake's documented procedure
  (``recreate_pipe``) so that no staged file is lost or loaded twice;
- stream: created when missing; on another table it is reported (recreating a stream loses
  its offset: the changes not merged yet);
- tasks: ``SUSPEND``, ``CREATE OR ALTER TASK``, ``RESUME`` when the schedule, warehouse,
  condition or body differs (https://docs.snowflake.com/en/sql-reference/sql/create-task:
  a task must be suspended to be altered); a suspended task is resumed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog

from cdc_daemon.config import Settings
from cdc_daemon.errors import CdcError, TransientError
from cdc_daemon.warehouse import sql
from cdc_daemon.warehouse.client import Described, Warehouse
from cdc_daemon.warehouse.model import Names, WarehouseTable, same_type, widens_in_place

log = structlog.get_logger()

# The objects staged under a prefix (keys relative to the bucket's prefix, with their last
# modification) modified since a time: what the stage holds, for refreshing a recreated pipe.
Staged = Callable[[str, datetime], list[tuple[str, datetime]]]

REFRESH_WINDOW = timedelta(days=7)  # ALTER PIPE ... REFRESH: files staged in the last 7 days
HISTORY_WINDOW = timedelta(days=14)  # COPY_HISTORY


@dataclass(frozen=True)
class Change:
    """One object brought in line: ``action`` is create, alter, recreate, resume or manual (a
    difference apply will not make: the reason says what to do)."""

    action: str
    kind: str
    name: str
    why: str
    statements: tuple[sql.Statement, ...] = ()
    pipe: Names | None = None  # recreate: the table whose pipe it is
    moves_pipes: bool = False  # a stage change that its pipes must be paused for

    def line(self) -> str:
        return f"{self.action:8} {self.kind} {self.name}: {self.why}"


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    always: list[sql.Statement] = field(default_factory=list)  # IF NOT EXISTS, USE
    tables: list[WarehouseTable] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.changes

    def render(self) -> str:
        if self.empty:
            return "Snowflake matches snowflake/: nothing to change\n"
        return "".join(c.line() + "\n" for c in self.changes)


# -- reading definitions ----------------------------------------------------------------------

ID = "([A-Za-z0-9_$]+)"  # an identifier as the settings allow it (captured)
_OPTION = re.compile(ID + r"\s*=\s*('(?:[^'\\]|''|\\.)*'|\([^)]*\)|[^\s,()]+)", re.S)


def norm(value: str, keep_case: bool = False) -> str:
    """A property's value as compared: upper case, no quotes or brackets around it, no blanks
    (DESC shows ``["s3://b/p/"]`` for a URL, ``[]`` for an empty NULL_IF, ``\\"`` for a quote)."""
    v = value.strip().replace('\\"', '"')
    if v[:1] in "([" and v[-1:] in ")]":
        v = v[1:-1]
    v = v.strip().strip('"') if v.startswith('"') and len(v) > 2 else v
    if len(v) >= 2 and v[0] == v[-1] == "'":
        v = v[1:-1].replace("''", "'")
    v = re.sub(r"\s+", "", v)
    return v if keep_case else v.upper()


def options(text: str) -> dict[str, str]:
    """``KEY = value`` options of a CREATE statement (after its name), as written."""
    return {k.upper(): v for k, v in _OPTION.findall(text)}


def desired(stmt: sql.Statement) -> tuple[str, str, dict[str, str]] | None:
    """(kind, name, properties) of a rendered statement that defines a compared object."""
    text = stmt.text
    integration = r"CREATE STORAGE INTEGRATION IF NOT EXISTS " + ID + r"(.*)$"
    if m := re.match(integration, text, re.S | re.I):
        opts = options(m.group(2))
        keys = ("ENABLED", "STORAGE_AWS_ROLE_ARN", "STORAGE_ALLOWED_LOCATIONS")
        return "INTEGRATION", m.group(1), {k: opts[k] for k in keys if k in opts}
    if m := re.match(r"CREATE OR ALTER FILE FORMAT " + ID + r"(.*)$", text, re.S | re.I):
        return "FILE FORMAT", m.group(1), options(m.group(2))
    if m := re.match(r"CREATE OR ALTER STAGE " + ID + r"(.*)$", text, re.S | re.I):
        opts = options(m.group(2))
        fmt = re.search(r"FORMAT_NAME\s*=\s*'([^']+)'", m.group(2))
        props = {"URL": opts.get("URL", "")}
        if "STORAGE_INTEGRATION" in opts:
            props["STORAGE_INTEGRATION"] = opts["STORAGE_INTEGRATION"]
        if fmt:
            props["FORMAT_NAME"] = fmt.group(1).split(".")[-1]
        return "STAGE", m.group(1), props
    if m := re.match(r"CREATE (?:OR REPLACE )?PIPE (?:IF NOT EXISTS )?" + ID, text, re.I):
        return "PIPE", m.group(1), {"COPY": sql.pipe_copy(stmt)}
    if m := re.match(r"CREATE STREAM IF NOT EXISTS " + ID + r"\s+ON TABLE (\S+)", text, re.I):
        return "STREAM", m.group(1), {"TABLE": m.group(2).split(".")[-1]}
    task = r"CREATE OR ALTER TASK " + ID + r"(.*?)\bAS\s+(EXECUTE\s.*)$"
    if m := re.match(task, text, re.S | re.I):
        return "TASK", m.group(1), task_properties(m.group(2), m.group(3))
    if m := re.match(r"CREATE TABLE IF NOT EXISTS " + ID, text, re.I):
        return "TABLE", m.group(1), {}
    return None


def task_properties(head: str, body: str) -> dict[str, str]:
    """What SHOW TASKS shows of a task: warehouse (none when serverless), schedule,
    condition (its WHEN) and definition (the body after AS)."""
    when = re.search(r"\bWHEN\s+(.*)$", head, re.S | re.I)
    schedule = re.search(r"SCHEDULE\s*=\s*'([^']*)'", head, re.I)
    warehouse = re.search(r"\bWAREHOUSE\s*=\s*" + ID, head, re.I)
    return {
        "WAREHOUSE": warehouse.group(1) if warehouse else "",
        "SCHEDULE": schedule.group(1) if schedule else "",
        "CONDITION": when.group(1).strip() if when else "",
        "DEFINITION": body.strip(),
    }


# Values compared with their case: S3 keys are case-sensitive.
CASED = frozenset({"URL", "STORAGE_ALLOWED_LOCATIONS"})


def differences(kind: str, want: dict[str, str], have: Described) -> list[str]:
    """The properties that differ, each as ``NAME: have -> want``."""
    out = []
    for key, value in want.items():
        if key in ("COPY", "DEFINITION", "CONDITION"):
            same = _text(have.get(key, ("", False))[0]) == _text(value)
        else:
            cased = key in CASED
            same = key in have and norm(have[key][0], cased) == norm(value, cased)
        if not same and key in ("COPY", "DEFINITION"):
            out.append(f"{key}: differs from the rendered one")
        elif not same:
            was = _shown(have[key][0]) if key in have else "unset"
            out.append(f"{key}: {was} -> {_shown(value)}")
    if kind == "FILE FORMAT":
        for key, (value, is_default) in have.items():
            if key not in want and not is_default:
                out.append(f"{key}: {value} -> its default")
    return out


def _shown(value: str) -> str:
    """A value as printed: without the quotes around it."""
    v = value.strip()
    return v[1:-1] if len(v) >= 2 and v[0] == v[-1] == "'" else v


def _text(value: str) -> str:
    """SQL text as compared: blanks collapsed, case ignored, no trailing semicolon."""
    return re.sub(r"\s+", " ", value).strip().rstrip(";").strip().upper()


# -- the plan ---------------------------------------------------------------------------------


def make_plan(
    wh: Warehouse,
    settings: Settings,
    tables: list[WarehouseTable],
    *,
    stage_url_override: str | None = None,
) -> Plan:
    """Compare every rendered object with what exists. The ``always`` statements (IF NOT
    EXISTS, USE SCHEMA) are run first, so that the objects can be described in the schema."""
    statements = sql.statements(settings, tables, stage_url_override=stage_url_override)
    plan = Plan(tables=tables)
    by_table = {t.names.pipe: t.names for t in tables}
    fresh = columns_done = False
    stage_moved = ""  # the stage's URL or integration changes: the pipes are recreated
    i = 0
    while i < len(statements):
        stmt = statements[i]
        i += 1
        if stmt.file > "40_tables.sql" and not columns_done:
            # The columns before the pipe, stream and tasks that name them.
            columns_done = True
            if not fresh:
                _column_changes(wh, plan)
        if stmt.head.startswith("ALTER TASK"):
            continue  # part of its task's change
        found = desired(stmt)
        if found is None:
            plan.always.append(stmt)
            if stmt.head.startswith("USE "):
                try:
                    wh.dialect.execute_ddl(wh, stmt)
                except CdcError as exc:
                    if "does not exist" not in str(exc):
                        raise
                    fresh = True  # no schema yet: everything is created
            continue
        kind, name, want = found
        have = None if fresh else wh.dialect.describe(wh, kind, name)
        if kind == "TABLE":
            # The statements that fill a table when it is created (a history's first
            # versions) run with its CREATE only.
            fill = []
            while i < len(statements) and re.match(
                rf"INSERT INTO {re.escape(name)}\b", statements[i].text, re.I
            ):
                fill.append(statements[i])
                i += 1
            if have is None:
                plan.changes.append(Change("create", kind, name, "missing", (stmt, *fill)))
            continue
        if kind == "TASK":
            resume = next(
                s
                for s in statements[i:]
                if re.fullmatch(rf"ALTER TASK {re.escape(name)} RESUME", s.text)
            )
            suspend = sql.Statement(stmt.file, f"ALTER TASK IF EXISTS {name} SUSPEND")
            if have is None:
                plan.changes.append(Change("create", kind, name, "missing", (stmt, resume)))
            elif diff := differences(kind, want, have):
                plan.changes.append(
                    Change("alter", kind, name, "; ".join(diff), (suspend, stmt, resume))
                )
            elif have.get("STATE", ("started", False))[0].lower() != "started":
                plan.changes.append(
                    Change("resume", kind, name, f"{have['STATE'][0]} -> started", (resume,))
                )
            continue
        if have is None:
            plan.changes.append(Change("create", kind, name, "missing", (stmt,)))
            continue
        diff = differences(kind, want, have)
        if kind == "PIPE" and not diff:
            state = have.get("STATE", ("RUNNING", False))[0].upper()
            if stage_moved:
                # "If you change the stage's cloud parameters (URL, STORAGE_INTEGRATION,
                # ENCRYPTION), you must recreate the pipe" (Manage Snowpipe).
                diff = [f"its stage's {stage_moved} changes"]
            elif state != "RUNNING":
                # Paused by an apply that did not finish (or by hand): recreating it again
                # refreshes what its dropped queue held, then it runs.
                diff = [f"{state} -> RUNNING, the objects it has not loaded refreshed"]
        if not diff:
            continue
        why = "; ".join(diff)
        if kind == "STAGE":
            moved = [d.split(":")[0] for d in diff if d.startswith(("URL", "STORAGE_INTEGRATION"))]
            stage_moved = " and ".join(moved)
        if kind == "PIPE":
            plan.changes.append(Change("recreate", kind, name, why, (stmt,), by_table[name]))
        elif kind == "STREAM":
            plan.changes.append(
                Change(
                    "manual",
                    kind,
                    name,
                    f"{why}: recreating it loses the changes not merged yet; merge them, then "
                    f"DROP STREAM {name} and apply again",
                )
            )
        elif kind == "INTEGRATION":
            # No CREATE OR ALTER for integrations: ALTER ... SET keeps the external ID that the
            # IAM role's trust policy names (recreating it would make a new one).
            sets = " ".join(f"{k} = {v}" for k, v in want.items())
            alter = sql.Statement(stmt.file, f"ALTER STORAGE INTEGRATION {name} SET {sets}")
            plan.changes.append(Change("alter", kind, name, why, (alter,)))
        else:
            moves = kind == "STAGE" and bool(stage_moved)
            plan.changes.append(Change("alter", kind, name, why, (stmt,), moves_pipes=moves))
    if not fresh and not columns_done:
        _column_changes(wh, plan)
    return plan


def _column_changes(wh: Warehouse, plan: Plan) -> None:
    """Columns the catalog has and an existing table lacks (added), has with a narrower type
    that Snowflake widens in place (altered), or has with another type (reported, with the way
    forward)."""
    created = {c.name for c in plan.changes if c.kind == "TABLE"}
    for t in plan.tables:
        adding = {table for table, _ in t.column_tables()}  # the tombstones: widened only
        for table, landing, columns in t.typed_tables():
            if table in created:
                continue
            have = wh.dialect.describe(wh, "TABLE", table) or {}
            adds: list[sql.Statement] = []
            added: list[str] = []
            for c in columns:
                kind = c.type.landing if landing else c.type.final
                if c.name not in have:
                    if table not in adding:
                        continue
                    adds.append(
                        sql.Statement(
                            "40_tables.sql",
                            f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {c.q} {kind}",
                        )
                    )
                    added.append(c.name)
                elif alter := widen_statement(table, c.q, have[c.name][0], kind):
                    plan.changes.append(
                        Change(
                            "alter",
                            "COLUMN",
                            f"{table}.{c.name}",
                            f"{have[c.name][0]} -> {kind} (widened in the source)",
                            (sql.Statement("40_tables.sql", alter),),
                        )
                    )
                elif have[c.name][0] and not _same_type(have[c.name][0], kind):
                    plan.changes.append(
                        Change(
                            "manual",
                            "COLUMN",
                            f"{table}.{c.name}",
                            f"{have[c.name][0]} in Snowflake, {kind} from the catalog: "
                            + retyped_way(t, have[c.name][0], kind),
                        )
                    )
            for name, kind in t.own_columns(table):
                if name not in have and table in adding:
                    adds.append(
                        sql.Statement(
                            "40_tables.sql",
                            f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {kind}",
                        )
                    )
                    added.append(name)
            if adds:
                plan.changes.append(
                    Change("alter", "TABLE", table, f"add column {', '.join(added)}", tuple(adds))
                )


def widen_statement(table: str, quoted: str, have: str, want: str) -> str | None:
    """The ALTER that brings a column of DESC type ``have`` to ``want`` when that is a widening
    Snowflake makes in place ("Increase the precision of a number column", "Increase the length
    of a text string column": https://docs.snowflake.com/en/sql-reference/sql/alter-table-column);
    None when the types are the same or it is not one."""
    if not have or same_type(have, want) or not widens_in_place(have, want):
        return None
    return f"ALTER TABLE {table} ALTER COLUMN {quoted} SET DATA TYPE {want}"


def retyped_way(t: WarehouseTable, have: str, want: str) -> str:
    """Why a column's type is not changed, and the way forward."""
    n = t.names
    why = "not a widening"
    if have.upper().startswith("TIMESTAMP_NTZ") and want.upper().startswith("TIMESTAMP_TZ"):
        why = "TIMESTAMP_NTZ to TIMESTAMP_TZ is a change to another type"
    return (
        f"{why}, which Snowflake cannot make in place; drop {n.landing}, {n.name} and its work "
        "tables, `snowflake apply` to create them again, and export the table again (logical "
        f"mode: `cdc-daemon resync --table {n.source}`; watermark mode: a backfill of its days)"
    )


def _same_type(have: str, want: str) -> bool:
    """``model.same_type``; the emulator gives no type for a table it did not type (never
    compared)."""
    return same_type(have, want)


# -- applying it ------------------------------------------------------------------------------


def apply_plan(wh: Warehouse, plan: Plan, staged: Staged | None) -> list[Change]:
    """Run the plan: the ``always`` statements, then each change in order. Returns the changes
    left for an operator (``manual``). A stage whose URL or integration changes is altered
    only once every pipe to recreate is paused and drained ("Manage Snowpipe")."""
    for stmt in plan.always:
        wh.dialect.execute_ddl(wh, stmt)
    manual = []
    paused: dict[str, PausedPipe] = {}
    try:
        for change in plan.changes:
            if change.action == "manual":
                log.warning(
                    "snowflake_not_applied", object=f"{change.kind} {change.name}", why=change.why
                )
                manual.append(change)
                continue
            if change.moves_pipes:
                for other in plan.changes:
                    if other.action == "recreate" and other.pipe and other.name not in paused:
                        paused[other.name] = pause_pipe(wh, other.pipe)
            if change.action == "recreate":
                assert change.pipe is not None
                held = paused.get(change.name) or pause_pipe(wh, change.pipe)
                paused[change.name] = held
                replace_pipe(wh, held, change.statements[0], staged)
                del paused[change.name]
            else:
                for stmt in change.statements:
                    wh.dialect.execute_ddl(wh, stmt)
            log.info(
                "snowflake_applied", action=change.action, object=f"{change.kind} {change.name}"
            )
    except BaseException:
        for held in paused.values():
            held.resume()  # not recreated: the old pipe loads again, its queue kept
        raise
    return manual


def _wait(what: str, check: Callable[[], bool], timeout_s: float, poll_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TransientError(f"gave up waiting for {what} after {int(timeout_s)} s")
        time.sleep(poll_s)


@dataclass
class PausedPipe:
    """A pipe paused and drained for recreation: what COPY_HISTORY showed loaded then."""

    wh: Warehouse
    n: Names
    loaded: set[str]
    paused_at: datetime

    def ddl(self, text: str) -> None:
        self.wh.dialect.execute_ddl(self.wh, sql.Statement("50_pipe.sql", text))

    def resume(self) -> None:
        """Back to running, never hiding the error that stopped the recreation."""
        try:
            self.ddl(f"ALTER PIPE {self.n.pipe} SET PIPE_EXECUTION_PAUSED = FALSE")
        except CdcError as exc:
            log.error("pipe_not_resumed", pipe=self.n.pipe, error=str(exc), hint="apply again")


def pause_pipe(
    wh: Warehouse, n: Names, *, timeout_s: float = 300, poll_s: float = 2.0
) -> PausedPipe:
    """Steps 1-2 of recreating a pipe (Snowflake, "Manage Snowpipe": pause it, then check that
    SYSTEM$PIPE_STATUS says PAUSED with no pending file):

    1. paused; PAUSED with ``pendingFileCount`` 0 confirmed: the old pipe has loaded what it had
       queued and starts nothing more (files notified from now on are held for it, and dropped
       with it);
    2. no load of the table in progress in COPY_HISTORY: the loaded set taken then is final.

    On a failure the pipe is resumed and the error raised."""
    started = datetime.now(UTC)
    held = PausedPipe(wh, n, set(), started)
    held.ddl(f"ALTER PIPE {n.pipe} SET PIPE_EXECUTION_PAUSED = TRUE")

    def drained() -> bool:
        status = wh.dialect.pipe_status(wh, n)
        return status.execution_state == "PAUSED" and status.pending_file_count == 0

    def settled() -> bool:
        records = wh.dialect.load_history(wh, n, started - HISTORY_WINDOW)
        return not any(r.status == "load_in_progress" for r in records)

    try:
        _wait(f"pipe {n.pipe} to be PAUSED with no pending file", drained, timeout_s, poll_s)
        _wait(f"the loads in progress into {n.landing} to end", settled, timeout_s, poll_s)
        held.loaded = {
            r.file
            for r in wh.dialect.load_history(wh, n, started - HISTORY_WINDOW)
            if r.status == "loaded"
        }
    except BaseException:
        held.resume()
        raise
    return held


def replace_pipe(
    wh: Warehouse,
    held: PausedPipe,
    create: sql.Statement,
    staged: Staged | None,
    *,
    timeout_s: float = 300,
    poll_s: float = 2.0,
) -> list[str]:
    """Steps 3-4: ``CREATE OR REPLACE``, paused again, resumed, RUNNING confirmed (Snowflake's
    procedure); then every object of the table's folder staged within the last 7 days
    (REFRESH's window) and before the replacement, that COPY_HISTORY did not show loaded at the
    pause, is refreshed by name: the files the dropped queue held, and those staged while the
    pipe was paused. None loaded before the pause is refreshed ("when a pipe is recreated, the
    load history is dropped"); one the new pipe is notified of itself is staged after the
    replacement. Returns the objects refreshed (relative to the bucket's prefix)."""
    n, pipe = held.n, held.n.pipe
    replace = re.sub(r"^CREATE PIPE IF NOT EXISTS", "CREATE OR REPLACE PIPE", create.text, count=1)
    replaced_at = datetime.now(UTC)
    held.ddl(replace)
    held.ddl(f"ALTER PIPE {pipe} SET PIPE_EXECUTION_PAUSED = TRUE")
    held.ddl(f"ALTER PIPE {pipe} SET PIPE_EXECUTION_PAUSED = FALSE")

    def running() -> bool:
        return wh.dialect.pipe_status(wh, n).execution_state == "RUNNING"

    _wait(f"pipe {pipe} to be RUNNING", running, timeout_s, poll_s)
    refreshed: list[str] = []
    if staged is None:
        log.warning("pipe_recreated_without_refresh", pipe=pipe, hint="the reconciler refreshes")
        return refreshed
    pattern = re.compile(_pattern(create))
    for key, modified in staged(n.folder, held.paused_at - REFRESH_WINDOW):
        relative = key.removeprefix(n.folder)
        if key in held.loaded or modified > replaced_at or not pattern.fullmatch(relative):
            continue
        try:
            wh.dialect.refresh(wh, n, relative)
        except CdcError as exc:
            raise TransientError(
                f"pipe {pipe} was recreated, but refreshing {key} failed ({exc}): the "
                "reconciler refreshes objects not loaded after snowflake.missing_after_s"
            ) from None
        refreshed.append(key)
    log.warning(
        "pipe_recreated", pipe=pipe, refreshed=len(refreshed), loaded_before=len(held.loaded)
    )
    return refreshed


def recreate_pipe(
    wh: Warehouse,
    n: Names,
    create: sql.Statement,
    staged: Staged | None,
    *,
    timeout_s: float = 300,
    poll_s: float = 2.0,
) -> list[str]:
    """A pipe whose COPY changed, by Snowflake's procedure for recreating a pipe that loads
    from event notifications: ``pause_pipe``, then ``replace_pipe``."""
    held = pause_pipe(wh, n, timeout_s=timeout_s, poll_s=poll_s)
    return replace_pipe(wh, held, create, staged, timeout_s=timeout_s, poll_s=poll_s)


def _pattern(create: sql.Statement) -> str:
    match = re.search(r"PATTERN\s*=\s*'([^']*)'", create.text)
    return match.group(1) if match else ".*"
