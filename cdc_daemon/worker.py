"""The daemon: startup checks, one TaskGroup of loops, graceful shutdown with a deadline.

SIGTERM/SIGINT only set an event. The capture loop stops taking new batches, lets the current
one finish within ``daemon.shutdown_grace_s`` (shorter than systemd's TimeoutStopSec and the
pod's terminationGracePeriodSeconds), then cancels it: a cancelled batch leaves at most a
pending intent record, redone on the next start. A second signal exits at once.

A failed table of a group (logical or watermark mode) does not stop the daemon: the group's
other tables keep flowing, and health and ``status`` say the group is degraded. When the daemon
stops (a signal, or idle with ``--exit-when-idle``) with a table of its group failed, it ends
with ``TableFailedError`` (exit 9) instead of 0, so that a cron job or a supervisor sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TypeVar

import structlog
from prometheus_client import CollectorRegistry

from cdc_daemon.batch.spool import sweep as sweep_spool
from cdc_daemon.capture import Pipeline
from cdc_daemon.capture.logical.pipeline import LogicalPipeline
from cdc_daemon.capture.logical.source import LogicalSource
from cdc_daemon.capture.watermark.group import WatermarkGroup
from cdc_daemon.capture.watermark.pipeline import WatermarkPipeline, table_failure
from cdc_daemon.capture.watermark.source import WatermarkSource
from cdc_daemon.config import Settings, redact_dsn
from cdc_daemon.errors import (
    AlreadyRunningError,
    CdcError,
    TableFailedError,
    TransientError,
    first_error,
)
from cdc_daemon.ops.health import HealthServer, Heartbeats, Probe, Supervisor
from cdc_daemon.ops.metrics import Metrics
from cdc_daemon.ops.systemd import SystemdNotifier
from cdc_daemon.sink.s3 import S3Sink
from cdc_daemon.source import hotpath
from cdc_daemon.source.table import hasher_of
from cdc_daemon.state.ledger import Producer
from cdc_daemon.state.store import Store
from cdc_daemon.unit import Retry, UnitOfWork

log = structlog.get_logger()

T = TypeVar("T")


class Worker:
    def __init__(self, settings: Settings, exit_when_idle: bool = False) -> None:
        self._settings = settings
        self._exit_when_idle = exit_when_idle
        self._stop = asyncio.Event()
        self._signals = 0
        self._store: Store | None = None
        # Operations (health.py, metrics.py, systemd.py): one registry per worker.
        self.registry = CollectorRegistry()
        self.metrics: Metrics | None = None
        self.heartbeats = Heartbeats()
        self._probe = Probe(settings)
        self._notifier = SystemdNotifier()
        self._lock_held = False

    def request_stop(self, reason: str = "requested") -> None:
        if not self._stop.is_set():
            log.info("shutdown_requested", reason=reason)
            self._notifier.stopping(f"stopping ({reason})")
            self._probe.phase = "stopping"
        self._stop.set()

    def _on_signal(self, signum: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            # The operator asked twice: no more grace.
            os._exit(128 + signum)
        self.request_stop(signum.name)

    async def serve(self, shutdown_trigger: Callable[[], Awaitable[object]] | None = None) -> int:
        settings = self._settings
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if shutdown_trigger is None:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal, signum)
                installed.append(signum)
        try:
            async with AsyncExitStack() as stack:
                stack.callback(self._notifier.close)
                stack.callback(self._notifier.stopping)
                if shutdown_trigger is not None:
                    # Outside the TaskGroup: it also ends a wait for the lock.
                    trigger = asyncio.create_task(self._await_trigger(shutdown_trigger))
                    stack.push_async_callback(_cancelled, trigger)
                pipeline = await self._startup(stack)
                if pipeline is None:
                    log.info("daemon_stopped", group=self._settings.group)
                    return 0
                self._probe.phase = "running"
                self._notifier.ready(f"exporting {pipeline.table}")
                try:
                    async with asyncio.TaskGroup() as group:
                        capture = group.create_task(self._capture_loop(pipeline))
                        supervisor = group.create_task(
                            Supervisor(settings, self.heartbeats, self._notifier, self._probe).run()
                        )
                        capture.add_done_callback(lambda _: supervisor.cancel())
                        if settings.snowflake.enabled:
                            # Imported here: the Snowflake connector costs ~0.2 s to import.
                            from cdc_daemon.reconcile.reconciler import Reconciler

                            # Its own sessions; it never raises: Snowflake cannot stop export.
                            reconciler = group.create_task(
                                Reconciler(
                                    settings,
                                    self.metrics,
                                    self.heartbeats,
                                    outages=self._probe.outages,
                                ).run(self._stop)
                            )
                            capture.add_done_callback(lambda _: reconciler.cancel())
                            if settings.verify.interval_s > 0:
                                from cdc_daemon.reconcile.verify import RollingVerifier

                                verifier = group.create_task(
                                    RollingVerifier(settings, self.metrics).run(self._stop)
                                )
                                capture.add_done_callback(lambda _: verifier.cancel())
                except BaseExceptionGroup as group:
                    # One loop failed and the group cancelled the rest: report that failure.
                    raise first_error(group) from None
                if self._exit_when_idle and settings.snowflake.enabled and not self._stop.is_set():
                    await self._reconcile_before_exit()
                failed = await self._failed_tables()
            log.info(
                "daemon_stopped",
                table=pipeline.table,
                position=pipeline.position,
                failed_tables=sorted(failed),
            )
            if failed:
                # Raised once everything is closed: the exit is as clean as a 0 would be.
                raise TableFailedError.of(pipeline.table, failed)
            return 0
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    async def _reconcile_before_exit(self) -> None:
        """Idle with ``--exit-when-idle``: one reconciler round (the loop's was cancelled with
        the capture), so that the ledger and ``status`` say what Snowflake has loaded; what it
        has not confirmed yet is said in one line, with how to check it later."""
        from cdc_daemon.reconcile.reconciler import Reconciler

        reconciler = Reconciler(self._settings, self.metrics)
        try:
            outcome = await reconciler.run_once()
        except CdcError as exc:
            log.warning(
                "reconcile_failed",
                attempt=1,
                error=str(exc),
                retriable=isinstance(exc, TransientError),
                hint="the uploaded batches await confirmation: cdc-daemon reconcile --once",
            )
            return
        finally:
            await reconciler.close()
        if outcome.unconfirmed:
            log.info(
                "batches_awaiting_confirmation",
                batches=outcome.unconfirmed,
                hint="Snowpipe loads them within minutes: cdc-daemon reconcile --once confirms"
                " them, cdc-daemon status shows them",
            )

    async def _await_trigger(self, trigger: Callable[[], Awaitable[object]]) -> None:
        await trigger()
        self.request_stop("trigger")

    async def _startup(self, stack: AsyncExitStack) -> Pipeline | None:
        """Open everything; None when a shutdown was asked for while waiting for the lock."""
        settings = self._settings
        log.info(
            "daemon_starting",
            group=settings.group,
            tables=[t.qualified for t in settings.table_specs],
            mode=settings.capture.mode,
            source=redact_dsn(settings.postgres.dsn.get_secret_value()),
            bucket=settings.s3.bucket,
            prefix=settings.s3.prefix,
        )
        store = await self._connect_store()
        stack.push_async_callback(self._close_store)
        source: WatermarkSource | LogicalSource = (
            LogicalSource(settings)
            if settings.capture.mode == "logical"
            else WatermarkSource(settings.for_table(settings.table_specs[0]))
        )
        stack.callback(source.close)
        # Watermark mode: a source session per further table of the group. In a group, a
        # table that cannot be read is set aside (``WatermarkGroup``): failed if it was
        # captured before, refused if it never was.
        others: list[WatermarkSource] = []
        watermarks: dict[str, str] = {}
        unreadable: dict[str, CdcError] = {}
        in_group = isinstance(source, WatermarkSource) and len(settings.table_specs) > 1
        try:
            table = await asyncio.to_thread(source.connect)
            watermarks[table.qualified] = table.watermark.name
        except CdcError as exc:
            if not (in_group and table_failure(exc)):
                raise
            unreadable[settings.table] = exc
        if isinstance(source, WatermarkSource):
            for spec in settings.table_specs[1:]:
                other = WatermarkSource(settings.for_table(spec))
                stack.callback(other.close)
                others.append(other)
                try:
                    info = await asyncio.to_thread(other.connect)
                except CdcError as exc:
                    if not table_failure(exc):
                        raise
                    unreadable[spec.qualified] = exc
                    continue
                watermarks[info.qualified] = info.watermark.name
        group = settings.group
        self.metrics = Metrics(self.registry, group)
        # The supervisor reads the group's failed tables through it, with or without HTTP.
        stack.push_async_callback(self._probe.close)
        self._probe.table = group
        self._probe.lock_session = self._lock_session
        if settings.http.address:
            await HealthServer(settings, self.metrics, self.heartbeats, self._probe).start(stack)
        if not await self._take_lock(store, group):
            return None
        # Holding the lock: spool folders of an earlier run killed mid-batch go (its batch, if
        # recorded, is redone from the source).
        swept = await asyncio.to_thread(sweep_spool, settings.batch.spool_dir)
        if swept:
            log.info("spool_swept", folders=len(swept), spool_dir=str(settings.batch.spool_dir))
        hasher = hasher_of(settings)
        await store.check_salts(settings, None if hasher is None else hasher.fingerprint())
        sink = await S3Sink.open(settings.s3, stack)
        self._probe.check_bucket = sink.check_bucket
        # Bounded, unlike an outage met while running: at the first contact a wrong endpoint
        # is likelier than an outage (a supervisor starts the daemon again either way).
        await sink.wait_for_bucket(settings.daemon.retry_attempts, settings.daemon.retry_max_wait_s)
        log.info(
            "daemon_started",
            group=group,
            tables=[t.qualified for t in settings.table_specs],
            partition_columns={t.qualified: t.partition_column for t in settings.table_specs},
            # Logical mode has no watermark: the tables are read from the slot. Its changes
            # pass through the hot path: compiled, or pure Python (and why), said once here.
            **(
                {"hot_path": hotpath.describe()}
                if isinstance(source, LogicalSource)
                else {"watermark_columns": watermarks}
            ),
            pid=os.getpid(),
        )
        unit = UnitOfWork(settings, sink, self.metrics)
        if isinstance(source, LogicalSource):
            # A logical read can take long (a huge transaction comes whole): it beats from its
            # thread, through the loop, so the stall watchdog sees it alive.
            loop = asyncio.get_running_loop()

            def beat() -> None:
                loop.call_soon_threadsafe(self.heartbeats.beat, "capture")

            source.on_progress = beat
            logical = LogicalPipeline(settings, source, unit, store, self.metrics)
            stack.push_async_callback(logical.close)
            return logical
        first = WatermarkPipeline(source.settings, source, unit, store, self.metrics)
        if not others:
            return first
        pipelines = [first] + [
            WatermarkPipeline(o.settings, o, unit, store, self.metrics) for o in others
        ]
        return WatermarkGroup(group, pipelines, store, self.metrics, unreadable)

    async def _failed_tables(self) -> dict[str, str]:
        """The group's failed tables as the ledger has them now (the last batch may have
        failed one); what the supervisor read last if the ledger cannot be read."""
        store = self._store
        if store is None or store.broken:
            return self._probe.failed_tables
        try:
            members = await store.group_tables(self._settings.group)
        except CdcError:
            return self._probe.failed_tables
        return {m.table: m.error or "failed" for m in members if m.status == "failed"}

    def _lock_session(self) -> int | None:
        store = self._store
        if not self._lock_held or store is None or store.broken:
            return None
        return store.backend_pid

    async def _take_lock(self, store: Store, table: str) -> bool:
        """The single-instance lock. Held by another daemon: exit 5, or with
        ``daemon.wait_for_lock`` wait for it (a standby), alive but not ready."""
        daemon = self._settings.daemon
        waited = False
        while True:
            try:
                await store.try_lock(table)
            except AlreadyRunningError:
                if not daemon.wait_for_lock:
                    raise
                if not waited:
                    log.info("lock_waiting", table=table, poll_s=daemon.lock_poll_s)
                    self._notifier.status(f"waiting for the lock on {table}")
                    self._probe.phase = "waiting_for_lock"
                    waited = True
                self.heartbeats.beat("lock")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), daemon.lock_poll_s)
                if self._stop.is_set():
                    return False
                continue
            self.heartbeats.forget("lock")
            self._lock_held = True
            if waited:
                log.info("lock_taken", table=table)
            return True

    async def _connect_store(self) -> Store:
        settings = self._settings
        store = await Store.from_settings(settings)
        try:
            # A group's members are recorded in either mode (a failed table, state.joins).
            await store.check_schema(
                logical=settings.capture.mode == "logical" or len(settings.table_specs) > 1
            )
        except BaseException:
            await store.close()
            raise
        self._store = store
        return store

    async def _close_store(self) -> None:
        if self._store is not None:
            await self._store.close()

    async def _reconnect_if_broken(self, pipeline: Pipeline) -> None:
        """After a transient failure: a lost ledger session also lost the lock; take it again
        (and stop if another daemon took it meanwhile). A new session whose lock could not be
        taken yet (the server went away again) is tried again the same way."""
        store = self._store
        if store is not None and (store.broken or not self._lock_held):
            self._lock_held = False
            if store.broken:
                with contextlib.suppress(Exception):
                    await store.close()
                store = await self._connect_store()
            await store.try_lock(pipeline.table)
            self._lock_held = True
            pipeline.replace_store(store)

    async def _step_with_retries(self, pipeline: Pipeline) -> bool:
        """One step, retried on transient errors by the one retry loop (``unit.Retry``):
        attempts and the last error are kept on the pending batch, so ``status`` can say why
        a batch is stuck."""

        async def prepare() -> None:
            self.heartbeats.beat("capture")
            await self._reconnect_if_broken(pipeline)

        async def note(exc: TransientError) -> None:
            await self._note_failure(pipeline, exc)

        return await self._retry().run(
            lambda: pipeline.step(draining=self._exit_when_idle or self._stop.is_set()),
            "step",
            note,
            prepare,
            stop=self._stop,
            table=pipeline.table,
        )

    def _retry(self) -> Retry:
        return Retry(self._settings.daemon, self.metrics, self._probe.outages)

    async def _give_up(self, pipeline: Pipeline, exc: CdcError) -> None:
        """Retries exhausted: the pending batch (if any) is marked failed with the reason; the
        daemon then exits non-zero, and the batch is redone first on the next start."""
        store = self._store
        failed: list[str] = []
        # Without the lock (another daemon took it while the ledger was away) the pending
        # batch is that daemon's now.
        if store is not None and not store.broken and self._lock_held:
            with contextlib.suppress(CdcError):
                for name in pipeline.ledger_names:
                    failed += await store.mark_failed(name, str(exc))
        log.error("batch_failed", table=pipeline.table, batches=failed, error=str(exc))

    async def _note_failure(self, pipeline: Pipeline, exc: CdcError) -> None:
        """Why the attempt failed, on the pending batch (``status`` shows it): with the
        service down and since when during an outage. Not counted as an attempt: the next
        attempt records the batch's intent again, which counts it (so the batch's attempts
        and the ``attempt`` of the retry's log lines agree)."""
        store = self._store
        if store is None or store.broken or not self._lock_held:
            return  # the ledger itself is what failed; the retry reconnects first
        reason = str(exc)
        outage = self._probe.outages.down().get(exc.boundary or "")
        if isinstance(exc, TransientError) and exc.unavailable and outage is not None:
            reason = f"{exc.boundary} unavailable since {outage['since']}: {reason}"
        with contextlib.suppress(CdcError):
            for name in pipeline.ledger_names:
                await store.note_attempt_failed(name, Producer.BATCH, reason, counted=False)

    async def _last_step(self, pipeline: Pipeline) -> None:
        await pipeline.step(draining=True)
        await pipeline.drain()

    async def _capture_loop(self, pipeline: Pipeline) -> None:
        poll = self._settings.capture.poll_interval_s
        grace = self._settings.daemon.shutdown_grace_s
        stop_wait = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                self.heartbeats.beat("capture")
                step = asyncio.ensure_future(self._step_with_retries(pipeline))
                await asyncio.wait([step, stop_wait], return_when=asyncio.FIRST_COMPLETED)
                # Shutdown during a batch: let it finish within the grace period.
                if not step.done() and not await _within(step, grace, pipeline.table):
                    return
                try:
                    worked = step.result()
                except TransientError as exc:
                    if self._stop.is_set():
                        # Stopping during an outage: the batch stays pending, with its reason,
                        # and is redone first on the next start; the stop itself succeeded.
                        log.warning("capture_stopped_waiting", table=pipeline.table, error=str(exc))
                        return
                    await self._give_up(pipeline, exc)
                    raise
                if worked:
                    continue
                if self._exit_when_idle:
                    log.info("capture_idle", table=pipeline.table, position=pipeline.position)
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stop_wait), poll)
            # Stopping: rows waiting for max_age_s are flushed and the batch still uploading
            # finishes, within the grace period.
            final = asyncio.ensure_future(self._last_step(pipeline))
            if await _within(final, grace, pipeline.table):
                final.result()
        finally:
            stop_wait.cancel()
            self.heartbeats.forget("capture")


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _within(task: asyncio.Future[T], grace: float, table: str) -> bool:
    """Let ``task`` finish within ``grace`` seconds; past that it is cancelled (a cancelled
    batch leaves at most an intent record, redone on the next start). False if it was."""
    done, _ = await asyncio.wait([task], timeout=grace)
    if done:
        return True
    log.warning("batch_abandoned", table=table, grace_s=grace)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False
