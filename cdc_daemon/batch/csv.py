"""The object format: RFC 4180 CSV (LF line ends, as Postgres writes them), a header row, the
source columns in table order, then ``_cdc_op``, ``_cdc_seq``, ``_cdc_ts``; compressed or not.

Pure encoding, no I/O. The row bytes themselves are Postgres's ``COPY ... (FORMAT csv)`` output,
passed through untouched: NULL is an empty unquoted field, an empty string is ``""``, and text
(commas, quotes, newlines, any Unicode) is quoted and kept byte for byte.
"""

from __future__ import annotations

import collections
import csv
import io
import zlib
from collections.abc import Sequence
from typing import Literal, Protocol

import zstandard
from isal import isal_zlib

Codec = Literal["gzip", "zstd", "none"]

EXTENSIONS: dict[str, str] = {"gzip": ".csv.gz", "zstd": ".csv.zst", "none": ".csv"}
CONTENT_ENCODINGS: dict[str, str | None] = {"gzip": "gzip", "zstd": "zstd", "none": None}


class Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...
    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes, /) -> bytes:
        return bytes(data)

    def flush(self) -> bytes:
        return b""


def make_compressor(codec: Codec, level: int, pool: ZstdPool | None = None) -> Compressor:
    if codec == "gzip":
        # ISA-L's deflate: ~4x zlib's speed at level 1, the same gzip format. wbits=31: one
        # gzip member with mtime 0, so equal input gives equal bytes.
        return isal_zlib.compressobj(min(level, 3), isal_zlib.DEFLATED, 31)
    if codec == "zstd":
        # Content size unknown up front; the frame is closed by flush().
        context = pool.acquire() if pool else zstandard.ZstdCompressor(level=level)
        return _Zstd(context, pool)
    return _Identity()


class ZstdPool:
    """zstd contexts (~1.4 MB each) kept for reuse: allocating and freeing one per day and batch
    fragments the heap (peak RSS grew past 500 MB in bench/export without it)."""

    def __init__(self, level: int) -> None:
        self._level = level
        self._free: collections.deque[zstandard.ZstdCompressor] = collections.deque()

    def acquire(self) -> zstandard.ZstdCompressor:
        try:
            return self._free.pop()
        except IndexError:
            return zstandard.ZstdCompressor(level=self._level)

    def release(self, context: zstandard.ZstdCompressor) -> None:
        self._free.append(context)


class _Zstd:
    """One frame from a (pooled) context; the context goes back to the pool at flush()."""

    def __init__(self, context: zstandard.ZstdCompressor, pool: ZstdPool | None) -> None:
        self._context = context
        self._pool = pool
        self._stream = context.compressobj()

    def compress(self, data: bytes, /) -> bytes:
        return self._stream.compress(data)

    def flush(self) -> bytes:
        out = self._stream.flush()
        if self._pool is not None:
            self._pool.release(self._context)
            self._pool = None
        return out


def decompress(codec: Codec, data: bytes) -> bytes:
    if codec == "gzip":
        return zlib.decompress(data, 47)
    if codec == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def header_line(names: Sequence[str]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(names)
    return out.getvalue().encode()


def seq_of_row(row: bytes) -> int:
    """``_cdc_seq`` of one encoded row: the second field from the end (the last two never
    hold a comma, so no CSV parsing is needed)."""
    return int(row.rsplit(b",", 2)[1])
