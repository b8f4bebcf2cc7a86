"""The README's first command: the demo runs the whole pipeline and ends with its report."""

from __future__ import annotations

import subprocess
import sys


def test_demo_reports_every_row_in_sales() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cdc_daemon", "demo"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    report = done.stdout[done.stdout.index("cdc-daemon demo:") :]
    assert "SALES equals the source: yes" in report
    assert "batches: loaded" in report
    assert "failed" not in report.split("batches:")[1].splitlines()[0]
