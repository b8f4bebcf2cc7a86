"""The completeness check's per-day totals: which total each column type gets, and the two
queries (PostgreSQL and Snowflake) totalling the same measures in the same order."""

from __future__ import annotations

import re

import sqlglot

from cdc_daemon.names import TableName
from cdc_daemon.reconcile.completeness import DayDifference
from cdc_daemon.warehouse.daytotals import DayTotals, measures
from cdc_daemon.warehouse.model import Names, from_columns

COLUMNS = [
    ("id", "bigint"),
    ("placed", "timestamp with time zone"),
    ("amount", "numeric(12,2)"),
    ("qty", "integer"),
    ("note", "text"),
    ("code", "character varying(10)"),
    ("paid", "boolean"),
    ("weight", "double precision"),
    ("doc", "jsonb"),
    ("Odd Name", "smallint"),
]
TABLE = from_columns(Names(TableName("shop", "orders"), "ORDERS"), COLUMNS, ("id",))


def test_each_type_gets_the_totals_both_sides_compute_alike() -> None:
    """Every column is counted; integers and numerics are summed, texts and varchars totalled
    by length, booleans by their true values; floats and JSON are only counted; the rows'
    verify hashes are summed last."""
    assert [m.label for m in measures(TABLE)] == [
        "count(id)",
        "sum(id)",
        "count(placed)",
        "count(amount)",
        "sum(amount)",
        "count(qty)",
        "sum(qty)",
        "count(note)",
        "length(note)",
        "count(code)",
        "length(code)",
        "count(paid)",
        "true(paid)",
        "count(weight)",
        "count(doc)",
        "count(Odd Name)",
        "sum(Odd Name)",
        "hash(row)",
    ]


def test_both_queries_total_the_same_measures_in_order() -> None:
    """The Snowflake query names one aliased total per measure (M0, M1, ...) over the quoted
    warehouse columns, parses as Snowflake SQL, and is limited to the watermark when given; the
    PostgreSQL query has as many totals over the quoted source columns."""
    totals = DayTotals.of(TABLE, "placed", "id")
    text = totals.warehouse_query(41)
    sqlglot.parse_one(text, read="snowflake")
    assert re.findall(r" AS (M\d+)", text) == [f"M{i}" for i in range(len(totals.measures))]
    assert 'SUM("ODD NAME")' in text
    assert text.endswith(' FROM ORDERS WHERE "ID" <= 41 GROUP BY 1')
    assert "WHERE" not in totals.warehouse_query(None)
    query, params = totals.source_query(41)
    source = query.as_string(None)
    assert params == (41,)
    # count(*), then one count(...) or coalesce(sum(...)) per measure (the row hash's inner
    # values are coalesce(<value>, chr(30))).
    assert source.count("count(") + source.count("coalesce(sum(") == 1 + len(totals.measures)
    assert 'sum("Odd Name")' in source
    assert source.endswith('FROM "shop"."orders" WHERE "id" <= %s GROUP BY 1')


def test_a_difference_reads_as_one_line() -> None:
    """A differing day prints its table, day, both row counts and the totals that differ."""
    day = DayDifference("shop.orders", "2024-03-02", 5, 4, ("count(id)", "sum(amount)"))
    assert day.line() == ("shop.orders 2024-03-02  rows 5 vs 4, differing: count(id), sum(amount)")
    assert day.as_json()["differing"] == ["count(id)", "sum(amount)"]
