"""The daemon: startup checks, one TaskGroup of loops, graceful shutdown with a deadline.

SIGTERM/SIGINT only set an event. The capture loop stops taking new batches, lets the current
one finish within ``daemon.shutdown_grace_s`` (shorter than systemd's TimeoutStopSec and the
pod's terminationGracePeriodSeconds), then cancels it: a cancelled batch leaves at most a
pending intent record, redone on the next start. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import stamina
import structlog

from cdc_daemon.config import Settings, redact_dsn
from cdc_daemon.errors import CdcError, TransientError, first_error
from cdc_daemon.logical_pipeline import LogicalPipeline
from cdc_daemon.pipeline import WatermarkPipeline
from cdc_daemon.sink.s3 import S3Sink
from cdc_daemon.source.logical import LogicalSource
from cdc_daemon.source.watermark import WatermarkSource
from cdc_daemon.state.store import Store

log = structlog.get_logger()


class Worker:
    def __init__(self, settings: Settings, exit_when_idle: bool = False) -> None:
        self._settings = settings
        self._exit_when_idle = exit_when_idle
        self._stop = asyncio.Event()
        self._signals = 0
        self._store: Store | None = None

    def request_stop(self, reason: str = "requested") -> None:
        if not self._stop.is_set():
            log.info("shutdown_requested", reason=reason)
        self._stop.set()

    def _on_signal(self, signum: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            # The operator asked twice: no more grace.
            os._exit(128 + signum)
        self.request_stop(signum.name)

    async def serve(self, shutdown_trigger: Callable[[], Awaitable[object]] | None = None) -> int:
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if shutdown_trigger is None:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal, signum)
                installed.append(signum)
        try:
            async with AsyncExitStack() as stack:
                pipeline = await self._startup(stack)
                try:
                    async with asyncio.TaskGroup() as group:
                        capture = group.create_task(self._capture_loop(pipeline))
                        if shutdown_trigger is not None:
                            trigger = group.create_task(self._await_trigger(shutdown_trigger))
                            capture.add_done_callback(lambda _: trigger.cancel())
                except BaseExceptionGroup as group:
                    # One loop failed and the group cancelled the rest: report that failure.
                    raise first_error(group) from None
            log.info("daemon_stopped", table=pipeline.table, position=pipeline.position)
            return 0
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    async def _await_trigger(self, trigger: Callable[[], Awaitable[object]]) -> None:
        await trigger()
        self.request_stop("trigger")

    async def _startup(self, stack: AsyncExitStack) -> WatermarkPipeline:
        settings = self._settings
        log.info(
            "daemon_starting",
            table=settings.postgres.table,
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
            else WatermarkSource(settings)
        )
        stack.callback(source.close)
        table = await asyncio.to_thread(source.connect)
        await store.try_lock(table.qualified)
        sink = await S3Sink.open(settings.s3, stack)
        # A bucket that does not answer yet is waited for like any transient error; one that
        # does not exist is the user's mistake and ends here.
        async for attempt in stamina.retry_context(
            on=TransientError,
            attempts=settings.daemon.retry_attempts,
            wait_max=settings.daemon.retry_max_wait_s,
            timeout=None,
        ):
            with attempt:
                await sink.check_bucket()
        log.info(
            "daemon_started",
            table=table.qualified,
            watermark_column=table.watermark.name,
            partition_column=table.partition.name,
            pid=os.getpid(),
        )
        if isinstance(source, LogicalSource):
            return LogicalPipeline(settings, source, sink, store)
        return WatermarkPipeline(settings, source, sink, store)

    async def _connect_store(self) -> Store:
        settings = self._settings
        store = await Store.from_settings(settings)
        self._store = store
        await store.check_schema()
        return store

    async def _close_store(self) -> None:
        if self._store is not None:
            await self._store.close()

    async def _reconnect_if_broken(self, pipeline: WatermarkPipeline) -> None:
        """After a transient failure: a lost ledger session also lost the lock; take it again
        (and stop if another daemon took it meanwhile)."""
        store = self._store
        if store is not None and store.broken:
            new = await self._connect_store()
            await new.try_lock(pipeline.table)
            pipeline.replace_store(new)

    async def _step_with_retries(self, pipeline: WatermarkPipeline) -> bool:
        """One step, retried with backoff and jitter on transient errors (stamina). One log
        line per failed attempt, one when it recovers; attempts and the last error are kept
        on the pending batch, so ``status`` can say why a batch is stuck."""
        daemon = self._settings.daemon
        failures = 0
        async for attempt in stamina.retry_context(
            on=TransientError,
            attempts=daemon.retry_attempts,
            wait_max=daemon.retry_max_wait_s,
            timeout=None,
        ):
            with attempt:
                try:
                    if failures:
                        await self._reconnect_if_broken(pipeline)
                    worked = await pipeline.step(
                        draining=self._exit_when_idle or self._stop.is_set()
                    )
                except TransientError as exc:
                    failures += 1
                    log.warning(
                        "step_failed",
                        table=pipeline.table,
                        attempt=attempt.num,
                        of=daemon.retry_attempts,
                        error=str(exc),
                    )
                    await self._note_failure(pipeline, exc)
                    raise
                if failures:
                    log.info("step_recovered", table=pipeline.table, attempts=failures + 1)
                return worked
        raise AssertionError("unreachable")  # pragma: no cover

    async def _give_up(self, pipeline: WatermarkPipeline, exc: CdcError) -> None:
        """Retries exhausted: the pending batch (if any) is marked failed with the reason; the
        daemon then exits non-zero, and the batch is redone first on the next start."""
        store = self._store
        failed: list[str] = []
        if store is not None and not store.broken:
            with contextlib.suppress(CdcError):
                failed = await store.mark_failed(pipeline.table, str(exc))
        log.error("batch_failed", table=pipeline.table, batches=failed, error=str(exc))

    async def _note_failure(self, pipeline: WatermarkPipeline, exc: CdcError) -> None:
        store = self._store
        if store is None or store.broken:
            return  # the ledger itself is what failed; the retry reconnects first
        with contextlib.suppress(CdcError):
            await store.note_failure(pipeline.table, str(exc))

    async def _last_step(self, pipeline: WatermarkPipeline) -> None:
        await pipeline.step(draining=True)
        await pipeline.drain()

    async def _capture_loop(self, pipeline: WatermarkPipeline) -> None:
        poll = self._settings.capture.poll_interval_s
        grace = self._settings.daemon.shutdown_grace_s
        stop_wait = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                step = asyncio.ensure_future(self._step_with_retries(pipeline))
                await asyncio.wait([step, stop_wait], return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    # Shutdown during a batch: let it finish within the grace period.
                    done, _ = await asyncio.wait([step], timeout=grace)
                    if not done:
                        log.warning("batch_abandoned", table=pipeline.table, grace_s=grace)
                        step.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await step
                        return
                try:
                    worked = step.result()
                except TransientError as exc:
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
            finished, _ = await asyncio.wait([final], timeout=grace)
            if not finished:
                log.warning("batch_abandoned", table=pipeline.table, grace_s=grace)
                final.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await final
            else:
                final.result()
        finally:
            stop_wait.cancel()
