"""Per-day spool files for one batch: rows are routed by their partition day, compressed as they
arrive, and written to local files, so a batch is never held whole in memory and its object
names can wait until its range is final (see ``worker``).

Blocks are compressed and written by a thread of the spool's own (``_Compressor``): the thread
that reads the rows hands a block over and goes on reading while it is compressed (ISA-L and
zstd release the GIL). A bounded queue keeps memory flat: a reader faster than the compressor
waits for it.
"""

from __future__ import annotations

import csv
import hashlib
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from cdc_daemon.batch.csv import EXTENSIONS, Codec, Compressor, ZstdPool, make_compressor

Row = bytes | bytearray | memoryview

# Rows of one day are compressed in blocks of this many rows (~1 MiB of sales rows): large
# enough that the compressor does the work, small enough to keep memory flat across many days.
BLOCK_ROWS = 8192
# A day left with at least this many rows pending is compressed when the next day starts.
DRAIN_ROWS = 256
# Blocks handed to the compressing thread and not yet compressed, at most.
QUEUE_BLOCKS = 4


# The column a row with withheld values carries: ``column:reason`` for each (``;``-separated).
QUARANTINED_COLUMN = "_cdc_quarantined"


# A batch's spool folder: ``cdc-batch-<pid>-<random>``, the pid of the process writing it, so
# that a folder left by a process killed outright can be told from one in use (``sweep``).
FOLDER_PREFIX = "cdc-batch-"
_FOLDER = re.compile(re.escape(FOLDER_PREFIX) + r"(\d+)-")


def _folder_prefix() -> str:
    return f"{FOLDER_PREFIX}{os.getpid()}-"


def sweep(directory: Path | None) -> list[str]:
    """Remove the spool folders in ``directory`` (the system's temporary folder when None)
    left by processes that are gone: a process killed outright (SIGKILL, OOM, a power cut)
    cannot remove its own. A folder of a live process (another daemon or a backfill sharing
    the folder), of this one, or named otherwise is left alone. Returns the names removed."""
    base = directory if directory is not None else Path(tempfile.gettempdir())
    removed = []
    for path in sorted(base.glob(FOLDER_PREFIX + "*")):
        found = _FOLDER.match(path.name)
        if found is None or not path.is_dir():
            continue
        pid = int(found.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process: alive
    return True


class Judge(Protocol):
    """Decides what the warehouse gets for a quarantined row (``source.values``)."""

    def derive(self, line: bytes) -> tuple[bytes, bytes] | None:
        """(day, the row with every value Snowflake cannot hold withheld and
        ``_cdc_quarantined`` appended), or None: the row has no warehouse form."""
        ...


@dataclass(frozen=True)
class DayObject:
    day: str  # YYYY-MM-DD, "unknown" (NULL partition value), or a quarantine reason
    path: Path
    rows: int
    raw_bytes: int
    size: int
    sha256: str
    quarantined: bool = False
    columns: tuple[str, ...] = ()  # the header's column names
    # The day's rows that were quarantined, with the values withheld (header + _cdc_quarantined)
    withheld: bool = False


class DayFile:
    """One day's object being written. ``pending`` is appended to directly by the hot loop in
    ``capture.watermark.source`` (a list append per row, nothing more); ``drain`` compresses it."""

    __slots__ = (
        "_last",
        "compressor",
        "digest",
        "file",
        "path",
        "pending",
        "raw",
        "rows",
        "size",
        "spool",
    )

    def __init__(self, spool: DaySpool, path: Path, compressor: Compressor, header: bytes) -> None:
        self.spool = spool
        self.path = path
        self.file: BinaryIO = path.open("wb")
        self.compressor = compressor
        self.digest = hashlib.sha256()
        self.pending: list[Row] = []
        self._last: Row = b""
        self.rows = 0
        self.raw = len(header)
        self.size = 0
        self._write(compressor.compress(header))

    def _write(self, data: bytes) -> None:
        if data:
            self.file.write(data)
            self.digest.update(data)
            self.size += len(data)

    @property
    def last_row(self) -> bytes:
        return bytes(self.pending[-1] if self.pending else self._last)

    def drain(self) -> None:
        """Hand what is pending to the compressor. The caller must re-read ``pending`` (a new
        list)."""
        if self.pending:
            self.spool.compress(self, self._take())

    def _take(self) -> bytes:
        block = b"".join(self.pending)
        self._last = self.pending[-1]
        self.rows += len(self.pending)
        self.raw += len(block)
        self.spool.raw_bytes += len(block)
        self.spool.rows += len(self.pending)
        self.pending = []
        return block

    def compress(self, block: bytes) -> None:
        started = time.perf_counter()
        self._write(self.compressor.compress(block))
        self.spool.compress_s += time.perf_counter() - started

    def close(self) -> None:
        """Compress the rest and close the file (the compressing thread has stopped)."""
        if self.pending:
            self.compress(self._take())
        self._write(self.compressor.flush())
        self.file.close()


class QuarantineFile(DayFile):
    """A quarantine reason's object. Each row taken from it is also handed to the spool's
    judge, and what the warehouse gets instead goes to its day's withheld object."""

    __slots__ = ()

    def _take(self) -> bytes:
        rows = self.pending
        block = super()._take()
        judge = self.spool.judge
        if judge is not None:
            for row in rows:
                derived = judge.derive(bytes(row))
                if derived is not None:
                    # Not drained here: the spool may be finishing (quarantined rows are few).
                    self.spool.withheld(derived[0]).pending.append(derived[1])
        return block


class WithheldFile(DayFile):
    """A day's quarantined rows in their warehouse form. Its rows are the quarantine's, so
    they are not counted again in the spool's row totals."""

    __slots__ = ()

    def _take(self) -> bytes:
        rows = self.spool.rows
        block = super()._take()
        self.spool.rows = rows
        return block


class _Compressor:
    """The thread that compresses and writes a spool's blocks, in the order they come (so each
    day's blocks stay in order). An error is kept and raised to the reader on its next block,
    or by ``stop``."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[DayFile, bytes] | None] = queue.Queue(QUEUE_BLOCKS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cdc-compress", daemon=True)
        self._thread.start()

    def submit(self, target: DayFile, block: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((target, block))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    item[0].compress(item[1])
                except BaseException as exc:  # noqa: BLE001 - handed to the reader
                    self._error = exc

    def stop(self) -> BaseException | None:
        """Wait for every block handed over; returns the error, if one occurred."""
        self._queue.put(None)
        self._thread.join()
        return self._error


class DaySpool:
    """Route encoded rows (``day,<csv row>``) into one compressed file per day."""

    def __init__(
        self,
        directory: Path | None,
        codec: Codec,
        level: int,
        header: bytes,
        pool: ZstdPool | None = None,
        judge: Judge | None = None,
    ) -> None:
        self._pool = pool
        self.judge = judge
        # Made with the first file: a pass that finds no rows leaves no folder behind.
        self._parent = directory
        self._folder: Path | None = None
        self._codec: Codec = codec
        self._level = level
        self._header = header
        self.columns = tuple(next(csv.reader([header.decode("utf-8")]), []))
        self._days: dict[bytes, DayFile] = {}
        self.raw_bytes = 0  # uncompressed bytes drained so far, all days
        self.rows = 0  # rows drained so far, all days (read by progress reports)
        self._compressor: _Compressor | None = None
        # Seconds spent compressing and writing blocks (mostly in the compressing thread,
        # overlapping the reading).
        self.compress_s = 0.0

    def __len__(self) -> int:
        return len(self._days)

    def __contains__(self, day: bytes) -> bool:
        return day in self._days

    def row_total(self) -> int:
        """Rows added so far, drained or still pending, all days."""
        return sum(
            d.rows + len(d.pending) for d in self._days.values() if not isinstance(d, WithheldFile)
        )

    def day(self, day: bytes) -> DayFile:
        found = self._days.get(day)
        if found is None:
            # NULL partition values get a day of their own; quarantined rows arrive with
            # "!<reason>" (see TableInfo.day_expr) and get a file per reason.
            name = day.decode("ascii", "replace").replace("!", "q-") or "unknown"
            kind = QuarantineFile if day.startswith(b"!") else DayFile
            found = self._days[day] = kind(
                self,
                self._file(name + EXTENSIONS[self._codec]),
                make_compressor(self._codec, self._level, self._pool),
                self._header,
            )
        return found

    def _file(self, name: str) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix=_folder_prefix(), dir=self._parent))
        return self._folder / name

    def withheld(self, day: bytes) -> DayFile:
        """The day's object of quarantined rows in their warehouse form (key ``?<day>``)."""
        key = b"?" + day
        found = self._days.get(key)
        if found is None:
            header = self._header.rstrip(b"\n") + b"," + QUARANTINED_COLUMN.encode() + b"\n"
            found = self._days[key] = WithheldFile(
                self,
                self._file("w-" + day.decode("ascii", "replace") + EXTENSIONS[self._codec]),
                make_compressor(self._codec, self._level, self._pool),
                header,
            )
        return found

    def add(self, row: bytes) -> int:
        """Route one ``day,<row>`` line (the slow path: late rows, redo); returns its length."""
        comma = row.index(b",")
        target = self.day(row[:comma])
        target.pending.append(row[comma + 1 :])
        if len(target.pending) >= BLOCK_ROWS:
            target.drain()
        return len(row) - comma - 1

    def compress(self, target: DayFile, block: bytes) -> None:
        if self._compressor is None:
            self._compressor = _Compressor()
        self._compressor.submit(target, block)

    def _stop_compressor(self) -> BaseException | None:
        found, self._compressor = self._compressor, None
        return found.stop() if found is not None else None

    def finish(self) -> list[DayObject]:
        if (error := self._stop_compressor()) is not None:
            raise error
        # The quarantine's files first: closing one hands its last rows to the withheld ones.
        for key in [k for k in self._days if k.startswith(b"!")]:
            self._days[key].close()
        out = []
        for key in sorted(self._days):
            f = self._days[key]
            if not f.file.closed:
                f.close()
            quarantined = key.startswith(b"!")
            withheld = key.startswith(b"?")
            out.append(
                DayObject(
                    key[1:].decode() if quarantined or withheld else f.path.name.split(".")[0],
                    f.path,
                    f.rows,
                    f.raw,
                    f.size,
                    f.digest.hexdigest(),
                    quarantined,
                    (*self.columns, QUARANTINED_COLUMN) if withheld else self.columns,
                    withheld,
                )
            )
        return out

    def discard(self) -> None:
        """Remove the spool's files and folder; idempotent."""
        self._stop_compressor()
        for f in self._days.values():
            if not f.file.closed:
                f.file.close()
        folder, self._folder = self._folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
