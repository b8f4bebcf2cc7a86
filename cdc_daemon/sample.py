"""The design table and the shipped sample of the UCI Online Retail data (see data/README.md)."""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import psycopg
from psycopg import sql

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
    return Path(str(resources.files("cdc_daemon") / "data" / "online_retail_sample.csv.gz"))


def create_sales_table(
    conn: psycopg.Connection[tuple[object, ...]], table: str = "ecommerce_sales"
) -> None:
    conn.execute(sql.SQL(SALES_DDL).format(table=sql.Identifier(*table.split("."))))


def load_online_retail(
    conn: psycopg.Connection[tuple[object, ...]], path: Path, table: str = "ecommerce_sales"
) -> int:
    """Load a Kaggle-layout Online Retail CSV (gzip or plain): ids in file order, InvoiceDate
    read as Europe/London local time. Returns the number of rows loaded."""
    ident = sql.Identifier(*table.split("."))
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
