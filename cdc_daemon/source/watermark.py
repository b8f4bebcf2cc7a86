"""High-watermark capture: new rows of the table, in watermark order, streamed with COPY.

Late commits. A plain ``WHERE id > watermark`` loses rows: a transaction can take id 5, then
another take id 6 and commit, the daemon export 6 and move the watermark to 6, and only then the
first commit id 5. This module never exports past a *fence*:

1. ``fence()`` reads, in one statement, ``high`` = the largest watermark visible now, and the
   virtual transaction ids of every transaction open in this database (``pg_locks``, lock type
   ``virtualxid``: every transaction holds one, including those that have not written yet and
   so have no xid) plus any prepared transaction.
2. Any row with a watermark ``<= high`` that is not visible yet belongs to one of those
   transactions: values are assigned increasingly, so a transaction that starts later takes a
   larger one. ``fence_holders()`` is polled until all of them have ended.
3. Only then is ``(watermark, high]`` read, in a new snapshot: every row it will ever hold is
   committed (or rolled back), so the range is final and the watermark can move past it.

The cost is latency: export waits for transactions that were open at the fence, so a session
left idle in a transaction holds export back (it holds back VACUUM too); the daemon logs it.
Sessions of the daemon itself (``application_name`` ``cdc-daemon*``) never write to the source
and are not waited for. The assumption, stated in the README: watermark values are assigned in
increasing order at insert time (a sequence with CACHE 1, the default for serial/identity
columns, or ``now()``/``clock_timestamp()``), and rows are not inserted with older values by hand.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import psycopg
from psycopg import sql

from cdc_daemon.config import Settings
from cdc_daemon.errors import from_psycopg
from cdc_daemon.sink.csv import header_line, seq_of_row
from cdc_daemon.sink.spool import DaySpool
from cdc_daemon.source.table import TableInfo, describe_table

APPLICATION_NAME = "cdc-daemon"


@dataclass(frozen=True)
class Fence:
    high: int | None  # largest _cdc_seq visible at the fence; None when the table is empty
    holders: tuple[str, ...]  # transactions that were open at the fence


@dataclass(frozen=True)
class Plan:
    rows: int
    hi: int | None


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_days: int


@dataclass(frozen=True)
class Extract:
    hi: int  # the batch covers (lo, hi]
    rows: int
    cut: bool  # True when max_bytes/max_days closed the batch before the planned hi


def connect(settings: Settings) -> psycopg.Connection[tuple[object, ...]]:
    """A source session with the settings the encoding relies on (UTC, ISO dates)."""
    options = "-c TimeZone=UTC -c DateStyle=ISO -c extra_float_digits=1"
    if settings.postgres.statement_timeout_s:
        options += f" -c statement_timeout={int(settings.postgres.statement_timeout_s * 1000)}"
    try:
        return psycopg.connect(
            settings.postgres.dsn.get_secret_value(),
            autocommit=True,
            application_name=APPLICATION_NAME,
            connect_timeout=max(1, int(settings.postgres.connect_timeout_s)),
            options=options,
        )
    except psycopg.Error as exc:
        raise from_psycopg(exc, "cannot connect to the source database") from None


class WatermarkSource:
    """Synchronous by design: COPY in a thread runs at psql's speed, async COPY at ~0.4x
    (one chunk per row through the event loop). The worker calls it with ``to_thread``."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._table: TableInfo | None = None
        self._lock = threading.Lock()

    @property
    def table(self) -> TableInfo:
        assert self._table is not None, "connect() first"
        return self._table

    def connect(self) -> TableInfo:
        self.close()
        self._conn = connect(self._settings)
        capture = self._settings.capture
        try:
            self._table = describe_table(
                self._conn,
                self._settings.postgres.table,
                capture.watermark_column,
                capture.partition_column,
            )
            # Fail now, not on the first batch, if the user may not read the table.
            self._conn.execute(sql.SQL("SELECT 1 FROM {} LIMIT 0").format(self._table.ident()))
        except psycopg.Error as exc:
            raise from_psycopg(exc, f"cannot read {self._settings.postgres.table}") from None
        return self._table

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _session(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self.connect()
        assert self._conn is not None
        return self._conn

    def cancel(self) -> None:
        """Interrupt a running COPY from another thread (graceful shutdown past its grace)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.cancel_safe(timeout=5)

    def _run(
        self, doing: str, query: sql.SQL | sql.Composed, params: tuple[object, ...] | None = None
    ) -> list[tuple[object, ...]]:
        try:
            return self._session().execute(query, params).fetchall()
        except psycopg.Error as exc:
            raise from_psycopg(exc, doing) from None

    def fence(self) -> Fence:
        t = self.table
        rows = self._run(
            "reading the fence",
            sql.SQL(
                "SELECT (SELECT {seq} FROM {tbl} WHERE {w} IS NOT NULL ORDER BY {w} DESC LIMIT 1),"
                " ARRAY(SELECT l.virtualxid FROM pg_locks l JOIN pg_stat_activity a"
                "       ON a.pid = l.pid"
                "       WHERE l.locktype = 'virtualxid' AND l.granted"
                "         AND l.virtualxid = l.virtualtransaction"
                "         AND a.datname = current_database() AND l.pid <> pg_backend_pid()"
                "         AND coalesce(a.application_name, '') NOT LIKE {app}"
                "       UNION ALL SELECT 'prepared:' || gid FROM pg_prepared_xacts"
                "       WHERE database = current_database())"
            ).format(
                seq=t.seq_expr(),
                tbl=t.ident(),
                w=t.watermark.ident(),
                app=sql.Literal(APPLICATION_NAME + "%"),
            ),
        )
        high, holders = rows[0]
        assert isinstance(holders, list)
        return Fence(None if high is None else int(str(high)), tuple(str(h) for h in holders))

    def fence_holders(self, fence: Fence) -> tuple[str, ...]:
        """Those of the fence's transactions that are still open."""
        if not fence.holders:
            return ()
        rows = self._run(
            "waiting on the fence",
            sql.SQL(
                "SELECT virtualxid FROM pg_locks WHERE locktype = 'virtualxid' AND granted"
                " AND virtualxid = virtualtransaction AND virtualxid = ANY(%s)"
                " UNION ALL SELECT 'prepared:' || gid FROM pg_prepared_xacts"
                " WHERE 'prepared:' || gid = ANY(%s)"
            ),
            (list(fence.holders), list(fence.holders)),
        )
        return tuple(str(r[0]) for r in rows)

    def _range(self, lo: int | None, hi: int) -> sql.Composable:
        t = self.table
        cond = sql.SQL("{w} <= {hi}").format(w=t.watermark.ident(), hi=t.position_expr(hi))
        if lo is not None:
            cond = (
                sql.SQL("{w} > {lo} AND ").format(w=t.watermark.ident(), lo=t.position_expr(lo))
                + cond
            )
        return cond

    def plan(self, lo: int | None, high: int, max_rows: int) -> Plan:
        """How many rows the next batch holds (at most ``max_rows``, plus ties of its last
        value) and its upper bound. An index scan on the watermark: no row is read."""
        t = self.table
        rows = self._run(
            "planning a batch",
            sql.SQL(
                "SELECT count(*), max(s) FROM (SELECT {seq} AS s FROM {tbl} WHERE {rng}"
                " ORDER BY {w} LIMIT {n}) q"
            ).format(
                seq=t.seq_expr(),
                tbl=t.ident(),
                rng=self._range(lo, high),
                w=t.watermark.ident(),
                n=sql.Literal(max_rows),
            ),
        )
        count, hi = rows[0]
        return Plan(int(str(count)), None if hi is None else int(str(hi)))

    def copy_query(self, lo: int | None, hi: int, read_ts: str) -> sql.Composed:
        t = self.table
        cols = sql.SQL(", ").join(c.csv_expr() for c in t.columns)
        return sql.SQL(
            "COPY (SELECT {day}, {cols}, 'I', {seq}, {ts} FROM {tbl} WHERE {rng} ORDER BY {w})"
            " TO STDOUT (FORMAT csv)"
        ).format(
            day=t.day_expr(),
            cols=cols,
            seq=t.seq_expr(),
            ts=sql.Literal(read_ts),
            tbl=t.ident(),
            rng=self._range(lo, hi),
            w=t.watermark.ident(),
        )

    def extract(
        self, lo: int | None, hi: int, read_ts: str, spool: DaySpool, limits: Limits | None
    ) -> Extract:
        """Stream ``(lo, hi]`` into the spool. With ``limits``, stop early at the first
        watermark change after max_bytes or max_days is reached (never between two rows with
        the same watermark, so the range stays a clean ``(lo, cut]``)."""
        conn = self._session()
        rows = nbytes = 0
        last: bytes | None = None
        cut: int | None = None
        cur_day = b""
        cur = None
        try:
            with conn.cursor() as cursor, cursor.copy(self.copy_query(lo, hi, read_ts)) as copy:
                for raw in copy:
                    if cut is not None:
                        continue  # draining what the server sent before the cancel landed
                    data = bytes(raw)
                    comma = data.index(b",")
                    day = data[:comma]
                    if (
                        limits is not None
                        and last is not None
                        and (
                            nbytes >= limits.max_bytes
                            or (
                                day != cur_day
                                and day not in spool
                                and len(spool) >= limits.max_days
                            )
                        )
                    ):
                        last_seq = seq_of_row(last)
                        if seq_of_row(data) != last_seq:
                            cut = last_seq
                            conn.cancel_safe(timeout=5)
                            continue
                    if day != cur_day:
                        cur_day, cur = day, spool.day(day)
                    assert cur is not None
                    row = data[comma + 1 :]
                    cur.pending.append(row)
                    cur.buffered += len(row)
                    if cur.buffered >= 1 << 20:
                        cur.drain()
                    nbytes += len(row)
                    rows += 1
                    last = data
        except psycopg.errors.QueryCanceled:
            if cut is None:
                raise from_psycopg(
                    psycopg.errors.QueryCanceled("export canceled"), "exporting"
                ) from None
        except psycopg.Error as exc:
            raise from_psycopg(exc, f"exporting {self.table.qualified}") from None
        if cut is not None:
            return Extract(cut, rows, True)
        return Extract(hi, rows, False)

    @property
    def header(self) -> bytes:
        return header_line(self.table.header)
