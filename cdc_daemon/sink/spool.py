"""Per-day spool files for one batch: rows are routed by their partition day, compressed as they
arrive, and written to local files, so a batch is never held whole in memory and its object
names can wait until its range is final (see ``worker``)."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cdc_daemon.sink.csv import EXTENSIONS, Codec, Compressor, make_compressor

# Rows of one day are compressed in blocks of about this size: large enough that zlib/zstd
# (which release the GIL) do the work, small enough to keep memory flat across many days.
_BLOCK = 1 << 20


@dataclass(frozen=True)
class DayObject:
    day: str
    path: Path
    rows: int
    raw_bytes: int
    size: int
    sha256: str


class _DayFile:
    __slots__ = (
        "buffered",
        "compressor",
        "digest",
        "file",
        "path",
        "pending",
        "raw",
        "rows",
        "size",
    )

    def __init__(self, path: Path, compressor: Compressor, header: bytes) -> None:
        self.path = path
        self.file: BinaryIO = path.open("wb")
        self.compressor = compressor
        self.digest = hashlib.sha256()
        self.pending: list[bytes] = []
        self.buffered = 0
        self.rows = 0
        self.raw = len(header)
        self.size = 0
        self._write(compressor.compress(header))

    def _write(self, data: bytes) -> None:
        if data:
            self.file.write(data)
            self.digest.update(data)
            self.size += len(data)

    def drain(self) -> None:
        if self.pending:
            block = b"".join(self.pending)
            self.rows += len(self.pending)
            self.raw += len(block)
            self.pending = []
            self.buffered = 0
            self._write(self.compressor.compress(block))

    def close(self) -> None:
        self.drain()
        self._write(self.compressor.flush())
        self.file.close()


class DaySpool:
    """Route encoded rows (``day,<csv row>``) into one compressed file per day."""

    def __init__(self, directory: Path | None, codec: Codec, level: int, header: bytes) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="cdc-batch-", dir=directory))
        self._codec: Codec = codec
        self._level = level
        self._header = header
        self._days: dict[bytes, _DayFile] = {}

    def __len__(self) -> int:
        return len(self._days)

    def __contains__(self, day: bytes) -> bool:
        return day in self._days

    def day(self, day: bytes) -> _DayFile:
        found = self._days.get(day)
        if found is None:
            name = day.decode("ascii", "replace") + EXTENSIONS[self._codec]
            found = self._days[day] = _DayFile(
                self._dir / name, make_compressor(self._codec, self._level), self._header
            )
        return found

    def add(self, day: bytes, row: bytes) -> None:
        target = self.day(day)
        target.pending.append(row)
        target.buffered += len(row)
        if target.buffered >= _BLOCK:
            target.drain()

    def finish(self) -> list[DayObject]:
        out = []
        for day, f in sorted(self._days.items()):
            f.close()
            out.append(DayObject(day.decode(), f.path, f.rows, f.raw, f.size, f.digest.hexdigest()))
        return out

    def discard(self) -> None:
        for f in self._days.values():
            if not f.file.closed:
                f.file.close()
        shutil.rmtree(self._dir, ignore_errors=True)
