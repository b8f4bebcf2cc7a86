"""``cdc-daemon init`` and ``teardown`` in logical mode.

``init`` checks every prerequisite (wal_level, the role's REPLICATION attribute, every table's
key and replica identity and column names, ``source.validate``; the right to create the
publication) and names each one missing in one actionable sentence, for every table, before it
creates or alters the publication. The slot is created by the first ``run`` (the tables then
join at its consistent point, ``capture.logical.join``); with ``capture.initial_snapshot =
false`` ``init`` creates it and records its consistent point as the position.

``teardown --yes`` drops the slot and the publication (a forgotten slot makes the server keep
WAL forever) and forgets the table's position, so the next ``run`` starts with a new snapshot.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import structlog

from cdc_daemon.capture import group_member, lock_stopped
from cdc_daemon.capture.logical.pgoutput import format_lsn
from cdc_daemon.capture.logical.source import LogicalSource
from cdc_daemon.config import Settings
from cdc_daemon.errors import ConfigError
from cdc_daemon.source.validate import TablesRefused
from cdc_daemon.state.position import CaptureState
from cdc_daemon.state.store import Store

log = structlog.get_logger()


async def init_logical(settings: Settings) -> int:
    source = LogicalSource(settings)
    group = settings.group
    try:
        await asyncio.to_thread(source.connect)
        # Every table is checked before the publication is touched, and every problem of
        # every table is reported: a table added to the publication with an unusable replica
        # identity would make the application's own UPDATE and DELETE fail at once. (A running
        # daemon goes on without an unavailable table; init is where a name is checked.)
        problems = list(source.unavailable.values())
        checked = await asyncio.to_thread(source.check_prerequisites)
        # Tables missing from the publication are what init is for: it adds them below.
        problems += [p for p in checked if "does not include" not in p]
        if problems:
            raise TablesRefused(f"{group} cannot be captured in logical mode yet", problems)
        changes = await asyncio.to_thread(source.sync_publication)
        for line in changes + await asyncio.to_thread(source.identity_notes):
            print(line)
        slot = None
        if not settings.capture.initial_snapshot:
            store = await Store.from_settings(settings)
            try:
                position = await store.position(group, "logical")
                status = await asyncio.to_thread(source.slot_status)
                if position.state.high == CaptureState().high and not status.exists:
                    lsn = await asyncio.to_thread(source.create_slot)
                    await store.commit_position(group, CaptureState(), CaptureState(lsn, lsn))
                    for table in source.tables:
                        await store.save_relation_columns(table.qualified, table.columns)
                    slot = format_lsn(lsn)
            finally:
                await store.close()
    finally:
        source.close()
    log.info(
        "logical_ready",
        schema=settings.state.schema_,
        group=group,
        tables=[t.qualified for t in source.tables],
        publication=source.publication,
        publication_changes=changes,
        slot=source.slot,
        slot_created_at=slot,
    )
    return 0


async def resync(settings: Settings, table: str) -> int:
    """Mark a configured table of a logical group to be exported again from a new snapshot:
    it leaves the group now (at the ledger's position, every object of it below) and rejoins
    at the daemon's next start (``capture.logical.join``)."""
    if settings.capture.mode != "logical":
        raise ConfigError("resync is for capture.mode = 'logical' only")
    spec = group_member(settings, table)
    parsed, name = spec.table, spec.qualified
    store = await Store.from_settings(settings)
    try:
        # It would go on streaming the table meanwhile.
        await lock_stopped(store, settings.group)
        position = (await store.position(settings.group, "logical")).state.high
        known = {t.table: t for t in await store.group_tables(settings.group)}
        current = known.get(name)
        if current is None or position == CaptureState().high:
            raise ConfigError(f"{parsed} has not been captured yet: nothing to resync")
        # Every object of it lies below this (an interrupted batch's too): its next
        # snapshot's floor.
        floor = max([position] + [p.hi for p in await store.pending(settings.group)])
        await store.set_group_table(
            settings.group, replace(current, status="left", since=floor, error=None)
        )
        await store.forget_salt(settings.group, name)
    finally:
        await store.close()
    print(
        f"{parsed} will be exported again from a new snapshot when the daemon of group "
        f"{settings.group} next starts; empty its warehouse table first"
    )
    log.info("table_resync_requested", group=settings.group, table=name)
    return 0


async def teardown(settings: Settings, confirmed: bool) -> int:
    if settings.capture.mode != "logical":
        raise ConfigError("teardown is for capture.mode = 'logical' only")
    source = LogicalSource(settings)
    try:
        await asyncio.to_thread(source.connect)
        if not confirmed:
            raise ConfigError(
                f"teardown drops slot {source.slot} and publication {source.publication}; the "
                "next run exports the whole table again: repeat with --yes to confirm"
            )
        dropped = await asyncio.to_thread(source.drop)
    finally:
        source.close()
    store = await Store.from_settings(settings)
    try:
        await store.check_schema(logical=True)
        await store.forget_position(settings.group)
        await store.forget_group(settings.group)
        await store.forget_salt(settings.group)
    finally:
        await store.close()
    log.info("logical_torn_down", group=settings.group, dropped=dropped)
    return 0
