"""The warehouse's final tables against the source: SALES row for row; INVOICES and PRODUCTS
against the same aggregates computed by Postgres from the source table (the expected values,
written independently of the merge task's SQL)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.warehouse.model import WarehouseTable

SALES_COLUMNS = (
    "id bigint, invoice_no text, stock_code text, description text, quantity integer,"
    " invoice_date timestamptz, unit_price numeric(12,3), customer_id integer, country text"
)
INVOICES_COLUMNS = (
    "invoice_no text, invoice_date timestamptz, customer_id integer, country text,"
    " lines bigint, quantity bigint, amount numeric, is_cancellation boolean"
)
PRODUCTS_COLUMNS = (
    "stock_code text, description text, unit_price numeric(12,3), first_sold timestamptz,"
    " last_sold timestamptz, quantity bigint, invoices bigint"
)

EXPECTED_INVOICES = """
SELECT invoice_no, min(invoice_date), max(customer_id), max(country COLLATE "C"), count(*),
  sum(quantity), sum(quantity * unit_price), invoice_no LIKE 'C%%'
FROM {t} GROUP BY invoice_no
"""
EXPECTED_PRODUCTS = """
SELECT a.stock_code, l.description, l.unit_price, a.first_sold, a.last_sold, a.quantity,
  a.invoices
FROM (SELECT stock_code, min(invoice_date) AS first_sold, max(invoice_date) AS last_sold,
        sum(quantity) AS quantity, count(DISTINCT invoice_no) AS invoices
      FROM {t} GROUP BY stock_code) a
JOIN (SELECT DISTINCT ON (stock_code) stock_code, description, unit_price FROM {t}
      ORDER BY stock_code, invoice_date DESC, id DESC) l USING (stock_code)
"""


def _column_names(columns: str) -> list[str]:
    return [
        c.strip().split()[0] for c in columns.split(",") if c.strip() and c.strip()[0].isalpha()
    ]


def _copy_in(
    conn: psycopg.Connection[Any], name: str, columns: str, rows: list[dict[str, Any]]
) -> None:
    names = _column_names(columns)
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} ({})").format(sql.Identifier(name), sql.SQL(columns))
    )
    with conn.cursor().copy(
        sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(name), sql.SQL(", ").join(map(sql.Identifier, names))
        )
    ) as copy:
        for row in rows:
            copy.write_row([row[n.upper()] for n in names])


def _diff(conn: psycopg.Connection[Any], got: str, expected: sql.Composable) -> tuple[int, int]:
    row = conn.execute(
        sql.SQL(
            "SELECT (SELECT count(*) FROM (SELECT * FROM {g} EXCEPT ALL ({e})) a),"
            " (SELECT count(*) FROM (({e}) EXCEPT ALL SELECT * FROM {g}) b)"
        ).format(g=sql.Identifier(got), e=expected)
    ).fetchone()
    assert row is not None
    if row != (0, 0):
        sample = conn.execute(
            sql.SQL(
                "(SELECT 'got', * FROM (SELECT * FROM {g} EXCEPT ALL ({e})) a LIMIT 3)"
                " UNION ALL (SELECT 'expected', * FROM (({e}) EXCEPT ALL SELECT * FROM {g}) b"
                " LIMIT 3)"
            ).format(g=sql.Identifier(got), e=expected)
        ).fetchall()
        print(f"{got}: {row[0]} unexpected rows, {row[1]} missing rows; e.g.", *sample, sep="\n  ")
    return int(row[0]), int(row[1])


def assert_warehouse_equals_source(
    dsn: str, wh: LocalWarehouse, table: str = "ecommerce_sales"
) -> None:
    t = sql.Identifier(table)
    sales = wh.query(f"SELECT {', '.join(_column_names(SALES_COLUMNS)).upper()} FROM SALES")
    invoices = wh.query(
        f"SELECT {', '.join(_column_names(INVOICES_COLUMNS)).upper()} FROM INVOICES"
    )
    products = wh.query(
        f"SELECT {', '.join(_column_names(PRODUCTS_COLUMNS)).upper()} FROM PRODUCTS"
    )
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        _copy_in(conn, "got_sales", SALES_COLUMNS, sales)
        _copy_in(conn, "got_invoices", INVOICES_COLUMNS, invoices)
        _copy_in(conn, "got_products", PRODUCTS_COLUMNS, products)
        cols = sql.SQL(", ").join(map(sql.Identifier, _column_names(SALES_COLUMNS)))
        assert _diff(conn, "got_sales", sql.SQL("SELECT {} FROM {}").format(cols, t)) == (0, 0)
        assert _diff(conn, "got_invoices", sql.SQL(EXPECTED_INVOICES).format(t=t)) == (0, 0)
        assert _diff(conn, "got_products", sql.SQL(EXPECTED_PRODUCTS).format(t=t)) == (0, 0)
        (count,) = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(t)).fetchone() or (0,)
    assert len(sales) == count


def _normal(value: Any, sf_type: str) -> Any:
    """A value as the comparison sees it: JSON parsed, numbers as Decimal, floats as float;
    NULL stays None and an empty string stays "", never one for the other."""
    if value is None:
        return None
    if sf_type in ("VARIANT", "ARRAY") and isinstance(value, str):
        return json.loads(value)
    if sf_type == "FLOAT":
        return float(value)
    if sf_type.startswith("NUMBER"):
        return Decimal(value)
    if sf_type == "BINARY":
        return bytes(value)
    if isinstance(value, (datetime, date, time, bool, list, dict)):
        return value
    return str(value)


def assert_table_equals_source(pg_dsn: str, wh: Any, t: WarehouseTable) -> int:
    """The current-state table holds every source row, each column equal to the source's value
    under the documented mapping (NULL and '' told apart). ``wh`` answers ``query`` (the local
    or a real warehouse). Returns the number of rows."""
    source_cols = []
    for c in t.columns:
        q = '"' + c.source.replace('"', '""') + '"'
        # Floats and the rest of VARCHAR's types in their output form (what the daemon writes;
        # format() uses the output function, where inet's ::text would add a /32). format()
        # makes NULL an empty string: NULL stays NULL.
        if c.type.final == "FLOAT" or (c.type.final == "VARCHAR" and "char" not in c.pg_type):
            q = f"CASE WHEN {q} IS NOT NULL THEN format('%s', {q}) END"
        source_cols.append(q)
    with psycopg.connect(pg_dsn, options="-c TimeZone=UTC -c extra_float_digits=1") as conn:
        source_rows = conn.execute(
            f"SELECT {', '.join(source_cols)} FROM {t.names.table.display}"
        ).fetchall()
    got_rows = wh.query(f"SELECT {', '.join(c.q for c in t.columns)} FROM {t.names.name}")
    types = [c.type.final for c in t.columns]
    keys = [i for i, c in enumerate(t.columns) if c.key]

    def keyed(rows: list[tuple[Any, ...]]) -> dict[tuple[Any, ...], tuple[Any, ...]]:
        out = {}
        for row in rows:
            values = tuple(_normal(v, kind) for v, kind in zip(row, types, strict=True))
            out[tuple(str(values[i]) for i in keys)] = values
        return out

    if t.keyless:
        # A multiset: each row as often as the source has it (exact duplicates included).
        def hashable(value: Any) -> Any:
            if isinstance(value, (list, dict)):
                return json.dumps(value, sort_keys=True)
            if isinstance(value, datetime) and value.tzinfo is not None:
                return value.astimezone(UTC)
            return value

        def counted(rows: list[tuple[Any, ...]]) -> Counter[tuple[Any, ...]]:
            return Counter(
                tuple(hashable(_normal(v, kind)) for v, kind in zip(row, types, strict=True))
                for row in rows
            )

        want = counted([tuple(r) for r in source_rows])
        have = counted([tuple(r[c.name] for c in t.columns) for r in got_rows])
        assert have == want, (
            f"{t.names.name}: {sum((want - have).values())} copies missing, "
            f"{sum((have - want).values())} extra: e.g. {list(want - have)[:2]} for "
            f"{list(have - want)[:2]}"
        )
        return len(source_rows)
    source = keyed([tuple(r) for r in source_rows])
    got = keyed([tuple(r[c.name] for c in t.columns) for r in got_rows])
    assert got.keys() == source.keys(), (
        f"{t.names.name}: {len(source.keys() - got.keys())} missing,"
        f" {len(got.keys() - source.keys())} extra"
    )
    wrong = [(k, source[k], got[k]) for k in source if source[k] != got[k]]
    assert not wrong, f"{t.names.name}: {len(wrong)} rows differ, e.g. {wrong[:2]}"
    return len(source)
