"""The columns each landing table in Snowflake is known to have (``warehouse_columns``,
written by ``warehouse.evolve`` and ``snowflake apply``): an object naming only these is
uploaded without asking Snowflake, which may be unreachable.

Synchronous, on a short connection of its own: the schema guard runs in a worker thread.
"""

from __future__ import annotations

import psycopg
import structlog
from psycopg import sql

from cdc_daemon.config import Settings

log = structlog.get_logger()


def warehouse_columns(
    settings: Settings, landing: str, columns: set[str] | None = None
) -> set[str]:
    """The landing table's known columns (saving ``columns`` instead, and returning them). A
    ledger made before the table that keeps them knows none (``init`` creates it)."""
    table = sql.Identifier(settings.state.schema_, "warehouse_columns")
    try:
        with psycopg.connect(
            settings.state_dsn.get_secret_value(),
            connect_timeout=max(1, int(settings.postgres.connect_timeout_s)),
            autocommit=True,
        ) as conn:
            if columns is not None:
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (table_name, columns) VALUES (%s, %s)"
                        " ON CONFLICT (table_name) DO UPDATE SET columns = excluded.columns,"
                        " applied_at = now()"
                    ).format(table),
                    (landing, sorted(columns)),
                )
                return columns
            row = conn.execute(
                sql.SQL("SELECT columns FROM {} WHERE table_name = %s").format(table),
                (landing,),
            ).fetchone()
            return set(row[0]) if row else set()
    except psycopg.Error as exc:
        log.warning("warehouse_columns_unknown", table=landing, error=str(exc).strip())
        return set()
