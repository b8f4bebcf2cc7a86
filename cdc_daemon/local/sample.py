"""The design table and the shipped sample of the UCI Online Retail data (see data/README.md)."""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import psycopg
from psycopg import sql

from cdc_daemon.names import TableName

# The sample's table as a configuration names it (``[[tables]]``): the demo's, and the one the
# tests' seed data fills. Its warehouse table is SALES, which the sample's models are written on.
SAMPLE_TABLE = {
    "name": "public.ecommerce_sales",
    "partition_column": "invoice_date",
    "warehouse_table": "SALES",
}


def sample_snowflake() -> dict[str, str]:
    """The ``snowflake`` settings the sample's models need: ``models_dir``, this checkout's
    ``snowflake/models/`` (INVOICES and PRODUCTS on SALES)."""
    from cdc_daemon.warehouse.model import MODELS_DIR

    return {"models_dir": str(MODELS_DIR)}


SALES_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    id bigserial PRIMARY KEY,
    invoice_no text NOT NULL,
    stock_code text NOT NULL,
    description text,
    quantity integer NOT NULL,
    invoice_date timestamptz NOT NULL,
    unit_price numeric(12,3) NOT NULL,
    customer_id integer,
    country text NOT NULL
)
"""


def sample_path() -> Path:
    return Path(str(resources.files("cdc_daemon.local") / "data" / "online_retail_sample.csv.gz"))


def create_sales_table(
    conn: psycopg.Connection[tuple[object, ...]], table: str = "ecommerce_sales"
) -> None:
    conn.execute(sql.SQL(SALES_DDL).format(table=TableName.parse(table).sql()))


def load_online_retail(
    conn: psycopg.Connection[tuple[object, ...]], path: Path, table: str = "ecommerce_sales"
) -> int:
    """Load a Kaggle-layout Online Retail CSV (gzip or plain): ids in file order, InvoiceDate
    read as Europe/London local time. Returns the number of rows loaded."""
    ident = TableName.parse(table).sql()
    create_sales_table(conn, table)
    with conn.transaction():
        conn.execute(
            "CREATE TEMP TABLE online_retail_raw (n bigserial, invoice_no text, stock_code text,"
            " description text, quantity text, invoice_date text, unit_price text,"
            " customer_id text, country text) ON COMMIT DROP"
        )
        opener = gzip.open if path.suffix == ".gz" else open
        with (
            opener(path, "rb") as source,
            conn.cursor().copy(
                "COPY online_retail_raw (invoice_no, stock_code, description, quantity,"
                " invoice_date, unit_price, customer_id, country) FROM STDIN"
                " (FORMAT csv, HEADER true)"
            ) as copy,
        ):
            while chunk := source.read(1 << 20):
                copy.write(chunk)
        base = conn.execute(sql.SQL("SELECT coalesce(max(id), 0) FROM {}").format(ident)).fetchone()
        offset = int(str(base[0])) if base else 0
        cur = conn.execute(
            sql.SQL(
                "INSERT INTO {t} (id, invoice_no, stock_code, description, quantity,"
                " invoice_date, unit_price, customer_id, country)"
                " SELECT n + %s, invoice_no, stock_code, description, quantity::integer,"
                " to_timestamp(invoice_date, 'MM/DD/YYYY HH24:MI')::timestamp"
                "   AT TIME ZONE 'Europe/London',"
                " unit_price::numeric(12,3), customer_id::numeric::integer, country"
                " FROM online_retail_raw ORDER BY n"
            ).format(t=ident),
            (offset,),
        )
        loaded = cur.rowcount
        conn.execute(
            sql.SQL(
                "SELECT setval(pg_get_serial_sequence(%s, 'id'), (SELECT max(id) FROM {t}))"
            ).format(t=ident),
            (table,),
        )
    return loaded


def generate_sales(
    conn: psycopg.Connection[tuple[object, ...]],
    rows: int,
    table: str = "ecommerce_sales",
    seed: float = 0.42,
    days: int = 373,
) -> None:
    """Insert ``rows`` synthetic rows shaped like the Online Retail data (server-side, fast):
    invoices of a few lines, ~4,000 stock codes, ``days`` days of dates (a year by default),
    some blank customers, descriptions with commas and quotes, cancellations."""
    create_sales_table(conn, table)
    conn.execute("SELECT setseed(%s)", (seed,))
    conn.execute(
        sql.SQL(
            "INSERT INTO {t} (invoice_no, stock_code, description, quantity, invoice_date,"
            " unit_price, customer_id, country)"
            " SELECT CASE WHEN random() < 0.02 THEN 'C' ELSE '' END || (536365 + g / 20)::text,"
            "  (10000 + (random() * 4070)::int)::text || CASE WHEN random() < 0.1 THEN 'A'"
            "   ELSE '' END,"
            "  CASE WHEN random() < 0.003 THEN NULL"
            "   WHEN random() < 0.01 THEN 'SET OF 3 \"VINTAGE\" CAKE TINS, RED'"
            "   ELSE 'PRODUCT ' || mod(g, 4070)::text || ' WHITE HANGING HEART' END,"
            "  CASE WHEN random() < 0.02 THEN -1 ELSE 1 END * (1 + (random() * 24)::int),"
            "  timestamptz '2010-12-01 08:00:00+00' + (g::float8 / %s) * %s * interval '1 day',"
            "  round((random() * 20)::numeric, 2),"
            "  CASE WHEN random() < 0.25 THEN NULL ELSE 12346 + (random() * 6000)::int END,"
            "  (ARRAY['United Kingdom','United Kingdom','United Kingdom','France','Germany',"
            "   'EIRE','Spain','Netherlands'])[1 + (random() * 7)::int]"
            " FROM generate_series(1, %s) g"
        ).format(t=TableName.parse(table).sql()),
        (rows, days, rows),
    )
