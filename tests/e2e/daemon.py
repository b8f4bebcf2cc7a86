"""Running ``python -m cdc_daemon`` as a real process against the test services."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cdc_daemon.local.sample import SAMPLE_TABLE, sample_snowflake
from cdc_daemon.local.services import LocalS3


def write_config(
    tmp_path: Path,
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    **extra: Any,
) -> Path:
    """A TOML configuration with ``extra`` sections; ``tables=[...]`` adds ``[[tables]]``."""
    tables: list[dict[str, Any]] = extra.pop("tables", [])
    seed = not tables and "table" not in extra.get("postgres", {})
    if seed:
        # Without [[tables]] or postgres.table: the seed's table, as the demo configures it
        # (a capture.partition_column given stands for the table's own).
        capture = dict(extra.get("capture", {}))
        partition = capture.pop("partition_column", SAMPLE_TABLE["partition_column"])
        tables = [{**SAMPLE_TABLE, "partition_column": partition}]
        if "capture" in extra:
            extra["capture"] = capture
    sections: dict[str, dict[str, Any]] = {
        "postgres": {"dsn": pg_dsn},
        "capture": {"poll_interval_s": 0.1},
        "batch": {"max_age_s": 0, "spool_dir": str(tmp_path)},
        "s3": {"bucket": bucket, "endpoint_url": s3_server.endpoint_url},
        "daemon": {"shutdown_grace_s": 5},
        "log": {"format": "json"},
        **({"snowflake": sample_snowflake()} if seed else {}),
    }
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
    for table in tables:
        lines.append("[[tables]]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in table.items())
    path = tmp_path / "cdc.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("CDC_", "CDCTEST_"))}
    out.setdefault("AWS_ACCESS_KEY_ID", "test")
    out.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    out.update(extra)
    return out


def cli(
    config: Path, *args: str, timeout: float = 120, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdc_daemon", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(**extra_env),
    )


def start(
    config: Path, *args: str, command: str = "run", **extra_env: str
) -> subprocess.Popen[str]:
    """``cdc-daemon <command> <args>`` started in the background, its output on pipes."""
    return subprocess.Popen(
        [sys.executable, "-m", "cdc_daemon", "--config", str(config), command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(**extra_env),
    )


def _reap(proc: subprocess.Popen[str]) -> str:
    """Kill the process if it still runs, wait for it, close its pipes: what was left of its
    stderr."""
    if proc.poll() is None:
        proc.kill()
    return proc.communicate(timeout=30)[1] or ""


@contextlib.contextmanager
def daemon_process(config: Path, *args: str, **extra_env: str) -> Iterator[subprocess.Popen[str]]:
    """``cdc-daemon run`` as a process for the body of the block, which stops it (``stop_daemon``)
    and checks how it ended. Whatever the body did, no process outlives the block (holding the
    table's lock or a slot into the next test): one still running is killed and reaped. If
    the body fails, the end of the daemon's stderr is added to its exception as a note."""
    proc = start(config, *args, **extra_env)
    try:
        yield proc
    except BaseException as failure:
        failure.add_note(f"the daemon's stderr ended with: {_reap(proc)[-3000:]}")
        raise
    finally:
        _reap(proc)


def stop_daemon(
    proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 30
) -> tuple[str, str]:
    """Send ``sig`` and wait up to ``timeout`` seconds for the process to end: the rest of its
    stdout and stderr."""
    proc.send_signal(sig)
    return proc.communicate(timeout=timeout)


def sigkill_rounds(
    config: Path,
    rng: random.Random,
    rounds: int,
    after_round: Callable[[], None] | None = None,
) -> None:
    """``rounds`` times: start the daemon, SIGKILL it at a random moment (a moment drawn, not
    a state waited for: the point is not to choose it), check it died of that signal, then
    run ``after_round`` (a check of the state it left). One round in four draws the moment
    from 0.3 to 1.8 s after the start (its start-up: imports alone take about 2 s on a busy
    2-core machine); the others from the 1.5 s after it logs ``daemon_started``, so that
    most kills land while it works."""
    for _ in range(rounds):
        with daemon_process(config) as daemon:
            if rng.random() < 0.25:
                time.sleep(0.3 + rng.random() * 1.5)
            else:
                wait_for_event(daemon, "daemon_started")
                time.sleep(rng.random() * 1.5)
            out, err = stop_daemon(daemon, signal.SIGKILL)
        assert daemon.returncode == -signal.SIGKILL, out[-3000:] + err[-3000:]
        if after_round is not None:
            after_round()


def wait_for_event(
    proc: subprocess.Popen[str], event: str, timeout: float = 60
) -> list[dict[str, Any]]:
    """Read JSON log lines until one has ``event``; return the lines read."""
    assert proc.stdout is not None
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"daemon exited before {event!r}: {seen} {err}")
        record = json.loads(line)
        seen.append(record)
        if record.get("event") == event:
            return seen
    raise AssertionError(f"no {event!r} within {timeout}s")
