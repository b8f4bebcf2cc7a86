"""``cdc-daemon backfill --from D1 --to D2``: export the rows of past days again, beside the
running daemon, into the same daily layout.

What is read: the rows whose partition day (the UTC day of ``capture.partition_column``, the
day that names their ``dt=`` folder) is in ``[from, to)``. One **chunk** per day that has rows,
each read in its own REPEATABLE READ snapshot with ``COPY`` through the daemon's own hot loop
(``capture.copy.stream_rows``), then delivered by the same unit of work as a batch
(``unit.UnitOfWork``). ``--jobs`` chunks run at once, each on its own source session.

Where it goes: ``<prefix><table>/dt=<day>/backfill-<run id>-<day>.csv.gz``, beside the live
objects (Snowpipe loads both). The run id (UTC start time and random hex) is new for every run,
so a key never names other rows than the first time: live keys start with a watermark or
``start``, and a later backfill of the same days gets keys of its own.

What it never touches: the live watermark (``positions``), the daemon's batches and its lock.
It takes a lock of its own per run. Its sessions are named ``cdc-daemon-backfill``, which the
daemon's fence ignores (they only read), so a long backfill delays nothing in the daemon.

``_cdc_seq``: see ``chunk_seq``. Order of a chunk, as for a batch: read into the spool, record
the intent (``pending``: keys, checksums, ``_cdc_ts``), upload, mark ``uploaded``. A run
interrupted anywhere (even by SIGKILL) resumes when the same range is asked for again with the
same configuration: uploaded chunks are skipped, a pending one is read again with the same
``_cdc_ts`` and uploaded under the same keys, so S3 gets no second copy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import re
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, TextIO, cast

import psycopg
import structlog
from psycopg import sql

from cdc_daemon.batch.csv import EXTENSIONS
from cdc_daemon.batch.policy import Limits
from cdc_daemon.batch.spool import DaySpool
from cdc_daemon.capture.copy import stream_rows
from cdc_daemon.config import Settings
from cdc_daemon.errors import CdcError, ConfigError, TransientError, first_error, from_psycopg
from cdc_daemon.sink.s3 import S3Sink
from cdc_daemon.source.copyread import copy_query
from cdc_daemon.source.session import SourceSession, read_snapshot, safe_position, translated
from cdc_daemon.source.table import TableInfo, describe_configured, hasher_of
from cdc_daemon.state.backfill import BackfillLedger, Chunk, ChunkRecord, Run, chunk_id
from cdc_daemon.state.ledger import Producer
from cdc_daemon.state.store import Store
from cdc_daemon.unit import Retry, UnitOfWork, utc_now_iso

log = structlog.get_logger()

APPLICATION_NAME = "cdc-daemon-backfill"
# A chunk is one day: it is never cut (one object per day, plus quarantine objects).
# How long a logical-mode run waits for the transactions open at its position.
SAFE_POSITION_WAIT_S = 120.0
_WHOLE_DAY = Limits(max_rows=2**62, max_bytes=2**62, max_days=2**31)


class Interrupted(CdcError):
    """SIGINT or SIGTERM: the run stops and can be resumed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass(frozen=True)
class Request:
    day_from: date
    day_to: date
    jobs: int = 4
    resume: bool = False
    dry_run: bool = False
    progress_interval_s: float = 10.0


def _parse_day(flag: str, text: str) -> date:
    # date.fromisoformat alone also takes "20101201" and "2010-W48-3": ask for one form only.
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise ConfigError(f"{flag} {text!r} is not a date of the form YYYY-MM-DD")
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a valid date (YYYY-MM-DD)") from None


def parse_request(
    day_from: str,
    day_to: str,
    jobs: str = "4",
    resume: bool = False,
    dry_run: bool = False,
    progress_interval_s: str = "10",
) -> Request:
    """The command line's values, checked; a ConfigError with one sentence otherwise."""
    first, end = _parse_day("--from", day_from), _parse_day("--to", day_to)
    if end <= first:
        raise ConfigError(
            f"--to {end} must be after --from {first} (the range is [from, to): --to is the "
            "first day not exported)"
        )
    if not jobs.isdigit() or not 1 <= int(jobs) <= 64:
        raise ConfigError(f"--jobs {jobs!r} must be a whole number from 1 to 64")
    try:
        interval = float(progress_interval_s)
    except ValueError:
        interval = 0
    if not interval > 0:
        raise ConfigError(f"--progress-interval {progress_interval_s!r} must be a positive number")
    return Request(first, end, int(jobs), resume, dry_run, interval)


def chunk_seq(
    settings: Settings, conn: psycopg.Connection[tuple[object, ...]]
) -> sql.Composable | None:
    """A backfilled row's ``_cdc_seq``: "the position at which it was read", such that a later
    live change of the row always has a higher one. None means the watermark column, exactly
    as the live path writes it.

    Watermark mode: the live path's ``_cdc_seq`` is the row's id, and it exports inserts only:
    the content of a row with a given id never changes in what the daemon captures, and no
    later live change of that id exists. So the id is correct: the backfilled copy ties with
    the live copy of the same row and holds the same values, so whichever the merge keeps
    ("highest ``_cdc_seq`` per id wins", ties between equal rows) the table is the same. Only a
    row updated in place, which watermark capture does not see, differs; a merge that breaks
    ties by the later ``_cdc_ts`` then keeps the backfilled (newer) read.

    Logical mode: W of ``source.session.safe_position``, taken once per run (and again when a
    run resumes): the WAL insert position after every transaction open at it has ended. A
    change logged before W is reflected in every chunk read later; one logged after W beats
    the chunk's row, which it is newer than or reflected in. ``verify --repair`` reads at the
    same position (``capture.repair``)."""
    if settings.capture.mode != "logical":
        return None
    position = safe_position(conn, SAFE_POSITION_WAIT_S)
    return sql.SQL("{}::bigint").format(sql.Literal(position))


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def fingerprint(
    settings: Settings, table: TableInfo, request: Request
) -> tuple[str, dict[str, Any]]:
    """What shapes a run's objects and keys: a resume continues a run only when all of it is
    unchanged (otherwise its finished chunks would be in another format or place)."""
    config = {
        "table": table.qualified,
        "mode": settings.capture.mode,
        "partition_column": table.partitioned.name,
        "watermark_column": table.watermark.name,
        "columns": table.header,
        "compression": settings.batch.compression,
        "compression_level": settings.batch.compression_level,
        "bucket": settings.s3.bucket,
        "prefix": settings.s3.prefix,
        "from": request.day_from.isoformat(),
        "to": request.day_to.isoformat(),
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return digest[:16], config


# -- the source side (blocking; runs in threads) --------------------------------------------


class ChunkReader(SourceSession):
    """One source session: the plan, or the chunks of one job."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, APPLICATION_NAME)

    def describe(self) -> tuple[TableInfo, tuple[str, ...]]:
        """The table and its key as the configured mode captures it (logical mode: its
        captured columns, the watermark slot holding the key's first column)."""
        spec = self._settings.table_specs[0]
        try:
            if self._settings.capture.mode == "logical":
                from cdc_daemon.capture.logical.tables import describe as describe_logical

                logical = describe_logical(self._session(), spec, hasher_of(self._settings))
                if logical.keyless:
                    # Its copies are told apart by nothing but their number: a day read again
                    # would add copies (docs/logical.md#keyless-tables).
                    raise ConfigError(
                        f"{spec.table} is keyless: a backfill would add copies of its rows; "
                        f"read it again whole with cdc-daemon resync --table {spec.table} "
                        "(or verify --repair)"
                    )
                return logical.info, logical.key
            table = describe_configured(self._session(), self._settings)
            return table, (table.watermark.name,)
        except psycopg.Error as exc:
            raise from_psycopg(exc, f"cannot read {spec.table}") from None

    def seq(self) -> sql.Composable | None:
        return chunk_seq(self._settings, self._session())

    def plan(self, table: TableInfo, first: date, end: date) -> tuple[list[tuple[date, int]], bool]:
        """(day, rows) of the days in ``[first, end)`` that have rows (an exact count, read
        through the same predicate as the chunks), and whether an index serves it."""
        conn = self._session()
        try:
            days = [
                (d, int(str(n)))
                for d, n in conn.execute(
                    sql.SQL(
                        "SELECT {day} AS day, count(*) FROM {tbl} WHERE {rng} GROUP BY 1 ORDER BY 1"
                    ).format(
                        day=table.utc_day_expr(),
                        tbl=table.ident(),
                        rng=table.days_between(first, end),
                    )
                )
                if isinstance(d, date)
            ]
            indexed = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a"
                " ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
                " WHERE i.indrelid = to_regclass(%s) AND a.attname = %s)",
                (table.ident().as_string(conn), table.partitioned.name),
            ).fetchone()
        except psycopg.Error as exc:
            raise from_psycopg(exc, f"planning the backfill of {table.qualified}") from None
        return days, bool(indexed and indexed[0])

    def read(
        self,
        table: TableInfo,
        day: date,
        read_ts: str,
        spool: DaySpool,
        seq: sql.Composable | None,
    ) -> None:
        """Every row of ``day`` into the spool, in id order, in one REPEATABLE READ snapshot
        (logical mode: with the objects' empty ``_cdc_unchanged``)."""
        conn = self._session()
        logical = self._settings.capture.mode == "logical"
        with translated(f"backfilling {table.qualified} for {day}"), read_snapshot(conn):
            where = table.days_between(day, day + timedelta(days=1))
            query = copy_query(table, where, read_ts, seq, unchanged=logical)
            stream_rows(conn, query, spool, _WHOLE_DAY, table.copy_hasher())


# -- progress ------------------------------------------------------------------------------


class _CurrentStdout:
    """A file that is whatever ``sys.stdout`` is now: log lines written through it pass
    through rich's redirection and appear above the progress bar."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


@dataclass
class Progress:
    """Rows read so far (finished chunks, plus what the running ones have compressed)."""

    run_id: str
    rows_total: int
    chunks_total: int
    chunks_done: int
    interval_s: float
    rows_done: int = 0
    active: dict[date, DaySpool] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    rows_before: int = 0  # read by earlier attempts of the run (not in the rate)

    def __post_init__(self) -> None:
        self.rows_before = self.rows_done

    @property
    def rows(self) -> int:
        return self.rows_done + sum(s.rows for s in list(self.active.values()))

    def chunk_done(self, day: date, rows: int) -> None:
        self.active.pop(day, None)
        self.rows_done += rows
        self.chunks_done += 1

    def figures(self) -> dict[str, Any]:
        rows = self.rows
        seconds = max(time.monotonic() - self.started, 1e-9)
        rate = (rows - self.rows_before) / seconds
        left = max(self.rows_total - rows, 0)
        return {
            "rows": rows,
            "rows_estimate": self.rows_total,
            "chunks_done": self.chunks_done,
            "chunks": self.chunks_total,
            "rows_per_s": round(rate),
            "eta_s": round(left / rate, 1) if rate > 0 else None,
        }

    async def log_lines(self) -> None:
        """Not on a terminal: one ``backfill_progress`` line every ``interval_s``."""
        while True:
            await asyncio.sleep(self.interval_s)
            log.info("backfill_progress", run_id=self.run_id, **self.figures())

    async def bar(self, label: str) -> None:
        """On a terminal: a rich progress bar with rows, rows/s and ETA."""
        from rich import progress as rp
        from rich.text import Text

        class RateColumn(rp.ProgressColumn):
            def render(self, task: rp.Task) -> Text:
                speed = task.speed
                return Text(f"{speed:,.0f} rows/s" if speed else "- rows/s")

        with rp.Progress(
            rp.TextColumn("{task.description}"),
            rp.BarColumn(),
            rp.MofNCompleteColumn(),
            rp.TextColumn("rows"),
            RateColumn(),
            rp.TextColumn("{task.fields[chunks]} days"),
            rp.TimeElapsedColumn(),
            rp.TextColumn("ETA"),
            rp.TimeRemainingColumn(),
            redirect_stdout=True,
        ) as bar:
            task = bar.add_task(label, total=self.rows_total, chunks="")
            try:
                while True:
                    bar.update(
                        task,
                        completed=self.rows,
                        chunks=f"{self.chunks_done}/{self.chunks_total}",
                    )
                    await asyncio.sleep(0.2)
            finally:
                bar.update(
                    task, completed=self.rows, chunks=f"{self.chunks_done}/{self.chunks_total}"
                )


def _on_terminal(settings: Settings) -> bool:
    return settings.log.format != "json" and sys.stdout.isatty()


# -- the run -------------------------------------------------------------------------------


class Backfill:
    """The chunks of one run, ``jobs`` at a time, each delivered by the unit of work."""

    def __init__(
        self,
        settings: Settings,
        table: TableInfo,
        run: Run,
        ledger: BackfillLedger,
        sink: S3Sink,
        jobs: int,
        quiet: bool = False,
        key: tuple[str, ...] | None = None,
    ) -> None:
        self._settings = settings
        # On a terminal the bar shows progress: the line per chunk is for debug level only.
        self._quiet = quiet
        self._table = table
        self._run = run
        self._ledger = ledger
        self._jobs = jobs
        self._seq: sql.Composable | None = None  # ``chunk_seq`` (logical: set by ``run``)
        self._logical = settings.capture.mode == "logical"
        self._key = key or (table.watermark.name,)
        columns = [c.name for c in table.columns]
        if self._logical:
            from cdc_daemon.capture.logical.tables import logical_header

            self._header = logical_header(columns)
        else:
            self._header = table.header
        self._unit = UnitOfWork(settings, sink, crash_prefix="backfill_")
        self._retry = Retry(settings.daemon)
        self._recorded: dict[date, Chunk] = {}  # intent records written by this process
        self._reconnecting = asyncio.Lock()
        self.objects = 0

    @property
    def ledger(self) -> BackfillLedger:
        """The run's ledger session (a new one after a reconnect)."""
        return self._ledger

    async def run(self, progress: Progress) -> None:
        todo = collections.deque(c for c in self._run.chunks if c.status != "uploaded")
        if self._logical and todo:
            reader = ChunkReader(self._settings)
            try:
                self._seq = await reader.run(reader.seq)
            finally:
                await asyncio.to_thread(reader.close)
            log.info("backfill_position", run_id=self._run.run_id, seq=str(self._seq))
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self._jobs, len(todo))):
                    group.create_task(self._job(todo, progress))
        except BaseExceptionGroup as failed:
            raise first_error(failed) from None

    async def _job(self, todo: collections.deque[Chunk], progress: Progress) -> None:
        reader = ChunkReader(self._settings)
        try:
            while todo:
                await self._chunk_with_retries(reader, todo.popleft(), progress)
        finally:
            await asyncio.to_thread(reader.close)

    async def _chunk_with_retries(
        self, reader: ChunkReader, chunk: Chunk, progress: Progress
    ) -> Chunk:
        """One chunk, retried on transient errors by the one retry loop; each failed attempt
        is noted on the chunk."""
        run_id = self._run.run_id

        async def note(exc: TransientError) -> None:
            if not self._ledger.broken:
                with contextlib.suppress(CdcError):
                    # Not counted: the next attempt records the chunk again, which counts it.
                    await self._ledger.note_attempt_failed(
                        self._table.qualified,
                        Producer.BACKFILL,
                        str(exc),
                        chunk_id(run_id, chunk.day),
                        counted=False,
                    )

        return await self._retry.run(
            lambda: self._chunk(reader, chunk, progress),
            "backfill_chunk",
            note,
            self._reconnect_ledger,
            run_id=run_id,
            day=chunk.day.isoformat(),
        )

    async def _reconnect_ledger(self) -> None:
        """A lost ledger session also lost the run's lock: take it again (and stop if another
        process took it meanwhile). The jobs share the session: one of them reconnects, the
        others wait for it (two new sessions would fight over the run's lock)."""
        async with self._reconnecting:
            if not self._ledger.broken:
                return
            with contextlib.suppress(CdcError):
                await self._ledger.close()
            self._ledger = await BackfillLedger.connect(self._settings)
            await self._ledger.try_lock(self._run.run_id)

    async def _chunk(self, reader: ChunkReader, chunk: Chunk, progress: Progress) -> Chunk:
        """Read, then the unit of work: intent record, upload, mark uploaded. Returns the chunk
        as the ledger has it now (a retry after the intent record redoes it with the same
        ``_cdc_ts``)."""
        table, run_id = self._table, self._run.run_id
        started = time.monotonic()
        # A chunk with an intent record (from an earlier process, or an attempt of this one that
        # failed after it) is read again with the same _cdc_ts: the same bytes under its keys.
        chunk = self._recorded.get(chunk.day, chunk)
        redo = chunk.status == "pending"
        read_ts = chunk.read_ts if redo and chunk.read_ts else utc_now_iso()
        spool = self._unit.new_spool(self._header, table.judge(self._key, self._header))
        progress.active[chunk.day] = spool
        try:
            await reader.run(lambda: reader.read(table, chunk.day, read_ts, spool, self._seq))
            days = await asyncio.to_thread(spool.finish)
            record = ChunkRecord(
                table=table.qualified,
                run_id=run_id,
                day=chunk.day,
                read_ts=read_ts,
                objects=(),
                ledger=self._settings.ledger_name,
            )
            record = replace(
                record, objects=self._unit.objects(table.qualified, record.batch_id, days)
            )
            timings = {"read_s": time.monotonic() - started}
            if redo:
                self._unit.check_redo(record, chunk.checksum, chunk.rows, run_id=run_id)
            await self._unit.record(record, self._ledger)
            chunk = replace(
                chunk, status="pending", read_ts=read_ts, checksum=record.checksum, rows=record.rows
            )
            self._recorded[chunk.day] = chunk
            timings |= await self._unit.upload_and_commit(record, self._ledger)
        except BaseException:
            progress.active.pop(chunk.day, None)
            raise
        finally:
            await asyncio.to_thread(spool.discard)
        progress.chunk_done(chunk.day, record.rows)
        self.objects += len(record.objects)
        self._unit.log_batch(
            record,
            started,
            timings,
            event="backfill_chunk_uploaded",
            quiet=self._quiet,
            run_id=run_id,
            day=chunk.day.isoformat(),
            redo=redo,
        )
        return replace(chunk, status="uploaded", rows=record.rows)


def print_plan(
    out: TextIO,
    settings: Settings,
    table: TableInfo,
    request: Request,
    days: Sequence[tuple[date, int]],
    resumable: Run | None,
) -> None:
    """What ``--dry-run`` shows: the days, their rows, the objects and where they would go."""
    rows = sum(n for _, n in days)
    ext = EXTENSIONS[settings.batch.compression]
    print(
        f"Backfill plan for {table.qualified}: UTC days of {table.partitioned.name} from "
        f"{request.day_from} to {request.day_to} (the --to day excluded)",
        file=out,
    )
    print(f"  {'day':<12}{'rows':>14}", file=out)
    for day, n in days:
        print(f"  {day.isoformat():<12}{n:>14,}", file=out)
    print(
        f"  {len(days)} day(s) with rows, {rows:,} rows (counted now), {len(days)} object(s): "
        "one per day, plus one per quarantine reason if a row needs it",
        file=out,
    )
    print(
        f"  keys: s3://{settings.s3.bucket}/{settings.s3.prefix}{table.qualified}/"
        f"dt=YYYY-MM-DD/backfill-<run id>-YYYY-MM-DD{ext}",
        file=out,
    )
    print(f"  jobs: {request.jobs}", file=out)
    if resumable is not None:
        done = len(resumable.done)
        print(
            f"  resumes run {resumable.run_id}: {done} of {len(resumable.chunks)} day(s) "
            f"already uploaded, {len(resumable.chunks) - done} to go",
            file=out,
        )
    else:
        print("  a new run", file=out)
    print("Nothing was written (--dry-run).", file=out)


async def run_backfill(settings: Settings, request: Request, out: TextIO | None = None) -> int:
    """The ``backfill`` command; the plan and the summary go to ``out`` (stdout). SIGINT and
    SIGTERM stop it (resumable), with exit 128 + signal."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        task.cancel()

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
    try:
        return await _backfill(settings, request, out or sys.stdout)
    except asyncio.CancelledError:
        if not received:
            raise
        task.uncancel()
        raise Interrupted(
            "the backfill was interrupted: run the same command again to resume it",
            received[0],
        ) from None
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


async def _backfill(settings: Settings, request: Request, out: TextIO) -> int:
    planner = ChunkReader(settings)
    try:
        table, key = await planner.run(planner.describe)
        # The count can take a while on a large range: a signal cancels it on the server.
        days, indexed = await planner.run(
            lambda: planner.plan(table, request.day_from, request.day_to)
        )
    finally:
        await asyncio.to_thread(planner.close)
    if not indexed:
        log.warning(
            "backfill_without_index",
            table=table.qualified,
            partition_column=table.partitioned.name,
            hint="each day's chunk scans the whole table; an index on the column avoids it",
        )
    digest, config = fingerprint(settings, table, request)
    if table.hasher is not None:
        # The salt must be the one the table's values were hashed with (as at the daemon's
        # start): a backfill with another would write other hashes for the same values.
        store = await Store.from_settings(settings)
        try:
            await store.check_salts(settings, table.hasher.fingerprint())
        finally:
            await store.close()
    ledger = await BackfillLedger.connect(settings)
    try:
        await ledger.check_schema()
        found = await ledger.unfinished(table.qualified, request.day_from, request.day_to, digest)
        if request.dry_run:
            print_plan(out, settings, table, request, days, found[0] if found else None)
            return 0
        if found:
            run = found[0]
        elif request.resume:
            other = await ledger.unfinished(table.qualified, request.day_from, request.day_to)
            why = (
                f"; run {other[0].run_id} of this range was made with another configuration"
                if other
                else ""
            )
            raise ConfigError(
                f"there is no unfinished backfill of {table.qualified} from "
                f"{request.day_from} to {request.day_to} with this configuration to resume{why}"
            )
        else:
            run = await ledger.create_run(
                new_run_id(),
                table.qualified,
                request.day_from,
                request.day_to,
                digest,
                config,
                request.jobs,
                days,
            )
        await ledger.try_lock(run.run_id)
        run = await ledger.run(run.run_id)  # as it is now that no one else works on it
        return await _execute(
            settings, table, request, run, ledger, resumed=bool(found), out=out, key=key
        )
    finally:
        await ledger.close()


async def _execute(
    settings: Settings,
    table: TableInfo,
    request: Request,
    run: Run,
    ledger: BackfillLedger,
    resumed: bool,
    out: TextIO,
    key: tuple[str, ...] | None = None,
) -> int:
    done = run.done
    progress = Progress(
        run.run_id,
        rows_total=sum(c.rows_estimate for c in run.chunks),
        chunks_total=len(run.chunks),
        chunks_done=len(done),
        interval_s=request.progress_interval_s,
        rows_done=sum(c.rows or 0 for c in done),
    )
    log.info(
        "backfill_resumed" if resumed else "backfill_started",
        run_id=run.run_id,
        table=table.qualified,
        range=[request.day_from.isoformat(), request.day_to.isoformat()],
        days=len(run.chunks),
        days_done=len(done),
        rows_estimate=progress.rows_total,
        jobs=request.jobs,
    )
    started = time.monotonic()
    await ledger.set_run_status(run.run_id, "running", request.jobs, None)
    terminal = _on_terminal(settings)
    async with AsyncExitStack() as stack:
        sink = await S3Sink.open(settings.s3, stack)
        await sink.wait_for_bucket(settings.daemon.retry_attempts, settings.daemon.retry_max_wait_s)
        backfill = Backfill(
            settings, table, run, ledger, sink, request.jobs, quiet=terminal, key=key
        )
        if terminal:
            structlog.configure(
                logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _CurrentStdout()))
            )
            label = f"backfill {request.day_from}..{request.day_to}"
            reporter = asyncio.create_task(progress.bar(label))
        else:
            reporter = asyncio.create_task(progress.log_lines())
        try:
            await backfill.run(progress)
            await backfill.ledger.set_run_status(run.run_id, "done", request.jobs, None)
        except BaseException as exc:
            error = str(exc) if isinstance(exc, CdcError) else "interrupted"
            if not backfill.ledger.broken:
                with contextlib.suppress(CdcError):
                    await asyncio.shield(
                        backfill.ledger.set_run_status(run.run_id, "failed", request.jobs, error)
                    )
            raise
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            if backfill.ledger is not ledger:
                await backfill.ledger.close()
    seconds = time.monotonic() - started
    figures = progress.figures()
    read_now = progress.rows - sum(c.rows or 0 for c in done)
    (log.debug if terminal else log.info)(
        "backfill_finished",
        run_id=run.run_id,
        table=table.qualified,
        rows=progress.rows,
        days=len(run.chunks),
        objects_written=backfill.objects,
        seconds=round(seconds, 3),
        rows_per_s=round(read_now / seconds) if seconds > 0 else None,
    )
    if terminal:
        print(
            f"backfill run {run.run_id} done: {figures['rows']:,} rows of {len(run.chunks)} "
            f"day(s), {backfill.objects} object(s) written in {seconds:.1f} s",
            file=out,
        )
    return 0
