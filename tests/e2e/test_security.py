"""Secrets never printed, the least-privilege role, hostile configuration files."""

from __future__ import annotations

import contextlib
import io
import subprocess
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc_daemon.cli import main
from cdc_daemon.local.sample import generate_sales
from cdc_daemon.local.services import LocalS3
from tests.e2e.daemon import cli, write_config
from tests.helpers import assert_rebuilt_equals_source

ROLE_SQL = Path(__file__).resolve().parents[2] / "deploy" / "postgres" / "cdc_role.sql"
PG_SECRET = "pg-secret-marker-7f3a"
AWS_SECRET = "aws-secret-marker-91bc"


def as_role(dsn: str, role: str, password: str) -> str:
    params = conninfo_to_dict(dsn)
    params.update(user=role, password=password)
    return make_conninfo("", **params)


def create_role(dsn: str) -> str:
    """Apply deploy/postgres/cdc_role.sql as the administrator, as an operator would. Roles
    belong to the whole cluster, so each test makes its own."""
    role = f"cdc_{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [
            "psql",
            dsn,
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"role={role}",
            "-v",
            "table=public.ecommerce_sales",
            "-v",
            "schema=cdc",
            "-f",
            str(ROLE_SQL),
        ],
        check=True,
        capture_output=True,
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {role} PASSWORD '{PG_SECRET}'")
    return role


def test_runs_under_the_minimal_role_and_prints_no_secret(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """The daemon runs init, run (with a late commit held open by another user) and status
    under the role of deploy/postgres/cdc_role.sql; with marker secrets in the DSN and the AWS
    credentials, nothing it prints (logs, errors, status) contains them."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 200, days=2)
    role = create_role(pg_dsn)
    dsn = as_role(pg_dsn, role, PG_SECRET)
    config = write_config(tmp_path, dsn, s3_server, bucket, log={"level": "debug"})

    def with_markers(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
        """The CLI with marker AWS credentials in its environment."""
        return cli(cfg, *args, AWS_ACCESS_KEY_ID="AKIAMARKER", AWS_SECRET_ACCESS_KEY=AWS_SECRET)

    printed = []
    with psycopg.connect(pg_dsn) as other:
        other.execute(
            "INSERT INTO ecommerce_sales (invoice_no, stock_code, quantity, invoice_date,"
            " unit_price, country) VALUES ('late', 'S', 1, now(), 1, 'UK')"
        )
        for args in (("init",), ("run", "--exit-when-idle"), ("status",), ("status", "--json")):
            result = with_markers(config, *args)
            printed += [result.stdout, result.stderr]
            assert result.returncode == 0, result.stderr
        other.commit()
    result = with_markers(config, "run", "--exit-when-idle")
    printed += [result.stdout, result.stderr]
    assert result.returncode == 0, result.stderr
    assert_rebuilt_equals_source(pg_dsn, s3_client, bucket)
    # Errors too: a missing bucket, and a database that refuses the connection.
    bad_bucket = write_config(tmp_path, dsn, s3_server, "no-such-bucket")
    # (The test cluster trusts local connections, so a wrong password would still log in:
    # a database that does not exist makes the server refuse, with the password in the DSN.)
    params = conninfo_to_dict(dsn)
    params["dbname"] = "no_such_database"
    wrong_db = write_config(tmp_path, make_conninfo("", **params), s3_server, bucket)
    for cfg in (bad_bucket, wrong_db):
        result = with_markers(cfg, "run")
        assert result.returncode != 0
        printed += [result.stdout, result.stderr]
    everything = "\n".join(printed)
    assert "batch_uploaded" in everything
    assert PG_SECRET not in everything
    assert AWS_SECRET not in everything


def test_the_role_cannot_write_the_source(pg_dsn: str) -> None:
    """The minimal role reads the table and nothing more."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 1)
    role = create_role(pg_dsn)
    with psycopg.connect(as_role(pg_dsn, role, PG_SECRET), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM ecommerce_sales").fetchone() == (1,)
        try:
            conn.execute("DELETE FROM ecommerce_sales")
        except psycopg.errors.InsufficientPrivilege:
            pass
        else:
            raise AssertionError("the role could delete source rows")


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_fuzzed_config_files_never_give_a_traceback(
    data: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random bytes (and random text) as the configuration file: one line on stderr and a
    non-zero exit, never a traceback (any exception escaping main() fails the test)."""
    monkeypatch.setenv("CDC_POSTGRES__DSN", "postgresql://u@127.0.0.1:1/x")
    monkeypatch.setenv("CDC_POSTGRES__CONNECT_TIMEOUT_S", "1")
    path = tmp_path / "fuzz.toml"
    path.write_bytes(data)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["--config", str(path), "status"])
    assert code != 0
    assert len(err.getvalue().strip().splitlines()) == 1


def test_missing_privilege_is_one_sentence(
    pg_dsn: str, s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """A role that may not read the table gets one sentence and exit code 3."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 1)
    role = create_role(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"REVOKE SELECT ON ecommerce_sales FROM {role}")
    config = write_config(tmp_path, as_role(pg_dsn, role, PG_SECRET), s3_server, bucket)
    result = cli(config, "init")
    assert result.returncode == 3, result.stderr
    assert "permission denied" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
