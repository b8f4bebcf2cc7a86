"""What the benchmarks share: local services as separate processes, the daemon as a process
(with its peak RSS and CPU from wait4), and the reference pipelines timed in the same run."""

from __future__ import annotations

import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]  # boto3 ships no type hints
import psycopg

from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalPostgres, free_port

VENV_BIN = Path(sys.executable).parent


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu})"


@dataclass
class Services:
    pg: LocalPostgres
    s3_url: str
    workdir: Path
    bucket: str = "bench"
    s3_pid: int = 0

    def s3(self) -> Any:
        return boto3.client("s3", endpoint_url=self.s3_url, region_name="us-east-1")

    def cpu(self) -> tuple[float, float]:
        """CPU seconds used so far by PostgreSQL (every process of the cluster, ended
        backends included) and by the S3 server."""
        postmaster = int((self.pg.data_dir / "postmaster.pid").read_text().split()[0])
        return tree_cpu_seconds(postmaster), tree_cpu_seconds(self.s3_pid)


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU of a process and its live descendants, plus what its ended children
    used (reaped: counted in its cutime/cstime), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
        todo.extend(int(c) for c in children)
    return total / ticks


@dataclass
class Timed:
    """A timed run and the CPU it took: its own processes, PostgreSQL's, the S3 server's."""

    seconds: float
    cpu_s: float
    pg_cpu_s: float = 0.0
    s3_cpu_s: float = 0.0

    def cpu_line(self) -> str:
        total = self.cpu_s + self.pg_cpu_s + self.s3_cpu_s
        return (
            f"CPU {total:.1f} s = {total / self.seconds:.2f} cores (own {self.cpu_s:.1f} s, "
            f"PostgreSQL {self.pg_cpu_s:.1f} s, S3 server {self.s3_cpu_s:.1f} s)"
        )


@contextmanager
def services() -> Iterator[Services]:
    """PostgreSQL (initdb) and moto's S3 server, each in its own process: the daemon must not
    share its CPU or GIL with the S3 server it is measured against."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    workdir = Path(tempfile.mkdtemp(prefix="cdc-bench-"))
    pg = LocalPostgres().start()
    port = free_port()
    moto = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1)  # noqa: S310 - loopback
                break
            except OSError:
                time.sleep(0.1)
        found = Services(pg, url, workdir, s3_pid=moto.pid)
        found.s3().create_bucket(Bucket=found.bucket)
        yield found
    finally:
        moto.terminate()
        moto.wait(10)
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def load_rows(svc: Services, rows: int, days: int = 373) -> int:
    """Synthetic sales rows; returns the CSV size of the table in bytes (as psql writes it)."""
    with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
        generate_sales(conn, rows, days=days)
        conn.execute("VACUUM ANALYZE ecommerce_sales")
        size = conn.execute("SELECT pg_table_size('ecommerce_sales')").fetchone()
    return int(size[0]) if size else 0


def reset_capture(svc: Services) -> None:
    """Forget what was exported, so the next run starts from the first row."""
    with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS cdc CASCADE")
    s3 = svc.s3()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=svc.bucket):
        for item in page.get("Contents", []):
            s3.delete_object(Bucket=svc.bucket, Key=item["Key"])


def timed_shell(command: str, svc: Services | None = None) -> Timed:
    """Run a shell pipeline; its time, its CPU (wait4: the shell and the programs of the
    pipeline it waited for) and, with ``svc``, PostgreSQL's CPU meanwhile."""
    pg_before = svc.cpu()[0] if svc else 0.0
    started = time.perf_counter()
    proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", command])
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command!r} failed")
    pg_cpu = svc.cpu()[0] - pg_before if svc else 0.0
    return Timed(seconds, usage.ru_utime + usage.ru_stime, pg_cpu)


def reference_run(svc: Services, compressor: str) -> Timed:
    """``psql \\copy ... to stdout csv | <compressor> > /dev/null`` on the same table."""
    query = "select * from ecommerce_sales order by id"
    return timed_shell(
        f"psql '{svc.pg.dsn}' -q -c \"\\copy ({query}) to stdout csv\" | {compressor} > /dev/null",
        svc,
    )


def reference_seconds(svc: Services, compressor: str) -> float:
    return reference_run(svc, compressor).seconds


def same_bytes_run(svc: Services, config: Path, compressor: str, jobs: int = 1) -> Timed:
    """The daemon's own COPY query (day prefix, ISO timestamps, _cdc_* columns) through
    ``psql | <compressor>``: the same bytes, produced by C tools. With ``jobs`` > 1 the ids are
    split into that many equal ranges, each read by its own psql (and PostgreSQL backend) in
    parallel: what C tools make of the machine's cores on these rows."""
    from cdc_daemon.capture.watermark.source import WatermarkSource
    from cdc_daemon.config import load_settings
    from cdc_daemon.state.position import INT64_MIN

    source = WatermarkSource(load_settings(config))
    source.connect()
    try:
        with psycopg.connect(svc.pg.dsn) as conn:
            found = conn.execute("SELECT min(id), max(id) FROM ecommerce_sales").fetchone()
            assert found is not None
            low, high = int(found[0]), int(found[1])
            step = (high - low + jobs) // jobs
            bounds = [INT64_MIN] + [low - 1 + step * n for n in range(1, jobs)] + [high]
            queries = [
                source._copy(source._range(lo, hi), "2026-01-01T00:00:00.000000Z").as_string(conn)
                for lo, hi in itertools.pairwise(bounds)
            ]
    finally:
        source.close()
    pipes = []
    for query in queries:
        inner = query[len("COPY (") : query.rindex(") TO STDOUT")]
        pipes.append(
            "PGOPTIONS='-c TimeZone=UTC -c DateStyle=ISO' "
            f"psql '{svc.pg.dsn}' -q -c \"\\copy ({inner}) to stdout csv\""
            f" | {compressor} > /dev/null"
        )
    if jobs == 1:
        return timed_shell(pipes[0], svc)
    # Each pipeline in its own subshell, in the background; wait fails if any of them failed.
    return timed_shell(
        " ".join(f"({pipe}) & p{n}=$!;" for n, pipe in enumerate(pipes))
        + " ".join(f"wait $p{n} &&" for n in range(len(pipes)))
        + " true",
        svc,
    )


def write_config(svc: Services, seed: bool = True, **sections: dict[str, Any]) -> Path:
    """The daemon's configuration for the local services; ``seed``: it captures the seed table
    (``public.ecommerce_sales`` by ``invoice_date``), else the caller adds ``[[tables]]``."""
    table = {"table": "public.ecommerce_sales"} if seed else {}
    partition = {"partition_column": "invoice_date"} if seed else {}
    base: dict[str, dict[str, Any]] = {
        "postgres": {"dsn": svc.pg.dsn, **table},
        "capture": {"poll_interval_s": 0.2, **partition},
        "batch": {"spool_dir": str(svc.workdir)},
        "s3": {"bucket": svc.bucket, "endpoint_url": svc.s3_url},
        "log": {"format": "json"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
    path = svc.workdir / "cdc.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class DaemonRun:
    seconds: float
    peak_rss_mb: float
    cpu_seconds: float
    events: list[dict[str, Any]] = field(default_factory=list)
    pg_cpu_s: float = 0.0
    s3_cpu_s: float = 0.0
    started_at: float = 0.0  # the process's start, epoch seconds

    def timed(self) -> Timed:
        return Timed(self.seconds, self.cpu_seconds, self.pg_cpu_s, self.s3_cpu_s)

    @property
    def batches(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == "batch_uploaded"]

    def total(self, key: str) -> float:
        return float(sum(b.get(key, 0) for b in self.batches))

    @property
    def start_s(self) -> float:
        """Seconds from the process's start until its first pass began (imports, settings,
        connections, checks: one thread, before any row is read)."""
        first = min(
            datetime.fromisoformat(b["timestamp"]).timestamp() - float(b["seconds"])
            for b in self.batches
        )
        return first - self.started_at

    def cpu_bound_s(self, cores: int) -> float:
        """The least time this run's CPU allows on ``cores`` cores: its start runs on one, the
        rest of all the CPU it took (the daemon's, PostgreSQL's, the S3 server's) spread
        perfectly over every core."""
        total = self.cpu_seconds + self.pg_cpu_s + self.s3_cpu_s
        return self.start_s + max(0.0, total - self.start_s) / cores


def cli(config: Path, *args: str) -> None:
    subprocess.run(
        [str(VENV_BIN / "cdc-daemon"), "--config", str(config), *args],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def start_daemon(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """The daemon's log goes to a file beside its config: a pipe nobody reads while it runs
    would fill up and stall the daemon on its next log line. ``env``: added to ours."""
    log = (config.parent / "daemon.log").open("wb")
    return subprocess.Popen(
        [str(VENV_BIN / "cdc-daemon"), "--config", str(config), "run", *args],
        stdout=log,
        env=None if env is None else {**os.environ, **env},
    )


def finish_daemon(proc: subprocess.Popen[bytes], started: float, config: Path) -> DaemonRun:
    """Collect the daemon's log, its CPU time (rusage) and its own peak RSS once it exits.

    The peak is the daemon's VmHWM, read from /proc while it runs: rusage's ru_maxrss of a
    child started with vfork+exec (subprocess does that) starts at the *parent's* peak, so it
    would count this bench process too. VmHWM belongs to the exec'd program only; polled every
    50 ms, a rise in the last 50 ms before exit can be missed."""
    peak_kib = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak_kib = max(peak_kib, _vm_hwm_kib(proc.pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"cdc-daemon exited with {proc.returncode}")
    out = (config.parent / "daemon.log").read_text()
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return DaemonRun(seconds, peak_kib / 1024, usage.ru_utime + usage.ru_stime, events)


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_until_idle(config: Path, svc: Services | None = None) -> DaemonRun:
    """``cdc-daemon run --exit-when-idle``; with ``svc``, PostgreSQL's and the S3 server's CPU
    meanwhile too."""
    cli(config, "init")
    before = svc.cpu() if svc else (0.0, 0.0)
    started, started_at = time.perf_counter(), time.time()
    run = finish_daemon(start_daemon(config, "--exit-when-idle"), started, config)
    run.started_at = started_at
    if svc:
        after = svc.cpu()
        run.pg_cpu_s, run.s3_cpu_s = after[0] - before[0], after[1] - before[1]
    return run


def postmaster_pid(svc: Services) -> int:
    return int((svc.pg.data_dir / "postmaster.pid").read_text().split()[0])


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of one live process (not its children), from /proc; 0 once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pg_bin(name: str) -> Path:
    """A program of the PostgreSQL installation the benchmarks' clusters run on."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
        found = Path(out.stdout.strip()) / name
        if found.exists():
            return found
    for version in ("17", "16", "15", "14"):
        found = Path(f"/usr/lib/postgresql/{version}/bin") / name
        if found.exists():
            return found
    raise RuntimeError(f"{name} is not installed (it ships with the PostgreSQL server binaries)")


class ClusterCpu:
    """The cluster's CPU split by process, polled from /proc in a thread while a run goes on:
    what each walsender (or any one backend) used, not only the whole tree.

    A backend that exits between two polls is reaped by the postmaster, whose cutime/cstime
    then grows by the backend's final CPU: that growth, less the last samples of the backends
    that vanished, is the CPU they used after their last sample (shared equally when several
    vanished in one interval; "unseen" when none did, i.e. a backend that lived less than one
    interval). So a short-lived walsender is counted whole, not cut at its last sample."""

    def __init__(self, svc: Services, interval_s: float = 0.02) -> None:
        self._postmaster = postmaster_pid(svc)
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-cpu", daemon=True)
        self._kind: dict[int, str] = {}
        self._base: dict[int, float] = {}  # CPU at the start (0 for those born later)
        self._last: dict[int, float] = {}  # the latest sample of every live child
        self.used: dict[int, float] = {}  # pid -> CPU used in the window
        self.unseen = 0.0
        self._postmaster_own = 0.0
        self._reaped = 0.0
        self.postmaster_s = 0.0  # the postmaster's own

    def _own_and_reaped(self) -> tuple[float, float]:
        fields = Path(f"/proc/{self._postmaster}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks, (
            int(fields[13]) + int(fields[14])
        ) / ticks

    def _children(self) -> dict[int, float]:
        pids = Path(f"/proc/{self._postmaster}/task/{self._postmaster}/children").read_text()
        found = {}
        for pid in map(int, pids.split()):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                # A backend sets its title after the fork, and a walsender names itself so
                # only after its start-up: read it again until it says walsender.
                if "walsender" not in self._kind.get(pid, ""):
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                    if title.strip():  # empty while the process exits
                        self._kind[pid] = title.decode(errors="replace").strip()
            except (FileNotFoundError, ProcessLookupError):
                continue
            ticks = os.sysconf("SC_CLK_TCK")
            found[pid] = sum(int(v) for v in stat[11:15]) / ticks
        return found

    def poll(self) -> None:
        own, reaped = self._own_and_reaped()
        current = self._children()
        gone = [pid for pid in self._last if pid not in current]
        residual = max(0.0, (reaped - self._reaped) - sum(self._last[p] for p in gone))
        for pid in gone:
            final = self._last.pop(pid) + residual / len(gone)
            self.used[pid] = final - self._base.get(pid, 0.0)
        if not gone:
            self.unseen += residual
        for pid, cpu in current.items():
            self._last[pid] = cpu
            self.used[pid] = cpu - self._base.get(pid, 0.0)
        self._reaped = reaped
        self.postmaster_s = own - self._postmaster_own

    def __enter__(self) -> ClusterCpu:
        self._postmaster_own, self._reaped = self._own_and_reaped()
        self._base = self._children()
        self._last = dict(self._base)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.poll()

    def title(self, pid: int) -> str:
        return self._kind.get(pid, "")

    def of(self, pid: int) -> float:
        return self.used.get(pid, 0.0)

    def walsenders(self) -> float:
        """CPU of every walsender (replication connection) in the window."""
        return sum(cpu for pid, cpu in self.used.items() if "walsender" in self.title(pid))

    @property
    def total(self) -> float:
        return sum(self.used.values()) + self.unseen + self.postmaster_s
