"""Per-day totals of one table, written once for PostgreSQL and once for Snowflake so that both
sides compute the same numbers: what the completeness check (``reconcile.completeness``)
compares.

A day is the UTC day of the table's partition column. Its totals are the row count and, per
column of the source (the columns the warehouse has, ``model.from_catalog``):

- ``count(c)``: the values that are not NULL, for every column;
- ``sum(c)``: the exact sum, for integer and ``numeric`` columns (``NUMBER`` in Snowflake, summed
  without rounding on both sides);
- ``length(c)``: the total length in characters, for ``text`` and ``varchar`` columns;
- ``true(c)``: the values that are true, for ``boolean`` columns;
- ``hash(row)``: the sum of ``verify``'s row hash (``warehouse.canonical``): the completeness
  check is verify's comparison per day. It sees a changed value of every type with a canonical
  form (integers, numerics, text, booleans, dates, timestamps, times, bytea, ...), also a text
  changed to another of the same length; floats, JSON and arrays only by NULL or not.

The per-column totals name where a day differs; the hash sees what they miss. A value the
quarantine withheld (NULL in the warehouse, named in ``_CDC_QUARANTINED``) counts as a
difference in its column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from psycopg import sql

from cdc_daemon.warehouse.canonical import canon, pg_row_hash, sf_row_hash
from cdc_daemon.warehouse.model import SfColumn, WarehouseTable, base_type

Kind = Literal["count", "sum", "length", "true", "hash"]

_EXACT_NUMBERS = frozenset({"smallint", "integer", "bigint", "numeric"})
_TEXT = frozenset({"text", "character varying"})


@dataclass(frozen=True)
class Measure:
    """One total per day over one column."""

    kind: Kind
    column: SfColumn

    @property
    def label(self) -> str:
        if self.kind == "hash":
            return "hash(row)"
        return f"{self.kind}({self.column.source})"


def measures(table: WarehouseTable) -> tuple[Measure, ...]:
    """The totals of every column, in column order."""
    out: list[Measure] = []
    for column in table.columns:
        out.append(Measure("count", column))
        if column.hashed:
            continue  # the source holds the value, the warehouse its hash: only counts agree
        base = base_type(column.pg_type)
        if base in _EXACT_NUMBERS:
            out.append(Measure("sum", column))
        elif base in _TEXT:
            out.append(Measure("length", column))
        elif base == "boolean":
            out.append(Measure("true", column))
    # The sum of verify's row hash (``warehouse.canonical``): any value of a hashed type that
    # differs, whatever the sums and lengths above say.
    out.append(Measure("hash", table.columns[0]))
    return tuple(out)


@dataclass(frozen=True)
class DayTotals:
    """What to total for one table: its columns' measures, by the day of ``partition``;
    ``watermark``, when given, limits both sides to the rows at or below a value of it."""

    table: WarehouseTable
    partition: SfColumn
    watermark: SfColumn | None
    measures: tuple[Measure, ...]

    @classmethod
    def of(cls, table: WarehouseTable, partition: str, watermark: str | None = None) -> DayTotals:
        """``partition`` and ``watermark`` are source column names."""
        by_source = {c.source: c for c in table.columns}
        return cls(
            table,
            by_source[partition],
            None if watermark is None else by_source[watermark],
            measures(table),
        )

    def source_query(self, at_most: int | None) -> tuple[sql.Composed, tuple[int, ...]]:
        """PostgreSQL: (day text, row count, each measure) per day, on a session whose
        TimeZone is UTC."""
        columns = [_pg_measure(m, self.table) for m in self.measures]
        where: sql.Composable = sql.SQL("")
        params: tuple[int, ...] = ()
        if self.watermark is not None and at_most is not None:
            where = sql.SQL(" WHERE {} <= %s").format(sql.Identifier(self.watermark.source))
            params = (at_most,)
        query = sql.SQL(
            "SELECT to_char({p} AT TIME ZONE 'UTC', 'YYYY-MM-DD'), count(*){m} FROM {t}{w}"
            " GROUP BY 1"
        ).format(
            p=sql.Identifier(self.partition.source),
            m=sql.SQL("").join(sql.SQL(", ") + c for c in columns),
            t=self.table.names.table.sql(),
            w=where,
        )
        return query, params

    def warehouse_query(self, at_most: int | None) -> str:
        """Snowflake: DAY, N (the row count) and M0, M1, ... (each measure) per day of the
        current-state table. Timestamps are loaded with their +00:00 offset, so TO_DATE gives
        the UTC day."""
        columns = "".join(
            f", {_sf_measure(m, self.table)} AS M{i}" for i, m in enumerate(self.measures)
        )
        conditions = [self.table.live] if self.table.soft_deletes else []
        if self.watermark is not None and at_most is not None:
            conditions.append(f"{self.watermark.q} <= {int(at_most)}")
        where = " WHERE " + " AND ".join(conditions) if conditions else ""
        return (
            f"SELECT TO_DATE({self.partition.q}) AS DAY, COUNT(*) AS N{columns}"
            f" FROM {self.table.names.name}{where} GROUP BY 1"
        )


def _pg_measure(m: Measure, table: WarehouseTable) -> sql.Composable:
    if m.kind == "hash":
        canons = [canon(c) for c in table.columns]
        return sql.SQL("coalesce(sum({}), 0)").format(pg_row_hash(canons))
    c = sql.Identifier(m.column.source)
    if m.kind == "count":
        return sql.SQL("count({})").format(c)
    if m.kind == "sum":
        return sql.SQL("coalesce(sum({}), 0)").format(c)
    if m.kind == "length":
        return sql.SQL("coalesce(sum(length({})), 0)").format(c)
    return sql.SQL("count(*) FILTER (WHERE {})").format(c)


def _sf_measure(m: Measure, table: WarehouseTable) -> str:
    if m.kind == "hash":
        return f"COALESCE(SUM({sf_row_hash([canon(c) for c in table.columns])}), 0)"
    c = m.column.q
    if m.kind == "count":
        return f"COUNT({c})"
    if m.kind == "sum":
        return f"COALESCE(SUM({c}), 0)"
    if m.kind == "length":
        return f"COALESCE(SUM(LENGTH({c})), 0)"
    return f"COUNT_IF({c})"
