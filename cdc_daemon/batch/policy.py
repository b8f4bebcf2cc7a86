"""When a micro-batch closes: by rows, bytes or age, whichever comes first. Pure.

Rows are counted exactly before the batch is read (an index scan). Bytes are known exactly
only while reading, so the batch is also cut there (``Limits``, below); before
reading, the byte count is estimated from the average row size seen so far.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdc_daemon.batch.spool import BLOCK_ROWS
from cdc_daemon.config import BatchSettings

# Until a batch has been seen, assume rows of this many bytes (the sales table averages ~110).
_DEFAULT_ROW_BYTES = 128


@dataclass
class BatchPolicy:
    max_rows: int
    max_bytes: int
    max_age_s: float
    row_bytes: float = _DEFAULT_ROW_BYTES

    @classmethod
    def of(cls, settings: BatchSettings) -> BatchPolicy:
        return cls(settings.max_rows, settings.max_bytes, settings.max_age_s)

    def flush_reason(self, rows: int, age_s: float, draining: bool) -> str | None:
        """Why the rows waiting now should become a batch now, or None to keep waiting."""
        if rows <= 0:
            return None
        if rows >= self.max_rows:
            return "max_rows"
        if rows * self.row_bytes >= self.max_bytes:
            return "max_bytes"
        if age_s >= self.max_age_s:
            return "max_age"
        if draining:
            return "drain"
        return None

    def learn(self, rows: int, raw_bytes: int) -> None:
        if rows:
            self.row_bytes = raw_bytes / rows


@dataclass(frozen=True)
class Limits:
    """What cuts a batch while it is read: the exact rows, bytes and days so far."""

    max_rows: int
    max_bytes: int
    max_days: int
    # Rows between two checks of max_bytes: a batch overshoots max_bytes by at most this many.
    block_rows: int = BLOCK_ROWS
