"""Health and metrics over HTTP (aiohttp, in the daemon's event loop): ``http.address``.

- ``/healthz``: liveness. Every loop reports a heartbeat as it makes progress; a loop silent for
  longer than ``daemon.stall_timeout_s`` is stalled and the answer is 503. The same test gates
  the systemd watchdog pings (``Supervisor``), so a wedged process is restarted either way.
- ``/readyz``: readiness. Startup finished, the single-instance lock is held by this process's
  ledger session, Postgres (ledger and source) and the bucket answer. A standby waiting for
  the lock is alive but not ready.
- ``/metrics``: Prometheus text format from the worker's registry; ledger-fed gauges are
  refreshed from the ledger first.

A failed table of a group, logical or watermark (``failed_tables``, read from the ledger by the
supervisor), makes both answers say ``degraded`` but changes neither status code: the group's
other tables still flow, a liveness failure would restart the daemon (stopping them, fixing
nothing), and a pod that is not ready drops out of its Service, so Prometheus would stop
scraping the very gauge to alert on (``cdc_group_table_state{state="failed"}``).

A service the retries find down (``down``: PostgreSQL, S3 or Snowflake, since when, the
failed attempts, the last error; ``Outages``) makes /healthz say ``degraded`` with 200: the
daemon waits it out and resumes by itself, and a restart would not bring the service back.
/readyz lists it too (and fails its own check of that service while it is down).

Probes use sessions of their own (``LedgerReader``), never the pipeline's ledger session.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from cdc_daemon.config import Settings
from cdc_daemon.errors import CdcError, ConfigError
from cdc_daemon.ops.metrics import Metrics
from cdc_daemon.ops.systemd import SystemdNotifier
from cdc_daemon.state.report import LedgerReader

log = structlog.get_logger()

HEALTHZ_PATH = "/healthz"
READYZ_PATH = "/readyz"
METRICS_PATH = "/metrics"
# One probe must not hang a request past a kubelet's default probe timeout much.
CHECK_TIMEOUT_S = 5.0


class Heartbeats:
    """When each loop last reported progress (monotonic clock)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._beats: dict[str, float] = {}

    def beat(self, loop: str) -> None:
        self._beats[loop] = self._clock()

    def forget(self, loop: str) -> None:
        """The loop ended on purpose (e.g. shutting down): no longer expected to beat."""
        self._beats.pop(loop, None)

    def ages(self) -> dict[str, float]:
        now = self._clock()
        return {loop: now - at for loop, at in self._beats.items()}

    def stalled(self, limit_s: float) -> list[str]:
        return sorted(loop for loop, age in self.ages().items() if age > limit_s)


@dataclass
class Outage:
    """One service down: since when (UTC), the attempts that failed on it, the last error."""

    since: datetime
    attempts: int = 0
    error: str = ""

    def as_json(self, now: datetime) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "for_s": round((now - self.since).total_seconds(), 1),
            "attempts": self.attempts,
            "error": self.error,
        }


class Outages:
    """The services (``CdcError.boundary``: postgres, s3, snowflake) the daemon's retries find
    down now, and since when: fed by the retry loop (``unit.Retry``), read by /healthz,
    /readyz, the supervisor (systemd's status line) and the reason noted on a pending batch
    (``status``)."""

    def __init__(self, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._clock = clock
        self._down: dict[str, Outage] = {}

    def failed(self, service: str, error: str) -> Outage:
        """An attempt failed on ``service``: down since its first failure in a row."""
        outage = self._down.get(service)
        if outage is None:
            outage = self._down[service] = Outage(self._clock())
        outage.attempts += 1
        outage.error = error
        return outage

    def recovered(self, service: str) -> Outage | None:
        """``service`` answered again: the outage it ends, if there was one."""
        return self._down.pop(service, None)

    def down(self) -> dict[str, dict[str, Any]]:
        now = self._clock()
        return {service: o.as_json(now) for service, o in sorted(self._down.items())}

    def summary(self) -> str:
        """One line for systemd's status: which services are down, since when."""
        return "; ".join(
            f"{service} down since {o['since']} ({o['attempts']} failed attempt(s))"
            for service, o in self.down().items()
        )


class Probe:
    """What readiness needs to know, filled in by the worker as startup proceeds."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.phase = "starting"  # -> waiting_for_lock -> running -> stopping
        # Returns the backend pid of the session holding the lock, when this process holds it.
        self.lock_session: Callable[[], int | None] = lambda: None
        self.check_bucket: Callable[[], Awaitable[None]] | None = None
        self.table: str | None = None
        # A logical group's failed tables (name -> reason), as ``check_tables`` last read them.
        self.failed_tables: dict[str, str] = {}
        # The services the retries find down now (the worker's retry loop feeds it).
        self.outages = Outages()
        self._reader: LedgerReader | None = None
        self._source: psycopg.AsyncConnection[Any] | None = None

    async def _ledger(self) -> LedgerReader:
        if self._reader is None or self._reader.broken:
            if self._reader is not None:
                await self._reader.close()
            self._reader = await LedgerReader.connect(self._settings, "cdc-daemon-probe")
        return self._reader

    async def _ping_source(self) -> None:
        """The source is checked on its own session only when it is another database."""
        settings = self._settings
        if settings.postgres.dsn == settings.state_dsn:
            return
        try:
            if self._source is None or self._source.closed or self._source.broken:
                self._source = await psycopg.AsyncConnection.connect(
                    settings.postgres.dsn.get_secret_value(),
                    autocommit=True,
                    application_name="cdc-daemon-probe",
                    connect_timeout=max(1, int(settings.postgres.connect_timeout_s)),
                )
            await self._source.execute("SELECT 1")
        except psycopg.Error as exc:
            raise CdcError(f"the source database does not answer: {type(exc).__name__}") from None

    async def close(self) -> None:
        """Idempotent: the worker closes it, and so does the HTTP server that uses it."""
        reader, source = self._reader, self._source
        self._reader = self._source = None
        if reader is not None:
            await reader.close()
        if source is not None:
            await source.close()

    async def _check(self, name: str, check: Callable[[], Awaitable[object]]) -> str:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await check()
        except TimeoutError:
            return f"{name}: no answer within {CHECK_TIMEOUT_S:g}s"
        except CdcError as exc:
            return str(exc)
        return "ok"

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        checks: dict[str, str] = {"phase": self.phase}
        if self.phase != "running" or self.table is None:
            return False, checks

        async def lock() -> None:
            ledger = await self._ledger()
            holder = await ledger.lock_holder(self.table or "")
            ours = self.lock_session()
            if holder is None or ours is None or holder["pid"] != ours:
                raise CdcError("the single-instance lock is not held by this process")

        async def bucket() -> None:
            if self.check_bucket is not None:
                await self.check_bucket()

        checks["postgres"] = await self._check("ledger", lock)
        if checks["postgres"] == "ok":
            checks["source"] = await self._check("source", self._ping_source)
        checks["s3"] = await self._check("s3", bucket)
        return all(v == "ok" for k, v in checks.items() if k != "phase"), checks

    async def check_tables(self) -> dict[str, str]:
        """Read the group's failed tables from the ledger (a group in either mode; a single
        watermark table has none: its error stops the daemon). On a failure to read, what was
        read last stays (``/readyz`` reports the ledger)."""
        if self.table is None:
            return self.failed_tables
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                members = await (await self._ledger()).group_tables(self.table)
        except (CdcError, TimeoutError) as exc:
            log.debug("group_tables_unavailable", error=str(exc))
            return self.failed_tables
        self.failed_tables = {
            m["table"]: m["error"] or "failed" for m in members if m["status"] == "failed"
        }
        return self.failed_tables

    async def refresh(self, metrics: Metrics) -> None:
        """Ledger-fed gauges; on a failure the previous figures stay (and the error is logged
        at debug: /readyz reports it)."""
        metrics.set_lock(self.lock_session() is not None)
        if self.table is None:
            return  # the table is not resolved yet: nothing to read
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                ledger = await self._ledger()
                counts = await ledger.counts(metrics.table)
                oldest = await ledger.oldest_unreconciled(metrics.table)
        except (CdcError, TimeoutError) as exc:
            log.debug("metrics_ledger_unavailable", error=str(exc))
            return
        metrics.set_ledger(counts, oldest["age_s"] if oldest else None)


class HealthServer:
    def __init__(
        self, settings: Settings, metrics: Metrics, heartbeats: Heartbeats, probe: Probe
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._heartbeats = heartbeats
        self._probe = probe

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(HEALTHZ_PATH, self._healthz)
        app.router.add_get(READYZ_PATH, self._readyz)
        app.router.add_get(METRICS_PATH, self._metrics_page)
        return app

    async def start(self, stack: AsyncExitStack) -> None:
        """Listen on ``http.address``; the exit stack stops it. A port that cannot be bound
        is the configuration's fault: one sentence, exit 2."""
        http = self._settings.http
        runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        stack.push_async_callback(self._probe.close)
        site = web.TCPSite(runner, http.host, http.port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on http.address {http.address!r}: {exc.strerror or exc}"
            ) from None
        log.info("http_listening", address=http.address, port=http.port)

    async def _healthz(self, _request: web.Request) -> web.Response:
        limit = self._settings.daemon.stall_timeout_s
        stalled = self._heartbeats.stalled(limit)
        failed = self._probe.failed_tables
        # A service down is waited out by the retries: degraded, still alive (a restart of
        # the daemon would not bring the service back).
        down = self._probe.outages.down()
        body = {
            "status": "stalled" if stalled else "degraded" if failed or down else "ok",
            "stalled": stalled,
            "failed_tables": failed,
            "down": down,
            "loops": {k: round(v, 3) for k, v in self._heartbeats.ages().items()},
            "stall_timeout_s": limit,
        }
        return web.json_response(body, status=503 if stalled else 200)

    async def _readyz(self, _request: web.Request) -> web.Response:
        ready, checks = await self._probe.readiness()
        failed = self._probe.failed_tables
        return web.json_response(
            {
                "status": ("degraded" if failed else "ready") if ready else "not_ready",
                "checks": checks,
                "failed_tables": failed,
                "down": self._probe.outages.down(),
            },
            status=200 if ready else 503,
        )

    async def _metrics_page(self, _request: web.Request) -> web.Response:
        await self._probe.refresh(self._metrics)
        self._metrics.set_heartbeats(self._heartbeats.ages())
        return web.Response(
            body=self._metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


class Supervisor:
    """The loop that feeds systemd's watchdog: a ping only while no loop is stalled, so a
    wedged capture (a query that never returns) gets the process restarted. With a ``probe``
    it also reads the group's failed tables each round, for the health answers and systemd's
    status line (``systemctl status``), which says ``degraded`` while one is failed."""

    def __init__(
        self,
        settings: Settings,
        heartbeats: Heartbeats,
        notifier: SystemdNotifier,
        probe: Probe | None = None,
    ) -> None:
        self._settings = settings
        self._heartbeats = heartbeats
        self._notifier = notifier
        self._probe = probe

    @property
    def interval_s(self) -> float:
        # Half the watchdog period, as sd_watchdog_enabled(3) advises.
        watchdog = self._notifier.watchdog_s
        return watchdog / 2 if watchdog else 5.0

    async def run(self) -> None:
        limit = self._settings.daemon.stall_timeout_s
        warned: list[str] = []
        was_down: list[str] = []
        while True:
            stalled = self._heartbeats.stalled(limit)
            if not stalled:
                self._notifier.watchdog()
            elif stalled != warned:
                log.error("loop_stalled", loops=stalled, stall_timeout_s=limit)
            warned = stalled
            if self._probe is not None:
                # After the ping: a slow ledger delays the next round, never this one's ping.
                before = dict(self._probe.failed_tables)
                failed = await self._probe.check_tables()
                down = sorted(self._probe.outages.down())
                if failed != before or down != was_down:
                    self._tell(failed, tables_changed=failed != before)
                was_down = down
            await asyncio.sleep(self.interval_s)

    def _tell(self, failed: dict[str, str], tables_changed: bool = True) -> None:
        group = self._probe.table if self._probe is not None else None
        outages = self._probe.outages if self._probe is not None else None
        down = outages.down() if outages is not None else {}
        if tables_changed and failed:
            log.error("group_degraded", group=group, failed_tables=sorted(failed))
        elif tables_changed:
            log.info("group_healthy", group=group)
        if outages is not None and down:
            self._notifier.status(f"waiting: {outages.summary()}; see /healthz")
        elif failed:
            self._notifier.status(
                f"degraded: failed table(s) {', '.join(sorted(failed))}; see cdc-daemon status"
            )
        else:
            self._notifier.status(f"exporting {group}")
