"""``cdc-daemon backfill`` against a real Postgres and a real S3 server (in this process)."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdc_daemon.capture.backfill import parse_request, run_backfill
from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3
from cdc_daemon.ops.status import collect, render
from cdc_daemon.state.backfill import BackfillLedger
from cdc_daemon.state.store import SCHEMA_VERSION
from tests.e2e.daemon import write_config
from tests.fix_faults import FaultyProxy
from tests.helpers import (
    differences,
    export_until_idle,
    init_ledger,
    main_in_thread,
    make_settings,
    object_bodies,
    rebuild,
)

TABLE = "public.ecommerce_sales"
KEY = re.compile(
    r"^public\.ecommerce_sales/dt=(\d{4}-\d{2}-\d{2})/backfill-(\d{8}T\d{6}Z-[0-9a-f]{6})-"
    r"(\d{4}-\d{2}-\d{2})(-q)?\.csv\.gz$"
)


def key_parts(key: str) -> re.Match[str]:
    """The day, run id and chunk day of a backfill object's key, which must have that form."""
    match = KEY.match(key)
    assert match is not None, key
    return match


def csv_rows(body: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(body.decode(), newline="")))


def ledger_snapshot(dsn: str) -> tuple[Any, ...]:
    """The daemon's part of the ledger: its positions and its batches."""
    with psycopg.connect(dsn) as conn:
        positions = conn.execute(
            "SELECT table_name, low, high, state::text, updated_at FROM cdc.positions"
        ).fetchall()
        batches = conn.execute(
            "SELECT batch_id, status, objects::text, updated_at FROM cdc.batches ORDER BY 1"
        ).fetchall()
    return tuple(positions), tuple(batches)


def range_table(dsn: str, first: str, end: str, column: str = "invoice_date") -> int:
    """``range_src``: the source rows whose UTC partition day is in [first, end)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute("DROP TABLE IF EXISTS range_src CASCADE")
        conn.execute(
            sql.SQL(
                "CREATE TABLE range_src AS SELECT * FROM ecommerce_sales"
                " WHERE ({c} AT TIME ZONE 'UTC')::date >= %s"
                " AND ({c} AT TIME ZONE 'UTC')::date < %s"
            ).format(c=sql.Identifier(column)),
            (first, end),
        )
        row = conn.execute("SELECT count(*) FROM range_src").fetchone()
    assert row is not None
    return int(row[0])


async def test_backfill_equals_the_source_rows_of_the_range(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A backfill of [from, to) writes one object per day with rows, under
    <table>/dt=<day>/backfill-<run>-<day>.csv.gz (quarantined rows under _quarantine/), holding
    exactly the source rows of those days, value for value, none twice; each row is byte for
    byte the live export's row but for _cdc_ts, with _cdc_seq the id. The daemon's positions
    and batches are untouched, and the ledger has one finished run with a chunk per day."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 6000, days=20)
        conn.execute(
            "INSERT INTO ecommerce_sales (invoice_no, stock_code, description, quantity,"
            " invoice_date, unit_price, customer_id, country) VALUES"
            " ('1', 'A', NULL, 1, '2010-12-05 23:59:59.999999+00', 0.001, NULL, 'X'),"
            " ('2', 'B', '', 2, '2010-12-06 00:30:00+01', 7.125, 7, 'X'),"
            " ('3', 'C', 'a,b \"q\"\r\nline £ 日本', 3, '2010-12-04 08:00:00+00', 2.5, 8, 'Y'),"
            " ('4', 'D', 'nan', 4, '2010-12-07 12:00:00+00', 'NaN', 9, 'Z'),"
            " ('5', 'E', 'outside', 5, '2010-12-10 00:00:00+00', 1, 9, 'Z')"
        )
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await export_until_idle(settings) == 0
    live = object_bodies(s3_client, bucket)
    before = ledger_snapshot(pg_dsn)

    request = parse_request("2010-12-03", "2010-12-10", jobs="3", progress_interval_s="0.05")
    assert await run_backfill(settings, request) == 0

    after = object_bodies(s3_client, bucket)
    new = {k: v for k, v in after.items() if k not in live}
    assert {k: after[k] for k in live} == live  # live objects untouched
    assert ledger_snapshot(pg_dsn) == before  # watermark and batches untouched
    keys = sorted(k for k in new if not k.startswith("_quarantine/"))
    quarantine = [k for k in new if k.startswith("_quarantine/")]
    days = [f"2010-12-{d:02d}" for d in range(3, 10)]
    # The NaN row's warehouse form is in its day's -q object, beside the day's own.
    assert [key_parts(k).group(1) for k in keys] == sorted([*days, "2010-12-07"])
    assert [k for k in keys if key_parts(k).group(4)] == [
        f"public.ecommerce_sales/dt=2010-12-07/{key_parts(keys[0]).group(0).split('/')[-1]}".replace(
            key_parts(keys[0]).group(3), "2010-12-07"
        ).replace(".csv.gz", "-q.csv.gz")
    ]
    assert all(key_parts(k).group(3) == key_parts(k).group(1) for k in keys)
    assert len({key_parts(k).group(2) for k in keys}) == 1
    run_id = key_parts(keys[0]).group(2)
    assert quarantine == [
        f"_quarantine/public.ecommerce_sales/reason=nan-unit_price/backfill-{run_id}-2010-12-07.csv.gz"
    ]

    expected = range_table(pg_dsn, "2010-12-03", "2010-12-10")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        # Quarantined: the warehouse form withholds the value (NULL, named in the -q object).
        conn.execute("UPDATE range_src SET unit_price = NULL WHERE unit_price = 'NaN'")
    rebuild(pg_dsn, new, table="range_src")
    src, rebuilt, missing, extra = differences(pg_dsn, "range_src")
    assert (src, missing, extra) == (expected, 0, 0)
    assert rebuilt == expected
    with psycopg.connect(pg_dsn) as conn:
        raw = conn.execute("SELECT count(*), count(DISTINCT id) FROM range_src_raw").fetchone()
    assert raw == (expected, expected)  # no row twice

    # The same bytes as the live export, but for _cdc_ts; seq = id, op = I.
    live_rows = {
        r[0]: r
        for key, body in live.items()
        if not key.endswith("-q.csv.gz")
        for r in csv_rows(body)[1:]
    }
    header = csv_rows(next(iter(live.values())))[0]
    for key in new:
        rows = csv_rows(new[key])
        if key.endswith("-q.csv.gz"):
            assert rows[0] == [*header, "_cdc_quarantined"]
            assert [r[-1] for r in rows[1:]] == ["unit_price:nan"]
            continue
        assert rows[0] == header
        stamps = {r[-1] for r in rows[1:]}
        assert len(stamps) == 1
        for r in rows[1:]:
            assert r[:-1] == live_rows[r[0]][:-1]
            assert (r[-3], r[-2]) == ("I", r[0])
            if not key.startswith("_quarantine/"):
                assert r[5].startswith(key_parts(key).group(1))

    ledger = await BackfillLedger.connect(settings)
    run = await ledger.run(run_id)
    await ledger.close()
    assert run.status == "done"
    assert [c.day.isoformat() for c in run.chunks] == days
    assert {c.status for c in run.chunks} == {"uploaded"}
    assert sum(c.rows or 0 for c in run.chunks) == expected
    assert sum(c.objects for c in run.chunks) == len(new)
    # `status` shows the run and its progress.
    (shown,) = (await collect(settings))["public.ecommerce_sales"]["backfill_runs"]
    assert (shown["run_id"], shown["status"]) == (run_id, "done")
    assert (shown["days_done"], shown["days"], shown["rows"]) == (len(days), len(days), expected)
    assert run_id in render(await collect(settings))


@pytest.mark.parametrize(
    ("column", "kind"),
    [("d", "date"), ("ts", "timestamp"), ("tz", "timestamptz")],
)
async def test_days_follow_the_live_routing(
    column: str,
    kind: str,
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    """For date, timestamp and timestamptz partition columns, the rows a backfill picks for a
    day are exactly those the live path puts in that day's folder (UTC day; a timestamp's own
    day), also next to midnight and for offsets that move a row to another UTC day."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'America/Sao_Paulo'")
        conn.execute(
            "CREATE TABLE ecommerce_sales (id bigserial PRIMARY KEY, d date, ts timestamp,"
            " tz timestamptz, note text)"
        )
        conn.execute(f"CREATE INDEX ON ecommerce_sales ({column})")
        values = [
            "2011-01-01 23:59:59.999999",
            "2011-01-02 00:00:00",
            "2011-01-02 23:30:00",
            "2011-01-03 00:00:00",
            "2011-01-03 21:30:00",
            "2010-12-31 23:00:00",
            None,
        ]
        for v in values:
            conn.execute(
                "INSERT INTO ecommerce_sales (d, ts, tz, note) VALUES"
                " (%s::timestamp::date, %s::timestamp, %s::timestamptz, 'x')",
                (v, v, v),
            )
    settings = make_settings(
        pg_dsn, s3_server, bucket, tmp_path, capture={"partition_column": column}
    )
    await init_ledger(settings)
    # The live routing: what the daemon writes for the whole table.
    assert await export_until_idle(settings) == 0
    live = object_bodies(s3_client, bucket)
    live_days = {
        k.split("/")[1][3:]: sorted(r[0] for r in csv_rows(v)[1:]) for k, v in live.items()
    }
    request = parse_request("2011-01-02", "2011-01-04")
    assert await run_backfill(settings, request) == 0
    new = {k: v for k, v in object_bodies(s3_client, bucket).items() if k not in live}
    got = {k.split("/")[1][3:]: sorted(r[0] for r in csv_rows(v)[1:]) for k, v in new.items()}
    assert got == {d: ids for d, ids in live_days.items() if "2011-01-02" <= d < "2011-01-04"}
    assert got  # the range is not empty for any kind


async def test_dry_run_writes_nothing(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--dry-run prints the days, their row counts, the object count and key pattern, and
    writes no object and no ledger row."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 1000, days=10)
        counts: dict[str, int] = dict(
            conn.execute(
                "SELECT (invoice_date AT TIME ZONE 'UTC')::date::text, count(*)"
                " FROM ecommerce_sales GROUP BY 1"
            ).fetchall()
        )
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path)
    await init_ledger(settings)
    request = parse_request("2010-12-02", "2010-12-05", dry_run=True)
    assert await run_backfill(settings, request) == 0
    out = capsys.readouterr().out
    for day in ("2010-12-02", "2010-12-03", "2010-12-04"):
        assert re.search(rf"{day}\s+{counts[day]:,}\b", out), out
    assert not re.search(r"^\s+2010-12-0[15]\s", out, re.MULTILINE)  # [from, to) only
    total = sum(counts[d] for d in ("2010-12-02", "2010-12-03", "2010-12-04"))
    assert f"3 day(s) with rows, {total:,} rows" in out
    assert "3 object(s)" in out
    assert "Nothing was written" in out
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM cdc.backfill_runs").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM cdc.backfill_chunks").fetchone() == (0,)


@pytest.mark.parametrize(
    ("args", "env", "code", "says"),
    [
        (["--from", "2010-12-05", "--to", "2010-12-05"], {}, 2, "--to 2010-12-05 must be after"),
        (["--from", "2010-12-05", "--to", "2010-12-01"], {}, 2, "must be after --from"),
        (["--from", "2010-12-1", "--to", "2010-12-05"], {}, 2, "not a date of the form"),
        (["--from", "20101201", "--to", "2010-12-05"], {}, 2, "not a date of the form"),
        (["--from", "2010-12-01", "--to", "2011-02-30"], {}, 2, "not a valid date"),
        (["--from", "2010-12-01", "--to", "2010-12-05", "--jobs", "0"], {}, 2, "--jobs"),
        (
            ["--from", "2010-12-01", "--to", "2010-12-05"],
            {"partition_column": "nope"},
            3,
            "has no column 'nope'",
        ),
        (
            ["--from", "2010-12-01", "--to", "2010-12-05", "--resume"],
            {},
            2,
            "no unfinished backfill",
        ),
    ],
)
async def test_bad_input_is_one_sentence(
    args: list[str],
    env: dict[str, str],
    code: int,
    says: str,
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A wrong date, an empty or reversed range, a bad --jobs, an unknown partition column or
    a --resume with nothing to resume end with one sentence on stderr and a non-zero exit."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 100, days=10)
    await init_ledger(make_settings(pg_dsn, s3_server, bucket, tmp_path))
    config = write_config(tmp_path, pg_dsn, s3_server, bucket, capture=env)
    assert await main_in_thread(["--config", str(config), "backfill", *args]) == code
    err = capsys.readouterr().err
    assert err.startswith("cdc-daemon: ")
    assert err.count("\n") == 1
    assert says in err
    assert "Traceback" not in err


async def test_a_ledger_without_backfill_tables_asks_for_init(
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A ledger made before backfill existed: one sentence that says to run init (which then
    adds the tables and bumps the schema version)."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 100, days=10)
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path)
    await init_ledger(settings)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE cdc.backfill_chunks, cdc.backfill_runs")
        conn.execute("UPDATE cdc.meta SET value = '1' WHERE key = 'schema_version'")
    config = write_config(tmp_path, pg_dsn, s3_server, bucket)
    args = ["--config", str(config), "backfill", "--from", "2010-12-01", "--to", "2010-12-02"]
    assert await main_in_thread(args) == 4
    assert "run `cdc-daemon init`" in capsys.readouterr().err
    await init_ledger(settings)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT value FROM cdc.meta").fetchone() == (str(SCHEMA_VERSION),)
    assert await main_in_thread(args) == 0


def test_parse_request_defaults() -> None:
    """[from, to) as dates, 4 jobs, no resume, no dry run by default."""
    request = parse_request("2010-12-01", "2010-12-31")
    assert (request.day_from, request.day_to, request.jobs) == (
        date(2010, 12, 1),
        date(2010, 12, 31),
        4,
    )
    assert not request.resume
    assert not request.dry_run


async def test_s3_errors_are_retried_with_the_same_bytes(
    pg_dsn: str,
    s3_server: LocalS3,
    s3_proxy: FaultyProxy,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """S3 answering 503 beyond botocore's own retries fails a chunk's upload after its intent
    record; the chunk is retried (logged, counted on the chunk) with the recorded _cdc_ts, so
    the same bytes, and the run ends with one object per day holding every row once."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 2000, days=4)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        s3={"endpoint_url": s3_proxy.endpoint_url},
        daemon={"retry_max_wait_s": 0.2},
    )
    await init_ledger(settings)

    async def fail_the_first_uploads() -> None:
        # The first request is the bucket check; the next ones are the first chunk's PUT
        # (3 attempts by botocore, then one more after the chunk is retried).
        while s3_proxy.requests == 0:  # noqa: ASYNC110 - a counter in another thread
            await asyncio.sleep(0.001)
        s3_proxy.fail_next(4)

    injector = asyncio.create_task(fail_the_first_uploads())
    request = parse_request("2010-12-01", "2010-12-05", jobs="1")
    assert await run_backfill(settings, request) == 0
    await injector
    assert s3_proxy.injected == 4
    with psycopg.connect(pg_dsn) as conn:
        attempts = conn.execute(
            "SELECT c.day::text, d.attempts FROM cdc.backfill_chunks c JOIN cdc.deliveries d"
            " ON d.producer = 'backfill' AND d.producer_id = c.delivery ORDER BY 1"
        ).fetchall()
    assert attempts == [("2010-12-01", 2), ("2010-12-02", 1), ("2010-12-03", 1), ("2010-12-04", 1)]
    out = capsys.readouterr().out
    assert re.search(r"backfill_chunk_failed .*day=2010-12-01 .*SlowDown", out)
    assert re.search(r"backfill_chunk_uploaded .*day=2010-12-01 .*redo=True", out)
    assert "changed_on_redo" not in out  # the same _cdc_ts, the same bytes
    bodies = object_bodies(s3_client, bucket)
    assert len(bodies) == 4
    expected = range_table(pg_dsn, "2010-12-01", "2010-12-05")
    rebuild(pg_dsn, bodies, table="range_src")
    assert differences(pg_dsn, "range_src") == (expected, expected, 0, 0)


async def test_a_range_without_rows_is_a_finished_empty_run(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """Days without rows are no chunks: a range without rows ends at once, recorded as a
    finished run with no chunk, and writes no object."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 100, days=3)
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path)
    await init_ledger(settings)
    assert await run_backfill(settings, parse_request("2012-01-01", "2012-02-01")) == 0
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT status FROM cdc.backfill_runs").fetchall() == [("done",)]
        assert conn.execute("SELECT count(*) FROM cdc.backfill_chunks").fetchone() == (0,)
