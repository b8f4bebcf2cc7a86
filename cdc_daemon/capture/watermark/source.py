"""High-watermark capture: new rows of the table, in id order, streamed with ``COPY TO STDOUT``.

One *pass* (``WatermarkSource.run_pass``) runs in one REPEATABLE READ snapshot: it reads the
fence, plans the batch, re-reads rows that filled earlier gaps, and copies the new range. Why
that loses no late commit is explained in ``capture.watermark.fence``.

Synchronous by design: a sync COPY in a thread runs at psql's speed, the async one far slower
(one chunk per row through the event loop). The pipeline calls it in a thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import psycopg
from psycopg import sql

from cdc_daemon.batch.csv import header_line, seq_of_row
from cdc_daemon.batch.policy import Limits
from cdc_daemon.batch.spool import DaySpool
from cdc_daemon.capture.copy import stream_rows
from cdc_daemon.capture.watermark.fence import advance, retire, to_ranges
from cdc_daemon.config import Settings
from cdc_daemon.errors import SourceError, from_psycopg
from cdc_daemon.source.copyread import CopyRows, copy_query
from cdc_daemon.source.session import SourceSession, connect, read_snapshot, translated
from cdc_daemon.source.table import TableInfo, describe_configured
from cdc_daemon.state.position import INT64_MIN, CaptureState, Range

# Transactions that can insert rows: not the daemon's own sessions (they only read), and not
# autovacuum or WAL senders.
_HOLDERS = """
SELECT l.virtualxid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'virtualxid' AND l.granted AND l.virtualxid = l.virtualtransaction
  AND a.datname = current_database() AND l.pid <> pg_backend_pid()
  AND a.backend_type NOT IN ('autovacuum worker', 'walsender')
  AND coalesce(a.application_name, '') NOT LIKE 'cdc-daemon%%'
UNION ALL SELECT 'prepared:' || gid FROM pg_prepared_xacts WHERE database = current_database()
"""


@dataclass(frozen=True)
class Scan:
    """What a pass found before copying anything: the policy decides on it."""

    new_rows: int
    late_rows: int

    @property
    def rows(self) -> int:
        return self.new_rows + self.late_rows


@dataclass(frozen=True)
class BatchSpec:
    """Exactly which rows a batch holds: ids in ``(lo, hi]`` except ``gaps``, plus ``caught``.
    Kept in the intent record, so a redo after a crash copies the very same rows."""

    lo: int
    hi: int
    gaps: tuple[Range, ...]
    caught: tuple[Range, ...]


@dataclass(frozen=True)
class PassResult:
    spec: BatchSpec | None  # None: nothing was copied
    cut: bool  # max_bytes/max_days closed the batch before the planned end
    state: CaptureState  # the capture state once this pass's batch is durable
    high_seen: int  # the highest id visible in the snapshot (for the "behind" figure)
    waiting: bool = False  # rows are there, but the policy let them wait (age)


class WatermarkSource(SourceSession):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._table: TableInfo | None = None
        # Whether the ids seen last were dense (no absent id): then the next pass copies a
        # range without counting its rows first (see ``_pass_in_snapshot``).
        self._dense = True

    @property
    def table(self) -> TableInfo:
        assert self._table is not None, "connect() first"
        return self._table

    @property
    def described(self) -> bool:
        """Whether the table's catalog was read (``connect`` succeeded once)."""
        return self._table is not None

    @property
    def header(self) -> bytes:
        return header_line(self.table.header)

    def connect(self) -> TableInfo:
        self.close()
        self._conn = connect(self._settings.postgres)
        try:
            self._table = describe_configured(self._conn, self._settings)
            # Fail now, not on the first batch, if this user may not read the table.
            self._conn.execute(sql.SQL("SELECT 1 FROM {} LIMIT 0").format(self._table.ident()))
        except psycopg.Error as exc:
            raise from_psycopg(exc, f"cannot read {self._settings.postgres.table}") from None
        return self._table

    # -- SQL pieces ---------------------------------------------------------------------------

    def _id(self) -> sql.Composable:
        return self.table.watermark.ident()

    def _copy(self, where: sql.Composable, read_ts: str) -> sql.Composed:
        return copy_query(self.table, where, read_ts)

    def _in_ranges(self, ranges: Sequence[Range]) -> sql.Composable:
        """Ids in any of ``ranges``. A few ranges as ``BETWEEN``s joined by OR, which the
        planner serves with index range scans (the first pass's gap below the first id,
        ``(INT64_MIN, first)``, cost a full scan of the table with a subquery per row in the
        form kept for many ranges)."""
        if len(ranges) <= _OR_RANGES:
            return sql.SQL("({})").format(
                sql.SQL(" OR ").join(
                    sql.SQL("{id} BETWEEN {f} AND {l}").format(
                        id=self._id(), f=_int8(f), l=_int8(last)
                    )
                    for f, last in ranges
                )
            )
        return sql.SQL(
            "EXISTS (SELECT 1 FROM unnest({f}::int8[], {l}::int8[]) g(f, l)"
            " WHERE {id} BETWEEN g.f AND g.l)"
        ).format(
            f=sql.Literal([r[0] for r in ranges]),
            l=sql.Literal([r[1] for r in ranges]),
            id=self._id(),
        )

    def _range(self, lo: int, hi: int) -> sql.Composable:
        return sql.SQL("{id} > {lo} AND {id} <= {hi}").format(
            id=self._id(), lo=_int8(lo), hi=_int8(hi)
        )

    # -- one pass -----------------------------------------------------------------------------

    def run_pass(
        self,
        state: CaptureState,
        limits: Limits,
        read_ts: str,
        spool: DaySpool,
        decide: Callable[[Scan], bool],
    ) -> PassResult:
        conn = self._session()
        with translated(f"exporting {self.table.qualified}"):
            # Which of the fences' transactions are still open, asked *before* the snapshot.
            alive = [str(r[0]) for r in conn.execute(sql.SQL(_HOLDERS)).fetchall()]
            retired = retire(state, alive)
            with read_snapshot(conn):
                result = self._pass_in_snapshot(conn, retired, limits, read_ts, spool, decide)
            # Rows waiting (max_age_s): keep the old state, so that ``low`` never passes gap
            # rows that the catch-up has not copied yet.
            return result if not result.waiting else replace(result, state=state)

    def _pass_in_snapshot(
        self,
        conn: psycopg.Connection[tuple[object, ...]],
        state: CaptureState,
        limits: Limits,
        read_ts: str,
        spool: DaySpool,
        decide: Callable[[Scan], bool],
    ) -> PassResult:
        t = self.table
        # The first statement takes the snapshot; pg_locks is read after it, so every
        # transaction open at the snapshot is either listed or has committed by now (and the
        # next pass's snapshot sees its rows).
        lo = state.high
        row = conn.execute(
            sql.SQL(
                "SELECT (SELECT {id}::bigint FROM {tbl} WHERE {id} IS NOT NULL"
                " ORDER BY {id} DESC LIMIT 1), ARRAY(" + _HOLDERS + "),"
                " (SELECT {id}::bigint FROM {tbl} WHERE {id} > {lo} ORDER BY {id} LIMIT 1)"
            ).format(id=self._id(), tbl=t.ident(), lo=_int8(lo))
        ).fetchone()
        assert row is not None
        high_now = INT64_MIN if row[0] is None else int(str(row[0]))
        holders = [str(h) for h in row[1]]  # type: ignore[attr-defined]
        first = None if row[2] is None else int(str(row[2]))
        # New rows: how many, the planned end, and the absent ids below it. When the ids
        # were dense so far, the next max_rows ids from the first new one are taken as they
        # are (new_rows is then an upper bound) and the copy itself shows whether an id was
        # absent; otherwise they are counted first (index scans).
        new_rows, planned_hi, gaps = 0, lo, list[Range]()
        optimistic = False
        if first is not None and high_now > lo:
            if self._dense:
                optimistic = True
                planned_hi = min(high_now, first + limits.max_rows - 1)
                new_rows = planned_hi - first + 1
            else:
                new_rows, planned_hi, gaps = self._plan(conn, lo, high_now, limits.max_rows)
                self._dense = new_rows == planned_hi - first + 1
        late_rows = 0
        if state.gaps:
            late = conn.execute(
                sql.SQL("SELECT count(*) FROM {tbl} t WHERE {cond}").format(
                    tbl=t.ident(), cond=self._in_ranges(state.gaps)
                )
            ).fetchone()
            late_rows = int(str(late[0])) if late else 0
        scan = Scan(new_rows, late_rows)
        if scan.rows == 0:
            # Nothing to copy; retired fences may still let empty gaps be forgotten.
            return PassResult(None, False, advance(state, lo, [], [], holders), high_now)
        if not decide(scan):
            return PassResult(None, False, state, high_now, waiting=True)

        caught: list[Range] = []
        if late_rows:
            caught = self._copy_late(conn, self._in_ranges(state.gaps), read_ts, spool)
        hi, cut = lo, False
        if new_rows:
            before = spool.row_total()
            hi, cut = self._copy_new(conn, lo, planned_hi, read_ts, spool, limits)
            if optimistic:
                assert first is not None
                copied = spool.row_total() - before
                if copied == hi - first + 1:
                    gaps = [(lo + 1, first - 1)] if first > lo + 1 else []
                else:
                    # An id was absent: which ones (in this snapshot, as the copy saw it),
                    # and the batch ends at the last id present.
                    self._dense = False
                    count, hi, gaps = self._plan(conn, lo, hi, copied + 1)
                    if count != copied:
                        raise SourceError(
                            f"copied {copied} rows of {t.qualified} where the snapshot has "
                            f"{count}: its watermark column {t.watermark.name} holds an id more "
                            "than once, and watermark mode needs one row per id (a unique "
                            "column a sequence fills)"
                        )
            gaps = [(a, min(b, hi)) for a, b in gaps if a <= hi]
        spec = BatchSpec(lo, hi, tuple(gaps), tuple(caught))
        return PassResult(spec, cut, advance(state, hi, gaps, caught, holders), high_now)

    def _plan(
        self, conn: psycopg.Connection[tuple[object, ...]], lo: int, high: int, max_rows: int
    ) -> tuple[int, int, list[Range]]:
        """(rows, last id, absent ids) of the next at most ``max_rows`` ids above ``lo``."""
        t = self.table
        window = sql.SQL(
            "(SELECT {id}::bigint AS id FROM {tbl} WHERE {rng} ORDER BY {id} LIMIT {n}) q"
        ).format(id=self._id(), tbl=t.ident(), rng=self._range(lo, high), n=sql.Literal(max_rows))
        row = conn.execute(sql.SQL("SELECT count(*), min(id), max(id) FROM {}").format(window))
        count, first, last = (int(str(v)) if v is not None else 0 for v in row.fetchone() or ())
        if count == 0:
            return 0, lo, []
        if count == last - first + 1:
            # Dense, the usual case: the only possible gap is below the first id.
            return count, last, [(lo + 1, first - 1)] if first > lo + 1 else []
        found = conn.execute(
            sql.SQL(
                "SELECT coalesce(array_agg(prev + 1), '{{}}'), coalesce(array_agg(id - 1), '{{}}')"
                " FROM (SELECT id, lag(id, 1, {lo}) OVER (ORDER BY id) AS prev FROM {w}) s"
                " WHERE id > prev + 1"
            ).format(lo=_int8(lo), w=window)
        ).fetchone()
        assert found is not None
        return count, last, list(zip(found[0], found[1], strict=True))  # type: ignore[call-overload]

    def _copy_late(
        self,
        conn: psycopg.Connection[tuple[object, ...]],
        where: sql.Composable,
        read_ts: str,
        spool: DaySpool,
    ) -> list[Range]:
        """The slow path, for the few rows of a catch-up (and a redo): each row is routed on
        its own and its id parsed. Returns the ids copied, as ranges."""
        ids: list[int] = []
        rewrite = self.table.copy_hasher()
        with conn.cursor() as cur, cur.copy(self._copy(where, read_ts)) as copy:
            rows = CopyRows(copy).batch
            while batch := rows():
                for data in map(bytes, batch) if rewrite is None else map(rewrite, batch):
                    spool.add(data)
                    ids.append(seq_of_row(data))
        return to_ranges(ids)

    def _copy_new(
        self,
        conn: psycopg.Connection[tuple[object, ...]],
        lo: int,
        hi: int,
        read_ts: str,
        spool: DaySpool,
        limits: Limits,
    ) -> tuple[int, bool]:
        """Stream ``(lo, hi]`` into the spool; returns (end, cut) (``capture.copy.stream_rows``)."""
        query = self._copy(self._range(lo, hi), read_ts)
        cut = stream_rows(conn, query, spool, limits, self.table.copy_hasher())
        if cut is not None and cut < hi:
            return cut, True
        return hi, False

    def redo(self, spec: BatchSpec, read_ts: str, spool: DaySpool) -> None:
        """Copy exactly the rows of an interrupted batch again (see ``BatchSpec``)."""
        conn = self._session()
        with translated(f"re-exporting {self.table.qualified}"), read_snapshot(conn):
            if spec.caught:
                self._copy_late(conn, self._in_ranges(spec.caught), read_ts, spool)
            if spec.hi > spec.lo:
                where = self._range(spec.lo, spec.hi)
                if spec.gaps:
                    where = sql.SQL("{} AND NOT {}").format(where, self._in_ranges(spec.gaps))
                self._copy_late(conn, where, read_ts, spool)


# Up to this many id ranges are tested as ORed BETWEENs (index range scans).
_OR_RANGES = 32


def _int8(value: int) -> sql.Composable:
    # CAST, not ::, so that -9223372036854775808 parses (:: binds tighter than unary minus).
    return sql.SQL("CAST({} AS int8)").format(sql.Literal(value))
