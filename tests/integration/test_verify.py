"""``cdc-daemon verify`` against the local warehouse, on tables not written for this project:
pgbench's, the many-types table (uuid key, jsonb, arrays, numeric, bytea, enum, TOASTed text)
and the table of the other types (composite text + integer key, real, double, varchar(n),
char(n), time, json, interval, inet, timestamptz, numeric(20,5), numeric(40,2))."""

from __future__ import annotations

import asyncio
import io
import json
import random
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from cdc_daemon.capture.backfill import parse_request, run_backfill
from cdc_daemon.cli import init, verify
from cdc_daemon.errors import ConfigError
from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3
from cdc_daemon.local.warehouse import LocalWarehouse
from cdc_daemon.ops.metrics import Metrics
from cdc_daemon.ops.status import collect, render
from cdc_daemon.reconcile.verify import RollingVerifier, TableResult, TableVerifier, verify_group
from cdc_daemon.source.session import connect
from cdc_daemon.warehouse.client import Warehouse
from tests.fix_warehouse import start_warehouse
from tests.helpers import export_until_idle, make_settings, wait_until
from tests.integration.test_warehouse_groups import MORE_TYPES, create_more_types
from tests.schemas import MANY_TYPES, create_many_types, pgbench_init, random_group_changes

SYNC = "-c synchronous_commit=on"


@pytest.fixture
def group(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> Iterator[LocalWarehouse]:
    pgbench_init(pg_dsn)
    create_many_types(pg_dsn, 300)
    create_more_types(pg_dsn)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        tables=[
            {"name": t}
            for t in ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", MANY_TYPES)
        ]
        + [{"name": MORE_TYPES}],
        capture={"mode": "logical", "group": "shop"},
        batch={"max_rows": 50_000},
    )
    wh = start_warehouse(settings, warehouse_dir)
    yield wh
    wh.stop()


async def _loaded(pg_dsn: str, group: LocalWarehouse) -> None:
    settings = group.settings
    assert await init(settings) == 0
    assert await export_until_idle(settings) == 0
    random_group_changes(pg_dsn, random.Random(5), 60)
    with psycopg.connect(pg_dsn, options=SYNC) as conn:
        conn.execute(f"UPDATE {MORE_TYPES} SET j = NULL, r = r + 1 WHERE n % 5 = 0")
        conn.execute(f"DELETE FROM {MORE_TYPES} WHERE n % 9 = 0")
        conn.commit()
    assert await export_until_idle(settings) == 0
    group.pump_until_quiet()


def _by_table(results: list[TableResult]) -> dict[str, TableResult]:
    return {r.warehouse_table: r for r in results}


async def test_verify_names_each_tampered_value_and_repair_fixes_exactly_those(
    pg_dsn: str, group: LocalWarehouse
) -> None:
    """After a snapshot and random inserts, updates and deletes, every table verifies equal
    with two aggregate queries and no row fetched. Then, in the warehouse, one value of each
    hashed type is changed, a value made NULL, a row deleted, a row added and a key changed:
    verify names exactly those keys, with the columns and both values, and nothing else. A
    float changed alone is named when its range is fetched; in a range whose other rows are
    equal it hashes the same (floats are hashed by NULL or not: the documented limit, named
    in the output). ``--repair`` exports those keys again (logical mode: at a WAL position
    past every open transaction); once merged, every table verifies equal."""
    await _loaded(pg_dsn, group)
    settings = group.settings
    results = _by_table(verify_group(settings))
    assert set(results) == {
        "PGBENCH_ACCOUNTS",
        "PGBENCH_BRANCHES",
        "PGBENCH_TELLERS",
        "MANY_TYPES",
        "MORE_TYPES",
    }
    for r in results.values():
        assert r.equal, r.lines()
        assert r.source_rows == r.warehouse_rows > 0
        assert (r.ranges, r.rows_fetched) == (1, 0), r.lines()
    assert results["MORE_TYPES"].null_only_columns == ("r", "d", "j")

    with psycopg.connect(pg_dsn) as conn:
        ids = [str(r[0]) for r in conn.execute(f"SELECT id FROM {MANY_TYPES} ORDER BY id LIMIT 8")]
        more = conn.execute(f"SELECT code, n FROM {MORE_TYPES} ORDER BY code, n LIMIT 6").fetchall()
    tamper = {
        ids[0]: ("AMOUNT = AMOUNT + 1", "amount"),
        ids[1]: ('"AT" = DATEADD(SECOND, 1, "AT")', "at"),
        ids[2]: ('"DAY" = DATEADD(DAY, 1, "DAY")', "day"),
        ids[3]: ("FLAG = NOT FLAG", "flag"),
        ids[4]: ("RAW = TO_BINARY('00', 'HEX')", "raw"),
        ids[5]: ("FEELING = 'nope'", "feeling"),
    }
    for key, (change, _) in tamper.items():
        group.query(f"UPDATE {MANY_TYPES} SET {change} WHERE ID = %(k)s", {"k": key})
    group.query(f"DELETE FROM {MANY_TYPES} WHERE ID = %(k)s", {"k": ids[6]})
    group.query(
        f"UPDATE {MANY_TYPES} SET ID = 'ffffffff-0000-0000-0000-000000000000' WHERE ID = %(k)s",
        {"k": ids[7]},
    )
    (code0, n0), (code1, n1), (code2, n2), (code3, n3) = more[:4]
    more_tamper = [
        ((code0, n0), "V = V || 'x'", "v"),
        ((code1, n1), "TZ = DATEADD(MICROSECOND, 1, TZ)", "tz"),
        ((code2, n2), "P = P + 0.00001, D = D + 1", "p"),
        ((code3, n3), "T = NULL", "t"),
    ]
    for (code, n), change, _ in more_tamper:
        group.query(
            f"UPDATE {MORE_TYPES} SET {change} WHERE CODE = %(c)s AND N = %(n)s",
            {"c": code, "n": n},
        )
    # A float changed alone: not seen.
    (code4, n4) = more[4]
    group.query(
        f"UPDATE {MORE_TYPES} SET R = R + 1 WHERE CODE = %(c)s AND N = %(n)s",
        {"c": code4, "n": n4},
    )

    results = _by_table(verify_group(settings))
    many = results["MANY_TYPES"]
    found = {d.key["id"]: d for d in many.differences}
    assert set(found) == {*tamper, ids[6], ids[7], "ffffffff-0000-0000-0000-000000000000"}
    for key, (_, column) in tamper.items():
        assert found[key].kind == "changed"
        assert [c.column for c in found[key].columns] == [column]
    assert found[ids[6]].kind == "missing"
    assert found[ids[7]].kind == "missing"
    assert found["ffffffff-0000-0000-0000-000000000000"].kind == "extra"
    flag = found[ids[3]].columns[0]
    assert {flag.source, flag.warehouse} == {"true", "false"}

    more_r = results["MORE_TYPES"]
    got = {(d.key["code"], d.key["n"]): d for d in more_r.differences}
    # The whole table is one fetched range (under FETCH_ROWS rows): the float changed alone is
    # named too, and the float d changed with p.
    assert set(got) == {k for k, _, _ in more_tamper} | {(code4, n4)}
    for more_key, _, column in more_tamper:
        columns = [c.column for c in got[more_key].columns]
        assert columns == (["d", "p"] if column == "p" else [column])  # in column order
    assert [c.column for c in got[(code4, n4)].columns] == ["r"]
    assert got[(code3, n3)].columns[0].warehouse is None
    # Ranges of two rows: the float changed alone hashes the same (the documented limit).
    (more_table,) = [t for t in group.tables if t.names.name == "MORE_TYPES"]
    with connect(settings.postgres) as conn:
        wh = Warehouse.of_group(settings).connect()
        try:
            fine = TableVerifier(conn, wh, more_table, fetch_rows=2, fanout=4).run()
        finally:
            wh.close()
    assert {(d.key["code"], d.key["n"]) for d in fine.differences} == {k for k, _, _ in more_tamper}
    assert fine.ranges > 4

    # --repair: the differing keys exported again; once merged, nothing differs.
    assert await asyncio.to_thread(verify, settings, None, 0.0, False, True) == 1
    group.pump_until_quiet()
    after = _by_table(verify_group(settings))
    for r in after.values():
        assert r.equal, r.lines()
        assert r.source_rows == r.warehouse_rows
    for name in ("PGBENCH_ACCOUNTS", "PGBENCH_BRANCHES", "PGBENCH_TELLERS"):
        assert results[name].equal
    assert results["PGBENCH_ACCOUNTS"].rows_fetched == 0


async def test_verify_command_exits_1_on_a_difference_and_prints_json(
    pg_dsn: str, group: LocalWarehouse, capsys: pytest.CaptureFixture[str]
) -> None:
    """``verify`` exits 0 when the tables are equal (and `status` shows each table's full pass)
    and 1 when a value differs, naming it in its JSON; ``--table`` limits it to one table; an
    unknown table is one sentence (exit 2)."""
    await _loaded(pg_dsn, group)
    settings = group.settings
    assert await asyncio.to_thread(verify, settings, None, 0.0, False) == 0
    assert "pgbench_accounts -> PGBENCH_ACCOUNTS: equal" in capsys.readouterr().out
    group.query("UPDATE PGBENCH_BRANCHES SET BBALANCE = BBALANCE + 7 WHERE BID = 1")
    text = render(await collect(settings))
    assert text.count("last full pass 20") == 5  # on-demand passes are recorded too
    assert await asyncio.to_thread(verify, settings, "pgbench_branches", 0.0, True) == 1
    (result,) = json.loads(capsys.readouterr().out)
    assert result["table"] == "public.pgbench_branches"
    ((difference,),) = [result["differences"]]
    assert difference["key"] == {"bid": 1}
    assert [c["column"] for c in difference["columns"]] == ["bbalance"]
    with pytest.raises(ConfigError, match="not a table of this configuration") as refused:
        await asyncio.to_thread(verify, settings, "public.nope", 0.0, False)
    assert refused.value.exit_code == 2


def test_postgres_hash_is_snowflakes_documented_md5_number_lower64(pg_dsn: str) -> None:
    """PostgreSQL's side of the hash equals Snowflake's documented example,
    MD5_NUMBER_LOWER64('Snowflake') = 9203306159527282910, modulo 2^60."""
    with psycopg.connect(pg_dsn) as conn:
        (got,) = conn.execute(
            "SELECT ('x' || substr(md5('Snowflake'), 18, 15))::bit(60)::bigint"
        ).fetchone() or (None,)
    assert got == 9203306159527282910 % (1 << 60)


@pytest.fixture
def seed_warehouse(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> Iterator[LocalWarehouse]:
    settings = make_settings(pg_dsn, s3_server, bucket, tmp_path, batch={"max_rows": 1_000})
    wh = start_warehouse(settings, warehouse_dir)
    yield wh
    wh.stop()


async def test_watermark_mode_repair_rewrites_changed_rows_and_deletes_extra_ones(
    pg_dsn: str, seed_warehouse: LocalWarehouse
) -> None:
    """Watermark mode: a row updated in place in the source (which the capture does not see),
    a value changed and a row deleted in the warehouse, and a row the source deleted: verify
    names the four keys; --repair exports the rows again at their watermark (winning by the
    later read) and a delete for the key the source no longer has; once merged, SALES equals
    the source."""
    wh = seed_warehouse
    settings = wh.settings
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 2_500, days=6)
    assert await export_until_idle(settings) == 0
    wh.pump_until_quiet()
    (result,) = verify_group(settings)
    assert result.equal
    assert result.source_rows == 2_500
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE ecommerce_sales SET quantity = quantity + 5 WHERE id = 10")
        conn.execute("DELETE FROM ecommerce_sales WHERE id = 20")
    wh.query("UPDATE SALES SET COUNTRY = 'Atlantis' WHERE ID = 30")
    wh.query("DELETE FROM SALES WHERE ID = 40")
    (result,) = verify_group(settings)
    assert {d.key["id"]: d.kind for d in result.differences} == {
        10: "changed",
        20: "extra",
        30: "changed",
        40: "missing",
    }
    assert await asyncio.to_thread(verify, settings, None, 0.0, False, True) == 1
    wh.pump_until_quiet()
    (result,) = verify_group(settings)
    assert result.equal, result.lines()
    assert result.source_rows == result.warehouse_rows == 2_499


async def test_logical_mode_backfill_restores_lost_days_and_verify_agrees(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> None:
    """Logical mode: rows of two days lost in the warehouse are exported again by `backfill
    --from --to` at a safe WAL position (an update made after the capture and before the
    backfill is carried too, and a later streamed change still wins); once merged, verify finds
    nothing."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 1_500, days=8)
        conn.execute("ALTER TABLE ecommerce_sales REPLICA IDENTITY FULL")
    settings = make_settings(
        pg_dsn, s3_server, bucket, tmp_path, capture={"mode": "logical"}, batch={"max_rows": 5_000}
    )
    wh = start_warehouse(settings, warehouse_dir)
    try:
        settings = wh.settings
        assert await init(settings) == 0
        assert await export_until_idle(settings) == 0
        wh.pump_until_quiet()
        (result,) = verify_group(settings)
        assert result.equal
        with psycopg.connect(pg_dsn) as conn:
            days = [
                str(d)
                for (d,) in conn.execute(
                    "SELECT DISTINCT (invoice_date AT TIME ZONE 'UTC')::date FROM ecommerce_sales"
                    " ORDER BY 1 LIMIT 2"
                )
            ]
        wh.query(
            "DELETE FROM SALES WHERE TO_DATE(INVOICE_DATE) IN (%(a)s, %(b)s)",
            {"a": days[0], "b": days[1]},
        )
        (result,) = verify_group(settings)
        lost = {d.key["id"] for d in result.differences}
        assert lost
        assert {d.kind for d in result.differences} == {"missing"}
        one = min(lost)
        sync = "-c synchronous_commit=on"
        with psycopg.connect(pg_dsn, autocommit=True, options=sync) as conn:
            conn.execute("UPDATE ecommerce_sales SET quantity = 111 WHERE id = %s", (one,))
        request = parse_request(days[0], str(date.fromisoformat(days[1]) + timedelta(days=1)))
        assert await run_backfill(settings, request, io.StringIO()) == 0
        with psycopg.connect(pg_dsn, autocommit=True, options=sync) as conn:
            conn.execute("UPDATE ecommerce_sales SET quantity = 222 WHERE id = %s", (one,))
        # The stream carries both updates: the first (logged before the backfill's position)
        # loses to the backfilled row, which holds it too; the second wins.
        assert await export_until_idle(settings) == 0
        wh.pump_until_quiet()
        (result,) = verify_group(settings)
        assert result.equal, result.lines()
        (row,) = wh.query("SELECT QUANTITY FROM SALES WHERE ID = %(i)s", {"i": one})
        assert int(row["QUANTITY"]) == 222
    finally:
        wh.stop()


async def test_continuous_verification_walks_the_table_in_slices_and_reports_what_persists(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path, warehouse_dir: Path
) -> None:
    """The rolling verifier compares one slice of keys per round from where the last ended,
    saving its place in the ledger; a full pass ends with the cursor back at the start. A
    value changed in the warehouse is reported by the slice holding it (once, with the fix,
    in metrics and in `status`); a difference that is gone by the settle time (a change in
    flight) is not."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 2_500, days=6)
    settings = make_settings(
        pg_dsn,
        s3_server,
        bucket,
        tmp_path,
        batch={"max_rows": 5_000},
        verify={"rows_per_slice": 1_000, "settle_s": 0},
    )
    wh = start_warehouse(settings, warehouse_dir)
    try:
        settings = wh.settings
        assert await init(settings) == 0
        assert await export_until_idle(settings) == 0
        wh.pump_until_quiet()
        registry = CollectorRegistry()
        metrics = Metrics(registry, settings.group)
        verifier = RollingVerifier(settings, metrics)
        (first,) = await verifier.round()
        assert first.cursor == (1_001,)
        assert first.rows_verified == 1_000
        assert not first.differing
        wh.query("UPDATE SALES SET COUNTRY = 'Atlantis' WHERE ID = 1500")
        with capture_logs() as logs:
            (second,) = await verifier.round()
        assert second.cursor == (2_001,)
        assert second.differing == ({"id": 1500},)
        (warned,) = [e for e in logs if e["event"] == "verify_difference"]
        assert warned["keys"] == 1
        assert "--repair" in warned["hint"]
        assert (
            registry.get_sample_value(
                "cdc_verify_differing_keys",
                {"table": settings.group, "member": "public.ecommerce_sales"},
            )
            == 1
        )
        text = render(await collect(settings))
        assert "1 key(s) DIFFER ({'id': 1500}): cdc-daemon verify --table" in text
        (third,) = await verifier.round()
        assert third.cursor is None
        assert third.last_pass_at is not None
        assert third.rows_verified == 2_500
        # A change in flight: differing when read, gone by the settle time: not reported.
        settling = RollingVerifier(
            settings.model_copy(
                update={"verify": settings.verify.model_copy(update={"settle_s": 1.0})}
            )
        )
        wh.query("UPDATE SALES SET QUANTITY = QUANTITY + 1 WHERE ID = 10")

        async def arrives() -> None:
            await wait_until(lambda: [e for e in logs if e["event"] == "verify_settling"], 30)
            await asyncio.to_thread(
                wh.query, "UPDATE SALES SET QUANTITY = QUANTITY - 1 WHERE ID = 10"
            )

        with capture_logs() as logs:
            (fourth,), _ = await asyncio.gather(settling.round(), arrives())
        assert fourth.cursor == (1_001,)
        assert not fourth.differing
        assert [e["keys"] for e in logs if e["event"] == "verify_settling"] == [1]
        assert not [e for e in logs if e["event"] == "verify_difference"]
    finally:
        wh.stop()
