"""The least-privilege grants (``snowflake render --grants``) cover every statement the tasks
and the reconciler run, and give the reconciler nothing more."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlglot
from sqlglot import exp

from cdc_daemon.config import Settings
from cdc_daemon.warehouse import sql
from cdc_daemon.warehouse.client import SnowflakeDialect
from cdc_daemon.warehouse.daytotals import DayTotals
from cdc_daemon.warehouse.model import WarehouseTable, names
from tests.helpers import seed_settings
from tests.schemas import sales_tables

Grant = tuple[str, str, str, str]  # role, privilege, object kind, object name


@pytest.fixture
def settings() -> Settings:
    return seed_settings(snowflake={"database": "ANALYTICS", "schema": "CDC"})


def granted(text: str) -> set[Grant]:
    """(role, privilege, kind, name) of every ``GRANT ... ON ... TO ROLE`` of the script."""
    out: set[Grant] = set()
    body = " ".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    for stmt in (s.strip() for s in body.split(";")):
        match = re.fullmatch(
            r"GRANT (.+?) ON (FUTURE |ALL )?(ACCOUNT|DATABASE|SCHEMA|WAREHOUSE|TABLE|STREAM|PIPE"
            r"|TASKS|TASK|INTEGRATION) (?:IN SCHEMA )?(\S+)? ?TO ROLE (\w+)"
            r"(?: COPY CURRENT GRANTS)?",
            " ".join(stmt.split()),
        )
        if match:
            privileges, scope, kind, name, role = match.groups()
            name = name or ""
            if scope:
                kind = f"{scope.strip()} {kind}"
            for privilege in privileges.split(","):
                out.add((role, privilege.strip(), kind, name))
    return out


class Recorder:
    """Collects the statements the reconciler's dialect sends (it is not Snowflake: it answers
    a pipe status with an empty one, anything else with no rows)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.snowflake = settings.snowflake
        self.seen: list[str] = []

    def query(self, text: str, params: Any = None) -> list[dict[str, Any]]:
        self.seen.append(text)
        return [{"S": "{}"}] if "SYSTEM$PIPE_STATUS" in text else []


def tables(statement: str) -> list[exp.Table]:
    return list(sqlglot.parse_one(statement, read="snowflake").find_all(exp.Table))


def keyless(t: WarehouseTable) -> WarehouseTable:
    """The table as if it had no key (its merge counts copies into ``<T>_ROWS``)."""
    columns = tuple(dataclasses.replace(c, key=False) for c in t.columns)
    return dataclasses.replace(t, columns=columns, models=())


@pytest.mark.parametrize("variant", ["plain", "history", "keyless"])
def test_the_tasks_role_may_run_every_statement_of_the_tasks(
    settings: Settings, variant: str
) -> None:
    """Each INSERT, DELETE and MERGE of both task bodies has its privilege on its target, each
    table (or stream) a task reads has SELECT, and the role may use the warehouse and execute
    tasks; also with a history table (``history = true``), which the merge task writes, and
    for a keyless table, whose merge writes its ``_ROWS`` table."""
    sf = settings.snowflake
    warehouse = [
        keyless(t) if variant == "keyless" else dataclasses.replace(t, history=variant == "history")
        for t in sales_tables(settings)
    ]
    grants = granted(sql.render_grants(settings, warehouse))
    role, prefix = sf.tasks_role, f"{sf.database}.{sf.schema_}."
    needed: set[Grant] = {
        (role, "EXECUTE TASK", "ACCOUNT", ""),
        (role, "USAGE", "WAREHOUSE", sf.warehouse),
        (role, "USAGE", "DATABASE", sf.database),
        (role, "USAGE", "SCHEMA", f"{sf.database}.{sf.schema_}"),
    }
    tasks = [
        s for s in sql.statements(settings, warehouse) if s.head.startswith("CREATE OR ALTER TASK")
    ]
    for task in tasks:
        for statement in sql.task_body(task):
            tree = sqlglot.parse_one(statement, read="snowflake")
            target = tree.this if isinstance(tree, (exp.Insert, exp.Delete, exp.Merge)) else None
            if isinstance(target, exp.Schema):
                target = target.this
            assert isinstance(target, exp.Table), statement
            name = prefix + target.name
            if isinstance(tree, exp.Merge):
                for branch in ("DELETE", "UPDATE", "INSERT"):
                    if f"THEN {branch}" in statement:
                        needed.add((role, branch, "TABLE", name))
            else:
                needed.add(
                    (role, "INSERT" if isinstance(tree, exp.Insert) else "DELETE", "TABLE", name)
                )
            for table in tables(statement):
                if table.name != target.name:
                    kind = "STREAM" if table.name == "RAW_SALES_STREAM" else "TABLE"
                    needed.add((role, "SELECT", kind, prefix + table.name))
                    if kind == "STREAM":
                        needed.add((role, "SELECT", "TABLE", prefix + "RAW_SALES"))
    assert needed - grants == set()


def test_the_reconciler_gets_what_it_runs_and_nothing_else(settings: Settings) -> None:
    """The reconciler's statements (COPY_HISTORY, SYSTEM$PIPE_STATUS, ALTER PIPE ... REFRESH,
    SHOW TASKS, TASK_HISTORY, SHOW STREAMS, the completeness check's totals of SALES) are each
    covered, and its role holds exactly those grants."""
    sf = settings.snowflake
    recorder = Recorder(settings)
    dialect = SnowflakeDialect()
    (n,) = names(settings)
    dialect.load_history(recorder, n, datetime.now(UTC))  # type: ignore[arg-type]
    dialect.pipe_status(recorder, n)  # type: ignore[arg-type]
    dialect.refresh(recorder, n, "dt=2011-01-04/")  # type: ignore[arg-type]
    dialect.tasks(recorder, n)  # type: ignore[arg-type]
    dialect.stream(recorder, n)  # type: ignore[arg-type]
    (sales,) = sales_tables(settings)
    completeness = DayTotals.of(sales, "invoice_date", "id").warehouse_query(at_most=100)
    seen = [*recorder.seen, completeness]
    role, schema = sf.reconciler_role, f"{sf.database}.{sf.schema_}"
    pipe = f"{schema}.{n.pipe}"
    needed: set[Grant] = {
        (role, "USAGE", "DATABASE", sf.database),
        (role, "USAGE", "SCHEMA", schema),
        (role, "USAGE", "WAREHOUSE", sf.warehouse),
    }
    for statement in seen:
        if "COPY_HISTORY" in statement:
            # Snowflake, COPY_HISTORY usage notes: USAGE on the database and schema, any
            # privilege on the table; MONITOR on the pipe for Snowpipe loads.
            needed |= {
                (role, "SELECT", "TABLE", f"{schema}.RAW_SALES"),
                (role, "MONITOR", "PIPE", pipe),
            }
        elif "SYSTEM$PIPE_STATUS" in statement:
            needed.add((role, "MONITOR", "PIPE", pipe))
        elif re.match(r"ALTER PIPE \S+ REFRESH", statement):
            needed.add((role, "OPERATE", "PIPE", pipe))
        elif statement.startswith("SHOW TASKS") or "TASK_HISTORY" in statement:
            for task in n.tasks:
                needed.add((role, "MONITOR", "TASK", f"{schema}.{task}"))
        elif statement.startswith("SHOW STREAMS"):
            needed.add((role, "SELECT", "STREAM", f"{schema}.{n.stream}"))
        else:
            for table in tables(statement):
                needed.add((role, "SELECT", "TABLE", f"{schema}.{table.name}"))
    assert len(seen) == 8  # history, pipe status, refresh, SHOW TASKS, 2 x TASK_HISTORY, ...
    held = {g for g in granted(sql.render_grants(settings, sales_tables(settings))) if g[0] == role}
    assert held == needed
