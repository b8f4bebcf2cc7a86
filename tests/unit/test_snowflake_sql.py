"""The warehouse SQL as rendered for a configuration: it parses, names what the configuration
says, matches the objects the daemon writes, and can be applied again without harm."""

from __future__ import annotations

import re

import pytest
import sqlglot
from sqlglot import exp

from cdc_daemon.config import Settings, load_settings
from cdc_daemon.errors import ConfigError
from cdc_daemon.local.sample import SALES_DDL
from cdc_daemon.warehouse import model, sql
from tests.helpers import seed_settings
from tests.schemas import sales_tables

# Statement kinds sqlglot's Snowflake dialect does not model (it keeps them as a Command).
UNMODELLED = ("CREATE PIPE", "CREATE STREAM", "CREATE OR ALTER TASK", "ALTER TASK")


@pytest.fixture
def settings() -> Settings:
    return seed_settings(
        s3={"bucket": "acme-cdc", "prefix": "raw/sales"},
        snowflake={"database": "ANALYTICS", "schema": "CDC", "warehouse": "LOAD_WH"},
    )


def test_every_statement_parses_with_sqlglot(settings: Settings) -> None:
    """Every rendered statement parses as Snowflake SQL (only the kinds sqlglot keeps as a bare
    Command are exempt), the pipe's COPY parses as a COPY, and every task body is made of INSERT,
    DELETE and MERGE statements."""
    statements = sql.statements(settings, sales_tables(settings))
    assert len(statements) >= 15
    for stmt in statements:
        tree = sqlglot.parse_one(stmt.text, read="snowflake")
        if stmt.head.startswith(UNMODELLED):
            continue
        assert not isinstance(tree, exp.Command), f"{stmt.file}: {stmt.head} did not parse"
    pipe = next(s for s in statements if s.head.startswith("CREATE PIPE"))
    assert isinstance(sqlglot.parse_one(sql.pipe_copy(pipe), read="snowflake"), exp.Copy)
    for task in (s for s in statements if s.head.startswith("CREATE OR ALTER TASK")):
        body = sql.task_body(task)
        assert body
        for statement in body:
            tree = sqlglot.parse_one(statement, read="snowflake")
            assert isinstance(tree, (exp.Insert, exp.Delete, exp.Merge)), statement


def test_every_name_in_a_task_body_is_fully_qualified(settings: Settings) -> None:
    """Each table, stream and model a task's statements name is database.schema.name: what a
    task reads and writes never depends on the session's current schema."""
    for task in (
        s
        for s in sql.statements(settings, sales_tables(settings))
        if s.head.startswith("CREATE OR ALTER TASK")
    ):
        for statement in sql.task_body(task):
            for table in sqlglot.parse_one(statement, read="snowflake").find_all(exp.Table):
                if not table.name:
                    continue  # a subquery's alias
                assert (table.catalog, table.db) == ("ANALYTICS", "CDC"), (task.head, table.sql())


def test_every_task_rolls_back_and_reraises_on_failure(settings: Settings) -> None:
    """Each task's transaction has an exception handler that rolls it back and raises the same
    exception again (a failed run fails as a whole and shows in TASK_HISTORY); a body without
    one is refused when rendered into the task runner."""
    tasks = [
        s
        for s in sql.statements(settings, sales_tables(settings))
        if s.head.startswith("CREATE OR ALTER TASK")
    ]
    assert len(tasks) == 2
    for task in tasks:
        assert sql.task_body(task)
        without = sql.Statement(task.file, task.text.replace("ROLLBACK;", ""))
        with pytest.raises(ValueError, match="rolls back and re-raises"):
            sql.task_body(without)


def test_the_warehouse_is_created_small_and_suspending_unless_managed_elsewhere(
    settings: Settings,
) -> None:
    """``apply`` creates the configured warehouse if missing, at the smallest size and
    suspended after 60 s idle; with ``snowflake.create_warehouse = false`` it is not touched."""
    text = sql.render(settings, sales_tables(settings))
    assert "CREATE WAREHOUSE IF NOT EXISTS LOAD_WH" in text
    assert "AUTO_SUSPEND = 60" in text
    assert "WAREHOUSE_SIZE = XSMALL" in text
    managed = settings.model_copy(
        update={"snowflake": settings.snowflake.model_copy(update={"create_warehouse": False})}
    )
    assert "CREATE WAREHOUSE" not in sql.render(managed, sales_tables(managed))


def test_serverless_tasks_name_no_warehouse(settings: Settings) -> None:
    """By default both tasks run on the configured warehouse; with
    ``snowflake.serverless_tasks`` neither names one and both start at the smallest managed
    size."""

    def tasks(s: Settings) -> list[str]:
        return [
            t.text
            for t in sql.statements(s, sales_tables(s))
            if t.head.startswith("CREATE OR ALTER TASK")
        ]

    assert all("WAREHOUSE = LOAD_WH" in t for t in tasks(settings))
    serverless = settings.model_copy(
        update={"snowflake": settings.snowflake.model_copy(update={"serverless_tasks": True})}
    )
    for text in tasks(serverless):
        assert "WAREHOUSE = " not in text.replace("INITIAL_WAREHOUSE_SIZE = ", "")
        assert "USER_TASK_MANAGED_INITIAL_WAREHOUSE_SIZE = 'XSMALL'" in text


def test_the_pipe_names_every_object_fully_qualified(settings: Settings) -> None:
    """The pipe's COPY names its table, stage and file format as database.schema.name (a pipe
    runs outside any session's current schema), and so do the stream and the merge task's
    condition."""
    statements = sql.statements(settings, sales_tables(settings))
    pipe = next(s for s in statements if s.head.startswith("CREATE PIPE"))
    copy = sql.pipe_copy(pipe)
    tree = sqlglot.parse_one(copy, read="snowflake")
    assert isinstance(tree, exp.Copy)
    target = tree.this if isinstance(tree.this, exp.Table) else tree.this.this
    assert (target.catalog, target.db, target.name) == ("ANALYTICS", "CDC", "RAW_SALES")
    assert "FROM @ANALYTICS.CDC.CDC_STAGE/public.ecommerce_sales/" in copy
    assert "FORMAT_NAME = 'ANALYTICS.CDC.CDC_CSV'" in copy
    text = sql.render(settings, sales_tables(settings))
    assert "ON TABLE ANALYTICS.CDC.RAW_SALES" in text
    assert "SYSTEM$STREAM_HAS_DATA('ANALYTICS.CDC.RAW_SALES_STREAM')" in text


def test_rendered_sql_names_the_configuration(settings: Settings) -> None:
    """The rendered SQL uses the configured database, schema and warehouse, points the stage and
    the storage integration's allowed location at s3://<bucket>/<prefix>/ (each table's pipe
    reads its folder under it), and keeps no template syntax."""
    text = sql.render(settings, sales_tables(settings))
    assert "USE SCHEMA ANALYTICS.CDC" in text
    assert "URL = 's3://acme-cdc/raw/sales/'" in text
    assert "STORAGE_ALLOWED_LOCATIONS = ('s3://acme-cdc/raw/sales/')" in text
    assert "STORAGE_INTEGRATION = CDC_S3" in text
    assert "WAREHOUSE = LOAD_WH" in text
    assert "{{" not in text
    assert "{%" not in text


def test_applying_twice_recreates_nothing_that_keeps_state(settings: Settings) -> None:
    """The pipe (its load history), the stream (its offset) and the tables are created only
    if missing; nothing is ever replaced: what holds no state (file format, stage, tasks) is
    altered in place (CREATE OR ALTER)."""
    for stmt in sql.statements(settings, sales_tables(settings)):
        assert "OR REPLACE" not in stmt.text.upper(), stmt.head
    in_place = ("CREATE OR ALTER TASK", "CREATE OR ALTER FILE", "CREATE OR ALTER STAGE")
    for stmt in sql.statements(settings, sales_tables(settings)):
        if stmt.head.startswith("CREATE") and not stmt.head.startswith(in_place):
            assert "IF NOT EXISTS" in " ".join(stmt.text.split()[:6]).upper(), stmt.head
    pipe = next(
        s
        for s in sql.statements(settings, sales_tables(settings))
        if s.head.startswith("CREATE PIPE")
    )
    assert "AUTO_INGEST = TRUE" in pipe.text


def test_the_pipe_loads_by_column_name_into_the_columns_the_daemon_writes(
    settings: Settings,
) -> None:
    """The pipe maps the objects' header onto the landing table by name (never by position:
    no SELECT transformation, MATCH_BY_COLUMN_NAME with the header parsed), takes file name,
    row number and scan time through INCLUDE_METADATA, and the landing table has a column for
    every name the daemon writes: the source's columns, _cdc_op, _cdc_seq, _cdc_ts,
    _cdc_unchanged and (in a day's -q object) _cdc_quarantined."""
    source = re.findall(r"^    (\w+) ", SALES_DDL, re.M)
    header = [*source, "_cdc_op", "_cdc_seq", "_cdc_ts", "_cdc_unchanged", "_cdc_quarantined"]
    statements = sql.statements(settings, sales_tables(settings))
    pipe = next(s for s in statements if s.head.startswith("CREATE PIPE"))
    copy = " ".join(sql.pipe_copy(pipe).split())
    assert "MATCH_BY_COLUMN_NAME = CASE_INSENSITIVE" in copy
    assert "SELECT" not in copy.upper()
    assert "INCLUDE_METADATA = ( _FILE = METADATA$FILENAME, _FILE_ROW = METADATA$FILE_ROW_NUMBER,"
    assert "_LOADED_AT = METADATA$START_SCAN_TIME" in copy
    fmt = next(s for s in statements if s.head.startswith("CREATE OR ALTER FILE"))
    assert "PARSE_HEADER = TRUE" in fmt.text
    assert "SKIP_HEADER" not in fmt.text
    landing = next(
        s for s in statements if s.text.startswith("CREATE TABLE IF NOT EXISTS RAW_SALES ")
    )
    tree = sqlglot.parse_one(landing.text, read="snowflake")
    columns = [c.name for c in tree.find_all(exp.ColumnDef)]
    assert columns == [h.upper() for h in header] + ["_FILE", "_FILE_ROW", "_LOADED_AT"]


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("snowflake", "database", "X; DROP TABLE SALES"),
        ("snowflake", "stage", 'P"'),
        ("tables", "warehouse_table", "X Y"),
        ("snowflake", "merge_schedule", "1 MINUTE'; DROP"),
        ("snowflake", "aws_role_arn", "x' OR '1"),
    ],
)
def test_names_that_could_splice_sql_are_refused(section: str, key: str, value: str) -> None:
    """A Snowflake setting that would splice SQL (a database name with a statement, a pipe name
    with a quote, a schedule or role ARN breaking out of its quotes) is refused when the settings
    load."""
    given: dict[str, object] = (
        {"tables": [{"name": "t", key: value}]} if section == "tables" else {section: {key: value}}
    )
    with pytest.raises(ConfigError):
        seed_settings(**given)


def test_a_bucket_name_that_could_splice_sql_is_refused() -> None:
    """A bucket name that would break out of the stage URL's quotes is refused when the SQL is
    rendered, with a message about the stage URL."""
    settings = seed_settings(s3={"bucket": "b'); DROP", "prefix": ""})
    with pytest.raises(ConfigError, match="stage URL"):
        sql.render(settings, sales_tables(settings))


def test_cli_renders_and_refuses_what_it_cannot_do(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, pg_dsn: str
) -> None:
    """`snowflake render` prints the SQL for the configured bucket, generated from the source
    table's catalog; with a table that does not exist, `snowflake apply` with a dialect no
    installed extension registers, and `reconcile --once` without snowflake.account, it exits
    2 with one line on stderr, never a traceback."""
    import psycopg
    import structlog

    from cdc_daemon.cli import main
    from cdc_daemon.local.sample import create_sales_table

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        create_sales_table(conn)
    monkeypatch.setenv("CDC_S3__BUCKET", "acme-cdc")
    monkeypatch.setenv("CDC_POSTGRES__DSN", pg_dsn)
    monkeypatch.setenv("CDC_POSTGRES__TABLE", "public.ecommerce_sales")
    try:
        assert main(["snowflake", "render"]) == 0
        out = capsys.readouterr().out
        assert "CREATE PIPE IF NOT EXISTS RAW_ECOMMERCE_SALES_PIPE" in out  # no demo name
        assert "URL = 's3://acme-cdc/'" in out
        assert "FROM @CDC.SALES.CDC_STAGE/public.ecommerce_sales/" in out
        assert '"UNIT_PRICE" NUMBER(12, 3)' in out
        monkeypatch.setenv("CDC_POSTGRES__TABLE", "public.no_such_table")
        assert main(["snowflake", "render"]) == 3  # a source error
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "no_such_table" in err
        monkeypatch.setenv("CDC_POSTGRES__TABLE", "public.ecommerce_sales")
        monkeypatch.setenv("CDC_SNOWFLAKE__ACCOUNT", "fakesnow")
        monkeypatch.setenv("CDC_SNOWFLAKE__DIALECT", "nonesuch")
        assert main(["snowflake", "apply"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "the warehouse dialect 'nonesuch' is not installed" in err
        monkeypatch.delenv("CDC_SNOWFLAKE__DIALECT")
        monkeypatch.delenv("CDC_SNOWFLAKE__ACCOUNT")
        assert main(["reconcile", "--once"]) == 2
        err = capsys.readouterr().err
        assert "snowflake.account is not set" in err
        assert "Traceback" not in err
    finally:
        structlog.reset_defaults()  # main() configured logging for the whole process


def test_odd_table_names_get_plain_snowflake_names() -> None:
    """A source table whose name is no Snowflake identifier (a space, capitals, a reserved
    word) gets the documented default name, and every object named after it is unquoted
    text: ``adv."Order Lines"`` is ORDER_LINES, RAW_ORDER_LINES, RAW_ORDER_LINES_PIPE..."""
    settings = load_settings(
        None,
        tables=[{"name": 'adv."Order Lines"'}, {"name": 'adv."select"'}, {"name": "adv.x"}],
        capture={"group": "adv"},
    )
    got = model.names(settings)
    assert [n.name for n in got] == ["ORDER_LINES", "SELECT_", "X"]
    assert got[0].pipe == "RAW_ORDER_LINES_PIPE"


@pytest.mark.parametrize(
    ("tables", "says"),
    [
        (
            [{"name": 'adv."Order Lines"'}, {"name": "adv.order_lines"}],
            'adv."Order Lines" and adv.order_lines would both name ORDER_LINES in Snowflake',
        ),
        (
            [{"name": "adv.x"}, {"name": "adv.x_changes"}],
            "adv.x and adv.x_changes would both name X_CHANGES in Snowflake",
        ),
        (
            [{"name": "adv.a", "warehouse_table": "B"}, {"name": "adv.b"}],
            "adv.a and adv.b would both name B in Snowflake",
        ),
        (
            [{"name": "adv.p", "history": True}, {"name": "adv.c", "warehouse_table": "P_HISTORY"}],
            "adv.p and adv.c would both name P_HISTORY in Snowflake",
        ),
        (
            [{"name": "adv.p", "history": True}, {"name": "adv.p_history"}],
            "adv.p and adv.p_history would both name P_HISTORY in Snowflake",
        ),
    ],
)
def test_two_tables_on_one_snowflake_name_are_refused_with_the_fix(
    tables: list[dict[str, str]], says: str
) -> None:
    """Two tables of a group whose Snowflake objects would share a name (two source names
    mapping to one default, or a table named like another's work table) are refused with one
    sentence naming both and the fix (warehouse_table); setting it makes the group valid. A
    history table counts when the table has one (``history = true``)."""
    capture = {"group": "adv", "mode": "logical"}
    settings = load_settings(None, tables=tables, capture=capture)
    with pytest.raises(ConfigError, match="set warehouse_table for one of them") as caught:
        model.names(settings)
    assert says in str(caught.value)
    fixed = [*tables[:-1], {**tables[-1], "warehouse_table": "OTHER"}]
    model.names(load_settings(None, tables=fixed, capture=capture))


def test_a_warehouse_table_that_is_a_reserved_word_is_refused() -> None:
    """``warehouse_table`` must be a plain identifier that is no reserved word (Snowflake would
    not parse ``CREATE TABLE SELECT``): refused with one sentence offering a name; a lower-case
    one is upper-cased, as Snowflake resolves it."""
    settings = load_settings(None, tables=[{"name": "t", "warehouse_table": "select"}])
    with pytest.raises(ConfigError, match=r"not a plain Snowflake identifier.*SELECT_"):
        model.names(settings)
    settings = load_settings(None, tables=[{"name": "t", "warehouse_table": "orders"}])
    assert [n.name for n in model.names(settings)] == ["ORDERS"]


def test_a_table_name_with_a_newline_is_refused() -> None:
    """A table name holding a control character would end the SQL comments it is printed in:
    refused with one sentence."""
    settings = load_settings(None, tables=[{"name": '"a\nDROP TABLE x"'}])
    with pytest.raises(ConfigError, match="control character"):
        model.names(settings)


@pytest.mark.parametrize(
    "folder",
    ["public.ecommerce_sales/", "adv.Order Lines/", "Odd%2ESchema.x/", "a.it's/", "a.b\\c/"],
)
def test_a_folder_that_is_not_plain_is_a_quoted_stage_path(folder: str) -> None:
    """A plain folder is named ``@DB.SCHEMA.STAGE/<folder>`` as before (no existing pipe's COPY
    changes); any other (a space, ``%``, a quote, a backslash) is a string literal whose quote
    and backslash are escaped, and the local pipe stand-in reads the same folder back from the
    rendered COPY."""
    from cdc_daemon.local.warehouse import _PipeCopy

    path = sql.stage_path("DB", "S", "STG", folder)
    if folder == "public.ecommerce_sales/":
        assert path == "@DB.S.STG/public.ecommerce_sales/"
    else:
        assert path.startswith("'@DB.S.STG/")
        assert path.endswith("/'")
        body = path[1:-1]
        assert re.fullmatch(r"(?:[^'\\]|\\.)*", body)  # no quote ends it early
    copy = (
        f"COPY INTO DB.S.RAW_T\nFROM {path}\nFILE_FORMAT = (FORMAT_NAME = 'DB.S.CSV')\n"
        "MATCH_BY_COLUMN_NAME = CASE_INSENSITIVE\nINCLUDE_METADATA = (_FILE = METADATA$FILENAME)\n"
        "PATTERN = '.*'"
    )
    assert _PipeCopy("RAW_T_PIPE", copy).folder == folder
