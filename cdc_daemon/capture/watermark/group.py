"""Several tables in watermark mode: one ``WatermarkPipeline`` per table (each with its own
position, source session and batch limits), served in turn by one daemon under one lock.

Fairness: each step serves the table after the one served last, and moves on after one batch,
so a table with a large backlog gets one batch per round while the others keep theirs fresh
(``batch.max_rows`` / ``max_bytes`` bound how long a turn takes). An idle table costs one
cheap pass per round.

Failure isolation: a table that can no longer be read (dropped, a privilege revoked, a column
retyped so that its values cannot be read, a value that cannot be encoded: see
``pipeline.table_failure``) is marked ``failed`` with the reason in the ledger's table of group
members (``state.joins``, as a logical group's), and the group's other tables go on. An outage
is not a table's failure: the worker's retry loop waits it out for every table. The failed
table's position stays where its last durable batch put it; ``resync --table`` (``resync``
below) returns it to the group, and the next start reads on from that position, so no row is
lost or exported twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import structlog

from cdc_daemon.capture import group_member, lock_stopped
from cdc_daemon.capture.watermark.pipeline import (
    TableUnreadableError,
    WatermarkPipeline,
    table_failure,
)
from cdc_daemon.capture.watermark.source import WatermarkSource
from cdc_daemon.config import Settings
from cdc_daemon.errors import CdcError, ConfigError, SourceError
from cdc_daemon.ops.metrics import Metrics
from cdc_daemon.state.joins import GroupTable
from cdc_daemon.state.store import Store

log = structlog.get_logger()

# A watermark group's healthy table, in the states a logical group's tables share (the
# ledger's CHECK): it is being captured.
CAPTURING = "streaming"


class WatermarkGroup:
    """The tables of a group, round robin, as one ``capture.Pipeline``."""

    def __init__(
        self,
        group: str,
        pipelines: list[WatermarkPipeline],
        store: Store,
        metrics: Metrics | None = None,
        unreadable: Mapping[str, CdcError] | None = None,
    ) -> None:
        """``unreadable``: the tables whose source could not be opened at the start, with
        why (each is failed, or refused if it was never captured, once the lock is held)."""
        assert pipelines
        self._group = group
        self._pipelines = pipelines
        self._store = store
        self._metrics = metrics
        self._unreadable = dict(unreadable or {})
        self._failed: dict[str, str] | None = None  # None: not read from the ledger yet
        self._next = 0
        self._last: WatermarkPipeline | None = None

    @property
    def table(self) -> str:
        return self._group

    @property
    def ledger_names(self) -> tuple[str, ...]:
        return tuple(p.table for p in self._pipelines)

    @property
    def position(self) -> int | None:
        return None  # one per table (``status`` shows them)

    def replace_store(self, store: Store) -> None:
        self._store = store
        for pipeline in self._pipelines:
            pipeline.replace_store(store)

    async def step(self, draining: bool) -> bool:
        """One batch of the next table with something to do, in turn; False when none has.
        The tables share one ledger session: a table's batch still uploading in the
        background (``WatermarkPipeline``'s overlap) is committed before another table's
        pass uses the session. A failed table is skipped."""
        failed = self._failed if self._failed is not None else await self._load()
        count = len(self._pipelines)
        for _ in range(count):
            pipeline = self._pipelines[self._next]
            self._next = (self._next + 1) % count
            if pipeline.table in failed:
                continue
            if self._last is not None and self._last is not pipeline:
                await self._last.drain()
            self._last = pipeline
            try:
                if await pipeline.step(draining):
                    return True
            except TableUnreadableError as exc:
                await self._fail(pipeline.table, str(exc))
        return False

    async def drain(self) -> None:
        for pipeline in self._pipelines:
            await pipeline.drain()

    async def _load(self) -> dict[str, str]:
        """The group's members from the ledger (the lock is held): a table failed earlier
        stays failed until resynced; a table that could not be opened now fails if it was
        captured before, and is refused (its own error) if it never was (a mistyped name)."""
        members = {m.table: m for m in await self._store.group_tables(self._group)}
        captured = {p.table for p in await self._store.positions()}
        failed: dict[str, str] = {}
        self._failed = failed
        for pipeline in self._pipelines:
            name = pipeline.table
            member = members.get(name)
            if member is not None and member.status == "failed":
                failed[name] = member.error or "failed"
                self._show(name, "failed")
            elif name in self._unreadable:
                error = self._unreadable[name]
                if name not in captured:
                    raise error
                await self._fail(name, str(error))
            else:
                if member is None or member.status != CAPTURING:
                    await self._store.set_group_table(self._group, GroupTable(name, CAPTURING))
                self._show(name, CAPTURING)
        return failed

    async def _fail(self, name: str, reason: str) -> None:
        """``name`` exports nothing more until ``resync --table``; the others go on."""
        await self._store.set_group_table(self._group, GroupTable(name, "failed", error=reason))
        assert self._failed is not None
        self._failed[name] = reason
        self._show(name, "failed")
        log.error("table_failed", group=self._group, table=name, error=reason)

    def _show(self, name: str, state: str) -> None:
        if self._metrics is not None:
            self._metrics.member(name, state)


async def resync(settings: Settings, table: str) -> int:
    """Return a failed table of a watermark group to the group: once it can be read again, the
    next start reads on from its position (every row at or below it is in S3 already, every
    row above it is read then), so no row is lost or exported twice."""
    spec = group_member(settings, table)
    parsed = spec.table
    store = await Store.from_settings(settings)
    try:
        # The daemon reads the group's members only at its start.
        await lock_stopped(store, settings.group)
        known = {t.table: t for t in await store.group_tables(settings.group)}
        current = known.get(spec.qualified)
        if current is None or current.status != "failed":
            raise ConfigError(
                f"{parsed} is not failed in group {settings.group}: nothing to resync"
            )
        source = WatermarkSource(settings.for_table(spec))
        try:
            await asyncio.to_thread(source.connect)
        except CdcError as exc:
            if not table_failure(exc):
                raise
            raise SourceError(f"{parsed} still cannot be captured, fix it first: {exc}") from None
        finally:
            source.close()
        await store.set_group_table(settings.group, GroupTable(spec.qualified, CAPTURING))
    finally:
        await store.close()
    print(
        f"{parsed} will be exported again from its position when the daemon of group "
        f"{settings.group} next starts"
    )
    log.info("table_resync_requested", group=settings.group, table=spec.qualified)
    return 0
