"""Rows that commit late: a transaction holds a lower id open while later rows are exported."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_daemon.config import Settings
from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3
from cdc_daemon.state.store import Store
from tests.helpers import (
    assert_rebuilt_equals_source,
    export_until_idle,
    fetch_one,
    make_settings,
    running_daemon,
    wait_until,
)

INSERT = (
    "INSERT INTO ecommerce_sales (invoice_no, stock_code, description, quantity, invoice_date,"
    " unit_price, customer_id, country) VALUES (%s, 'S', 'late', 1, now(), 1, 1, 'UK')"
    " RETURNING id"
)


def exported_ids(s3_client: Any, bucket: str) -> set[int]:
    from tests.helpers import object_bodies

    ids = set()
    for body in object_bodies(s3_client, bucket).values():
        for line in body.decode().splitlines()[1:]:
            ids.add(int(line.split(",", 1)[0]))
    return ids


async def position(dsn: str) -> int | None:
    store = await Store.connect(dsn, "cdc")
    try:
        return (await store.position("public.ecommerce_sales", "watermark")).position
    finally:
        await store.close()


async def assert_all_exported(
    settings: Settings, pg_dsn: str, s3_client: Any, bucket: str, ids: set[int], last: int
) -> None:
    """After the late transaction ended: one more run exports exactly ``ids``, the objects
    rebuild the source, and the run after it moves the watermark to ``last``."""
    await export_until_idle(settings)
    assert exported_ids(s3_client, bucket) == ids
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    await export_until_idle(settings)
    assert await position(pg_dsn) == last


@pytest.mark.parametrize("ends_with", ["commit", "rollback"])
async def test_late_commit_is_exported(
    ends_with: str,
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    """Transaction A takes id 11 and stays open; B commits ids 12..20; the daemon exports
    12..20 without waiting for A; A commits; the next run exports 11. If A rolls back instead,
    the gap is forgotten once A has ended and the watermark moves to 20."""
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path)
    with psycopg.connect(pg_dsn, autocommit=True) as setup:
        generate_sales(setup, 10, days=1)
    await export_until_idle(settings)
    assert exported_ids(s3_client, bucket) == set(range(1, 11))

    with psycopg.connect(pg_dsn) as late, psycopg.connect(pg_dsn, autocommit=True) as other:
        (late_id,) = fetch_one(late.execute(INSERT, ("late",)))
        for n in range(9):
            other.execute(INSERT, (f"on-time-{n}",))
        assert late_id == 11

        await export_until_idle(settings)
        assert exported_ids(s3_client, bucket) == set(range(1, 21)) - {11}
        assert await position(pg_dsn) == 10  # 11 may still come: the watermark stays below it

        if ends_with == "commit":
            late.commit()
        else:
            late.rollback()

    expected = set(range(1, 21)) - ({11} if ends_with == "rollback" else set())
    await assert_all_exported(settings, pg_dsn, s3_client, bucket, expected, 20)


async def test_id_taken_before_the_row_is_written(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A transaction that draws nextval() first and inserts later (it has no xid in between,
    only a virtual transaction id) is still waited for: its row is exported once it commits."""
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path)
    with psycopg.connect(pg_dsn, autocommit=True) as setup:
        generate_sales(setup, 5, days=1)
    with psycopg.connect(pg_dsn) as late, psycopg.connect(pg_dsn, autocommit=True) as other:
        (taken,) = fetch_one(
            late.execute("SELECT nextval(pg_get_serial_sequence('ecommerce_sales', 'id'))")
        )
        other.execute(INSERT, ("after",))
        await export_until_idle(settings)
        assert exported_ids(s3_client, bucket) == {1, 2, 3, 4, 5, 7}
        late.execute(
            "INSERT INTO ecommerce_sales (id, invoice_no, stock_code, description, quantity,"
            " invoice_date, unit_price, customer_id, country)"
            " VALUES (%s, 'x', 'S', 'drawn early', 1, now(), 1, 1, 'UK')",
            (taken,),
        )
        late.commit()
    await export_until_idle(settings)
    assert exported_ids(s3_client, bucket) == {1, 2, 3, 4, 5, 6, 7}
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


async def test_watermark_never_passes_a_late_row_still_waiting(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """With max_age_s > 0 a late row may wait before it is copied; meanwhile the transaction
    that held it has ended, so its fence retires. The committed watermark must still stay below
    the late row until the row is in S3 (the watermark means "exported and final")."""
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path, batch={"max_age_s": 1.5})
    with psycopg.connect(pg_dsn, autocommit=True) as setup:
        generate_sales(setup, 10, days=1)
    async with running_daemon(settings):
        await wait_until(lambda: exported_ids(s3_client, bucket) == set(range(1, 11)))
        with psycopg.connect(pg_dsn) as late, psycopg.connect(pg_dsn, autocommit=True) as other:
            late.execute(INSERT, ("late",))
            for n in range(9):
                other.execute(INSERT, (f"on-time-{n}",))
            await wait_until(lambda: exported_ids(s3_client, bucket) == set(range(1, 21)) - {11})
            late.commit()
        watermarks = []
        while True:
            # The position first, then S3: a position read before 11 is in S3 must be below
            # it (read the other way round, the upload and commit could fall in between).
            watermark = await position(pg_dsn)
            if 11 in exported_ids(s3_client, bucket):
                break
            watermarks.append(watermark)
            await asyncio.sleep(0.05)
        assert watermarks, "the late row should have waited for max_age_s"
        assert all(w is not None and w < 11 for w in watermarks), watermarks
        await wait_until(lambda: asyncio.run(position(pg_dsn)) == 20)
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


async def test_absent_ids_inside_a_planned_range(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The ids of a batch are taken as a range without counting them first while they have
    been dense; an id absent inside it (held by an open transaction, or rolled back) must
    still end up a gap: here id 5 is the last id of the first planned range of 5 and id 13
    one in the middle of a later one. Both are waited for, 5 is exported once it commits,
    and the watermark reaches the end once 13's transaction has ended."""
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path, batch={"max_rows": 5})
    with psycopg.connect(pg_dsn, autocommit=True) as setup:
        generate_sales(setup, 4, days=1)
    with psycopg.connect(pg_dsn) as late, psycopg.connect(pg_dsn, autocommit=True) as other:
        (late_id,) = fetch_one(late.execute(INSERT, ("late",)))
        assert late_id == 5
        for n in range(7):
            other.execute(INSERT, (f"on-time-{n}",))
        with other.transaction():
            (gone,) = fetch_one(other.execute(INSERT, ("rolled back",)))
            assert gone == 13
            raise psycopg.Rollback()
        for n in range(4):
            other.execute(INSERT, (f"after-{n}",))

        await export_until_idle(settings)
        assert exported_ids(s3_client, bucket) == set(range(1, 18)) - {5, 13}
        waiting = await position(pg_dsn)
        assert waiting is None or waiting < 5  # 5 may still come
        late.commit()

    await assert_all_exported(settings, pg_dsn, s3_client, bucket, set(range(1, 18)) - {13}, 17)


async def test_many_gaps_at_once(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """More absent ids than the ORed form of the gap test takes (40 rollbacks while a late
    transaction holds id 3 open): the late row is still found among them and exported."""
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path)
    with psycopg.connect(pg_dsn, autocommit=True) as setup:
        generate_sales(setup, 2, days=1)
    committed = {1, 2}
    with psycopg.connect(pg_dsn) as late, psycopg.connect(pg_dsn, autocommit=True) as other:
        (late_id,) = fetch_one(late.execute(INSERT, ("late",)))
        assert late_id == 3
        for n in range(40):
            (kept,) = fetch_one(other.execute(INSERT, (f"kept-{n}",)))
            committed.add(kept)
            with other.transaction():
                other.execute(INSERT, (f"rolled-back-{n}",))
                raise psycopg.Rollback()
        await export_until_idle(settings)
        assert exported_ids(s3_client, bucket) == committed
        late.commit()
    await export_until_idle(settings)
    assert exported_ids(s3_client, bucket) == committed | {3}
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
