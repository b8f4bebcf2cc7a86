"""Hostile values of every type: each lands in S3 exactly as a CSV reader gets it back, or its
row goes to the quarantine prefix with the reason. Never altered, never a crash."""

from __future__ import annotations

import datetime as dt
import gzip
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_daemon.local.services import LocalS3
from tests.helpers import export_until_idle, make_settings

TABLE = """
CREATE TABLE IF NOT EXISTS hostile (
    id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT '2011-01-01 10:00+00',
    t text, n numeric, n12 numeric(12,3), f float8, ts timestamptz, tsl timestamp, d date,
    b bytea
)
"""
COLUMNS = ["t", "n", "n12", "f", "ts", "tsl", "d", "b"]

texts = st.one_of(
    st.none(),
    st.just(""),
    st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40),
    st.sampled_from(['"', ",", "\r\n", "\\", "\t", "NULL", "\\N", "日本 🎉", "x" * 1_000_000]),
)
numerics = st.one_of(
    st.none(),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.sampled_from(
        [
            Decimal("NaN"),
            Decimal("Infinity"),
            Decimal("-Infinity"),
            Decimal("12345678901234567890.123456789012345678901"),
            Decimal("1E+40"),
            Decimal("-0.000"),
        ]
    ),
)
numeric12 = st.one_of(
    st.none(),
    st.decimals(min_value=-999_999_999, max_value=999_999_999, places=3),
    st.just(Decimal("NaN")),
)
floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))
special_ts = ["infinity", "-infinity", "0044-03-15 12:00:00 BC", "20000-01-01 00:00:00"]
timestamps = st.one_of(
    st.none(),
    st.datetimes(
        min_value=dt.datetime(1, 1, 2),  # noqa: DTZ001 - hypothesis wants naive bounds
        max_value=dt.datetime(9999, 12, 30),  # noqa: DTZ001
        timezones=st.sampled_from(
            [
                dt.UTC,
                dt.timezone(dt.timedelta(hours=5, minutes=30)),
                dt.timezone(dt.timedelta(hours=-11)),
            ]
        ),
    ).map(lambda v: v.isoformat()),
    st.sampled_from(special_ts),
)
local_timestamps = st.one_of(
    st.none(), st.datetimes().map(lambda v: v.isoformat()), st.sampled_from(special_ts)
)
dates = st.one_of(
    st.none(),
    st.dates().map(str),
    st.sampled_from(["infinity", "-infinity", "0010-01-01 BC", "12000-01-01"]),
)
blobs = st.one_of(st.none(), st.binary(max_size=40))
rows = st.tuples(texts, numerics, numeric12, floats, timestamps, local_timestamps, dates, blobs)


def expected_reason(conn: psycopg.Connection[Any], row_id: int) -> str | None:
    """The first check that fails, in table column order, computed independently in Python
    from the values Postgres holds."""
    values = conn.execute(
        "SELECT n, f, ts::text, tsl::text, d::text,"
        " n = 'NaN', (n <> 'NaN' AND abs(n) >= 1e29), (n <> 'NaN' AND n <> round(n, 9)),"
        " n12 = 'NaN'"
        " FROM hostile WHERE id = %s",
        (row_id,),
    ).fetchone()
    assert values is not None
    n, _, ts, tsl, d, n_nan, n_range, n_inexact, n12_nan = values
    # n is unconstrained: NUMBER(38, 9) in Snowflake.
    if n_nan:
        return "nan-n"
    if n_range or (n is not None and str(n) in ("Infinity", "-Infinity")):
        return "numeric_out_of_range-n"
    if n_inexact:
        return "numeric_inexact-n"
    if n12_nan:
        return "nan-n12"
    for name, text in (("ts", ts), ("tsl", tsl), ("d", d)):
        if text is None:
            continue
        if text in ("infinity", "-infinity"):
            return f"infinite-{name}"
        if text.endswith(" BC"):
            return f"before_year_1-{name}"
        if len(text.split("-")[0]) > 4:
            return f"after_year_9999-{name}"
    return None


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(rows, min_size=1, max_size=15))
async def test_every_value_lands_exactly_or_is_quarantined(
    batch: list[tuple[Any, ...]],
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    """Each example inserts rows of hostile values and exports them. Then, for the whole
    table: every id is in exactly one loadable object; quarantined rows sit under
    _quarantine/<table>/reason=<why>/ with the reason Python expects, and also in their day's
    ``-q`` object with every value Snowflake cannot hold NULL and named in _cdc_quarantined;
    every other row and value, read back with COPY (NULL vs "" as Snowflake's file format
    reads them; float NaN and infinities as NaN, inf, -inf), equals the source."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(TABLE)
        for values in batch:
            conn.execute(
                "INSERT INTO hostile (t, n, n12, f, ts, tsl, d, b)"
                " VALUES (%s, %s, %s, %s, %s::timestamptz, %s::timestamp, %s::date, %s)",
                values,
            )
    settings_ = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        postgres={"table": "public.hostile"},
        capture={"partition_column": "at"},
    )
    assert await export_until_idle(settings_) == 0

    normal: dict[str, bytes] = {}
    withheld: dict[str, bytes] = {}
    quarantine_bodies: dict[str, bytes] = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            key = item["Key"]
            body = gzip.decompress(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
            if key.startswith("_quarantine/public.hostile/reason="):
                quarantine_bodies[key] = body
            elif key.endswith("-q.csv.gz"):
                withheld[key] = body
            else:
                assert key.startswith("public.hostile/dt=2011-01-01/"), key
                normal[key] = body

    quarantined: dict[int, str] = {}
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TEMP TABLE q (id bigint, at text, t text, n text, n12 text, f text,"
            " ts text, tsl text, d text, b text, _cdc_op text, _cdc_seq text, _cdc_ts text)"
        )
        for key, body in quarantine_bodies.items():
            reason = key.split("reason=")[1].split("/")[0]
            conn.execute("TRUNCATE q")
            with conn.cursor().copy("COPY q FROM STDIN (FORMAT csv, HEADER true)") as copy:
                copy.write(body)
            for (row_id,) in conn.execute("SELECT id FROM q"):
                assert row_id not in quarantined
                quarantined[row_id] = reason

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute(
            "CREATE TEMP TABLE back (id bigint, at timestamptz, t text, n numeric,"
            " n12 numeric(12,3), f float8, ts timestamptz, tsl timestamp, d date, b text,"
            " _cdc_op text, _cdc_seq bigint, _cdc_ts timestamptz)"
        )
        for body in normal.values():
            with conn.cursor().copy("COPY back FROM STDIN (FORMAT csv, HEADER true)") as copy:
                copy.write(body)
        back_ids = {r[0] for r in conn.execute("SELECT id FROM back")}
        all_ids = {r[0] for r in conn.execute("SELECT id FROM hostile")}
        assert back_ids.isdisjoint(quarantined)
        assert back_ids | set(quarantined) == all_ids
        for row_id in all_ids:
            assert quarantined.get(row_id) == expected_reason(conn, row_id), row_id
        conn.execute("CREATE TEMP TABLE held (LIKE back, _cdc_quarantined text)")
        for body in withheld.values():
            with conn.cursor().copy("COPY held FROM STDIN (FORMAT csv, HEADER true)") as copy:
                copy.write(body)
        held = {
            r[0]: (r[1], r[2])
            for r in conn.execute(
                "SELECT h.id, h._cdc_quarantined, row(h.t, h.n, h.n12, h.f, h.ts, h.tsl, h.d,"
                " h.b) IS NOT DISTINCT FROM row(o.t, CASE WHEN h.n IS NULL THEN NULL ELSE o.n"
                " END, CASE WHEN h.n12 IS NULL THEN NULL ELSE o.n12 END, o.f, CASE WHEN h.ts"
                " IS NULL THEN NULL ELSE o.ts END, CASE WHEN h.tsl IS NULL THEN NULL ELSE"
                " o.tsl END, CASE WHEN h.d IS NULL THEN NULL ELSE o.d END, encode(o.b, 'hex'))"
                " FROM held h JOIN hostile o USING (id)"
            )
        }
        assert conn.execute("SELECT count(*) FROM held").fetchone() == (len(held),)
        assert set(held) == set(quarantined)
        for row_id, reason in quarantined.items():
            named, others_equal = held[row_id]
            why, _, column = reason.partition("-")
            # The first reason's column is named (with any later ones) and withheld.
            assert f"{column}:{why}" in named.split(";"), (row_id, named)
            assert others_equal, row_id
        differing = conn.execute(
            "SELECT count(*) FROM ("
            " SELECT id, at, t, n, n12, f, ts, tsl, d, encode(b, 'hex') FROM hostile"
            "  WHERE id = ANY(%s)"
            " EXCEPT ALL SELECT id, at, t, n, n12, f, ts, tsl, d, b FROM back) x",
            (list(back_ids),),
        ).fetchone()
        assert differing == (0,)
