"""`cdc-daemon snowflake apply [--plan]` against a warehouse that drifted from snowflake/: each
difference is printed, the safe ones are made, a pipe whose COPY changed is recreated without
losing or reloading a file, and applying twice changes nothing. The local warehouse keeps what
each object was made with and behaves as Snowflake documents: a paused pipe queues the files it
is notified of, a recreated pipe has lost that queue and has a load history of its own."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.errors import TransientError
from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.reconcile.reconciler import Reconciler
from cdc_daemon.warehouse.plan import recreate_pipe
from cdc_daemon.warehouse.sql import Statement
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, make_settings
from tests.warehouse_checks import assert_warehouse_equals_source

# The pipe as a deployment made before dt=unknown/ objects existed had it.
OLD_PATTERN = "'.*dt=[0-9]{4}-[0-9]{2}-[0-9]{2}/[^/]+[.]csv([.](gz|zst))?'"


@pytest.fixture
def warehouse(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> Any:
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path, batch={"max_rows": 1_000})
    wh = start_warehouse(settings, warehouse_dir)
    yield wh
    wh.stop()


def _drift_pipe(warehouse: LocalWarehouse) -> None:
    """RAW_SALES_PIPE as an older apply made it: another PATTERN."""
    (row,) = warehouse.query("SELECT DEFINITION FROM _EMU_PIPES WHERE NAME = 'RAW_SALES_PIPE'")
    old = re.sub(r"PATTERN = '[^']*'", lambda _: f"PATTERN = {OLD_PATTERN}", row["DEFINITION"])
    warehouse.query(
        "UPDATE _EMU_PIPES SET DEFINITION = %(d)s WHERE NAME = 'RAW_SALES_PIPE'", {"d": old}
    )


async def _export_while_paused(
    warehouse: LocalWarehouse, dsn: str, rows: int, *, days: int, seed: float
) -> None:
    """RAW_SALES_PIPE paused, then more rows exported and notified to it (held by it)."""
    warehouse.wh.dialect.execute_ddl(
        warehouse.wh,
        Statement("50_pipe.sql", "ALTER PIPE RAW_SALES_PIPE SET PIPE_EXECUTION_PAUSED = TRUE"),
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        generate_sales(conn, rows, days=days, seed=seed)
    assert await export_until_idle(warehouse.settings) == 0
    warehouse.pump_until_quiet()


def _loaded_files(warehouse: LocalWarehouse) -> list[str]:
    rows = warehouse.query(
        "SELECT FILE_NAME FROM _EMU_COPY_HISTORY WHERE STATUS = 'Loaded' ORDER BY FILE_NAME"
    )
    return [str(r["FILE_NAME"]) for r in rows]


def test_a_fresh_warehouse_applied_once_plans_nothing_more(warehouse: LocalWarehouse) -> None:
    """Right after snowflake/ was applied, the plan is empty, and applying it again makes no
    change."""
    plan = warehouse.apply(plan_only=True)
    assert plan.empty, plan.render()
    assert warehouse.apply().empty
    assert "nothing to change" in warehouse.apply(plan_only=True).render()


def test_a_changed_file_format_stage_and_task_are_planned_then_altered_in_place(
    warehouse: LocalWarehouse,
) -> None:
    """A file format made with the positional loads' options (SKIP_HEADER, no PARSE_HEADER), a
    stage on another URL and a merge task on another schedule: --plan names each property that
    differs and changes nothing, and the pipe on the moved stage is to be recreated; apply
    alters them (CREATE OR ALTER, the task suspended and resumed, the pipe recreated) and the
    next plan is empty."""
    fmt = warehouse.query("SELECT DEFINITION FROM _EMU_OBJECTS WHERE KIND = 'FILE FORMAT'")
    old_fmt = str(fmt[0]["DEFINITION"]).replace("PARSE_HEADER = TRUE", "SKIP_HEADER = 1")
    warehouse.query(
        "UPDATE _EMU_OBJECTS SET DEFINITION = %(d)s WHERE KIND = 'FILE FORMAT'", {"d": old_fmt}
    )
    stage = warehouse.query("SELECT DEFINITION FROM _EMU_OBJECTS WHERE KIND = 'STAGE'")
    old_stage = re.sub(r"URL = '[^']*'", "URL = 's3://elsewhere/'", str(stage[0]["DEFINITION"]))
    warehouse.query(
        "UPDATE _EMU_OBJECTS SET DEFINITION = %(d)s WHERE KIND = 'STAGE'", {"d": old_stage}
    )
    task = warehouse.query("SELECT DEFINITION FROM _EMU_TASKS WHERE NAME = 'MERGE_SALES'")
    old_task = re.sub(r"SCHEDULE = '[^']*'", "SCHEDULE = '60 MINUTE'", task[0]["DEFINITION"])
    warehouse.query(
        "UPDATE _EMU_TASKS SET DEFINITION = %(d)s WHERE NAME = 'MERGE_SALES'", {"d": old_task}
    )
    text = warehouse.apply(plan_only=True).render()
    assert "alter    FILE FORMAT CDC_CSV: PARSE_HEADER: unset -> TRUE" in text
    assert "SKIP_HEADER: 1 -> its default" in text
    assert "alter    STAGE CDC_STAGE: URL: s3://elsewhere/ ->" in text
    assert "alter    TASK MERGE_SALES: SCHEDULE: 60 MINUTE -> 1 MINUTE" in text
    # A stage whose URL changes needs its pipes recreated (Snowflake, "Manage Snowpipe").
    assert "recreate PIPE RAW_SALES_PIPE: its stage's URL changes" in text
    assert len(text.splitlines()) == 4, text
    assert warehouse.apply(plan_only=True).render() == text  # --plan changed nothing
    applied = warehouse.apply()
    assert [c.kind for c in applied.changes] == ["FILE FORMAT", "STAGE", "PIPE", "TASK"]
    assert warehouse.apply(plan_only=True).empty
    state = warehouse.query("SELECT STATE FROM _EMU_TASK_STATE WHERE NAME = 'MERGE_SALES'")
    assert state[0]["STATE"] == "started"


def test_a_suspended_task_is_resumed_and_a_missing_column_added(
    warehouse: LocalWarehouse, pg_dsn: str
) -> None:
    """A merge task left suspended (auto-suspended after failures, then fixed) is planned as
    resume, and resumed. Then a source column the landing table lacks is planned as an added
    column on every table that holds the source's columns, and the merge task as altered (its
    body names the column). Apply makes both; the next plan is empty."""
    warehouse.query("UPDATE _EMU_TASK_STATE SET STATE = 'suspended' WHERE NAME = 'MERGE_SALES'")
    text = warehouse.apply(plan_only=True).render()
    assert text == "resume   TASK MERGE_SALES: suspended -> started\n"
    warehouse.apply()
    state = warehouse.query("SELECT STATE FROM _EMU_TASK_STATE WHERE NAME = 'MERGE_SALES'")
    assert state[0]["STATE"] == "started"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE ecommerce_sales ADD COLUMN gift_note text")
    text = warehouse.apply(plan_only=True).render()
    for table in ("RAW_SALES", "SALES", "SALES_CHANGES", "SALES_TOUCHED"):
        assert f"alter    TABLE {table}: add column GIFT_NOTE\n" in text
    assert "alter    TASK MERGE_SALES: DEFINITION: differs from the rendered one" in text
    warehouse.apply()
    assert warehouse.apply(plan_only=True).empty
    assert "GIFT_NOTE" in warehouse.wh.columns("RAW_SALES")


async def test_a_pipe_whose_copy_changed_is_recreated_losing_and_doubling_nothing(
    warehouse: LocalWarehouse, pg_dsn: str
) -> None:
    """The pipe's COPY differs from the rendered one (an older PATTERN). Some objects are
    loaded; others were notified to the pipe while it was paused (queued in it, and dropped by
    a recreation). Apply follows Snowflake's procedure: pause, recreate, resume, refresh each
    object COPY_HISTORY lacks. Afterwards every object is loaded exactly once, the reconciler
    confirms every batch, SALES equals the source, and the plan is empty. Refreshing every
    object instead would load the first ones twice (the recreated pipe's history is new)."""
    settings = warehouse.settings
    _drift_pipe(warehouse)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 2_000, days=3)
    assert await export_until_idle(settings) == 0
    warehouse.pump_until_quiet()
    first = _loaded_files(warehouse)
    assert first
    # More objects, notified while the pipe is paused: queued in the old pipe.
    await _export_while_paused(warehouse, pg_dsn, 2_000, days=3, seed=0.9)
    assert _loaded_files(warehouse) == first  # paused: nothing more loaded
    plan = warehouse.apply(plan_only=True)
    (change,) = plan.changes
    assert change.line().startswith("recreate PIPE RAW_SALES_PIPE: COPY: differs")
    warehouse.apply()
    warehouse.pump_until_quiet()
    loaded = _loaded_files(warehouse)
    assert len(loaded) == len(set(loaded)), "an object was loaded twice"
    assert set(first) < set(loaded)
    reconciler = Reconciler(settings)
    try:
        outcome = await reconciler.run_once()
    finally:
        await reconciler.close()
    assert outcome.failed == []
    assert outcome.missing == []
    assert outcome.waiting == 0
    assert warehouse.apply(plan_only=True).empty
    assert_warehouse_equals_source(pg_dsn, warehouse)


def test_a_pipe_with_a_load_in_progress_is_not_recreated_and_runs_again(
    warehouse: LocalWarehouse,
) -> None:
    """While COPY_HISTORY shows a load of the table in progress, the recreation waits for it
    to end; when it does not end in time, the pipe is not recreated, it is resumed (its queue
    kept), and the error says what it waited for."""
    _drift_pipe(warehouse)
    warehouse.query(
        "INSERT INTO _EMU_COPY_HISTORY VALUES ('RAW_SALES', 'dt=2011-01-04/x.csv.gz',"
        " 'Load in progress', 3, NULL, NULL, CURRENT_TIMESTAMP())"
    )
    (change,) = warehouse.apply(plan_only=True).changes
    assert change.pipe is not None
    before = warehouse.query("SELECT DEFINITION FROM _EMU_PIPES")
    with pytest.raises(TransientError, match="loads in progress into RAW_SALES"):
        recreate_pipe(
            warehouse.wh, change.pipe, change.statements[0], None, timeout_s=0.2, poll_s=0.05
        )
    assert warehouse.query("SELECT DEFINITION FROM _EMU_PIPES") == before
    status = warehouse.wh.dialect.pipe_status(warehouse.wh, change.pipe)
    assert status.execution_state == "RUNNING"


async def test_a_pipe_left_paused_is_recreated_and_its_held_objects_loaded(
    warehouse: LocalWarehouse, pg_dsn: str
) -> None:
    """A pipe left paused with files held for it (an apply cut short after its pause, or a
    pause by hand): the plan says so, and apply recreates it (the held files are dropped with
    the old pipe) and refreshes the objects it had not loaded; each loads once, and the next
    plan is empty."""
    settings = warehouse.settings
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 1_000, days=2)
    assert await export_until_idle(settings) == 0
    warehouse.pump_until_quiet()
    first = _loaded_files(warehouse)
    await _export_while_paused(warehouse, pg_dsn, 1_000, days=2, seed=0.8)
    assert _loaded_files(warehouse) == first
    (change,) = warehouse.apply(plan_only=True).changes
    assert change.line().startswith("recreate PIPE RAW_SALES_PIPE: PAUSED -> RUNNING")
    warehouse.apply()
    warehouse.pump_until_quiet()
    loaded = _loaded_files(warehouse)
    assert len(loaded) == len(set(loaded)) > len(first)
    assert warehouse.apply(plan_only=True).empty
    assert_warehouse_equals_source(pg_dsn, warehouse)
