"""The tables of a logical group, and the snapshot of a table that joins a running group.

    table: joining --every chunk uploaded--> streaming;  joining|streaming --left the
           configuration--> left --configured again--> joining
    chunk: pending --every object in S3, the table's resume key moved (one transaction)--> uploaded

A joining table's rows are exported in chunks by key, each ``(after, last]`` read in its own
transaction, interleaved with the group's stream (see ``capture.logical.join``). Pure records
here; the statements are ``Store``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdc_daemon.state.ledger import ObjectRecord, ObjectTotals

# Run by ``Store.init_schema`` (``cdc-daemon init``), after the base tables; idempotent.
JOINS_DDL = """
CREATE TABLE IF NOT EXISTS {schema}.group_tables (
    group_name text NOT NULL,
    table_name text NOT NULL,
    status text NOT NULL CHECK (status IN ('joining', 'streaming', 'left')),
    since bigint,
    seq bigint,
    floor bigint,
    after_key jsonb,
    chunks integer NOT NULL DEFAULT 0,
    rows bigint NOT NULL DEFAULT 0,
    joined_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, table_name)
);
CREATE TABLE IF NOT EXISTS {schema}.join_chunks (
    group_name text NOT NULL,
    table_name text NOT NULL,
    chunk integer NOT NULL,
    attempt integer NOT NULL,
    status text NOT NULL CHECK (status IN ('pending', 'uploaded')),
    after_key jsonb,
    last_key jsonb,
    rows bigint NOT NULL,
    raw_bytes bigint NOT NULL,
    size bigint NOT NULL,
    objects jsonb NOT NULL,
    checksum text NOT NULL,
    read_ts text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    uploaded_at timestamptz,
    PRIMARY KEY (group_name, table_name, chunk)
);
"""


@dataclass(frozen=True)
class GroupTable:
    """A table of the group as the ledger has it."""

    table: str
    status: str  # joining, streaming, left
    since: int | None = None  # the group position from which the stream keeps its changes
    seq: int | None = None  # the _cdc_seq of its snapshot rows (None: not chosen yet)
    # Rejoining: every object of its earlier membership has a lower _cdc_seq than this (the
    # group's position when it left); its snapshot's seq must be higher.
    floor: int | None = None
    after_key: tuple[str | None, ...] | None = None  # the snapshot's resume point (None: start)
    chunks: int = 0
    rows: int = 0


def join_chunk_name(seq: int, chunk: int, attempt: int) -> str:
    """The object name of a join chunk: never a live batch id (digits or ``start``), never a
    backfill chunk (``backfill-``). Each attempt has its own name (see ``JoinChunk``)."""
    return f"join-{seq:020d}-{chunk:06d}-{attempt}"


@dataclass(frozen=True)
class JoinChunk(ObjectTotals):
    """The rows of a joining table with keys in ``(after_key, last_key]``, read at
    ``read_ts``, all with ``_cdc_seq`` = the table's ``seq``. A chunk interrupted before its
    commit is read again, under the next attempt's name: its rows may differ from the first
    attempt's only where a change with a higher ``_cdc_seq`` was streamed since, so either
    attempt's objects, or both, rebuild the same table."""

    group: str
    table: str
    chunk: int
    attempt: int
    seq: int
    after_key: tuple[str | None, ...] | None
    last_key: tuple[str | None, ...] | None
    read_ts: str
    objects: tuple[ObjectRecord, ...] = ()
    done: bool = False  # the last chunk: the table streams from now on

    @property
    def batch_id(self) -> str:
        return join_chunk_name(self.seq, self.chunk, self.attempt)
