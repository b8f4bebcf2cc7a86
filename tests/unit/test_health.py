"""Heartbeats, the watchdog gate, systemd's notify datagrams, ``http.address`` and metrics."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from cdc_daemon.config import DEFAULT_HTTP_PORT, Settings, split_address
from cdc_daemon.errors import ConfigError
from cdc_daemon.ops.health import HealthServer, Heartbeats, Probe, Supervisor
from cdc_daemon.ops.metrics import Metrics
from cdc_daemon.ops.systemd import SystemdNotifier
from tests.helpers import seed_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_loop_silent_past_the_limit_is_stalled() -> None:
    """A loop is stalled only once its last beat is older than the limit; a loop that ended
    on purpose is no longer expected to beat."""
    clock = Clock()
    beats = Heartbeats(clock)
    beats.beat("capture")
    beats.beat("reconcile")
    clock.now += 10
    beats.beat("reconcile")
    assert beats.stalled(10) == []
    clock.now += 0.5
    assert beats.stalled(10) == ["capture"]
    assert beats.ages() == {"capture": 10.5, "reconcile": 0.5}
    beats.forget("capture")
    assert beats.stalled(10) == []


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()


def test_notifier_sends_the_protocol_messages(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """READY=1 (with a status and the main pid), WATCHDOG=1 and STOPPING=1 arrive as
    datagrams on NOTIFY_SOCKET; WATCHDOG_USEC gives the watchdog period, but only for the
    process WATCHDOG_PID names."""
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    notifier = SystemdNotifier()
    try:
        assert notifier.watchdog_s == 2.0
        notifier.ready("exporting t")
        notifier.watchdog()
        notifier.stopping()
        got = [notify_socket.recv(4096).decode() for _ in range(3)]
    finally:
        notifier.close()
    assert got[0].splitlines()[:2] == ["READY=1", "STATUS=exporting t"]
    assert got[0].splitlines()[2].startswith("MAINPID=")
    assert got[1:] == ["WATCHDOG=1", "STOPPING=1\nSTATUS=stopping"]
    monkeypatch.setenv("WATCHDOG_PID", "1")
    other = SystemdNotifier()
    assert other.watchdog_s is None
    other.close()


def test_notifier_outside_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NOTIFY_SOCKET nothing is sent and nothing fails."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    notifier.ready("x")
    notifier.watchdog()
    notifier.close()


class CheckedHeartbeats(Heartbeats):
    """Heartbeats that queue the verdict of every ``stalled`` check, so a test can wait for
    the supervisor's next checks instead of sleeping through its period."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.verdicts: asyncio.Queue[list[str]] = asyncio.Queue()

    def stalled(self, limit_s: float) -> list[str]:
        verdict = super().stalled(limit_s)
        self.verdicts.put_nowait(verdict)
        return verdict

    def forget_checks(self) -> int:
        """Drop the verdicts queued so far: how many checks they were."""
        count = 0
        while not self.verdicts.empty():
            self.verdicts.get_nowait()
            count += 1
        return count

    async def next_checks(self, count: int) -> list[list[str]]:
        """The verdicts of the supervisor's next ``count`` checks. The supervisor only yields
        at its sleep, so when this returns, the ping of the last check, if any, is sent."""
        async with asyncio.timeout(10):
            return [await self.verdicts.get() for _ in range(count)]


async def test_watchdog_pings_stop_while_a_loop_is_stalled(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor checks the loops every half watchdog period and pings after each check
    that finds none stalled; once a loop stays silent past the stall limit it stops pinging
    (so systemd restarts the process) and says so once; a beat brings the pings back."""
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    settings = seed_settings(daemon={"stall_timeout_s": 0.3})
    clock = Clock()
    beats = CheckedHeartbeats(clock)
    notifier = SystemdNotifier()
    supervisor = Supervisor(settings, beats, notifier)
    assert supervisor.interval_s == 0.05
    notify_socket.setblocking(False)
    beats.beat("capture")
    with capture_logs() as logs:
        task = asyncio.create_task(supervisor.run())
        try:
            assert await beats.next_checks(4) == [[]] * 4
            # Each check so far found nothing stalled and pinged: one datagram per check.
            pings = drain(notify_socket)
            assert pings == ["WATCHDOG=1"] * (4 + beats.forget_checks())

            # Silent past the limit (the test's clock moved, the loop did not beat). No
            # await between here and the wait below: no check runs in between.
            clock.now += 0.31
            assert drain(notify_socket).count("WATCHDOG=1") == beats.forget_checks()
            assert await beats.next_checks(3) == [["capture"]] * 3
            assert drain(notify_socket) == []
            stalled = [e for e in logs if e["event"] == "loop_stalled"]
            assert [e["loops"] for e in stalled] == [["capture"]]

            beats.beat("capture")
            assert drain(notify_socket) == []
            beats.forget_checks()
            assert await beats.next_checks(1) == [[]]
            assert drain(notify_socket) == ["WATCHDOG=1"]
        finally:
            task.cancel()
            notifier.close()


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("0.0.0.0:9187", ("0.0.0.0", 9187)),
        ("127.0.0.1", ("127.0.0.1", DEFAULT_HTTP_PORT)),
        (":8080", ("0.0.0.0", 8080)),
        ("[::]:9100", ("::", 9100)),
        ("[::1]", ("::1", DEFAULT_HTTP_PORT)),
    ],
)
def test_http_address_forms(address: str, expected: tuple[str, int]) -> None:
    """``host:port``, a host alone (the default port), ``:port`` and bracketed IPv6."""
    assert split_address(address) == expected


@pytest.mark.parametrize("address", ["localhost:http", "::1", "h:0", "h:70000"])
def test_bad_http_address_is_one_sentence(address: str) -> None:
    """A malformed address is refused at load time with a message naming the key."""
    with pytest.raises(ConfigError, match=r"http\.address"):
        seed_settings(http={"address": address})


def test_http_endpoint_is_off_by_default() -> None:
    """Without http.address there is no HTTP endpoint: the default address is empty."""
    assert seed_settings().http.address == ""


def test_metrics_follow_prometheus_conventions() -> None:
    """Every series is prefixed, counters end in _total, and unknown reconciler outcomes are
    refused rather than creating a new series."""
    metrics = Metrics(CollectorRegistry(), "public.t")
    metrics.batch_committed(
        rows=10, raw_bytes=100, size=40, objects=2, quarantined=1, seconds=0.2, lag_s=0.3, behind=5
    )
    metrics.reconciled("loaded", 2)
    metrics.retried("s3")
    metrics.retried(None)
    text = metrics.exposition().decode()
    assert 'cdc_rows_exported_total{table="public.t"} 10.0' in text
    assert 'cdc_reconciler_outcomes_total{outcome="loaded",table="public.t"} 2.0' in text
    assert 'cdc_retries_total{boundary="s3"} 1.0' in text
    assert 'cdc_retries_total{boundary="unknown"} 1.0' in text
    assert 'cdc_lag_rows{table="public.t"} 5.0' in text
    for family in metrics.registry.collect():
        assert family.name.startswith(("cdc_", "process_")), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
    with pytest.raises(ValueError, match="unknown reconciler outcome"):
        metrics.reconciled("exploded")
    metrics.slot_lag(4096)
    assert 'cdc_slot_lag_bytes{table="public.t"} 4096.0' in metrics.exposition().decode()
    metrics.caught_up()
    assert 'cdc_lag_seconds{table="public.t"} 0.0' in metrics.exposition().decode()


async def test_endpoints_answer_from_heartbeats_and_phase() -> None:
    """/healthz is 200 while the loops beat and 503 naming the stalled loop after
    ``daemon.stall_timeout_s``; /readyz is 503 until startup finished; /metrics is Prometheus
    text with the loops' heartbeat ages."""
    settings = seed_settings(daemon={"stall_timeout_s": 30})
    clock = Clock()
    beats = Heartbeats(clock)
    beats.beat("capture")
    metrics = Metrics(CollectorRegistry(), "public.t")
    server = HealthServer(settings, metrics, beats, Probe(settings))
    async with TestClient(TestServer(server.app())) as client:
        answer = await client.get("/healthz")
        assert answer.status == 200
        assert (await answer.json())["status"] == "ok"
        clock.now += 31
        answer = await client.get("/healthz")
        assert answer.status == 503
        assert (await answer.json())["stalled"] == ["capture"]
        answer = await client.get("/readyz")
        assert answer.status == 503
        assert (await answer.json())["checks"] == {"phase": "starting"}
        answer = await client.get("/metrics")
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        assert 'cdc_loop_heartbeat_age_seconds{loop="capture"} 31.0' in await answer.text()


class LedgerlessProbe(Probe):
    """A probe whose ledger answers are set by the test: ready, and the failed tables a test
    puts in ``ledger_failed``, which ``check_tables`` reads as the real one reads the ledger
    (each read queued, so a test can wait for the supervisor's next rounds)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.phase = "running"
        self.table = "ledgers"
        self.ledger_failed: dict[str, str] = {}
        self.reads: asyncio.Queue[dict[str, str]] = asyncio.Queue()

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        return True, {"phase": self.phase, "postgres": "ok", "s3": "ok"}

    async def check_tables(self) -> dict[str, str]:
        self.failed_tables = dict(self.ledger_failed)
        self.reads.put_nowait(self.failed_tables)
        return self.failed_tables

    async def next_reads(self, count: int) -> list[dict[str, str]]:
        async with asyncio.timeout(10):
            return [await self.reads.get() for _ in range(count)]


TRUNCATED = "bank.tellers was truncated: ... (cdc-daemon resync --table bank.tellers)"


async def test_a_failed_table_makes_health_degraded_without_failing_a_probe() -> None:
    """With a failed table in the group, /healthz and /readyz both answer 200 (a restart fixes
    nothing and an unready pod would stop being scraped) with ``status: degraded`` and the
    table with its reason under ``failed_tables``; a stalled loop still wins on /healthz (503,
    ``stalled``)."""
    settings = seed_settings(daemon={"stall_timeout_s": 30}, capture={"mode": "logical"})
    clock = Clock()
    beats = Heartbeats(clock)
    beats.beat("capture")
    probe = LedgerlessProbe(settings)
    server = HealthServer(settings, Metrics(CollectorRegistry(), "ledgers"), beats, probe)
    async with TestClient(TestServer(server.app())) as client:
        answer = await client.get("/readyz")
        assert (answer.status, (await answer.json())["status"]) == (200, "ready")
        probe.ledger_failed = {"bank.tellers": TRUNCATED}
        await probe.check_tables()
        for path, ok in (("/healthz", "ok"), ("/readyz", "ready")):
            answer = await client.get(path)
            body = await answer.json()
            assert answer.status == 200, path
            assert body["status"] == "degraded", f"{path} said {body['status']}, not {ok}"
            assert body["failed_tables"] == {"bank.tellers": TRUNCATED}
        clock.now += 31
        answer = await client.get("/healthz")
        assert (answer.status, (await answer.json())["status"]) == (503, "stalled")


async def test_supervisor_reports_a_failed_table_to_systemd_and_the_log_once(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each round the supervisor reads the group's failed tables; when they change it logs
    ``group_degraded`` with the tables and sets systemd's status line to ``degraded: ...``
    (what ``systemctl status`` shows), once, not at every round; the watchdog pings go on;
    once no table is failed the status line says it exports again."""
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    settings = seed_settings(capture={"mode": "logical"})
    notifier = SystemdNotifier()
    probe = LedgerlessProbe(settings)
    supervisor = Supervisor(settings, Heartbeats(), notifier, probe)
    notify_socket.setblocking(False)
    with capture_logs() as logs:
        task = asyncio.create_task(supervisor.run())
        try:
            assert await probe.next_reads(2) == [{}, {}]
            probe.ledger_failed = {"bank.tellers": TRUNCATED}
            await probe.next_reads(4)
            sent = drain(notify_socket)
            statuses = [m for m in sent if m.startswith("STATUS=")]
            assert statuses == [
                "STATUS=degraded: failed table(s) bank.tellers; see cdc-daemon status"
            ]
            assert "WATCHDOG=1" in sent
            degraded = [e for e in logs if e["event"] == "group_degraded"]
            assert [(e["group"], e["failed_tables"]) for e in degraded] == [
                ("ledgers", ["bank.tellers"])
            ]
            probe.ledger_failed = {}
            await probe.next_reads(2)
            assert [m for m in drain(notify_socket) if m.startswith("STATUS=")] == [
                "STATUS=exporting ledgers"
            ]
        finally:
            task.cancel()
            notifier.close()
