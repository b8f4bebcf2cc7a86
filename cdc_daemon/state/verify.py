"""The continuous verification's place in the ledger (``reconcile.verify.RollingVerifier``):
per table, where the next slice starts and what the last one found."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cdc_daemon.config import Settings
from cdc_daemon.state.session import LedgerSession

# Run by ``Store.init_schema``; idempotent.
VERIFY_DDL = """
CREATE TABLE IF NOT EXISTS {schema}.verify_state (
    table_name text PRIMARY KEY,
    cursor jsonb,
    pass_started_at timestamptz,
    last_pass_at timestamptz,
    rows_verified bigint NOT NULL DEFAULT 0,
    differing jsonb NOT NULL DEFAULT '[]',
    checked_at timestamptz
);
"""


@dataclass(frozen=True)
class VerifyState:
    """A table's rolling verification: ``cursor`` is the key the next slice starts at (None:
    the start of a pass); ``differing`` the keys the last slice found differing after its
    settle time; ``rows_verified`` the rows of the current pass so far."""

    table: str
    cursor: tuple[Any, ...] | None = None
    pass_started_at: datetime | None = None
    last_pass_at: datetime | None = None
    rows_verified: int = 0
    differing: tuple[dict[str, Any], ...] = field(default=())
    checked_at: datetime | None = None


class VerifyLedger(LedgerSession):
    """Reads and writes ``verify_state`` on a session of its own."""

    async def has_table(self) -> bool:
        rows = await self._fetch(
            "reading the ledger",
            self._q("SELECT to_regclass('{schema}.verify_state') IS NOT NULL AS found"),
            (),
        )
        return bool(rows and rows[0]["found"])

    async def state(self, table: str) -> VerifyState:
        rows = await self._fetch(
            "reading the verification state",
            self._q("SELECT * FROM {schema}.verify_state WHERE table_name = %s"),
            (table,),
        )
        if not rows:
            return VerifyState(table)
        r = rows[0]
        return VerifyState(
            table,
            None if r["cursor"] is None else tuple(r["cursor"]),
            r["pass_started_at"],
            r["last_pass_at"],
            int(r["rows_verified"]),
            tuple(r["differing"]),
            r["checked_at"],
        )

    async def states(self) -> list[VerifyState]:
        rows = await self._fetch(
            "reading the verification state",
            self._q("SELECT table_name FROM {schema}.verify_state ORDER BY table_name"),
            (),
        )
        return [await self.state(str(r["table_name"])) for r in rows]

    async def save(self, s: VerifyState) -> None:
        async with self.transaction("saving the verification state"):
            await self._conn.execute(
                self._q(
                    "INSERT INTO {schema}.verify_state (table_name, cursor, pass_started_at,"
                    " last_pass_at, rows_verified, differing, checked_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (table_name) DO UPDATE SET"
                    " cursor = EXCLUDED.cursor, pass_started_at = EXCLUDED.pass_started_at,"
                    " last_pass_at = EXCLUDED.last_pass_at,"
                    " rows_verified = EXCLUDED.rows_verified, differing = EXCLUDED.differing,"
                    " checked_at = EXCLUDED.checked_at"
                ),
                (
                    s.table,
                    None if s.cursor is None else json.dumps(list(s.cursor)),
                    s.pass_started_at,
                    s.last_pass_at,
                    s.rows_verified,
                    json.dumps(list(s.differing), default=str),
                    s.checked_at,
                ),
            )


async def verify_states(settings: Settings) -> list[VerifyState]:
    """Every table's state, on a session of its own (none before ``init`` made the table)."""
    ledger = await VerifyLedger.open_for(settings, "cdc-daemon-report")
    try:
        return await ledger.states() if await ledger.has_table() else []
    finally:
        await ledger.close()


async def record_full_pass(settings: Settings, states: list[VerifyState]) -> None:
    """``cdc-daemon verify``'s results as full passes (``status`` and the report show them);
    nothing before ``init`` made the table."""
    ledger = await VerifyLedger.open_for(settings, "cdc-daemon-verify")
    try:
        if await ledger.has_table():
            for state in states:
                await ledger.save(state)
    finally:
        await ledger.close()
