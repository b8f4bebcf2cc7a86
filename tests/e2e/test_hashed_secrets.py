"""The salt of ``hash_columns`` and the values it hashes, with the daemon as a process: never
printed, whatever the command and however it ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from cdc_daemon.local.sample import SAMPLE_TABLE, generate_sales
from cdc_daemon.local.services import LocalS3
from tests.e2e.daemon import cli, write_config
from tests.helpers import object_bodies

SALT = "salt-marker-3b7e-not-for-printing"
VALUE = "hashed-value-marker-a51d"


def test_the_salt_and_the_hashed_values_are_never_printed(
    pg_dsn: str, s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """``init``, ``run --exit-when-idle`` and ``status`` at debug level, a run with another
    salt (refused, exit 2) and one whose salt file is missing (exit 2): nothing printed holds
    the salt or a hashed column's clear value, and neither is in any object."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        generate_sales(conn, 100, days=2)
        conn.execute("UPDATE ecommerce_sales SET description = %s WHERE id %% 3 = 0", (VALUE,))
    table = {**SAMPLE_TABLE, "hash_columns": ["description", "customer_id"]}
    config = write_config(
        tmp_path, pg_dsn, s3_server, bucket, tables=[table], log={"level": "debug"}
    )
    printed = []
    for args in (("init",), ("run", "--exit-when-idle"), ("status",), ("status", "--json")):
        result = cli(config, *args, CDC_HASH_SALT=SALT)
        printed += [result.stdout, result.stderr]
        assert result.returncode == 0, result.stderr
    refused = cli(config, "run", "--exit-when-idle", CDC_HASH_SALT=SALT + "-other")
    assert refused.returncode == 2
    assert "the salt of its hash_columns is not the one" in refused.stderr
    no_file = write_config(
        tmp_path,
        pg_dsn,
        s3_server,
        bucket,
        tables=[table],
        capture={"hash_salt_file": str(tmp_path / "missing-salt")},
    )
    missing = cli(no_file, "run", "--exit-when-idle", CDC_HASH_SALT=SALT)
    assert missing.returncode == 2
    assert "cannot read capture.hash_salt_file" in missing.stderr
    printed += [refused.stdout, refused.stderr, missing.stdout, missing.stderr]
    everything = "\n".join(printed)
    assert "batch_uploaded" in everything
    assert SALT not in everything
    assert VALUE not in everything
    bodies = object_bodies(s3_client, bucket)
    assert bodies
    assert not any(VALUE.encode() in b or SALT.encode() in b for b in bodies.values())
