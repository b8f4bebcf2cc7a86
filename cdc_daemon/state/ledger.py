"""Deliveries (objects awaiting Snowpipe's confirmation) and their states, and the stream
batch. Pure: no I/O (the Postgres tables are in ``deliveries`` and ``store``).

Every producer (a stream batch, a logical group's snapshot chunk, a backfill chunk) hands the
unit of work a ``Delivery``: its objects and where they stand. The states are the same whoever
produced it:

    pending --upload acknowledged + watermark moved (one transaction)--> uploaded
    pending --retries exhausted (S3 or Postgres kept failing)--> failed (with the error)
    failed, never uploaded --redone at the next start--> pending
    uploaded --reconciler: loaded row count matches--> loaded
    uploaded --reconciler: Snowflake reported an error--> failed
    uploaded --reconciler: not seen in load history in time--> missing
    missing --reconciler: seen late, row count matches--> loaded
    missing --reconciler: seen late, Snowflake reported an error--> failed

``pending`` is the intent record: a batch's range and object keys are written before the first
byte goes to S3, so a batch interrupted by a crash is redone with exactly the same range, under
exactly the same keys, with the same ``_cdc_ts``: byte-identical objects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from cdc_daemon.state.position import INT64_MIN, CaptureState, Range


class Status(StrEnum):
    PENDING = "pending"
    UPLOADED = "uploaded"
    LOADED = "loaded"
    FAILED = "failed"
    MISSING = "missing"


TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.PENDING: frozenset({Status.UPLOADED, Status.FAILED}),
    Status.UPLOADED: frozenset({Status.LOADED, Status.FAILED, Status.MISSING}),
    Status.MISSING: frozenset({Status.LOADED, Status.FAILED}),
    Status.FAILED: frozenset({Status.PENDING}),
    Status.LOADED: frozenset(),
}


def can_move(old: Status, new: Status) -> bool:
    return new in TRANSITIONS[old]


def batch_id(lo: int, hi: int, caught: Sequence[tuple[int, int]] = ()) -> str:
    """Derived from what the batch holds: the same rows always get the same name, different
    rows never do. New ranges ``(lo, hi]`` never overlap; a batch of late rows only (``lo ==
    hi``) is told apart by its first caught id, since an id is caught up once. Zero-padded so
    that names sort in watermark order."""
    start = "start" if lo == INT64_MIN else f"{lo:020d}"
    name = f"{start}-{hi:020d}"
    if hi == lo and caught:
        name += f"-late-{caught[0][0]:020d}"
    return name


@dataclass(frozen=True)
class ObjectRecord:
    key: str
    day: str
    rows: int
    raw_bytes: int
    size: int
    sha256: str
    path: str = field(default="", compare=False)  # the local spool file, while it exists
    quarantine: str | None = None  # the reason, for rows Snowflake could not read back
    # The object's header (its column names): the reconciler checks that the landing table
    # has each one (a by-name load silently skips a column the table lacks). Empty in objects
    # recorded before it was kept.
    columns: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.columns, tuple):  # read back from the ledger's JSON
            object.__setattr__(self, "columns", tuple(self.columns))

    def as_json(self) -> dict[str, object]:
        return {
            "quarantine": self.quarantine,
            "columns": list(self.columns),
            "key": self.key,
            "day": self.day,
            "rows": self.rows,
            "raw_bytes": self.raw_bytes,
            "size": self.size,
            "sha256": self.sha256,
        }


class ObjectTotals:
    """Figures of a batch (or a backfill chunk) summed over its ``objects``."""

    objects: tuple[ObjectRecord, ...]

    @property
    def rows(self) -> int:
        """Rows exported, each once: a quarantined row counts in ``quarantined`` and here
        through its warehouse form (the day's ``-q`` object)."""
        return sum(o.rows for o in self.objects if not o.quarantine)

    @property
    def quarantined(self) -> int:
        return sum(o.rows for o in self.objects if o.quarantine)

    @property
    def raw_bytes(self) -> int:
        return sum(o.raw_bytes for o in self.objects)

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def checksum(self) -> str:
        return objects_checksum(self.objects)


class Producer(StrEnum):
    """Who delivered the objects: what the producer keeps of its own is in its ledger."""

    BATCH = "batch"  # a stream batch (``state.store``: its range and the position to move to)
    JOIN = "join"  # a logical group's snapshot chunk (``state.joins``: its key range)
    BACKFILL = "backfill"  # a backfill chunk (``state.backfill``: the run's progress)
    REPAIR = "repair"  # keys exported again by ``verify --repair`` (``capture.repair``)


@dataclass(frozen=True)
class Delivery(ObjectTotals):
    """Objects a producer uploads as one unit of work, and their state until Snowpipe confirms
    their load. ``ledger`` is whose reconciler reads it (a table's or a group's name),
    ``producer_id`` names it among its producer's (the same across redos), ``name`` is the
    objects' name (which may change between attempts, as a join chunk's does)."""

    ledger: str
    producer: Producer
    producer_id: str
    name: str
    table: str
    read_ts: str
    objects: tuple[ObjectRecord, ...] = ()
    status: Status = Status.PENDING
    attempts: int = 1
    error: str | None = field(default=None, compare=False)
    uploaded_at: datetime | None = field(default=None, compare=False)
    refreshed_at: datetime | None = field(default=None, compare=False)


@dataclass(frozen=True)
class BatchRecord(ObjectTotals):
    """One batch: ids in ``(lo, hi]`` except ``gaps``, plus the late ids in ``caught``."""

    table: str
    batch_id: str
    lo: int
    hi: int
    read_ts: str
    gaps: tuple[Range, ...] = ()
    caught: tuple[Range, ...] = ()
    state_after: CaptureState = field(default_factory=CaptureState)
    objects: tuple[ObjectRecord, ...] = ()
    status: Status = Status.PENDING
    attempts: int = 1
    error: str | None = field(default=None, compare=False)

    @property
    def delivery(self) -> Delivery:
        return Delivery(
            ledger=self.table,
            producer=Producer.BATCH,
            producer_id=self.batch_id,
            name=self.batch_id,
            table=self.table,
            read_ts=self.read_ts,
            objects=self.objects,
            attempts=self.attempts,
        )

    def spec_json(self) -> dict[str, Any]:
        return {
            "gaps": [list(g) for g in self.gaps],
            "caught": [list(c) for c in self.caught],
            "state_after": self.state_after.to_json(),
        }


def objects_checksum(objects: Sequence[ObjectRecord]) -> str:
    """sha256 over the objects' keys and sha256s, in key order."""
    digest = hashlib.sha256()
    for obj in sorted(objects, key=lambda o: o.key):
        digest.update(f"{obj.key}\0{obj.sha256}\n".encode())
    return digest.hexdigest()
