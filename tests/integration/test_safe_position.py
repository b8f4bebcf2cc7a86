"""``source.session.safe_position``: the ``_cdc_seq`` of rows a repair (or a logical backfill)
reads waits for every transaction open at it, so that no change logged before it is missed by
the read."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from cdc_daemon.errors import SourceError
from cdc_daemon.source.session import safe_position


def test_a_transaction_open_at_the_position_is_waited_for_and_its_change_lies_below(
    pg_dsn: str,
) -> None:
    """A transaction that logged an insert and is still open holds safe_position back; once it
    commits, the position returned lies above its change's LSN, and a read after it sees the
    row."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE held (id int PRIMARY KEY)")
    writer = psycopg.connect(pg_dsn)
    writer.execute("INSERT INTO held VALUES (1)")
    try:
        _wait_for(pg_dsn, writer)
    finally:
        writer.close()


def _wait_for(pg_dsn: str, writer: psycopg.Connection[tuple[object, ...]]) -> None:
    (logged,) = writer.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone() or (
        0,
    )
    got: list[int] = []
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        waiting = threading.Thread(target=lambda: got.append(safe_position(conn, 30)))
        waiting.start()
        time.sleep(0.5)
        assert waiting.is_alive(), "safe_position returned while a transaction was open"
        writer.commit()
        waiting.join(10)
        assert got
        assert got[0] >= int(str(logged))
        assert conn.execute("SELECT count(*) FROM held").fetchone() == (1,)


def test_a_transaction_left_open_ends_the_wait_with_one_sentence(pg_dsn: str) -> None:
    """A transaction open longer than the wait: one sentence naming it, no position."""
    idle = psycopg.connect(pg_dsn)
    idle.execute("SELECT txid_current()")
    try:
        with (
            psycopg.connect(pg_dsn, autocommit=True) as conn,
            pytest.raises(SourceError, match="open since before this read"),
        ):
            safe_position(conn, 0.3)
    finally:
        idle.close()
