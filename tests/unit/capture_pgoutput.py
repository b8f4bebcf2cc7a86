"""Regenerate ``data/pgoutput_v1.json``: real pgoutput messages from a throwaway cluster.

Run once: ``.venv/bin/python -m tests.unit.capture_pgoutput``. The unit tests decode the saved
bytes; they never need a server.
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg

from cdc_daemon.local.services import LocalPostgres

STEPS = [
    "CREATE TYPE mood AS ENUM ('sad', 'ok')",
    "CREATE TABLE t (id bigint PRIMARY KEY, name text, price numeric(12,3), at timestamptz,"
    " raw bytea, note text, m mood)",
    "ALTER TABLE t ALTER COLUMN note SET STORAGE EXTERNAL",
    "CREATE TABLE f (id int PRIMARY KEY, v text)",
    "ALTER TABLE f REPLICA IDENTITY FULL",
    "CREATE PUBLICATION p FOR TABLE t, f",
    "SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
    # 1: inserts with awkward values, NULL and ''
    "INSERT INTO t VALUES (1, 'a,b \"q\"' || chr(10) || 'x £', 1.5, '2011-03-27 01:30:00.25+01',"
    " '\\x00ff', NULL, 'ok'), (2, '', NULL, NULL, NULL, repeat('z', 10000), 'sad')",
    # 2: update of a plain column: the TOASTed note is not logged ('u')
    "UPDATE t SET price = 2 WHERE id = 2",
    # 3: update changing the key: old key sent ('K')
    "UPDATE t SET id = 3 WHERE id = 1",
    # 4: delete under the default identity: key only
    "DELETE FROM t WHERE id = 3",
    # 5: REPLICA IDENTITY FULL: update and delete carry the old row ('O')
    "INSERT INTO f VALUES (1, 'one')",
    "UPDATE f SET v = 'uno' WHERE id = 1",
    "DELETE FROM f WHERE id = 1",
    # 6: a logical decoding message (ignored: messages are not requested) and a truncate
    "SELECT pg_logical_emit_message(true, 'x', 'hello')",
    "TRUNCATE t, f",
    # 7: an added column: a new Relation message
    "ALTER TABLE t ADD COLUMN extra int",
    "INSERT INTO t (id, extra) VALUES (9, 42)",
]


def main() -> None:
    server = LocalPostgres().start()
    try:
        with psycopg.connect(
            server.dsn, autocommit=True, options="-c TimeZone=UTC -c DateStyle=ISO"
        ) as conn:
            conn.execute("SET synchronous_commit = on")
            for step in STEPS:
                conn.execute(step)
            rows = conn.execute(
                "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes("
                "'s', NULL, NULL, 'proto_version', '1', 'publication_names', 'p')"
            ).fetchall()
    finally:
        server.stop()
    out = [{"lsn": str(lsn), "data": bytes(data).hex()} for lsn, data in rows]
    path = Path(__file__).parent / "data" / "pgoutput_v1.json"
    path.write_text(json.dumps({"steps": STEPS, "messages": out}, indent=1) + "\n")
    print(f"{len(out)} messages -> {path}")


if __name__ == "__main__":
    main()
