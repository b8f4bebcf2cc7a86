"""The watermark pipeline against a real Postgres and a real S3 server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdc_daemon.local.sample import generate_sales, load_online_retail, sample_path
from cdc_daemon.local.services import LocalS3
from cdc_daemon.state.store import Store
from tests.helpers import (
    assert_rebuilt_equals_source,
    export_until_idle,
    make_settings,
    object_bodies,
)


async def test_sample_round_trips_through_s3(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The shipped Online Retail sample comes back from the objects value for value, one object
    per day under <table>/dt=YYYY-MM-DD/, each with a header and only rows of its day."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        loaded = load_online_retail(conn, sample_path())
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path)
    assert await export_until_idle(settings) == 0
    bodies = assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    with psycopg.connect(pg_dsn) as conn:
        days = {
            str(d)
            for (d,) in conn.execute(
                "SELECT DISTINCT to_char(invoice_date AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
                " FROM ecommerce_sales"
            )
        }
    assert {k.split("/")[1] for k in bodies} == {f"dt={d}" for d in days}
    for key, body in bodies.items():
        assert key.startswith("public.ecommerce_sales/dt=")
        assert key.endswith(".csv.gz")
        header, *rows = body.decode().splitlines()
        assert header == (
            "id,invoice_no,stock_code,description,quantity,invoice_date,unit_price,"
            "customer_id,country,_cdc_op,_cdc_seq,_cdc_ts"
        )
        day = key.split("dt=")[1][:10]
        # Every row's invoice_date (an ISO UTC timestamp) falls on the object's day.
        assert all(f",{day}T" in r for r in rows if r.count(",") >= 11)
    assert loaded == 2207


async def test_csv_encoding_of_awkward_values(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """NULL is an empty unquoted field and '' is "", text with commas, quotes, newlines and
    non-ASCII is kept byte for byte, numerics keep their digits, timestamps are ISO-8601 UTC."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 0)
        conn.execute(
            "INSERT INTO ecommerce_sales (invoice_no, stock_code, description, quantity,"
            " invoice_date, unit_price, customer_id, country) VALUES"
            " ('1', 'A', NULL, 1, '2011-03-27 00:30:00+00', 0.001, NULL, 'X'),"
            " ('2', 'B', '', 2, '2011-03-27 01:30:00+01', 123456789.125, 7, 'X'),"
            " ('3', 'C', 'a,b \"quoted\"\r\nnext line £ 日本 🎉', 3,"
            "  '2010-12-01 08:26:00.123456+00', 2.5, 8, 'Y')"
        )
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path)
    await export_until_idle(settings)
    bodies = assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    data = b"".join(bodies[k] for k in sorted(bodies))
    assert b"\n1,1,A,,1,2011-03-27T00:30:00+00:00,0.001,,X,I,1," in data
    assert b'\n2,2,B,"",2,2011-03-27T00:30:00+00:00,123456789.125,7,X,I,2,' in data
    assert (
        '\n3,3,C,"a,b ""quoted""\r\nnext line £ 日本 🎉",3,2010-12-01T08:26:00.123456+00:00,'
        "2.500,8,Y,I,3,".encode()
    ) in data


@pytest.mark.parametrize("compression", ["zstd", "none"])
async def test_other_compressions(
    compression: str,
    pg_dsn: str,
    s3_server: LocalS3,
    bucket: str,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    """zstd objects end in .csv.zst, uncompressed ones in .csv; both round-trip."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 3000)
    settings = make_settings(
        pg_dsn, s3_server, bucket, tmp_path, batch={"compression": compression}
    )
    await export_until_idle(settings)
    bodies = assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    suffix = {"zstd": ".csv.zst", "none": ".csv"}[compression]
    assert bodies
    assert all(k.endswith(suffix) for k in bodies)


async def test_batches_close_at_max_rows(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """max_rows bounds every batch; the batches tile the ids without gap or overlap."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 2500, days=3)
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path, batch={"max_rows": 1000})
    await export_until_idle(settings)
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    store = await Store.connect(pg_dsn, "cdc")
    batches = await store.batches("public.ecommerce_sales")
    await store.close()
    assert [b.rows for b in batches] == [1000, 1000, 500]
    assert [b.hi for b in batches] == [1000, 2000, 2500]
    assert {b.status.value for b in batches} == {"uploaded"}


async def test_batches_close_at_max_bytes(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """max_bytes cuts a batch while it is read: a batch overshoots max_bytes by at most the
    rows between two checks (a sixteenth of a batch per day being written), and the cut
    batches still tile the ids."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 5000, days=3)
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path, batch={"max_bytes": 100_000})
    await export_until_idle(settings)
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    store = await Store.connect(pg_dsn, "cdc")
    batches = await store.batches("public.ecommerce_sales")
    await store.close()
    assert len(batches) >= 5
    header = 110
    assert all(b.raw_bytes - header * len(b.objects) <= 100_000 * 1.2 for b in batches)
    assert all(b.raw_bytes >= 100_000 for b in batches[:-1])
    assert [b.lo for b in batches[1:]] == [b.hi for b in batches[:-1]]


async def test_objects_are_multipart_above_part_size(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """An object larger than the part size goes up as a multipart upload and reads back whole."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 0)
        # One day, incompressible descriptions: one object of ~6 MiB compressed.
        conn.execute(
            "INSERT INTO ecommerce_sales (invoice_no, stock_code, description, quantity,"
            " invoice_date, unit_price, customer_id, country)"
            " SELECT g::text, 'S', md5(random()::text) || md5(random()::text) ||"
            " md5(random()::text), 1, '2011-01-01 10:00+00', 1, 1, 'UK'"
            " FROM generate_series(1, 120000) g"
        )
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path, s3={"part_size": 5 * 1024 * 1024})
    await export_until_idle(settings)
    [key] = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]]
    head = s3_client.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] > 5 * 1024 * 1024
    assert "-" in head["ETag"]  # a multipart ETag: md5-of-parts "-" part count
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


async def test_rerun_exports_only_new_rows(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A second run starts at the committed watermark: only rows inserted since are written."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 500)
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path)
    await export_until_idle(settings)
    first = set(object_bodies(s3_client, bucket))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 10)
    await export_until_idle(settings)
    second = object_bodies(s3_client, bucket)
    new = {k: v for k, v in second.items() if k not in first}
    assert sum(v.count(b"\n") - 1 for v in new.values()) == 10
    assert all("/00000000000000000500-00000000000000000510." in k for k in new)
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)


async def test_hostile_table_name_is_an_identifier(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """A table whose name holds quotes, a semicolon and SQL is captured as that table: the name
    is never spliced into a statement. Server-side encryption is asked for and applied."""
    name = 'sales "x"; DROP TABLE ecommerce_sales; --'
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 0)
        conn.execute(
            sql.SQL("CREATE TABLE {} (LIKE ecommerce_sales INCLUDING ALL)").format(
                sql.Identifier(name)
            )
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (invoice_no, stock_code, quantity, invoice_date, unit_price,"
                " country) VALUES ('1', 'S', 1, '2011-01-01', 1, 'UK')"
            ).format(sql.Identifier(name))
        )
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        postgres={"table": sql.Identifier("public", name).as_string(None)},
        capture={"partition_column": "invoice_date"},
        s3={"server_side_encryption": "AES256"},
    )
    assert await export_until_idle(settings) == 0
    [key] = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert key.startswith(f"public.{name}/dt=2011-01-01/")
    assert s3_client.head_object(Bucket=bucket, Key=key)["ServerSideEncryption"] == "AES256"
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM ecommerce_sales").fetchone() == (0,)
