"""The one retry loop against outages (``unit.Retry``), what counts as one (``errors``), and how
/healthz says which service is down and since when (``ops.health.Outages``)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import botocore.exceptions
import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from botocore.exceptions import ClientError
from prometheus_client import CollectorRegistry
from psycopg import errors as pg
from structlog.testing import capture_logs

from cdc_daemon.batch.spool import sweep
from cdc_daemon.config import DaemonSettings
from cdc_daemon.errors import TransientError, from_botocore, from_psycopg
from cdc_daemon.ops.health import HealthServer, Heartbeats, Outages, Probe, Supervisor
from cdc_daemon.ops.metrics import Metrics
from cdc_daemon.ops.systemd import SystemdNotifier
from cdc_daemon.unit import Retry
from tests.helpers import seed_settings
from tests.unit.test_health import LedgerlessProbe, drain, notify_socket

# The fixture, from the health tests (imported, so that pytest finds it here too).
__all__ = ["notify_socket"]


class Failing:
    """A step that fails with each of ``errors`` in turn, then returns "done"."""

    def __init__(self, *errors: TransientError, signal_at: int = 0) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.signal_at = signal_at
        self.reached = asyncio.Event()  # set at the ``signal_at``-th call

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls == self.signal_at:
            self.reached.set()
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def outage(service: str = "s3") -> TransientError:
    err = TransientError(f"{service}: connection refused").outage()
    err.boundary = service
    return err


def other(service: str = "postgres") -> TransientError:
    err = TransientError("reading: canceling statement due to statement timeout")
    err.boundary = service
    return err


async def no_note(_exc: TransientError) -> None:
    return None


def fast(**daemon: float) -> DaemonSettings:
    return DaemonSettings(retry_max_wait_s=0.01, **daemon)


async def test_an_outage_is_retried_past_retry_attempts() -> None:
    """An outage is not bounded by ``retry_attempts`` (the default 8): 30 failed attempts in a
    row, then the service answers and the step's result comes back; each attempt is one
    ``step_failed`` line numbered as the pending batch counts it, and one ``step_recovered``
    line says how many attempts it took."""
    step = Failing(*[outage() for _ in range(30)])
    with capture_logs() as logs:
        assert await Retry(fast()).run(step, "step", no_note) == "done"
    failed = [e for e in logs if e["event"] == "step_failed"]
    assert [e["attempt"] for e in failed] == list(range(1, 31))
    assert {e["service"] for e in failed} == {"s3"}
    assert all("of" not in e for e in failed)  # no attempt limit to announce
    recovered = [e for e in logs if e["event"] == "step_recovered"]
    assert [(e["attempts"], e["services"]) for e in recovered] == [(31, ["s3"])]


async def test_other_transient_errors_stop_at_retry_attempts() -> None:
    """A transient error that is not an outage (a statement timeout) is retried
    ``retry_attempts`` times, then raised; the log lines say ``attempt`` of ``of``; the
    service is not reported down."""
    step = Failing(*[other() for _ in range(10)])
    outages = Outages()
    with capture_logs() as logs, pytest.raises(TransientError, match="statement timeout"):
        await Retry(fast(retry_attempts=3), outages=outages).run(step, "step", no_note)
    assert step.calls == 3
    assert outages.down() == {}  # failing, not down
    failed = [(e["attempt"], e["of"]) for e in logs if e["event"] == "step_failed"]
    assert failed == [(1, 3), (2, 3), (3, 3)]


async def test_outage_failures_do_not_use_up_the_attempts_of_other_errors() -> None:
    """A service coming back after a long outage may first answer with another transient
    error (a slot still held by the walsender of before): those are counted on their own, so
    two of them after 20 outage failures do not end a step that ``retry_attempts=3`` allows."""
    step = Failing(*[outage("postgres") for _ in range(20)], other(), other())
    assert await Retry(fast(retry_attempts=3)).run(step, "step", no_note) == "done"
    assert step.calls == 23


async def test_outage_max_s_bounds_an_outage() -> None:
    """With ``outage_max_s`` set, an outage is given up once it lasted that long and at least
    ``retry_attempts`` attempts failed: the last error is raised."""
    step = Failing(*[outage() for _ in range(10_000)])
    started = time.monotonic()
    with pytest.raises(TransientError, match="connection refused"):
        await Retry(fast(retry_attempts=2, outage_max_s=0.3)).run(step, "step", no_note)
    assert 0.3 <= time.monotonic() - started < 5
    assert step.calls >= 2


async def test_a_stop_ends_the_wait_between_attempts_at_once() -> None:
    """A shutdown during an outage ends the backoff wait at once (not at its end) and raises
    the last error, without another attempt."""
    # After the sixth attempt the wait is 1.6 to 3.2 s.
    step = Failing(*[outage() for _ in range(10_000)], signal_at=6)
    stop = asyncio.Event()
    retry = Retry(DaemonSettings(retry_max_wait_s=60))
    task = asyncio.create_task(retry.run(step, "step", no_note, stop=stop))
    await asyncio.wait_for(step.reached.wait(), 10)
    calls = step.calls
    stop.set()
    started = time.monotonic()
    with pytest.raises(TransientError):
        await asyncio.wait_for(task, 2)
    assert time.monotonic() - started < 1
    assert step.calls == calls


def test_the_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    """Waits double from 0.1 s up to ``retry_max_wait_s``, each in the upper half of its
    step (jitter), so a service coming back is tried again within the cap."""
    retry = Retry(DaemonSettings(retry_max_wait_s=10))
    for failures, step in ((1, 0.1), (2, 0.2), (4, 0.8), (7, 6.4), (8, 10), (50, 10)):
        waits = [retry.wait_s(failures) for _ in range(200)]
        assert step / 2 <= min(waits), failures
        assert max(waits) <= step, failures
        assert len(set(waits)) > 1


async def test_the_outages_follow_the_retries() -> None:
    """The service an attempt failed on is down from its first failure, with the failed
    attempts and the last error; it is no longer listed once a step succeeds."""
    clock = [datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)]
    outages = Outages(lambda: clock[0])
    seen: list[dict[str, dict[str, Any]]] = []

    async def note(_exc: TransientError) -> None:
        seen.append(outages.down())
        clock[0] += timedelta(seconds=30)

    step = Failing(outage(), outage())
    assert await Retry(fast(), outages=outages).run(step, "step", note) == "done"
    assert seen[1] == {
        "s3": {
            "since": "2026-01-02T03:04:05Z",
            "for_s": 30.0,
            "attempts": 2,
            "error": "s3: connection refused",
        }
    }
    assert outages.down() == {}


async def test_healthz_names_the_service_down_and_stays_alive() -> None:
    """While a service is down /healthz answers 200 (a restart would not bring it back) with
    ``status: degraded`` and the service, since when, under ``down``; /readyz lists it too."""
    settings = seed_settings()
    probe = Probe(settings)
    beats = Heartbeats()
    beats.beat("capture")
    server = HealthServer(settings, Metrics(CollectorRegistry(), "public.t"), beats, probe)
    async with TestClient(TestServer(server.app())) as client:
        body = await (await client.get("/healthz")).json()
        assert (body["status"], body["down"]) == ("ok", {})
        probe.outages.failed("s3", "uploading: Could not connect to the endpoint URL")
        answer = await client.get("/healthz")
        body = await answer.json()
        assert (answer.status, body["status"], list(body["down"])) == (200, "degraded", ["s3"])
        assert body["down"]["s3"]["attempts"] == 1
        assert body["down"]["s3"]["since"].endswith("Z")
        assert list((await (await client.get("/readyz")).json())["down"]) == ["s3"]
        probe.outages.recovered("s3")
        body = await (await client.get("/healthz")).json()
        assert (body["status"], body["down"]) == ("ok", {})


@pytest.mark.parametrize(
    ("exc", "outage_expected"),
    [
        (psycopg.OperationalError("connection refused"), True),
        (pg.lookup("57P01")("terminating connection due to administrator command"), True),
        (pg.lookup("57P03")("the database system is starting up"), True),
        (pg.lookup("08006")("connection failure"), True),
        (pg.lookup("53300")("too many clients"), True),
        (pg.lookup("57014")("canceling statement due to statement timeout"), False),
        (pg.lookup("40P01")("deadlock detected"), False),
    ],
)
def test_postgres_outages(exc: psycopg.Error, outage_expected: bool) -> None:
    """A server away, shutting down, starting or full of clients is an outage; a statement
    timeout or a deadlock is transient but bounded (it may recur on every attempt)."""
    err = from_psycopg(exc, "reading")
    assert isinstance(err, TransientError)
    assert err.unavailable is outage_expected


@pytest.mark.parametrize(
    ("exc", "outage_expected"),
    [
        (botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3"), True),
        (botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3"), True),
        (botocore.exceptions.ConnectionClosedError(endpoint_url="http://s3"), True),
        (ClientError({"Error": {"Code": "SlowDown"}}, "PutObject"), True),
        (ClientError({"Error": {"Code": "503"}}, "PutObject"), True),
        (ClientError({"Error": {"Code": "RequestTimeTooSkewed"}}, "PutObject"), False),
        (botocore.exceptions.NoCredentialsError(), False),
    ],
)
def test_s3_outages(exc: Exception, outage_expected: bool) -> None:
    """S3 unreachable, timing out, failing (5xx) or throttling is an outage; a skewed clock or
    missing credentials is transient but bounded."""
    assert isinstance(exc, (botocore.exceptions.BotoCoreError, ClientError))
    err = from_botocore(exc, "uploading")
    assert isinstance(err, TransientError)
    assert err.unavailable is outage_expected


async def test_supervisor_tells_systemd_which_service_is_down(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a service is down systemd's status line says which and since when (what
    ``systemctl status`` shows), once; when it is back the line says the daemon exports."""
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    settings = seed_settings(capture={"mode": "logical"})
    notifier = SystemdNotifier()
    probe = LedgerlessProbe(settings)
    supervisor = Supervisor(settings, Heartbeats(), notifier, probe)
    notify_socket.setblocking(False)
    task = asyncio.create_task(supervisor.run())
    try:
        await probe.next_reads(2)
        probe.outages.failed("s3", "uploading: Could not connect to the endpoint URL")
        since = probe.outages.down()["s3"]["since"]
        await probe.next_reads(3)
        statuses = [m for m in drain(notify_socket) if m.startswith("STATUS=")]
        assert statuses == [
            f"STATUS=waiting: s3 down since {since} (1 failed attempt(s)); see /healthz"
        ]
        probe.outages.recovered("s3")
        await probe.next_reads(2)
        statuses = [m for m in drain(notify_socket) if m.startswith("STATUS=")]
        assert statuses == ["STATUS=exporting ledgers"]
    finally:
        task.cancel()
        notifier.close()


def test_sweep_removes_only_the_folders_of_processes_that_are_gone(tmp_path: Path) -> None:
    """``spool.sweep`` removes a spool folder whose process is gone (with its files), and
    leaves a live process's, this process's, and folders it did not name."""
    dead_pid = _exited_pid()
    names = {
        "dead": f"cdc-batch-{dead_pid}-abc",
        "ours": f"cdc-batch-{os.getpid()}-def",
        "live": f"cdc-batch-{os.getppid()}-ghi",
        "other": "cdc-batch-x1y2z3",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "2026-01-01.csv.gz").write_bytes(b"x")
    assert sweep(tmp_path) == [names["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[k] for k in ("ours", "live", "other")
    )


def _exited_pid() -> int:
    """The pid of a process that has exited (and been reaped): no process has it now."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid
