"""The tables of a logical group, and the snapshot of each table as it joins the group (all
of them when the group starts, one added later while it runs).

    table: joining --every range done--> streaming;  joining|streaming --left the
           configuration--> left --configured again--> joining
           joining|streaming --the table failed (dropped, no privilege, TRUNCATE, a schema
           change to stop at)--> failed --``resync --table`` and a restart--> joining
    chunk: pending --every object in S3, its range's resume key moved (one transaction)--> uploaded
           (the states of its delivery, ``state.ledger``)

A joining table's key space is cut into ``capture.snapshot_jobs`` ranges, copied at once; each
range is exported in chunks by key, each ``(after, last]`` read in its own transaction
(see ``capture.logical.join``). Pure records here; the statements are ``Store``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdc_daemon.state.ledger import Delivery, ObjectRecord, ObjectTotals, Producer

# Run by ``Store.init_schema`` (``cdc-daemon init``), after the base tables; idempotent.
JOINS_DDL = """
CREATE TABLE IF NOT EXISTS {schema}.group_tables (
    group_name text NOT NULL,
    table_name text NOT NULL,
    status text NOT NULL CHECK (status IN ('joining', 'streaming', 'left', 'failed')),
    error text,
    since bigint,
    seq bigint,
    floor bigint,
    ranges jsonb NOT NULL DEFAULT '[]',
    chunks integer NOT NULL DEFAULT 0,
    rows bigint NOT NULL DEFAULT 0,
    joined_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, table_name)
);
-- Schema 6: a partitioned table's leaf partitions as last seen (oids), so that one attached or
-- detached while the daemon was down is still noticed (``capture.logical.partitions``).
ALTER TABLE {schema}.group_tables ADD COLUMN IF NOT EXISTS partitions jsonb;
-- A snapshot chunk's own part: its key range and attempt (its objects and their state are its
-- delivery's, ``state.deliveries``).
CREATE TABLE IF NOT EXISTS {schema}.join_chunks (
    group_name text NOT NULL,
    table_name text NOT NULL,
    seq bigint NOT NULL,
    part integer NOT NULL,
    chunk integer NOT NULL,
    attempt integer NOT NULL,
    after_key jsonb,
    last_key jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, table_name, seq, part, chunk)
);
"""


Key = tuple[str | None, ...]  # a key's values, as text


@dataclass(frozen=True)
class KeyRange:
    """Keys in ``(lower, upper]`` (None: unbounded), exported up to ``after``. ``partition``:
    the oid of the partition read instead of the table (attached with its rows); with
    ``delete``, of a partition detached from it, whose keys are written as deletes."""

    lower: Key | None = None
    upper: Key | None = None
    after: Key | None = None
    chunks: int = 0
    done: bool = False
    partition: int | None = None
    delete: bool = False

    @property
    def start(self) -> Key | None:
        """The next chunk's keys are above this."""
        return self.after if self.after is not None else self.lower

    def as_json(self) -> dict[str, object]:
        return {
            "lower": _listed(self.lower),
            "upper": _listed(self.upper),
            "after": _listed(self.after),
            "chunks": self.chunks,
            "done": self.done,
            **({} if self.partition is None else {"partition": self.partition}),
            **({"delete": True} if self.delete else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> KeyRange:
        return cls(
            _key(data.get("lower")),
            _key(data.get("upper")),
            _key(data.get("after")),
            int(str(data.get("chunks", 0))),
            bool(data.get("done", False)),
            None if data.get("partition") is None else int(str(data["partition"])),
            bool(data.get("delete", False)),
        )


def _listed(key: Key | None) -> list[str | None] | None:
    return None if key is None else list(key)


def _key(value: object) -> Key | None:
    if value is None:
        return None
    assert isinstance(value, list)
    return tuple(None if v is None else str(v) for v in value)


@dataclass(frozen=True)
class GroupTable:
    """A table of the group as the ledger has it."""

    table: str
    status: str  # joining, streaming, left, failed
    since: int | None = None  # the group position from which the stream keeps its changes
    seq: int | None = None  # the _cdc_seq of its snapshot rows (None: not chosen yet)
    # Rejoining: every object of its earlier membership has a lower _cdc_seq than this (the
    # group's position when it left); its snapshot's seq must be higher.
    floor: int | None = None
    ranges: tuple[KeyRange, ...] = ()  # the snapshot's ranges (empty: not split yet)
    chunks: int = 0
    rows: int = 0
    error: str | None = None  # why it failed
    # A partitioned table: the oids of its leaf partitions when last looked at (None: not
    # partitioned, or not looked at yet).
    partitions: tuple[int, ...] | None = None


def join_chunk_id(table: str, seq: int, part: int, chunk: int) -> str:
    """A join chunk's delivery among the group's: the same across its attempts."""
    return f"{table}/{seq}/{part}/{chunk}"


def join_chunk_name(seq: int, part: int, chunk: int, attempt: int) -> str:
    """The object name of a join chunk: never a live batch id (digits or ``start``), never a
    backfill chunk (``backfill-``). Each attempt has its own name (see ``JoinChunk``)."""
    return f"join-{seq:020d}-{part:03d}-{chunk:06d}-{attempt}"


@dataclass(frozen=True)
class JoinChunk(ObjectTotals):
    """The rows of a joining table with keys in ``(after_key, last_key]`` (range ``part``), read at
    ``read_ts``, all with ``_cdc_seq`` = the table's ``seq``. A chunk interrupted before its
    commit is read again, under the next attempt's name: its rows may differ from the first
    attempt's only where a change with a higher ``_cdc_seq`` was streamed since, so either
    attempt's objects, or both, rebuild the same table."""

    group: str
    table: str
    part: int
    chunk: int
    attempt: int
    seq: int
    after_key: Key | None  # where the range stood (its ``start``)
    last_key: Key | None
    read_ts: str
    objects: tuple[ObjectRecord, ...] = ()
    done: bool = False  # the range's last chunk

    @property
    def batch_id(self) -> str:
        return join_chunk_name(self.seq, self.part, self.chunk, self.attempt)

    @property
    def delivery(self) -> Delivery:
        return Delivery(
            ledger=self.group,
            producer=Producer.JOIN,
            producer_id=join_chunk_id(self.table, self.seq, self.part, self.chunk),
            name=self.batch_id,
            table=self.table,
            read_ts=self.read_ts,
            objects=self.objects,
            attempts=self.attempt,
        )
