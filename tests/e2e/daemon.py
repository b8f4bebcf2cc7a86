"""Running ``python -m cdc_daemon`` as a real process against the test services."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cdc_daemon.local.services import LocalS3


def write_config(
    tmp_path: Path, pg_dsn: str, s3_server: LocalS3, bucket: str, **extra: dict[str, Any]
) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "postgres": {"dsn": pg_dsn},
        "capture": {"poll_interval_s": 0.1},
        "batch": {"max_age_s": 0, "spool_dir": str(tmp_path)},
        "s3": {"bucket": bucket, "endpoint_url": s3_server.endpoint_url},
        "daemon": {"shutdown_grace_s": 5},
        "log": {"format": "json"},
    }
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
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


def start(config: Path, *args: str, **extra_env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cdc_daemon", "--config", str(config), "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(**extra_env),
    )


def wait_for_event(
    proc: subprocess.Popen[str], event: str, timeout: float = 60
) -> list[dict[str, Any]]:
    """Read JSON log lines until one has ``event``; return the lines read."""
    assert proc.stdout is not None
    seen = []
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
