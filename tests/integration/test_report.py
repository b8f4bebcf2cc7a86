"""The report page (``cdc-daemon report``, ``demo --report``) for any group: per table its rows
per day in the source and in the warehouse with the days that differ called out, rendered by a
real headless browser (Debian's Chromium) and checked on the pixels it drew, not only on the
HTML."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.local.charts import sample_charts
from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.state.verify import VerifyState
from cdc_daemon.warehouse.report import report_tables, write_report
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, make_settings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The colours of the source's and the warehouse's series (warehouse.report).
SOURCE_RGB = (0x1F, 0x77, 0xB4)
WAREHOUSE_RGB = (0xD6, 0x27, 0x28)


def _browser() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return CHROMIUM


def _chromium(*args: str) -> str:
    """What headless Chromium printed (``--dump-dom``) or drew (``--screenshot``). Its
    profile and sockets live in a short folder of their own (a socket path has a length
    limit that pytest's folders exceed)."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="chr") as profile:
        return _run_chromium(profile, *args)


def _run_chromium(profile: str, *args: str) -> str:
    done = subprocess.run(
        [
            _browser(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": profile, "TMPDIR": profile},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _pixels_near(path: Path, rgb: tuple[int, int, int], tolerance: int = 40) -> int:
    from PIL import Image

    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24) or []
    return sum(
        n
        for n, c in colours
        if isinstance(c, tuple)
        and all(abs(a - b) <= tolerance for a, b in zip(c, rgb, strict=True))
    )


@pytest.fixture
def warehouse(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> Any:
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path, batch={"max_rows": 2_000})
    wh = start_warehouse(settings, warehouse_dir)
    yield wh
    wh.stop()


async def test_the_report_shows_each_day_on_both_sides_and_calls_out_a_difference(
    pg_dsn: str, warehouse: LocalWarehouse, tmp_path: Path
) -> None:
    """With every row loaded, the page says the table is equal on every day and Chromium draws
    both series (source blue, warehouse red, dashed over it) and the sample's charts; after a
    row is lost in the warehouse, the page names the day, with both counts, and the table as
    differing; the continuous verification's state is shown (none yet, then a differing
    key)."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 3_000, days=12)
    assert await export_until_idle(warehouse.settings) == 0
    warehouse.pump_until_quiet()
    with psycopg.connect(pg_dsn) as conn:
        (n_days,) = conn.execute(
            "SELECT count(DISTINCT (invoice_date AT TIME ZONE 'UTC')::date) FROM ecommerce_sales"
        ).fetchone() or (0,)
    assert n_days >= 12
    settings = warehouse.settings
    tables = report_tables(settings)
    assert [(t.table.names.name, t.partition) for t in tables] == [("SALES", "invoice_date")]

    page = tmp_path / "report.html"
    write_report(
        page,
        warehouse.query,
        settings.postgres,
        settings.snowflake,
        tables,
        ["a summary line"],
        sample_charts(warehouse.query),
    )
    dom = _chromium("--dump-dom", page.as_uri())
    assert (
        f"rows per day of invoice_date (UTC), source and SALES: equal on all {n_days} days" in dom
    )
    assert "Days that differ" not in dom
    assert "Revenue by country, top 12 (GBP, from INVOICES)" in dom
    assert "No continuous verification has run yet" in dom
    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", "--window-size=1000,2400", page.as_uri())
    assert _pixels_near(shot, SOURCE_RGB) > 500, "the source's line is not drawn"
    assert _pixels_near(shot, WAREHOUSE_RGB) > 50, "the warehouse's line is not drawn"

    warehouse.query("DELETE FROM SALES WHERE ID = 7")
    with psycopg.connect(pg_dsn) as conn:
        day = conn.execute(
            "SELECT to_char(invoice_date AT TIME ZONE 'UTC', 'YYYY-MM-DD'),"
            " (SELECT count(*) FROM ecommerce_sales e WHERE (e.invoice_date AT TIME ZONE 'UTC')"
            "::date = (s.invoice_date AT TIME ZONE 'UTC')::date)"
            " FROM ecommerce_sales s WHERE id = 7"
        ).fetchone()
    assert day is not None
    states = [VerifyState("public.ecommerce_sales", rows_verified=5, differing=({"id": 7},))]
    write_report(
        page, warehouse.query, settings.postgres, settings.snowflake, tables, [], (), states
    )
    dom = _chromium("--dump-dom", page.as_uri())
    assert "1 key(s)</b>: {'id': 7}" in dom
    assert f"source and SALES: differ on 1 of {n_days} days" in dom
    assert f"{day[0]}: source {day[1]}, warehouse {day[1] - 1}" in dom
    assert '<b class="bad">differ</b>' in dom
