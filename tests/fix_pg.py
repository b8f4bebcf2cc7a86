"""A real PostgreSQL for the test session: a throwaway cluster made with initdb, or the server
named by ``CDC_TEST_PG_DSN`` (e.g. a container on a laptop). Each test gets its own database."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc_daemon.local.services import LocalPostgres


@pytest.fixture(scope="session")
def local_pg() -> Iterator[LocalPostgres | None]:
    """The cluster this session started, or None when CDC_TEST_PG_DSN names another server."""
    if os.environ.get("CDC_TEST_PG_DSN"):
        yield None
        return
    server = LocalPostgres().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_server(local_pg: LocalPostgres | None) -> str:
    return local_pg.dsn if local_pg is not None else os.environ["CDC_TEST_PG_DSN"]


@pytest.fixture
def pg_dsn(pg_server: str) -> Iterator[str]:
    """A fresh, empty database on the session's server."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(pg_server)
    params["dbname"] = name
    yield make_conninfo("", **params)
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def drop_slots(pg_dsn: str) -> Iterator[None]:
    """For tests that create replication slots: after the test, every slot of its database is
    dropped. Slots belong to the whole cluster, and one still in use keeps its database from
    being dropped (even WITH (FORCE)), so a session still using one (the backend of a daemon
    just killed may not have noticed yet) is ended first."""
    yield
    deadline = time.monotonic() + 30
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        while True:
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                " WHERE database = current_database() AND active_pid IS NOT NULL"
            )
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE database = current_database() AND NOT active"
            )
            left = conn.execute(
                "SELECT array_agg(slot_name) FROM pg_replication_slots"
                " WHERE database = current_database()"
            ).fetchone()
            if left is None or left[0] is None:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"replication slots still in use: {left[0]}")
            time.sleep(0.05)
