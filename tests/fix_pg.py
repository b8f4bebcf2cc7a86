"""A real PostgreSQL for the test session: a throwaway cluster made with initdb, or the server
named by ``CDC_TEST_PG_DSN`` (e.g. a container on a laptop). Each test gets its own database."""

from __future__ import annotations

import os
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
