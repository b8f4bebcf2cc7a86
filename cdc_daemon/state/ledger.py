"""Batches and their states. Pure: no I/O (the Postgres tables are in ``store``).

    pending --upload acknowledged + watermark moved (one transaction)--> uploaded
    uploaded --reconciler: loaded row count matches--> loaded
    uploaded --reconciler: Snowflake reported an error--> failed
    uploaded --reconciler: not seen in load history in time--> missing

``pending`` is the intent record: a batch's range and object keys are written before the first
byte goes to S3, so a batch interrupted by a crash is redone with exactly the same range, under
exactly the same keys, with the same ``_cdc_ts``: byte-identical objects.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum

from cdc_daemon.sink.csv import EXTENSIONS, Codec


class Status(StrEnum):
    PENDING = "pending"
    UPLOADED = "uploaded"
    LOADED = "loaded"
    FAILED = "failed"
    MISSING = "missing"


TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.PENDING: frozenset({Status.UPLOADED}),
    Status.UPLOADED: frozenset({Status.LOADED, Status.FAILED, Status.MISSING}),
    Status.MISSING: frozenset({Status.LOADED, Status.FAILED}),
    Status.FAILED: frozenset({Status.LOADED}),
    Status.LOADED: frozenset(),
}


def can_move(old: Status, new: Status) -> bool:
    return new in TRANSITIONS[old]


def batch_id(lo: int | None, hi: int) -> str:
    """Derived from the range only: the same range always gets the same name, two different
    ranges never do. Zero-padded so that names sort in watermark order."""
    start = "start" if lo is None else f"{lo:020d}"
    return f"{start}-{hi:020d}"


def object_key(prefix: str, table: str, day: str, batch: str, codec: Codec) -> str:
    return f"{prefix}{table}/dt={day}/{batch}{EXTENSIONS[codec]}"


@dataclass(frozen=True)
class ObjectRecord:
    key: str
    day: str
    rows: int
    raw_bytes: int
    size: int
    sha256: str

    def as_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "day": self.day,
            "rows": self.rows,
            "raw_bytes": self.raw_bytes,
            "size": self.size,
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class BatchRecord:
    table: str
    batch_id: str
    lo: int | None
    hi: int
    read_ts: str
    objects: tuple[ObjectRecord, ...] = field(default=())
    status: Status = Status.PENDING
    attempts: int = 1

    @property
    def rows(self) -> int:
        return sum(o.rows for o in self.objects)

    @property
    def raw_bytes(self) -> int:
        return sum(o.raw_bytes for o in self.objects)

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def checksum(self) -> str:
        """sha256 over the objects' keys and sha256s, in key order."""
        digest = hashlib.sha256()
        for obj in sorted(self.objects, key=lambda o: o.key):
            digest.update(f"{obj.key}\0{obj.sha256}\n".encode())
        return digest.hexdigest()
