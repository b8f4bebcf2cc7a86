"""The README's first command: the demo runs the whole pipeline and ends with its report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_reports_every_row_in_sales(tmp_path: Path) -> None:
    """`python -m cdc_daemon demo --report` exits 0 and its closing report says SALES equals the
    source and every batch is loaded, none failed, with no day_incomplete line; the HTML page
    holds the four charts (rows per day, revenue by country, top products, cancellations per
    month) drawn from the sample's data."""
    page = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "cdc_daemon", "demo", "--report", str(page)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    report = done.stdout[done.stdout.index("cdc-daemon demo:") :]
    assert "SALES equals the source: yes" in report
    # Nothing is wrong: the completeness check reports no day (it judges only confirmed days).
    assert "day_incomplete" not in done.stdout + done.stderr
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
