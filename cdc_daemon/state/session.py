"""An async session on the state database, in the ledger's schema: what the daemon's ledger
(``store.Store``), the backfill ledger and the read-only reports each open one of."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, Self

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from cdc_daemon.config import Settings
from cdc_daemon.errors import AlreadyRunningError, StateError, from_psycopg


def advisory_key(name: str) -> int:
    """A signed 64-bit advisory lock key for ``name`` (one table's daemon, one backfill run)."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class LedgerSession:
    """``open()``/``from_settings()`` are the factories that do I/O."""

    def __init__(self, conn: psycopg.AsyncConnection[dict[str, Any]], schema: str) -> None:
        self._conn = conn
        self._schema = sql.Identifier(schema)
        self._schema_name = schema
        # Tasks may share a session (a backfill's jobs do): a statement of one must not land
        # inside another's transaction, nor two transactions nest.
        self._lock = asyncio.Lock()
        self._transaction_task: asyncio.Task[Any] | None = None

    @classmethod
    async def open(
        cls, dsn: str, schema: str, application_name: str, connect_timeout_s: float = 10
    ) -> Self:
        connecting = asyncio.ensure_future(
            psycopg.AsyncConnection.connect(
                dsn,
                autocommit=True,
                row_factory=dict_row,
                application_name=application_name,
                connect_timeout=max(1, int(connect_timeout_s)),
                options="-c TimeZone=UTC -c DateStyle=ISO",
            )
        )
        try:
            conn = await asyncio.shield(connecting)
        except asyncio.CancelledError:
            # Cancelled mid-connect (a shutdown): the session psycopg may already have opened
            # is closed, not left to the garbage collector with a backend attached.
            with contextlib.suppress(Exception):
                await (await connecting).close()
            raise
        except psycopg.Error as exc:
            raise from_psycopg(exc, "cannot connect to the state database") from None
        return cls(conn, schema)

    @classmethod
    async def open_for(cls, settings: Settings, application_name: str) -> Self:
        return await cls.open(
            settings.state_dsn.get_secret_value(),
            settings.state.schema_,
            application_name,
            settings.postgres.connect_timeout_s,
        )

    async def close(self) -> None:
        await self._conn.close()

    @property
    def broken(self) -> bool:
        return self._conn.closed or self._conn.broken

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(schema=self._schema)

    @contextlib.asynccontextmanager
    async def transaction(self, doing: str) -> AsyncIterator[None]:
        """One transaction, which this task's statements join and no other task's can; a
        driver error in it is translated (and the transaction undone)."""
        async with self._lock:
            self._transaction_task = asyncio.current_task()
            try:
                async with self._conn.transaction():
                    yield
            except psycopg.Error as exc:
                raise from_psycopg(exc, doing) from None
            finally:
                self._transaction_task = None

    async def _fetch(
        self, doing: str, query: sql.SQL | sql.Composed, params: Sequence[Any] | None = None
    ) -> list[dict[str, Any]]:
        if self._transaction_task is not None and self._transaction_task is asyncio.current_task():
            return await self._run(doing, query, params)
        async with self._lock:
            return await self._run(doing, query, params)

    async def _run(
        self, doing: str, query: sql.SQL | sql.Composed, params: Sequence[Any] | None
    ) -> list[dict[str, Any]]:
        try:
            cur = await self._conn.execute(query, params)
            return await cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise from_psycopg(exc, doing) from None

    async def _require_tables(self, tables: Sequence[str], missing: str) -> None:
        """Raise StateError(``missing``) unless the schema has every one of ``tables``."""
        rows = await self._fetch(
            "reading the ledger",
            sql.SQL(
                "SELECT count(*) AS n FROM pg_tables WHERE schemaname = %s AND tablename = ANY(%s)"
            ),
            (self._schema_name, list(tables)),
        )
        if rows[0]["n"] != len(tables):
            raise StateError(missing)

    async def _try_lock(self, key: int, doing: str, refused: str) -> None:
        """The session-level advisory lock ``key``: held as long as this connection lives,
        released if the process dies. AlreadyRunningError(``refused``) when another holds it."""
        rows = await self._fetch(doing, sql.SQL("SELECT pg_try_advisory_lock(%s) AS ok"), (key,))
        if not rows[0]["ok"]:
            raise AlreadyRunningError(refused)
