"""The PostgreSQL source session every capture mode and the backfill use: connection settings
the encoding relies on, reopened after it broke, interrupted from another thread. Synchronous
(COPY in a thread runs at psql's speed); callers run it with ``asyncio.to_thread``."""

from __future__ import annotations

import psycopg

from cdc_daemon.config import Settings
from cdc_daemon.errors import from_psycopg

APPLICATION_NAME = "cdc-daemon"


def connect(
    settings: Settings, application_name: str = APPLICATION_NAME
) -> psycopg.Connection[tuple[object, ...]]:
    """A source session with the settings the encoding relies on (UTC, ISO dates). The name
    must start with ``cdc-daemon``: the fence ignores such sessions (they only read)."""
    options = "-c TimeZone=UTC -c DateStyle=ISO -c extra_float_digits=1"
    if settings.postgres.statement_timeout_s:
        options += f" -c statement_timeout={int(settings.postgres.statement_timeout_s * 1000)}"
    try:
        return psycopg.connect(
            settings.postgres.dsn.get_secret_value(),
            autocommit=True,
            application_name=application_name,
            connect_timeout=max(1, int(settings.postgres.connect_timeout_s)),
            options=options,
        )
    except psycopg.Error as exc:
        raise from_psycopg(exc, "cannot connect to the source database") from None


class SourceSession:
    """The source session both capture modes keep (synchronous; run in a thread): reopened
    by ``_session()`` after it broke, closed by ``close()``, interrupted by ``cancel()``."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    def connect(self) -> object:
        raise NotImplementedError

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _session(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self.connect()
        assert self._conn is not None
        return self._conn

    def cancel(self) -> None:
        """Interrupt a running statement from another thread (shutdown past its grace)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.cancel_safe(timeout=5)
