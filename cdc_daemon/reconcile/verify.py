"""``cdc-daemon verify``: every table of the group against its current-state table in the
warehouse, value by value, without moving the data (docs/snowflake.md, "Verification").

Per key range each database sums a 60-bit hash of each row's canonical text
(``warehouse.canonical``) and counts the rows; a range whose sums differ is split at the
source's (or, when it holds more, the warehouse's) key quantiles, again, until a range is small
enough to fetch: its rows are then read from both sides and compared column by column. So
when nothing differs, two aggregate queries per table are all that runs.

Keys are ordered the same way on both sides: integer keys as numbers, every other key by its
canonical text in byte order (``COLLATE "C"`` in PostgreSQL, Snowflake's default binary
comparison of VARCHAR).

A difference may be lag (a change not merged yet): with ``settle_s``, the differing keys are
read again until they agree or the time is up, and only what persists is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import psycopg
import structlog
from psycopg import sql

from cdc_daemon.config import Settings
from cdc_daemon.errors import CdcError, ConfigError, from_psycopg
from cdc_daemon.names import TableName
from cdc_daemon.ops.metrics import Metrics
from cdc_daemon.source.hashing import Hasher
from cdc_daemon.source.table import Column
from cdc_daemon.state.verify import VerifyLedger, VerifyState
from cdc_daemon.warehouse.canonical import Canon, canon, pg_row_hash, sf_row_hash
from cdc_daemon.warehouse.client import Warehouse
from cdc_daemon.warehouse.model import WarehouseTable, base_type

log = structlog.get_logger()

Key = tuple[Any, ...]
Bound = Key | None

# A range with at most this many rows on each side is fetched and compared row by row.
FETCH_ROWS = 200
# A differing range is split into this many parts.
FANOUT = 16
# Values longer than this are shortened in the report.
SHOWN_CHARS = 120


@dataclass(frozen=True)
class ColumnDifference:
    column: str
    source: str | None
    warehouse: str | None


@dataclass(frozen=True)
class RowDifference:
    """A key whose row differs: ``missing`` from the warehouse, ``extra`` in it, or
    ``changed`` in the columns named."""

    key: dict[str, Any]
    kind: Literal["missing", "extra", "changed"]
    columns: tuple[ColumnDifference, ...] = ()


@dataclass
class TableResult:
    table: str
    warehouse_table: str
    source_table: TableName
    source_rows: int = 0
    warehouse_rows: int = 0
    ranges: int = 0
    rows_fetched: int = 0
    differences: list[RowDifference] = field(default_factory=list)
    quarantined: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    null_only_columns: tuple[str, ...] = ()
    # Why the table was not compared (a hashed key); empty: it was.
    not_verified: str = ""
    seconds: float = 0.0
    warehouse_seconds: float = 0.0

    @property
    def equal(self) -> bool:
        return not self.differences

    def as_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "warehouse_table": self.warehouse_table,
            "equal": self.equal,
            "source_rows": self.source_rows,
            "warehouse_rows": self.warehouse_rows,
            "ranges": self.ranges,
            "rows_fetched": self.rows_fetched,
            "differences": [
                {
                    "key": d.key,
                    "kind": d.kind,
                    "columns": [
                        {"column": c.column, "source": c.source, "warehouse": c.warehouse}
                        for c in d.columns
                    ],
                }
                for d in self.differences
            ],
            "quarantined": [{"key": k, "columns": r} for k, r in self.quarantined],
            "hashed_by_null_only": list(self.null_only_columns),
            "not_verified": self.not_verified or None,
            "seconds": round(self.seconds, 3),
            "warehouse_seconds": round(self.warehouse_seconds, 3),
        }

    def lines(self) -> list[str]:
        if self.not_verified:
            return [f"{self.table} -> {self.warehouse_table}: not verified: {self.not_verified}"]
        head = "equal" if self.equal else f"{len(self.differences)} key(s) differ"
        out = [
            f"{self.table} -> {self.warehouse_table}: {head}; {self.source_rows} rows in the "
            f"source, {self.warehouse_rows} in the warehouse; {self.ranges} range(s), "
            f"{self.rows_fetched} row(s) fetched; {self.seconds:.1f} s "
            f"({self.warehouse_seconds:.1f} s in the warehouse)"
        ]
        for d in self.differences[:100]:
            key = ", ".join(f"{k}={v!r}" for k, v in d.key.items())
            if d.kind != "changed":
                where = "warehouse" if d.kind == "missing" else "source"
                out.append(f"  {key}: {d.kind} (not in the {where})")
                continue
            for c in d.columns:
                out.append(
                    f"  {key}: {c.column}: source {_shown(c.source)}, "
                    f"warehouse {_shown(c.warehouse)}"
                )
        if len(self.differences) > 100:
            out.append(f"  ... and {len(self.differences) - 100} more key(s)")
        for key_values, reasons in self.quarantined[:20]:
            key = ", ".join(f"{k}={v!r}" for k, v in key_values.items())
            out.append(f"  {key}: quarantined ({reasons}): NULL in the warehouse, as intended")
        if self.null_only_columns:
            out.append(
                "  hashed by NULL or not only (compared by value where a range is fetched): "
                + ", ".join(self.null_only_columns)
            )
        if self.differences:
            out.append(
                "  (a change still on its way is a difference too: --settle 180 reads the keys "
                "again; --repair exports them again)"
            )
        return out


def _shown(value: str | None) -> str:
    if value is None:
        return "NULL"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


@dataclass(frozen=True)
class _Sums:
    rows: int
    total: int


class TableVerifier:
    """One table: the source session (``source.session.connect``: UTC, ISO dates) and a
    warehouse session."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        wh: Warehouse,
        table: WarehouseTable,
        *,
        fetch_rows: int = FETCH_ROWS,
        fanout: int = FANOUT,
        hasher: Hasher | None = None,
    ) -> None:
        self._conn = conn
        self._hasher = hasher
        self._wh = wh
        self._t = table
        self._fetch_rows = fetch_rows
        self._fanout = fanout
        self._canons = [canon(c) for c in table.columns]
        if any(c.hashed for c in table.columns) and hasher is None:
            raise ValueError(f"{table.names.table} hashes columns: verify needs the salt")
        self._keys = [k for k in self._canons if k.column.key]
        if not self._keys and not table.keyless:
            raise ValueError(f"{table.names.table} has no key to verify by")
        self._wh_seconds = 0.0
        self._result = TableResult(str(table.names.table), table.names.name, table.names.table)

    # -- the pass ------------------------------------------------------------------------

    def slice_end(self, lo: Bound, rows: int) -> Bound:
        """The key ``rows`` rows after ``lo`` in the source's key order (None: the end)."""
        where, params = self._pg_where(lo, None)
        keys = sql.SQL(", ").join(self._pg_key(k) for k in self._keys)
        row = self._conn.execute(
            sql.SQL("SELECT {k} FROM {t} WHERE {w} ORDER BY {k} OFFSET %s LIMIT 1").format(
                k=keys, t=self._t.names.table.sql(), w=where
            ),
            [*params, rows],
        ).fetchone()
        if row is None:
            return None
        return tuple(self._key_value(k, v) for k, v in zip(self._keys, row, strict=True))

    def recheck(self, keys: Sequence[dict[str, Any]]) -> list[RowDifference]:
        """The keys (as reported) compared again: those that still differ."""
        names = [k.column.source for k in self._keys]
        found: dict[Key, RowDifference] = {}
        as_keys = [tuple(d[n] for n in names) for d in keys]
        for i in range(0, len(as_keys), 100):
            found.update(self._compare_keys(as_keys[i : i + 100]))
        return [found[k] for k in sorted(found, key=_sortable)]

    def run(
        self,
        settle_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        lo: Bound = None,
        hi: Bound = None,
    ) -> TableResult:
        """The keys in [lo, hi) (the whole table by default). A keyless table is compared
        whole: its sums, and when they differ, every row of both sides as multisets."""
        started = clock()
        result = self._result
        result.null_only_columns = tuple(k.column.source for k in self._canons if not k.exact)
        source, warehouse = self._sums(lo, hi)
        result.source_rows, result.warehouse_rows = source.rows, warehouse.rows
        result.ranges = 1
        differing: dict[Key, RowDifference] = {}
        if source != warehouse and self._t.keyless:
            result.differences = self._compare_copies()
            result.rows_fetched = source.rows + warehouse.rows
            result.seconds = clock() - started
            result.warehouse_seconds = self._wh_seconds
            return result
        if source != warehouse:
            self._bisect(lo, hi, source, warehouse, differing)
        if differing and settle_s > 0:
            differing = self._settle(differing, settle_s, clock)
        result.differences = [differing[k] for k in sorted(differing, key=_sortable)]
        result.seconds = clock() - started
        result.warehouse_seconds = self._wh_seconds
        return result

    def _bisect(
        self,
        lo: Bound,
        hi: Bound,
        source: _Sums,
        warehouse: _Sums,
        differing: dict[Key, RowDifference],
    ) -> None:
        if max(source.rows, warehouse.rows) <= self._fetch_rows:
            differing.update(self._compare_rows(lo, hi))
            return
        splits = self._splits(lo, hi, from_source=source.rows >= warehouse.rows)
        bounds = [lo, *splits, hi]
        sums = self._split_sums(lo, hi, splits)
        for (a, b), (s, w) in zip(itertools.pairwise(bounds), sums, strict=True):
            self._result.ranges += 1
            if s != w:
                self._bisect(a, b, s, w, differing)

    # -- SQL -----------------------------------------------------------------------------

    def _pg_key(self, k: Canon) -> sql.Composable:
        if k.numeric_order:
            return sql.Identifier(k.column.source)
        return sql.SQL('({}) COLLATE "C"').format(k.pg)

    def _sf_key(self, k: Canon) -> str:
        return k.column.q if k.numeric_order else k.sf

    def _pg_row(self) -> sql.Composable:
        """The key as one row value: compared with a bound row, lexicographically, which an
        index on the key columns serves as a range (``(k) >= (lo) AND (k) < (hi)``)."""
        return sql.SQL("ROW({})").format(sql.SQL(", ").join(self._pg_key(k) for k in self._keys))

    def _pg_bound(self, op: str, bound: Key) -> tuple[sql.Composable, list[Any]]:
        marks = sql.SQL(", ").join(sql.SQL("%s") for _ in bound)
        return sql.SQL("{} {} ROW({})").format(self._pg_row(), sql.SQL(op), marks), list(bound)

    def _pg_where(self, lo: Bound, hi: Bound) -> tuple[sql.Composable, list[Any]]:
        parts: list[sql.Composable] = []
        params: list[Any] = []
        for bound, op in ((lo, ">="), (hi, "<")):
            if bound is not None:
                part, values = self._pg_bound(op, bound)
                parts.append(part)
                params += values
        if not parts:
            return sql.SQL("TRUE"), []
        return sql.SQL(" AND ").join(parts), params

    def _sf_below(self, bound: Key, bind: Callable[[Any], str]) -> str:
        """The key sorts before ``bound`` (Snowflake compares no row values: spelled out)."""
        keys = [self._sf_key(k) for k in self._keys]
        ors = []
        for i in range(len(keys)):
            ands = [f"{keys[j]} = {bind(bound[j])}" for j in range(i)]
            ands.append(f"{keys[i]} < {bind(bound[i])}")
            ors.append("(" + " AND ".join(ands) + ")")
        return "(" + " OR ".join(ors) + ")"

    def _sf_where(
        self, lo: Bound, hi: Bound, params: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """The range as a WHERE, its values bound in ``params`` (a new mapping by default)."""
        parts: list[str] = []
        params = {} if params is None else params
        bind = _binder(params)
        if lo is not None:
            parts.append(f"NOT {self._sf_below(lo, bind)}")
        if hi is not None:
            parts.append(self._sf_below(hi, bind))
        if self._t.soft_deletes:  # its soft-deleted rows are no longer in the source
            parts.append(self._t.live)
        return (" AND ".join(parts) or "TRUE"), params

    def _query_wh(self, text: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        started = time.monotonic()
        try:
            return self._wh.query(text, params or None)
        finally:
            self._wh_seconds += time.monotonic() - started

    def _sums(self, lo: Bound, hi: Bound) -> tuple[_Sums, _Sums]:
        where, params = self._pg_where(lo, hi)
        row = self._conn.execute(
            sql.SQL("SELECT count(*), coalesce(sum({h}), 0) FROM {t} WHERE {w}").format(
                h=pg_row_hash(self._canons), t=self._t.names.table.sql(), w=where
            ),
            params,
        ).fetchone()
        assert row is not None
        sf_where, sf_params = self._sf_where(lo, hi)
        (got,) = self._query_wh(
            f"SELECT COUNT(*) AS N, COALESCE(SUM({sf_row_hash(self._canons)}), 0) AS H"
            f" FROM {self._t.names.name} WHERE {sf_where}",
            sf_params,
        )
        return _Sums(int(row[0]), int(row[1])), _Sums(int(got["N"]), int(got["H"]))

    def _split_sums(self, lo: Bound, hi: Bound, splits: Sequence[Key]) -> list[tuple[_Sums, _Sums]]:
        """The sums of each part of [lo, hi) cut at ``splits``, one query on each side (the
        part of a row: the number of splits at or below its key)."""
        where, params = self._pg_where(lo, hi)
        cases: list[sql.Composable] = []
        pg_params: list[Any] = []
        for i, split in enumerate(splits):
            below, values = self._pg_bound("<", split)
            cases.append(sql.SQL("WHEN {} THEN {}").format(below, sql.Literal(i)))
            pg_params += values
        part = (
            sql.SQL("CASE {} ELSE {} END").format(
                sql.SQL(" ").join(cases), sql.Literal(len(splits))
            )
            if splits
            else sql.Literal(0)
        )
        found = self._conn.execute(
            sql.SQL(
                "SELECT {p} AS part, count(*), coalesce(sum({h}), 0) FROM {t} WHERE {w} GROUP BY 1"
            ).format(p=part, h=pg_row_hash(self._canons), t=self._t.names.table.sql(), w=where),
            [*pg_params, *params],
        ).fetchall()
        source = {int(r[0]): _Sums(int(r[1]), int(r[2])) for r in found}
        sf_params: dict[str, Any] = {}
        bind = _binder(sf_params)
        sf_cases = " ".join(
            f"WHEN {self._sf_below(split, bind)} THEN {i}" for i, split in enumerate(splits)
        )
        sf_part = f"CASE {sf_cases} ELSE {len(splits)} END" if splits else "0"
        sf_where, _ = self._sf_where(lo, hi, sf_params)
        rows = self._query_wh(
            f"SELECT {sf_part} AS PART, COUNT(*) AS N,"
            f" COALESCE(SUM({sf_row_hash(self._canons)}), 0) AS H"
            f" FROM {self._t.names.name} WHERE {sf_where} GROUP BY 1",
            sf_params,
        )
        warehouse = {int(r["PART"]): _Sums(int(r["N"]), int(r["H"])) for r in rows}
        empty = _Sums(0, 0)
        return [(source.get(i, empty), warehouse.get(i, empty)) for i in range(len(splits) + 1)]

    def _splits(self, lo: Bound, hi: Bound, *, from_source: bool) -> list[Key]:
        """Keys that cut (lo, hi) into about ``fanout`` parts of the side with more rows."""
        if from_source:
            where, params = self._pg_where(lo, hi)
            keys = sql.SQL(", ").join(self._pg_key(k) for k in self._keys)
            rows = self._conn.execute(
                sql.SQL(
                    "SELECT * FROM (SELECT {k}, row_number() OVER (ORDER BY {k}) AS _rn,"
                    " count(*) OVER () AS _n FROM {t} WHERE {w}) s"
                    " WHERE _rn > 1 AND mod(_rn - 1, greatest(1, _n / {f})) = 0 ORDER BY _rn"
                ).format(k=keys, t=self._t.names.table.sql(), w=where, f=sql.Literal(self._fanout)),
                params,
            ).fetchall()
            return [
                tuple(self._key_value(k, v) for k, v in zip(self._keys, r, strict=False))
                for r in rows
            ]
        sf_where, sf_params = self._sf_where(lo, hi)
        names = [f"K{i}" for i in range(len(self._keys))]
        keys_sf = ", ".join(
            f"{self._sf_key(k)} AS {n}" for k, n in zip(self._keys, names, strict=True)
        )
        order = ", ".join(names)
        found = self._query_wh(
            f"SELECT {order} FROM (SELECT {keys_sf}, ROW_NUMBER() OVER (ORDER BY {order}) AS RN_,"
            f" COUNT(*) OVER () AS N_ FROM {self._t.names.name} WHERE {sf_where}) S"
            f" WHERE RN_ > 1 AND MOD(RN_ - 1, GREATEST(1, FLOOR(N_ / {self._fanout}))) = 0"
            " ORDER BY RN_",
            sf_params,
        )
        return [
            tuple(self._key_value(k, r[n]) for k, n in zip(self._keys, names, strict=True))
            for r in found
        ]

    @staticmethod
    def _key_value(k: Canon, value: Any) -> Any:
        if value is None:
            return None
        return int(value) if k.numeric_order else str(value)

    # -- rows ----------------------------------------------------------------------------

    def _pg_rows(self, where: sql.Composable, params: Sequence[Any]) -> dict[Key, list[str | None]]:
        columns = [self._pg_key(k) for k in self._keys] + [
            k.pg if k.exact else _pg_raw(k) for k in self._canons
        ]
        rows = self._conn.execute(
            sql.SQL("SELECT {} FROM {} WHERE {}").format(
                sql.SQL(", ").join(columns), self._t.names.table.sql(), where
            ),
            params,
        ).fetchall()
        n = len(self._keys)
        return {
            tuple(self._key_value(k, v) for k, v in zip(self._keys, r[:n], strict=True)): [
                self._source_value(k, v) for k, v in zip(self._canons, r[n:], strict=True)
            ]
            for r in rows
        }

    def _source_value(self, k: Canon, value: Any) -> str | None:
        """A fetched source value as text; a hashed column's as its hash (the source's text in
        the object format, hashed here: the clear value is never reported)."""
        if value is None:
            return None
        if k.column.hashed:
            assert self._hasher is not None
            return self._hasher.hex(str(value).encode()).decode()
        return str(value)

    def _sf_rows(
        self, where: str, params: dict[str, Any]
    ) -> dict[Key, tuple[list[str | None], str | None]]:
        names = [f"K{i}" for i in range(len(self._keys))]
        keys = [f"{self._sf_key(k)} AS {n}" for k, n in zip(self._keys, names, strict=True)]
        values = [f"{k.sf if k.exact else _sf_raw(k)} AS V{i}" for i, k in enumerate(self._canons)]
        rows = self._query_wh(
            f"SELECT {', '.join(keys + values)}, _CDC_QUARANTINED AS Q_"
            f" FROM {self._t.names.name} WHERE {where}",
            params,
        )
        return {
            tuple(self._key_value(k, r[n]) for k, n in zip(self._keys, names, strict=True)): (
                [None if r[f"V{i}"] is None else str(r[f"V{i}"]) for i in range(len(self._canons))],
                r["Q_"],
            )
            for r in rows
        }

    def _compare_rows(self, lo: Bound, hi: Bound) -> dict[Key, RowDifference]:
        where, params = self._pg_where(lo, hi)
        sf_where, sf_params = self._sf_where(lo, hi)
        return self._compare(self._pg_rows(where, params), self._sf_rows(sf_where, sf_params))

    def _compare(
        self,
        source: dict[Key, list[str | None]],
        warehouse: dict[Key, tuple[list[str | None], str | None]],
    ) -> dict[Key, RowDifference]:
        self._result.rows_fetched += len(source) + len(warehouse)
        out: dict[Key, RowDifference] = {}
        for key in source.keys() | warehouse.keys():
            shown = {k.column.source: v for k, v in zip(self._keys, key, strict=True)}
            if key not in warehouse:
                out[key] = RowDifference(shown, "missing")
                continue
            if key not in source:
                out[key] = RowDifference(shown, "extra")
                continue
            values, quarantined = warehouse[key]
            withheld = _quarantined_columns(quarantined)
            changed = []
            for k, a, b in zip(self._canons, source[key], values, strict=True):
                if _same(k, a, b):
                    continue
                if b is None and k.column.source in withheld:
                    continue
                changed.append(ColumnDifference(k.column.source, a, b))
            if withheld and not changed:
                self._result.quarantined.append((shown, quarantined or ""))
            if changed:
                out[key] = RowDifference(shown, "changed", tuple(changed))
        return out

    def _compare_copies(self) -> list[RowDifference]:
        """A keyless table's rows on both sides as multisets of their values (each value in
        the form ``_same`` compares): a row the source has more copies of than the warehouse
        is ``missing`` once per copy, one it has fewer of ``extra``; the row's values stand for
        its key. A warehouse copy whose values are quarantined (NULL, named in
        ``_CDC_QUARANTINED``) pairs with a source copy equal in every other column: counted
        as quarantined, not as a difference."""
        columns = [k.pg if k.exact else _pg_raw(k) for k in self._canons]
        source_rows = self._conn.execute(
            sql.SQL("SELECT {} FROM {}").format(
                sql.SQL(", ").join(columns), self._t.names.table.sql()
            )
        ).fetchall()
        values = [f"{k.sf if k.exact else _sf_raw(k)} AS V{i}" for i, k in enumerate(self._canons)]
        warehouse_rows = self._query_wh(
            f"SELECT {', '.join(values)}, _CDC_QUARANTINED AS Q_ FROM {self._t.names.name}", {}
        )

        def row_of(raw: Sequence[Any]) -> tuple[Any, ...]:
            return tuple(_comparable(k, v) for k, v in zip(self._canons, raw, strict=True))

        source = Counter(
            row_of([self._source_value(k, v) for k, v in zip(self._canons, r, strict=True)])
            for r in source_rows
        )
        warehouse: Counter[tuple[Any, ...]] = Counter()
        marks: dict[tuple[Any, ...], str] = {}
        for r in warehouse_rows:
            row = row_of(
                [None if r[f"V{i}"] is None else str(r[f"V{i}"]) for i in range(len(self._canons))]
            )
            warehouse[row] += 1
            if r["Q_"]:
                marks[row] = str(r["Q_"])
        missing, extra = source - warehouse, warehouse - source
        names = [k.column.source for k in self._canons]
        for row, mark in marks.items():
            withheld = _quarantined_columns(mark)
            for wanted in list(missing):
                while (
                    extra[row]
                    and missing[wanted]
                    and all(
                        a == b or (name in withheld and b is None)
                        for name, a, b in zip(names, wanted, row, strict=True)
                    )
                ):
                    extra[row] -= 1
                    missing[wanted] -= 1
                    self._result.quarantined.append((dict(zip(names, wanted, strict=True)), mark))
        sides: list[tuple[Literal["missing", "extra"], Counter[tuple[Any, ...]]]] = [
            ("missing", +missing),
            ("extra", +extra),
        ]
        out = []
        for kind, more in sides:
            for row, copies in sorted(more.items(), key=lambda item: repr(item[0])):
                shown = dict(zip(names, row, strict=True))
                out += [RowDifference(shown, kind)] * copies
        return out

    # -- lag -----------------------------------------------------------------------------

    def _settle(
        self, differing: dict[Key, RowDifference], settle_s: float, clock: Callable[[], float]
    ) -> dict[Key, RowDifference]:
        """Read the differing keys again until they agree or ``settle_s`` has passed."""
        deadline = clock() + settle_s
        while differing and clock() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - clock())))
            again: dict[Key, RowDifference] = {}
            keys = list(differing)
            for i in range(0, len(keys), 100):
                again.update(self._compare_keys(keys[i : i + 100]))
            differing = again
        return differing

    def _compare_keys(self, keys: Iterable[Key]) -> dict[Key, RowDifference]:
        keys = list(keys)
        pg_parts: list[sql.Composable] = []
        params: list[Any] = []
        sf_parts: list[str] = []
        sf_params: dict[str, Any] = {}
        for key in keys:
            pg_parts.append(
                sql.SQL("(")
                + sql.SQL(" AND ").join(
                    sql.SQL("{} = %s").format(self._pg_key(k)) for k in self._keys
                )
                + sql.SQL(")")
            )
            params.extend(key)
            ands = []
            for k, v in zip(self._keys, key, strict=True):
                name = f"p{len(sf_params)}"
                sf_params[name] = v
                ands.append(f"{self._sf_key(k)} = %({name})s")
            sf_parts.append("(" + " AND ".join(ands) + ")")
        source = self._pg_rows(sql.SQL(" OR ").join(pg_parts), params)
        warehouse = self._sf_rows(" OR ".join(sf_parts), sf_params)
        return self._compare(source, warehouse)


def _binder(params: dict[str, Any]) -> Callable[[Any], str]:
    """Binds a value in ``params`` under the next name and returns its placeholder."""

    def bind(value: Any) -> str:
        name = f"p{len(params)}"
        params[name] = value
        return f"%({name})s"

    return bind


def _pg_raw(k: Canon) -> sql.Composable:
    if k.column.hashed:  # the text the daemon hashed: the value in the object format
        return sql.SQL("({})::text").format(Column(k.column.source, k.column.pg_type).csv_expr())
    c = sql.Identifier(k.column.source)
    if base_type(k.column.pg_type).endswith("[]"):
        return sql.SQL("array_to_json({})::text").format(c)
    return sql.SQL("{}::text").format(c)


def _sf_raw(k: Canon) -> str:
    if k.column.type.final in ("VARIANT", "ARRAY"):
        return f"TO_JSON({k.column.q})"
    return f"TO_VARCHAR({k.column.q})"


def _same(k: Canon, a: str | None, b: str | None) -> bool:
    """One column's values, as fetched from each side, are the same value."""
    if a is None or b is None:
        return a is None and b is None
    if k.exact or k.column.hashed:
        return a == b
    if k.column.type.final == "FLOAT":
        x, y = _float(a), _float(b)
        return x == y or (math.isnan(x) and math.isnan(y))
    try:
        return bool(json.loads(a, parse_float=Decimal) == json.loads(b, parse_float=Decimal))
    except ValueError:
        return a == b


def _comparable(k: Canon, value: str | None) -> Any:
    """A fetched value in a form equal on both sides exactly when ``_same`` says so."""
    if value is None or k.exact or k.column.hashed:
        return value
    if k.column.type.final == "FLOAT":
        number = _float(value)
        return "nan" if math.isnan(number) else number
    try:
        parsed = json.loads(value, parse_float=Decimal, parse_int=Decimal)
        return json.dumps(parsed, sort_keys=True, default=lambda d: str(d.normalize()))
    except ValueError:
        return value


def _float(text: str) -> float:
    return float(text.replace("Infinity", "inf"))


def _quarantined_columns(text: str | None) -> set[str]:
    """The columns named in ``_CDC_QUARANTINED`` (``col:reason;...``)."""
    if not text:
        return set()
    return {part.rsplit(":", 1)[0] for part in text.split(";") if part}


def _sortable(key: Key) -> tuple[Any, ...]:
    return tuple((v is None, str(type(v)), v) for v in key)


def verify_group(
    settings: Settings, table: TableName | None = None, settle_s: float = 0.0
) -> list[TableResult]:
    """Every table of the group (or ``table``) against its warehouse table."""
    from cdc_daemon.source.session import connect
    from cdc_daemon.warehouse.model import read_catalog

    tables = read_catalog(settings)
    if table is not None:
        tables = [t for t in tables if t.names.table == table]
        if not tables:
            raise ConfigError(f"{table} is not a table of this configuration")
    conn = connect(settings.postgres, "cdc-daemon-verify")
    try:
        wh = Warehouse.of_group(settings).connect()
        try:
            salt = settings.hash_salt()
            hasher = None if salt is None else Hasher(salt)
            return [_verify_table(conn, wh, t, hasher, settle_s) for t in tables]
        except psycopg.Error as exc:
            raise from_psycopg(exc, "verifying against the source") from None
        finally:
            wh.close()
    finally:
        conn.close()


def _verify_table(
    conn: psycopg.Connection[Any],
    wh: Warehouse,
    table: WarehouseTable,
    hasher: Hasher | None,
    settle_s: float,
) -> TableResult:
    """One table; one whose key is hashed is not compared (and says so): its rows are keyed by
    the key's clear value in the source and by its hash in the warehouse, so no key range
    means the same rows on both sides without moving every key out of the source."""
    hashed_key = [c.source for c in table.key if c.hashed]
    if hashed_key:
        return TableResult(
            str(table.names.table),
            table.names.name,
            table.names.table,
            not_verified=f"its key column {hashed_key[0]} is hashed (hash_columns), so the "
            "warehouse's keys cannot be matched to the source's by range",
        )
    return TableVerifier(conn, wh, table, hasher=hasher).run(settle_s)


class RollingVerifier:
    """Continuous verification (``verify`` settings): every ``interval_s``, a slice of
    ``rows_per_slice`` keys of each table is compared with the warehouse, from where the last
    slice of that table ended (``state.verify``); a key found differing is compared again after
    ``settle_s`` and, if it still differs, logged once (``verify_difference``, with the keys'
    count and the fix), counted in metrics and kept for ``status``. It never raises: a
    failed round is logged and the next one runs."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._warned_schema = False

    async def run(self, stop: asyncio.Event) -> None:
        interval = self._settings.verify.interval_s
        if interval <= 0:
            return
        # The first slice one interval after the start: the export comes first.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        while not stop.is_set():
            try:
                await self.round(stop)
            except CdcError as exc:
                log.warning("verify_round_failed", error=str(exc), retriable=exc.retriable)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def round(self, stop: asyncio.Event | None = None) -> list[VerifyState]:
        """One slice of each table; returns the tables' states after it."""
        from cdc_daemon.source.session import connect
        from cdc_daemon.state.verify import VerifyLedger
        from cdc_daemon.warehouse.model import read_catalog

        settings = self._settings
        ledger = await VerifyLedger.open_for(settings, "cdc-daemon-verify")
        try:
            if not await ledger.has_table():
                if not self._warned_schema:
                    self._warned_schema = True
                    log.warning(
                        "verify_needs_init",
                        hint="run `cdc-daemon init`: the ledger has no verify_state table yet",
                    )
                return []
            tables = await asyncio.to_thread(read_catalog, settings)
            conn = await asyncio.to_thread(connect, settings.postgres, "cdc-daemon-verify")
            try:
                wh = await asyncio.to_thread(Warehouse.of_group(settings).connect)
                try:
                    salt = settings.hash_salt()
                    hasher = None if salt is None else Hasher(salt)
                    out = []
                    for t in tables:
                        if any(c.hashed for c in t.key) or t.keyless:
                            # Not comparable by key range (see _verify_table); a keyless
                            # table has no keys to slice by: `cdc-daemon verify` compares it.
                            continue
                        out.append(await self._slice(ledger, conn, wh, t, stop, hasher))
                        if stop is not None and stop.is_set():
                            break
                    return out
                finally:
                    await asyncio.to_thread(wh.close)
            finally:
                await asyncio.to_thread(conn.close)
        finally:
            await ledger.close()

    async def _slice(
        self,
        ledger: VerifyLedger,
        conn: psycopg.Connection[Any],
        wh: Warehouse,
        table: WarehouseTable,
        stop: asyncio.Event | None,
        hasher: Hasher | None = None,
    ) -> VerifyState:
        cfg = self._settings.verify
        name = table.names.table.key
        state = await ledger.state(name)
        verifier = TableVerifier(conn, wh, table, hasher=hasher)
        lo = state.cursor
        try:
            hi = await asyncio.to_thread(verifier.slice_end, lo, cfg.rows_per_slice)
            result = await asyncio.to_thread(verifier.run, 0.0, time.monotonic, lo, hi)
            differing = result.differences
            if differing and cfg.settle_s > 0:
                log.info("verify_settling", table=name, keys=len(differing), seconds=cfg.settle_s)
                if stop is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), cfg.settle_s)
                    if stop.is_set():
                        return state  # stopping: the slice is not judged (nor saved)
                else:
                    await asyncio.sleep(cfg.settle_s)
                differing = await asyncio.to_thread(verifier.recheck, [d.key for d in differing])
        except psycopg.Error as exc:
            raise from_psycopg(exc, f"verifying {name}") from None
        now = datetime.now(UTC)
        keys = tuple(d.key for d in differing)
        new = VerifyState(
            name,
            cursor=hi,
            pass_started_at=now if lo is None else state.pass_started_at,
            last_pass_at=now if hi is None else state.last_pass_at,
            rows_verified=(0 if lo is None else state.rows_verified) + result.source_rows,
            differing=keys[:1000],
            checked_at=now,
        )
        await ledger.save(new)
        if keys and set(map(_frozen, keys)) != set(map(_frozen, state.differing)):
            log.warning(
                "verify_difference",
                table=name,
                keys=len(keys),
                sample=[dict(k) for k in keys[:5]],
                hint=f"`cdc-daemon verify --table {table.names.table}` shows them; --repair "
                "fixes them",
            )
        elif state.differing and not keys:
            log.info("verify_difference_gone", table=name)
        if hi is None:
            log.info("verify_pass_done", table=name, rows=new.rows_verified)
        if self._metrics is not None:
            last = new.last_pass_at.timestamp() if new.last_pass_at else None
            self._metrics.verified(name, result.source_rows, len(keys), last)
        return new


def _frozen(key: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, str(v)) for k, v in key.items()))
