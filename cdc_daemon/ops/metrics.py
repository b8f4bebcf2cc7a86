"""Prometheus metrics, on a registry the worker owns (passed in, never a module global).

Names follow Prometheus conventions: a ``cdc_`` prefix, base units (seconds, bytes), ``_total``
on counters (prometheus-client appends it). One daemon captures one table; the ``table`` label
keeps series apart when several daemons report to one Prometheus.

Most figures are pushed by the pipeline as batches commit (``batch_committed``). The batches by
status and the oldest unreconciled batch are read from the ledger when ``/metrics`` is scraped
(``set_ledger``): the ledger is the truth, and other processes (the reconciler, a backfill)
change it too.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from cdc_daemon.state.ledger import Status

RECONCILER_OUTCOMES = ("loaded", "failed", "missing", "refreshed")
BOUNDARIES = ("postgres", "s3", "snowflake")
# From a small redo to a 500,000-row batch that waited for its upload slot.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, registry: CollectorRegistry, table: str) -> None:
        self.registry = registry
        self.table = table
        t = ["table"]
        self.rows_exported = Counter(
            "cdc_rows_exported",
            "Rows written to S3 objects (committed batches).",
            t,
            registry=registry,
        )
        self.bytes_exported = Counter(
            "cdc_bytes_exported",
            "Uncompressed CSV bytes written to S3 objects.",
            t,
            registry=registry,
        )
        self.object_bytes = Counter(
            "cdc_object_bytes_uploaded",
            "Object bytes (compressed) uploaded to S3.",
            t,
            registry=registry,
        )
        self.objects = Counter(
            "cdc_objects_uploaded",
            "Objects uploaded to S3 (one per day per batch).",
            t,
            registry=registry,
        )
        self.rows_quarantined = Counter(
            "cdc_rows_quarantined",
            "Rows with a value Snowflake cannot read back, written to the quarantine prefix.",
            t,
            registry=registry,
        )
        self.batches_committed = Counter(
            "cdc_batches_committed",
            "Batches uploaded and committed by this process.",
            t,
            registry=registry,
        )
        self.batch_duration = Histogram(
            "cdc_batch_duration_seconds",
            "From the start of a batch's read to its commit in the ledger.",
            t,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.lag_seconds = Gauge(
            "cdc_lag_seconds",
            "Seconds from rows first seen to their batch committed (last batch); 0 when idle.",
            t,
            registry=registry,
        )
        self.lag_rows = Gauge(
            "cdc_lag_rows",
            "Ids visible in the source but not exported yet (at the last pass).",
            t,
            registry=registry,
        )
        self.slot_lag_bytes = Gauge(
            "cdc_slot_lag_bytes",
            "WAL bytes between the server's current LSN and the slot's confirmed flush LSN "
            "(logical mode).",
            t,
            registry=registry,
        )
        self.last_commit = Gauge(
            "cdc_last_commit_timestamp_seconds",
            "Unix time of the last batch committed by this process.",
            t,
            registry=registry,
        )
        self.batches = Gauge(
            "cdc_batches",
            "Batches in the ledger by status (read from the ledger at each scrape).",
            ["table", "status"],
            registry=registry,
        )
        self.oldest_unreconciled = Gauge(
            "cdc_oldest_unreconciled_batch_age_seconds",
            "Age of the oldest batch uploaded but not yet confirmed loaded (0 if none).",
            t,
            registry=registry,
        )
        self.reconciler_outcomes = Counter(
            "cdc_reconciler_outcomes",
            "Batches the reconciler settled, by outcome.",
            ["table", "outcome"],
            registry=registry,
        )
        self.retries = Counter(
            "cdc_retries",
            "Failed attempts that were retried, by the service that failed.",
            ["boundary"],
            registry=registry,
        )
        self.pipe_running = Gauge(
            "cdc_pipe_running",
            "1 when SYSTEM$PIPE_STATUS last said RUNNING, 0 when paused or stalled (reconciler).",
            ["table", "pipe"],
            registry=registry,
        )
        self.pipe_pending_files = Gauge(
            "cdc_pipe_pending_files",
            "Files queued in the pipe when the reconciler last asked (pendingFileCount).",
            ["table", "pipe"],
            registry=registry,
        )
        self.task_running = Gauge(
            "cdc_task_running",
            "1 when the task was started (not suspended) at the reconciler's last round.",
            ["table", "task"],
            registry=registry,
        )
        self.task_failures = Gauge(
            "cdc_task_consecutive_failures",
            "Failed runs of the task in a row since its last success (TASK_HISTORY).",
            ["table", "task"],
            registry=registry,
        )
        self.member_state = Gauge(
            "cdc_group_table_state",
            "Groups: 1 for each table's current state (joining, streaming, failed, left; a "
            "watermark group's healthy table is streaming), 0 for the others; the group is the "
            "`table` label.",
            ["table", "member", "state"],
            registry=registry,
        )
        self.stream_stale_in_gauge = Gauge(
            "cdc_stream_stale_in_seconds",
            "Seconds until the stream goes stale if nothing reads it (negative: stale).",
            ["table", "stream"],
            registry=registry,
        )
        self.lock_held = Gauge(
            "cdc_lock_held",
            "1 while this process holds the table's single-instance lock.",
            t,
            registry=registry,
        )
        self.heartbeat_age = Gauge(
            "cdc_loop_heartbeat_age_seconds",
            "Seconds since each loop last reported progress.",
            ["loop"],
            registry=registry,
        )
        self.verify_rows = Counter(
            "cdc_verify_rows",
            "Source rows the continuous verification compared with the warehouse.",
            ["table", "member"],
            registry=registry,
        )
        self.verify_differing = Gauge(
            "cdc_verify_differing_keys",
            "Keys the last verified slice found differing after its settle time "
            "(fix: cdc-daemon verify --repair).",
            ["table", "member"],
            registry=registry,
        )
        self.verify_last_pass = Gauge(
            "cdc_verify_last_full_pass_timestamp_seconds",
            "When the last full pass over the table ended (Unix time; 0: none yet).",
            ["table", "member"],
            registry=registry,
        )
        ProcessCollector(registry=registry)
        # Every series exists from the start (at zero), so rates and alerts see no gaps.
        for metric in (
            self.rows_exported,
            self.bytes_exported,
            self.object_bytes,
            self.objects,
            self.rows_quarantined,
            self.batches_committed,
            self.lag_seconds,
            self.lag_rows,
            self.lock_held,
            self.oldest_unreconciled,
        ):
            metric.labels(table)
        self.batch_duration.labels(table)
        for status in Status:
            self.batches.labels(table, status.value)
        for outcome in RECONCILER_OUTCOMES:
            self.reconciler_outcomes.labels(table, outcome)
        for boundary in BOUNDARIES:
            self.retries.labels(boundary)

    def batch_committed(
        self,
        *,
        rows: int,
        raw_bytes: int,
        size: int,
        objects: int,
        quarantined: int,
        seconds: float,
        lag_s: float,
        behind: int,
    ) -> None:
        """One batch is in S3 and committed in the ledger."""
        table = self.table
        self.rows_exported.labels(table).inc(rows)
        self.bytes_exported.labels(table).inc(raw_bytes)
        self.object_bytes.labels(table).inc(size)
        self.objects.labels(table).inc(objects)
        self.rows_quarantined.labels(table).inc(quarantined)
        self.batches_committed.labels(table).inc()
        self.batch_duration.labels(table).observe(seconds)
        self.lag_seconds.labels(table).set(lag_s)
        self.lag_rows.labels(table).set(max(behind, 0))
        self.last_commit.labels(table).set(time.time())

    def caught_up(self) -> None:
        """A pass found nothing new and nothing waiting: no lag."""
        self.lag_seconds.labels(self.table).set(0)
        self.lag_rows.labels(self.table).set(0)

    def slot_lag(self, lag_bytes: int) -> None:
        """For logical mode: WAL the slot holds back (see ``ops.status.slot_lag_bytes``)."""
        self.slot_lag_bytes.labels(self.table).set(lag_bytes)

    def retried(self, boundary: str | None) -> None:
        self.retries.labels(boundary or "unknown").inc()

    def reconciled(self, outcome: str, count: int = 1) -> None:
        """For the reconciler: ``count`` batches settled with ``outcome``."""
        if outcome not in RECONCILER_OUTCOMES:
            raise ValueError(f"unknown reconciler outcome {outcome!r}")
        self.reconciler_outcomes.labels(self.table, outcome).inc(count)

    def task(self, task: str, running: bool, failures: int) -> None:
        """For the reconciler: a task's state and failed runs in a row."""
        self.task_running.labels(self.table, task).set(1 if running else 0)
        self.task_failures.labels(self.table, task).set(failures)

    def member(self, member: str, state: str) -> None:
        """A table of a group changed state."""
        for name in ("joining", "streaming", "failed", "left"):
            self.member_state.labels(self.table, member, name).set(1 if name == state else 0)

    def stream_stale_in(self, stream: str, seconds: float) -> None:
        """For the reconciler: how long until the stream goes stale."""
        self.stream_stale_in_gauge.labels(self.table, stream).set(seconds)

    def pipe(self, pipe: str, running: bool, pending_files: int) -> None:
        """For the reconciler: the pipe's state from SYSTEM$PIPE_STATUS."""
        self.pipe_running.labels(self.table, pipe).set(1 if running else 0)
        self.pipe_pending_files.labels(self.table, pipe).set(pending_files)

    def set_ledger(self, counts: Mapping[str, int], oldest_unreconciled_s: float | None) -> None:
        for status in Status:
            self.batches.labels(self.table, status.value).set(counts.get(status.value, 0))
        self.oldest_unreconciled.labels(self.table).set(oldest_unreconciled_s or 0)

    def set_heartbeats(self, ages: Mapping[str, float]) -> None:
        for loop, age in ages.items():
            self.heartbeat_age.labels(loop).set(age)

    def verified(self, member: str, rows: int, differing: int, last_pass_s: float | None) -> None:
        """A slice of ``member`` compared with the warehouse."""
        self.verify_rows.labels(self.table, member).inc(rows)
        self.verify_differing.labels(self.table, member).set(differing)
        self.verify_last_pass.labels(self.table, member).set(last_pass_s or 0)

    def set_lock(self, held: bool) -> None:
        self.lock_held.labels(self.table).set(1 if held else 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
}


def metric_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry exposes or will expose once a series has a value
    (``cdc_rows_exported_total``, ``cdc_batch_duration_seconds_bucket``, ``cdc_lag_seconds``)."""
    names = set()
    for family in registry.collect():
        names |= {sample.name for sample in family.samples}
        suffixes = _SUFFIXES.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
    return names
