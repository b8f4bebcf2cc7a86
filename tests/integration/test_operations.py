"""Operations against real services: ``status`` and ``/metrics`` agree with the ledger after a
real export, ``/healthz`` and ``/readyz`` answer, a standby waits for the lock."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cdc_daemon.config import Settings
from cdc_daemon.errors import ConfigError
from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3, free_port
from cdc_daemon.ops.status import collect, render, slot_lag_bytes
from tests.fix_faults import FaultyProxy
from tests.helpers import export_until_idle, make_settings, running_daemon, wait_until


def settings_with_http(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, **daemon: Any
) -> Settings:
    return make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        batch={"max_rows": 1000},
        s3={"timeout_s": 5},
        http={"address": f"127.0.0.1:{free_port()}"},
        daemon={"shutdown_grace_s": 5, **daemon},
    )


T = (("table", "public.ecommerce_sales"),)


async def get(settings: Settings, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{settings.http.port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def scrape(settings: Settings) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = await get(settings, "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def settled(settings: Settings, rows: int) -> dict[tuple[str, Any], float]:
    """A scrape once the counters caught up with the ledger (they move just after the ledger
    commit, in the same task)."""
    for _ in range(100):
        metrics = await scrape(settings)
        if metrics[("cdc_rows_exported_total", T)] == rows:
            return metrics
        await asyncio.sleep(0.05)
    raise AssertionError(f"cdc_rows_exported_total never reached {rows}")


def ledger(dsn: str, query: str) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query).fetchone()
        assert row is not None
        return row[0] if len(row) == 1 else row


def uploaded_batches(dsn: str) -> int:
    return int(ledger(dsn, "SELECT count(*) FROM cdc.batches WHERE status = 'uploaded'"))


def by_status(status: str) -> tuple[tuple[str, str], ...]:
    return (("status", status), *T)  # labels in name order, as scrape() keeps them


async def test_status_and_metrics_match_the_ledger(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """After a real export of 3,000 rows in 3 batches: the counters of /metrics equal the
    ledger's sums (rows, CSV bytes, object bytes, objects), the batches gauge its counts by
    status, also after batches change status behind the daemon's back; ``status`` reports the
    running daemon (its ledger session's pid), nothing behind, the last batch, the failed and
    missing ones with their reasons and the oldest unreconciled one. Once stopped, ``status``
    says not running and counts the rows inserted since as behind."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 3000, days=3)
    settings = settings_with_http(pg_dsn, s3_server, bucket, tmp_path)
    async with running_daemon(settings):
        await wait_until(lambda: uploaded_batches(pg_dsn) == 3)
        rows, raw, size, objects = ledger(
            pg_dsn,
            "SELECT sum(rows), sum(raw_bytes), sum(size), sum(jsonb_array_length(objects))"
            " FROM cdc.batches",
        )
        metrics = await settled(settings, rows)
        assert rows == 3000
        assert metrics[("cdc_bytes_exported_total", T)] == raw
        assert metrics[("cdc_object_bytes_uploaded_total", T)] == size
        assert metrics[("cdc_objects_uploaded_total", T)] == objects
        assert metrics[("cdc_batches_committed_total", T)] == 3
        assert metrics[("cdc_batch_duration_seconds_count", T)] == 3
        assert metrics[("cdc_batches", by_status("uploaded"))] == 3
        assert metrics[("cdc_batches", by_status("pending"))] == 0
        assert metrics[("cdc_lock_held", T)] == 1
        assert metrics[("cdc_retries_total", (("boundary", "s3"),))] == 0
        assert metrics[("cdc_oldest_unreconciled_batch_age_seconds", T)] > 0
        assert ("process_resident_memory_bytes", ()) in metrics

        health, body = await get(settings, "/healthz")
        assert health == 200, body
        assert '"capture"' in body
        ready, body = await get(settings, "/readyz")
        assert ready == 200, body
        assert '"postgres": "ok"' in body
        assert '"s3": "ok"' in body

        # The reconciler's verdicts, written behind the daemon's back: both views follow.
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            first, second, third = [
                r[0] for r in conn.execute("SELECT batch_id FROM cdc.batches ORDER BY hi")
            ]
            batch = " WHERE producer = 'batch' AND producer_id = %s"
            conn.execute(
                "UPDATE cdc.deliveries SET status = 'loaded', loaded_at = now()" + batch,
                (first,),
            )
            conn.execute(
                "UPDATE cdc.deliveries SET status = 'failed', error = 'Numeric value out of range'"
                + batch,
                (second,),
            )
            conn.execute(
                "UPDATE cdc.deliveries SET status = 'missing', error = 'not in COPY_HISTORY'"
                + batch,
                (third,),
            )
        metrics = await scrape(settings)
        for state, n in {"loaded": 1, "failed": 1, "missing": 1, "uploaded": 0}.items():
            assert metrics[("cdc_batches", by_status(state))] == n

        report = (await collect(settings))["public.ecommerce_sales"]
        server_pid = ledger(
            pg_dsn,
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'cdc-daemon-ledger'",
        )
        assert report["running"]["pid"] == server_pid
        assert report["batches"] == {"loaded": 1, "failed": 1, "missing": 1}
        assert (report["rows"], report["objects"], report["bytes"]) == (3000, objects, size)
        assert report["watermark"] == 3000
        assert report["behind"] == {"rows": 0, "seconds": 0.0, "slot_lag_bytes": None}
        assert report["last_uploaded"]["batch_id"] == third
        assert report["last_loaded"]["batch_id"] == first
        assert [(b["batch_id"], b["error"]) for b in report["failed"]] == [
            (second, "Numeric value out of range")
        ]
        assert [(b["batch_id"], b["error"]) for b in report["missing"]] == [
            (third, "not in COPY_HISTORY")
        ]
        assert report["unfinished"] == []  # both are in S3
        assert report["oldest_unreconciled"]["batch_id"] == third
        text = render({"public.ecommerce_sales": report})
        assert "running" in text
        assert f"Postgres pid {server_pid}" in text
        assert "Numeric value out of range" in text
        assert "not in COPY_HISTORY" in text

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ecommerce_sales (invoice_no, stock_code, description, quantity,"
            " invoice_date, unit_price, customer_id, country) SELECT invoice_no, stock_code,"
            " description, quantity, invoice_date, unit_price, customer_id, country"
            " FROM ecommerce_sales ORDER BY id LIMIT 500"
        )
    report = (await collect(settings))["public.ecommerce_sales"]
    assert report["running"] is None
    assert report["behind"]["rows"] == 500
    assert report["behind"]["seconds"] > 0
    text = render({"t": report})
    assert "no (no session holds the table's lock)" in text
    assert "500 rows; the position last moved" in text


async def test_standby_waits_for_the_lock_then_takes_over(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """With ``daemon.wait_for_lock`` a second daemon for the same table does not run twice
    and does not exit: it is alive (/healthz 200) but not ready (/readyz 503) until the first
    one stops, then it takes the lock, becomes ready and exports the rows inserted since."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 1000, days=2)
    first_settings = settings_with_http(pg_dsn, s3_server, bucket, tmp_path / "a")
    standby_settings = settings_with_http(
        pg_dsn, s3_server, bucket, tmp_path / "b", wait_for_lock=True, lock_poll_s=0.1
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with running_daemon(first_settings) as first:
        await wait_until(lambda: uploaded_batches(pg_dsn) == 1)
        async with running_daemon(standby_settings) as standby:

            async def standby_answers() -> None:
                while True:
                    try:
                        await get(standby_settings, "/healthz")
                        return
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)

            await asyncio.wait_for(standby_answers(), 30)
            assert (await get(standby_settings, "/healthz"))[0] == 200
            status, body = await get(standby_settings, "/readyz")
            assert (status, '"waiting_for_lock"' in body) == (503, True), body
            metrics = await scrape(standby_settings)
            assert metrics[("cdc_lock_held", T)] == 0
            assert not standby.done()

            assert await first.stopped() == 0
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                generate_sales(conn, 500, days=1)  # appends: ids 1001..1500

            async def ready() -> None:
                status = 0
                while status != 200:
                    await asyncio.sleep(0.1)
                    status = (await get(standby_settings, "/readyz"))[0]

            await asyncio.wait_for(ready(), 30)
            await wait_until(
                lambda: (
                    ledger(pg_dsn, "SELECT max(hi) FROM cdc.batches WHERE status = 'uploaded'")
                    == 1500
                )
            )

            await settled(standby_settings, 500)


@pytest.mark.usefixtures("drop_slots")
def test_slot_lag_bytes_of_a_logical_slot(pg_dsn: str) -> None:
    """The logical-mode figure of ``status``: WAL written after a slot's confirmed position
    counts as lag, and grows with it; an unknown slot is None."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("SELECT pg_create_logical_replication_slot('ops_test', 'test_decoding')")
        before = slot_lag_bytes(conn, "ops_test")
        conn.execute("INSERT INTO t SELECT generate_series(1, 10000)")
        after = slot_lag_bytes(conn, "ops_test")
        assert before is not None
        assert after is not None
        assert after > before + 100_000  # 10,000 rows of WAL
        assert slot_lag_bytes(conn, "no_such_slot") is None


async def test_readiness_and_retries_follow_s3_faults(
    pg_dsn: str, s3_server: LocalS3, s3_proxy: FaultyProxy, bucket: str, tmp_path: Path
) -> None:
    """S3 answering errors makes /readyz 503 with the reason (and 200 again when it
    recovers); an upload that fails past botocore's own retries is retried by the daemon and
    counted in ``cdc_retries_total{boundary="s3"}``, and the rows still arrive."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 1000, days=1)
    settings = settings_with_http(pg_dsn, s3_server, bucket, tmp_path)
    settings = settings.model_copy(
        update={"s3": settings.s3.model_copy(update={"endpoint_url": s3_proxy.endpoint_url})}
    )
    async with running_daemon(settings):
        await wait_until(lambda: uploaded_batches(pg_dsn) == 1)
        assert (await get(settings, "/readyz"))[0] == 200
        s3_proxy.fail_next(4)  # botocore tries a request 4 times (3 retries)
        status, body = await get(settings, "/readyz")
        assert status == 503
        # botocore's retries back off between tries: on a loaded machine the check's own
        # deadline may come first. Either way S3 is what is not ready.
        assert "S3 answered 503" in body or "s3: no answer within" in body
        for _ in range(50):  # ready again once the faults are used up
            if (await get(settings, "/readyz"))[0] == 200:
                break
            await asyncio.sleep(0.2)
        assert (await get(settings, "/readyz"))[0] == 200
        assert (await scrape(settings))[("cdc_retries_total", (("boundary", "s3"),))] == 0

        # Every request of the next upload fails (two objects, four tries each): the step
        # fails, the daemon retries it.
        s3_proxy.fail_next(8)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            generate_sales(conn, 500, days=1)
        await wait_until(lambda: uploaded_batches(pg_dsn) == 2)
        metrics = await settled(settings, 1500)
        assert metrics[("cdc_retries_total", (("boundary", "s3"),))] >= 1
        assert metrics[("cdc_retries_total", (("boundary", "postgres"),))] == 0
        assert metrics[("cdc_rows_exported_total", T)] == 1500
        assert ledger(pg_dsn, "SELECT max(attempts) FROM cdc.batches") > 1


async def test_a_port_in_use_is_a_configuration_error(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """``http.address`` on a port another process holds: one sentence naming the key, exit
    code 2 (configuration), before any batch."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 10, days=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = make_settings(
            pg_dsn, s3_server, bucket, tmp_path, http={"address": f"127.0.0.1:{port}"}
        )
        with pytest.raises(ConfigError, match=r"cannot listen on http\.address") as raised:
            await export_until_idle(settings)
    assert raised.value.exit_code == 2
    assert ledger(pg_dsn, "SELECT count(*) FROM cdc.batches") == 0
