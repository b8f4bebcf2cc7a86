"""Capture: the producers that read changes from PostgreSQL and hand them, batch by batch, to
the unit of work (``cdc_daemon.unit``). One per mode: ``watermark/``, ``logical/``, and the
``backfill`` of past days. The worker drives a mode through the ``Pipeline`` protocol."""

from __future__ import annotations

from typing import Protocol

from cdc_daemon.config import Settings, TableSettings
from cdc_daemon.errors import AlreadyRunningError, ConfigError
from cdc_daemon.names import TableName
from cdc_daemon.state.store import Store


class Pipeline(Protocol):
    """What the worker drives: one step at a time, drained at shutdown."""

    @property
    def table(self) -> str:
        """The captured table, ``schema.table``."""
        ...

    @property
    def ledger_names(self) -> tuple[str, ...]:
        """The names its batches are recorded under: the table, or the group (logical mode
        records a group's batches under its name), or each table of a watermark group."""
        ...

    @property
    def position(self) -> int | None:
        """Where the ledger stands (a watermark id or an LSN); None before the first batch."""
        ...

    async def step(self, draining: bool) -> bool:
        """One unit of work; False when there was nothing to do. ``draining``: flush what
        waits (shutdown, ``--exit-when-idle``)."""
        ...

    async def drain(self) -> None:
        """Wait for the batch still in flight; its failure is raised here."""
        ...

    def replace_store(self, store: Store) -> None:
        """The ledger session after a reconnect."""
        ...


def group_member(settings: Settings, table: str) -> TableSettings:
    """The group's table that ``table`` names as a user writes it (``resync --table``), or
    one sentence naming the group's tables."""
    specs = {t.table: t for t in settings.table_specs}
    try:
        parsed = TableName.parse(table)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if parsed not in specs:
        listed = ", ".join(str(t) for t in specs)
        raise ConfigError(f"{parsed} is not a table of group {settings.group}: {listed}")
    return specs[parsed]


async def lock_stopped(store: Store, group: str) -> None:
    """The group's lock, for a command that changes what its daemon reads at its start (the
    daemon must be stopped)."""
    await store.check_schema(logical=True)
    try:
        await store.try_lock(group)
    except AlreadyRunningError:
        raise AlreadyRunningError(
            f"the daemon of group {group} is running: stop it, resync, start it"
        ) from None
