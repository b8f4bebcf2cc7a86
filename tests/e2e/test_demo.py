"""The README's first command: the demo runs the whole pipeline and ends with its report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_reports_every_row_in_sales(tmp_path: Path) -> None:
    """`python -m cdc_daemon demo --report` exits 0; on a pipe it prints a few progress lines
    (the first naming its log file) and its closing report, nothing on stderr, and keeps the
    log lines in that file; the report says SALES equals the source, that `verify` found every
    value equal, and every batch is loaded, none failed, with no day_incomplete line logged;
    the HTML page holds the four charts (rows per day, revenue by country, top products,
    cancellations per month) drawn from the sample's data, the verification and the latest
    deliveries."""
    page = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "cdc_daemon", "demo", "--report", str(page)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    # A few lines of progress, then the report; the log lines (the daemon's, fakesnow's,
    # warnings) are in the log file the first line names, none on stdout or stderr.
    first, *progress = done.stdout[: done.stdout.index("\ncdc-daemon demo:")].splitlines()
    log = Path(first.rsplit(" ", 1)[1])
    assert first == f"cdc-daemon demo: log lines of the daemon and the local services go to {log}"
    assert 3 <= len(progress) <= 8, progress
    assert all(line.startswith("  ") and "{" not in line for line in progress), progress
    assert done.stderr == ""
    logged = log.read_text()
    log.unlink()
    assert '"event": "daemon_started"' in logged
    report = done.stdout[done.stdout.index("\ncdc-daemon demo:") :]
    assert "SALES equals the source: yes" in report
    assert "verify public.ecommerce_sales: every value equal (" in report
    # Nothing is wrong: the completeness check reports no day (it judges only confirmed days).
    assert "day_incomplete" not in logged + done.stdout
    assert "batches: loaded" in report
    assert "failed" not in report.split("batches:")[1].splitlines()[0]
    html = page.read_text()
    assert html.count("<svg") == 4
    for title in (
        "rows per day of invoice_date (UTC), source and SALES: equal on all",
        "Revenue by country",
        "Top 10 products",
        "cancellations per month",
    ):
        assert title in html
    assert "United Kingdom" in html
    assert "<h2>Latest deliveries</h2>" in html
    assert "<h2>Verification</h2>" in html
