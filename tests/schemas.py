"""Schemas nobody wrote for this project, and writers that change them at random: pgbench's
tables (``pgbench -i``) and a table of many PostgreSQL types, all with their default replica
identity."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from cdc_daemon.config import Settings
from cdc_daemon.warehouse import model
from cdc_daemon.warehouse.model import WarehouseTable

# pgbench_history has no key: a table the warehouse cannot merge (logical mode refuses it).
PGBENCH_KEYS = {"pgbench_accounts": "aid", "pgbench_branches": "bid", "pgbench_tellers": "tid"}
MANY_TYPES = "many_types"
# A value PostgreSQL keeps out of line (TOAST): random hex does not compress.
BIG_TEXT = "(SELECT string_agg(md5(random()::text || g), '') FROM generate_series(1, 250) g)"


def pgbench_bin() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    bindir = subprocess.run(
        ["pg_config", "--bindir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return str(Path(bindir) / "pgbench")


def pgbench_init(dsn: str, scale: int = 1) -> None:
    """``pgbench -i``: tables, generated rows, primary keys (no vacuum)."""
    params = conninfo_to_dict(dsn)
    args = [pgbench_bin(), "-i", "-q", "-s", str(scale), "-I", "dtgp"]
    for flag, key in (("-h", "host"), ("-p", "port"), ("-U", "user")):
        if params.get(key):
            args += [flag, str(params[key])]
    args.append(str(params["dbname"]))
    subprocess.run(args, check=True, capture_output=True)


def create_many_types(dsn: str, rows: int, name: str = MANY_TYPES) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "DO $$ BEGIN CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');"
            " EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        )
        conn.execute(
            f"CREATE TABLE {name} (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
            " doc jsonb, tags text[], grid int[][], amount numeric, at timestamp,"
            " day date, flag bool, raw bytea, feeling mood, body text)"
        )
        insert_many_types(conn, rows, name)


def insert_many_types(conn: psycopg.Connection[Any], rows: int, name: str = MANY_TYPES) -> None:
    conn.execute(
        f"INSERT INTO {name} (doc, tags, grid, amount, at, day, flag, raw, feeling, body)"
        " SELECT jsonb_build_object('n', g, 's', 'a,\"b\"', 'nested', jsonb_build_array(g, null)),"
        " ARRAY['x', NULL, 'y,z', '\"q\"'], ARRAY[[g, 2], [3, NULL]],"
        " (g * 1.000000001)::numeric, '2011-01-01'::timestamp + g * interval '1 h',"
        " '2011-01-01'::date + g, g %% 2 = 0, decode(md5(g::text), 'hex'),"
        " (ARRAY['sad', 'ok', 'happy'])[1 + g %% 3]::mood,"
        f" CASE WHEN g %% 5 = 0 THEN {BIG_TEXT} ELSE 'short ' || g END"
        " FROM generate_series(1, %s) g",
        (rows,),
    )


def random_group_changes(dsn: str, rng: random.Random, transactions: int) -> None:
    """Transactions of 1-10 statements over pgbench's tables and the many-types table:
    inserts, updates (some leaving the large TOASTed ``body`` unchanged, some replacing it),
    deletes; some roll back."""
    with psycopg.connect(dsn, options="-c synchronous_commit=on") as conn:
        for _ in range(transactions):
            try:
                for _ in range(rng.randint(1, 10)):
                    _one_change(conn, rng)
                if rng.random() < 0.1:
                    conn.rollback()
                else:
                    conn.commit()
            except (psycopg.errors.DeadlockDetected, psycopg.errors.UniqueViolation):
                conn.rollback()


def _one_change(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    pick = rng.random()
    aid = rng.randint(1, 100_000)
    if pick < 0.2:
        conn.execute(
            "UPDATE pgbench_accounts SET abalance = abalance + %s WHERE aid = %s",
            (rng.randint(-500, 500), aid),
        )
    elif pick < 0.25:
        conn.execute("DELETE FROM pgbench_accounts WHERE aid = %s", (aid,))
    elif pick < 0.3:
        conn.execute(
            "INSERT INTO pgbench_accounts (aid, bid, abalance, filler)"
            " SELECT coalesce(max(aid), 0) + 1, 1, %s, 'new' FROM pgbench_accounts",
            (rng.randint(0, 100),),
        )
    elif pick < 0.4:
        conn.execute(
            "UPDATE pgbench_tellers SET tbalance = tbalance + 1 WHERE tid = %s",
            (rng.randint(1, 10),),
        )
    elif pick < 0.45:
        conn.execute("UPDATE pgbench_branches SET bbalance = bbalance - 1")
    elif pick < 0.65:
        # The TOASTed body is left as it is: the change does not log it.
        conn.execute(
            f"UPDATE {MANY_TYPES} SET amount = amount + 0.5, flag = NOT flag,"
            " tags = tags || 'u'::text WHERE id = (SELECT id FROM many_types"
            " ORDER BY random() LIMIT 1)"
        )
    elif pick < 0.72:
        conn.execute(
            f"UPDATE {MANY_TYPES} SET body = {BIG_TEXT} WHERE id = (SELECT id FROM many_types"
            " ORDER BY random() LIMIT 1)"
        )
    elif pick < 0.8:
        conn.execute(
            f"DELETE FROM {MANY_TYPES} WHERE id = (SELECT id FROM many_types"
            " ORDER BY random() LIMIT 1)"
        )
    else:
        insert_many_types(conn, rng.randint(1, 3))


# ecommerce_sales's columns as format_type() gives them (cdc_daemon.local.sample.SALES_DDL).
SALES_PG_COLUMNS = [
    ("id", "bigint"),
    ("invoice_no", "text"),
    ("stock_code", "text"),
    ("description", "text"),
    ("quantity", "integer"),
    ("invoice_date", "timestamp with time zone"),
    ("unit_price", "numeric(12,3)"),
    ("customer_id", "integer"),
    ("country", "text"),
]


def sales_tables(settings: Settings) -> list[WarehouseTable]:
    """The warehouse of the one-table configuration, without a catalog to read: what
    ``model.read_catalog`` gives for ``ecommerce_sales`` (for tests of the rendered SQL)."""
    (n,) = model.names(settings)
    return [model.from_columns(n, SALES_PG_COLUMNS, ("id",), model.model_files(settings, n))]
