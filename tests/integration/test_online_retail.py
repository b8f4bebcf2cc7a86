"""Acceptance: the whole UCI Online Retail file (541,909 rows) through the pipeline."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.local.sample import load_online_retail
from cdc_daemon.local.services import LocalS3
from tests.helpers import assert_rebuilt_equals_source, export_until_idle, make_settings

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "online_retail.csv.gz"


@pytest.mark.slow
@pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} is not here")
async def test_full_online_retail_file(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """Every row and value of the 541,909-row file comes back from the objects (keeping the
    highest _cdc_seq per id), and the known figures of the data set hold on the source."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert load_online_retail(conn, DATA) == 541_909
        figures = conn.execute(
            "SELECT count(DISTINCT invoice_no), count(DISTINCT stock_code),"
            " count(*) FILTER (WHERE customer_id IS NULL), sum(quantity), sum(unit_price)"
            " FROM ecommerce_sales"
        ).fetchone()
    assert figures == (25_900, 4_070, 135_080, 5_176_450, Decimal("2498803.974"))
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path, batch={"max_days": 400})
    assert await export_until_idle(settings) == 0
    bodies = assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    assert sum(b.count(b"\n") for b in bodies.values()) >= 541_909 + len(bodies)
