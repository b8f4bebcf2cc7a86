"""The warehouse side as ordered, templated SQL: ``snowflake/NN_*.sql`` rendered with the
``[snowflake]`` and ``[s3]`` settings (Jinja2, undefined names are errors), split into
statements by the connector's own splitter (it knows ``$$`` blocks).

Every name that goes into the SQL is validated by the settings (identifiers match
``[A-Za-z_][A-Za-z0-9_$]*``; the stage URL is built from the bucket and prefix, whose characters
are checked here), quoted (columns: ``model.quote``) or a string literal (a table's folder that
is not plain: ``stage_path``), so rendering cannot splice SQL.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

from cdc_daemon.config import Settings
from cdc_daemon.errors import ConfigError
from cdc_daemon.warehouse.model import HISTORY_COLUMNS, WarehouseTable

SQL_DIR = Path(__file__).resolve().parents[2] / "snowflake"

_SAFE_URL_PART = re.compile(r"^[A-Za-z0-9._/=-]*$")


@dataclass(frozen=True)
class Statement:
    file: str
    text: str

    @property
    def head(self) -> str:
        """The statement's first words, upper-cased: what kind of statement it is."""
        return " ".join(self.text.split()[:4]).upper()


def stage_url(settings: Settings) -> str:
    """The stage: the bucket's prefix (each table's folder is a path under it)."""
    url = f"s3://{settings.s3.bucket}/{settings.s3.prefix}"
    if not _SAFE_URL_PART.match(url.removeprefix("s3://")):
        raise ConfigError(
            "the S3 bucket and prefix must be plain (letters, digits, . _ - / =) to be named "
            "in Snowflake's stage URL"
        )
    return url


def stage_path(database: str, schema: str, stage: str, folder: str) -> str:
    """A table's folder on the stage, as a pipe's COPY names it: ``@DB.SCHEMA.STAGE/<folder>``
    for a plain folder (letters, digits, ``. _ - / =``), else that reference as a string
    literal, Snowflake's form for a stage path holding spaces or special characters (the
    folder of ``adv."Order Lines"``, or of a name with a quote, ``%`` or a non-ASCII letter).
    In the literal a quote and a backslash are escaped with a backslash
    (https://docs.snowflake.com/en/sql-reference/data-types-text). A plain folder keeps the
    unquoted form, so the COPY of no existing pipe changes (``snowflake apply`` would
    recreate it)."""
    path = f"@{database}.{schema}.{stage}/{folder}"
    if _SAFE_URL_PART.match(folder):
        return path
    return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _model_parts(
    settings: Settings, tables: list[WarehouseTable]
) -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, list[str]]]:
    """Each table's models: their DDL, their refresh statements, their names."""
    ddl: dict[str, list[str]] = {}
    refresh: dict[str, list[str]] = {}
    named: dict[str, list[str]] = {}
    sf = settings.snowflake
    for t in tables:
        n = t.names
        common = {
            "source": n.name,
            "touched": n.touched,
            "database": sf.database,
            "schema": sf.schema_,
        }
        ddl[n.name] = [render_file(m, common | {"ddl": True}).strip() for m in t.models]
        # Inside the merge task, names are fully qualified.
        qualified = {
            "source": f"{sf.database}.{sf.schema_}.{n.name}",
            "touched": f"{sf.database}.{sf.schema_}.{n.touched}",
        }
        refresh[n.name] = [
            render_file(m, common | qualified | {"ddl": False}).strip() for m in t.models
        ]
        named[n.name] = [re.sub(r"^[0-9]+_", "", m.stem).upper() for m in t.models]
    return ddl, refresh, named


def template_vars(
    settings: Settings,
    tables: list[WarehouseTable],
    *,
    stage_url_override: str | None = None,
) -> dict[str, object]:
    sf = settings.snowflake
    model_ddl, model_refresh, model_names = _model_parts(settings, tables)
    return {
        "tables": tables,
        "model_ddl": model_ddl,
        "model_refresh": model_refresh,
        "model_names": model_names,
        "database": sf.database,
        "schema": sf.schema_,
        "warehouse": sf.warehouse,
        "create_warehouse": sf.create_warehouse,
        "serverless_tasks": sf.serverless_tasks,
        "integration": None if stage_url_override else sf.integration,
        "aws_role_arn": sf.aws_role_arn,
        "stage": sf.stage,
        "stage_url": stage_url_override or stage_url(settings),
        "file_format": sf.file_format,
        "merge_schedule": sf.merge_schedule,
        "cleanup_schedule": sf.cleanup_schedule,
        "retention_days": sf.retention_days,
        "tombstone_days": sf.tombstone_days,
        "history_columns": HISTORY_COLUMNS,
        "stage_path": lambda folder: stage_path(sf.database, sf.schema_, sf.stage, folder),
    }


def sql_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    files = sorted(sql_dir.glob("[0-9][0-9]_*.sql"))
    if not files:
        raise ConfigError(f"no SQL files in {sql_dir}")
    return files


def render_file(path: Path, variables: dict[str, object]) -> str:
    env = jinja2.Environment(  # noqa: S701 - SQL, not HTML; names are validated identifiers
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    try:
        return env.from_string(path.read_text()).render(**variables)
    except jinja2.TemplateError as exc:
        raise ConfigError(f"cannot render {path.name}: {exc}") from None


def statements(
    settings: Settings,
    tables: list[WarehouseTable],
    *,
    stage_url_override: str | None = None,
    sql_dir: Path = SQL_DIR,
) -> list[Statement]:
    """Every statement of every file, in order."""
    from snowflake.connector.util_text import split_statements  # ~40 MB: only when used

    variables = template_vars(settings, tables, stage_url_override=stage_url_override)
    out: list[Statement] = []
    for path in sql_files(sql_dir):
        text = render_file(path, variables)
        for stmt, _ in split_statements(io.StringIO(text), remove_comments=True):
            stmt = stmt.strip().rstrip(";").strip()
            if stmt:
                out.append(Statement(path.name, stmt))
    return out


def render(settings: Settings, tables: list[WarehouseTable], *, sql_dir: Path = SQL_DIR) -> str:
    """The whole script for the current configuration, with each file's comments kept."""
    variables = template_vars(settings, tables)
    parts = []
    for path in sql_files(sql_dir):
        body = re.sub(r"\n{3,}", "\n\n", render_file(path, variables)).strip()
        parts.append(f"-- ==== {path.name} ====\n{body}\n")
    return "\n".join(parts)


GRANTS = SQL_DIR / "grants" / "grants.sql"


def render_grants(settings: Settings, tables: list[WarehouseTable]) -> str:
    """The least-privilege roles and grants for the configuration (``snowflake/grants/``)."""
    sf = settings.snowflake
    variables = template_vars(settings, tables) | {
        "deployer_role": sf.deployer_role,
        "tasks_role": sf.tasks_role,
        "reconciler_role": sf.reconciler_role,
    }
    return re.sub(r"\n{3,}", "\n\n", render_file(GRANTS, variables)).strip() + "\n"


def task_body(stmt: Statement) -> list[str]:
    """The statements a task runs: those between ``BEGIN TRANSACTION`` and ``COMMIT`` of its
    ``EXECUTE IMMEDIATE $$ BEGIN ... EXCEPTION ... END; $$`` body (the local task runner runs
    exactly these). Its exception handler must roll back and re-raise."""
    match = re.search(
        r"\$\$\s*BEGIN\s+BEGIN TRANSACTION;(.*?)COMMIT;\s*EXCEPTION\s+(?:--[^\n]*\n\s*)*"
        r"WHEN\s+OTHER\s+THEN\s+ROLLBACK;\s*RAISE;\s*END;\s*\$\$",
        stmt.text,
        re.S,
    )
    if match is None:
        raise ValueError(
            f"{stmt.file}: a task's body must be BEGIN TRANSACTION ... COMMIT with an "
            "exception handler that rolls back and re-raises"
        )
    body = match.group(1)
    from snowflake.connector.util_text import split_statements

    return [
        s.strip().rstrip(";").strip()
        for s, _ in split_statements(io.StringIO(body), remove_comments=True)
        if s.strip().rstrip(";").strip()
    ]


def task_name(stmt: Statement) -> str:
    match = re.match(r"CREATE\s+OR\s+ALTER\s+TASK\s+([A-Za-z0-9_$]+)", stmt.text, re.I)
    if match is None:
        raise ValueError(f"{stmt.file}: not a CREATE OR ALTER TASK statement")
    return match.group(1)


def pipe_copy(stmt: Statement) -> str:
    """The COPY statement of a ``CREATE PIPE ... AS COPY ...``."""
    match = re.search(r"\bAS\s+(COPY\s+INTO\b.*)$", stmt.text, re.S | re.I)
    if match is None:
        raise ValueError(f"{stmt.file}: pipe without a COPY statement")
    return match.group(1)
