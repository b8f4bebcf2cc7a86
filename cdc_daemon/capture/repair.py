"""``verify --repair``: the keys ``verify`` found differing are exported again, through the
unit of work, as ordinary objects: the row as it is now, or a delete for a key that exists only
in the warehouse. Crash-safe and confirmed by the reconciler like any delivery (producer
``repair``); the merge then fixes exactly those keys.

Why a repaired row lands right, whatever the source does meanwhile ("highest ``_cdc_seq`` per
key wins", ties to the later ``_cdc_ts``):

- **logical mode**: the rows carry ``_cdc_seq`` = W, the server's WAL insert position taken
  before the read, and the read waits until every transaction in progress at W has ended. A
  change logged before W belongs to a transaction that had ended before the read: the read
  holds its effect (or it rolled back), and W beats it. A change logged after W carries a
  higher LSN and beats the repaired row: it is either reflected in the read already or newer
  than it. A change logged exactly at W commits after the read and wins the tie by its later
  commit time. The same holds for a delete of a key the source no longer has: a transaction
  inserting it again either ended before the read (then the key is not absent) or logs its
  insert after W.
- **watermark mode** (inserts only): ``_cdc_seq`` is the row's watermark, as in its first
  export; the repaired copy ties with it and wins by its later ``_cdc_ts`` (what a backfill
  relies on too). A delete of a key absent from the source carries the key's watermark value.

Objects are named ``repair-<run id>`` in each day's folder. A repair interrupted before its
commit leaves a pending delivery; the next repair marks it failed (superseded) and repairs the
keys again, and any of its objects already loaded are harmless (each row holds a version that
is right at its ``_cdc_seq``).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog
from psycopg import sql

from cdc_daemon.config import Settings, TableSettings
from cdc_daemon.errors import from_psycopg
from cdc_daemon.names import TableName
from cdc_daemon.sink.s3 import S3Sink
from cdc_daemon.source.copyread import CopyRows, copy_query, snapshot_query
from cdc_daemon.source.session import connect, read_snapshot, safe_position
from cdc_daemon.source.table import TableInfo, describe_configured, hasher_of
from cdc_daemon.source.values import quote
from cdc_daemon.state.deliveries import Deliveries
from cdc_daemon.state.ledger import Delivery, ObjectRecord, ObjectTotals, Producer
from cdc_daemon.state.store import Store
from cdc_daemon.unit import UnitOfWork, utc_now_iso

log = structlog.get_logger()

# How long a repair waits for the transactions in progress at its position to end.
WAIT_S = 120.0


@dataclass(frozen=True)
class RepairRequest:
    """The keys of one table to export again: ``present`` exist in the source (their rows are
    read now), ``absent`` exist only in the warehouse (deleted). Key values as ``verify``
    reports them: integers, or the key's text."""

    table: TableName
    present: tuple[dict[str, Any], ...]
    absent: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class RepairBatch(ObjectTotals):
    """A repair as the unit of work delivers it."""

    ledger: str
    table: str
    run_id: str
    read_ts: str
    objects: tuple[ObjectRecord, ...]

    @property
    def batch_id(self) -> str:
        return f"repair-{self.run_id}"

    @property
    def delivery(self) -> Delivery:
        return Delivery(
            ledger=self.ledger,
            producer=Producer.REPAIR,
            producer_id=f"{self.run_id}/{self.table}",
            name=self.batch_id,
            table=self.table,
            read_ts=self.read_ts,
            objects=self.objects,
        )


class RepairLedger:
    """``unit.Ledger`` for repairs: the delivery is all a repair keeps."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def deliveries(self) -> Deliveries:
        return self.store

    async def intent(self, batch: RepairBatch, /) -> None:
        return None

    async def advance(self, batch: RepairBatch, /) -> None:
        return None


@dataclass(frozen=True)
class RepairOutcome:
    table: str
    rows: int
    deletes: int
    objects: int
    seq: int | None
    seconds: float


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


async def repair_group(
    settings: Settings, requests: Sequence[RepairRequest]
) -> list[RepairOutcome]:
    """Each request's keys exported again (one delivery per table)."""
    run_id = new_run_id()
    specs = {spec.table: spec for spec in settings.table_specs}
    outcomes = []
    async with AsyncExitStack() as stack:
        sink = await S3Sink.open(settings.s3, stack)
        for request in requests:
            if not request.present and not request.absent:
                continue
            spec = specs[request.table]
            narrowed = settings.for_table(spec)
            store = await Store.from_settings(narrowed)
            try:
                superseded = await store.fail_pending(
                    narrowed.ledger_name,
                    Producer.REPAIR,
                    f"interrupted before its commit; superseded by repair {run_id}",
                )
                if superseded:
                    log.warning("repair_superseded", table=str(spec.table), repairs=superseded)
                unit = UnitOfWork(narrowed, sink, crash_prefix="repair_")
                outcomes.append(
                    await _repair_table(narrowed, spec, request, unit, RepairLedger(store), run_id)
                )
            finally:
                await store.close()
    return outcomes


async def _repair_table(
    settings: Settings,
    spec: TableSettings,
    request: RepairRequest,
    unit: UnitOfWork,
    ledger: RepairLedger,
    run_id: str,
) -> RepairOutcome:
    started = time.monotonic()
    logical = settings.capture.mode == "logical"
    conn = connect(settings.postgres, "cdc-daemon-repair")
    try:
        if logical:
            from cdc_daemon.capture.logical.tables import describe as describe_logical

            lt = describe_logical(conn, spec, hasher_of(settings))
            info, key, header = lt.info, lt.key, lt.header
            judge = lt.judge()
            seq: int | None = await asyncio.to_thread(safe_position, conn, WAIT_S)
        else:
            info = describe_configured(conn, settings, spec)  # with its hash_columns' hasher
            key = (info.watermark.name,)
            header = info.header
            judge = info.judge(key)
            seq = None
        read_ts = utc_now_iso()
        spool = unit.new_spool(header, judge)
        try:
            if logical and not key:
                from cdc_daemon.capture.logical.keyless import copy_keyless
                from cdc_daemon.capture.logical.source import replication_connection

                # A keyless table's copies are told apart by nothing but their number: it is
                # read whole again, in a new snapshot that replaces the earlier one in the
                # merge (capture.logical.keyless).
                seq = await asyncio.to_thread(
                    copy_keyless,
                    conn,
                    lambda: replication_connection(settings),
                    info,
                    read_ts,
                    spool,
                    info.copy_hasher(),
                )
                rows, deletes = -1, 0  # counted once the spool is finished
            else:
                rows = await asyncio.to_thread(
                    _read_present, conn, info, key, request.present, read_ts, seq, spool
                )
                deletes = _add_deletes(spool, info, key, request.absent, read_ts, seq, logical)
            days = await asyncio.to_thread(spool.finish)
            if rows < 0:
                rows = sum(d.rows for d in days)
            batch = RepairBatch(settings.ledger_name, info.qualified, run_id, read_ts, ())
            batch = replace(batch, objects=unit.objects(info.qualified, batch.batch_id, days))
            timings = await unit.deliver(batch, ledger)
        finally:
            await asyncio.to_thread(spool.discard)
    except psycopg.Error as exc:
        raise from_psycopg(exc, f"repairing {spec.table}") from None
    finally:
        conn.close()
    # At debug level: ``verify --repair`` prints what it repaired itself.
    unit.log_batch(
        batch,
        started,
        timings,
        event="repair_uploaded",
        quiet=True,
        run_id=run_id,
        deletes=deletes,
        seq=seq,
    )
    return RepairOutcome(
        str(spec.table), rows, deletes, len(batch.objects), seq, time.monotonic() - started
    )


def _key_values(info: TableInfo, key: Sequence[str], values: dict[str, Any]) -> sql.Composable:
    types = {c.name: c for c in info.columns}
    parts = []
    for k in key:
        v = values[k]
        column = types[k]
        if column.base_type == "bytea":
            parts.append(sql.SQL("decode({}, 'hex')").format(sql.Literal(str(v))))
        else:
            parts.append(
                sql.SQL("CAST({} AS {})").format(sql.Literal(str(v)), sql.SQL(column.type_name))
            )
    return sql.SQL("(") + sql.SQL(", ").join(parts) + sql.SQL(")")


def _read_present(
    conn: psycopg.Connection[Any],
    info: TableInfo,
    key: Sequence[str],
    present: Sequence[dict[str, Any]],
    read_ts: str,
    seq: int | None,
    spool: Any,
) -> int:
    """The rows of ``present`` into the spool, in one snapshot; returns how many."""
    if not present:
        return 0
    columns = sql.SQL(", ").join(sql.Identifier(k) for k in key)
    rewrite = info.copy_hasher()  # hash_columns: hashed before the spool, as every export
    rows = 0
    with read_snapshot(conn):
        for i in range(0, len(present), 1000):
            values = sql.SQL(", ").join(_key_values(info, key, p) for p in present[i : i + 1000])
            where = sql.SQL("({}) IN ({})").format(columns, values)
            query = (
                copy_query(info, where, read_ts)
                if seq is None
                else snapshot_query(info, seq, read_ts, where)
            )
            with conn.cursor() as cur, cur.copy(query) as copy:
                batch = CopyRows(copy).batch
                while chunk := batch():
                    for data in map(bytes, chunk) if rewrite is None else map(rewrite, chunk):
                        spool.add(data)
                        rows += 1
    return rows


def _add_deletes(
    spool: Any,
    info: TableInfo,
    key: Sequence[str],
    absent: Sequence[dict[str, Any]],
    read_ts: str,
    seq: int | None,
    logical: bool,
) -> int:
    """A ``D`` row per absent key: the key's values, the other columns empty (NULL), in the
    UTC day of the read. Watermark mode: ``_cdc_seq`` is the key's watermark value."""
    day = read_ts[:10].encode()
    for values in absent:
        fields = [
            quote(str(values[c.name]).encode()) if c.name in key else b"" for c in info.columns
        ]
        row_seq = seq if seq is not None else int(values[key[0]])
        fields += [b"D", str(row_seq).encode(), read_ts.encode()]
        if logical:
            fields.append(b"")
        spool.add(day + b"," + b",".join(fields) + b"\n")
    return len(absent)
