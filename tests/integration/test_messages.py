"""What ``init`` tells a user whose tables cannot be captured as configured: every refused
table at once, one a line, each naming the setting to change in the form the configuration
uses, or saying that only logical mode can capture it. Against a real PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import structlog

from cdc_daemon.cli import main

TABLES = (
    "CREATE TABLE nokey (a int, b text)",
    "CREATE TABLE textonly (a text, b text)",
    "CREATE TABLE twokey (a int, b int, c text, PRIMARY KEY (a, b))",
    "CREATE TABLE uuidpk (id uuid PRIMARY KEY, n bigint)",
    "CREATE TABLE good (id bigserial PRIMARY KEY, placed timestamptz)",
    "CREATE TABLE uuidseq (id uuid PRIMARY KEY, seq bigint GENERATED ALWAYS AS IDENTITY)",
    "CREATE TABLE stamped (code text PRIMARY KEY, n serial, placed timestamptz DEFAULT now())",
)


@pytest.fixture
def tables(pg_dsn: str) -> Iterator[str]:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for statement in TABLES:
            conn.execute(statement)
    yield pg_dsn
    # main() pointed structlog at this test's captured stdout, closed once it ends.
    structlog.reset_defaults()


def config(tmp_path: Path, dsn: str, text: str) -> Path:
    path = tmp_path / "cdc.toml"
    path.write_text(f"[postgres]\ndsn = {json.dumps(dsn)}\n{text}")
    return path


def test_init_reports_every_refused_table_of_a_group_at_once(
    tables: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A group of eight tables, refused for seven reasons: one run of ``init`` exits 3 and
    prints every refusal on its own line, each naming ``[[tables]] watermark_column`` (the
    setting as a group writes it) with the table's columns a sequence fills to choose from, or,
    for a table with none (an integer the application sets does not count, nor does a
    timestamp), that watermark mode cannot capture it and ``capture.mode = "logical"`` can
    (with ``[[tables]] key`` for a table without a primary key); a typo'd column gets the
    closest column's name."""
    path = config(
        tmp_path,
        tables,
        '[capture]\ngroup = "shop"\nmode = "watermark"\n'
        + "".join(
            f'[[tables]]\nname = "public.{t}"\n' for t in ("nokey", "textonly", "twokey", "uuidpk")
        )
        + '[[tables]]\nname = "public.good"\nwatermark_column = "idd"\n'
        + '[[tables]]\nname = "public.good2"\n'
        + '[[tables]]\nname = "public.uuidseq"\n'
        + '[[tables]]\nname = "public.stamped"\nwatermark_column = "placed"\n',
    )
    assert main(["init", "--config", str(path)]) == 3
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "cdc-daemon: shop cannot be captured yet (8 problems):"
    no_index = " (nor a unique index on NOT NULL columns)"
    no_sequence = (
        ", and no integer column of it is filled by a sequence (serial or identity), so it "
        "cannot be captured in watermark mode, which needs one to read new rows without missing "
        'a late commit: capture it with capture.mode = "logical"'
    )
    assert lines[1:] == [
        f"  - public.nokey has no primary key{no_index}{no_sequence} (keyless, under REPLICA"
        " IDENTITY FULL)",
        f"  - public.textonly has no primary key{no_index}{no_sequence} (keyless, under REPLICA"
        " IDENTITY FULL)",
        f"  - public.twokey's primary key has several columns{no_sequence}",
        f"  - public.uuidpk's primary key id is uuid, not an integer{no_sequence}",
        "  - public.good has no column 'idd', named in [[tables]] watermark_column (did you mean "
        "'id'?)",
        "  - table 'public.good2' does not exist (or is not visible to this user)",
        "  - public.uuidseq's primary key id is uuid, not an integer, so it cannot serve as its "
        "watermark: name a column a sequence fills in [[tables]] watermark_column (here: seq), "
        'or capture it with capture.mode = "logical"',
        "  - public.stamped: [[tables]] watermark_column 'placed' is timestamp with time zone, "
        "not an integer, so it cannot serve as its watermark: name a column a sequence fills in "
        '[[tables]] watermark_column (here: n), or capture it with capture.mode = "logical"',
    ]


def test_the_one_table_shorthand_is_told_its_capture_keys(
    tables: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With ``postgres.table`` the same refusals name ``capture.watermark_column`` and
    ``capture.partition_column``, the keys that configuration uses."""
    path = config(tmp_path, tables, 'table = "public.uuidseq"\n')
    assert main(["init", "--config", str(path)]) == 3
    err = capsys.readouterr().err
    assert "in capture.watermark_column (here: seq)" in err
    assert "[[tables]]" not in err
    path = config(tmp_path, tables, 'table = "public.good"\n[capture]\npartition_column = "at"\n')
    assert main(["init", "--config", str(path)]) == 3
    assert capsys.readouterr().err.splitlines() == [
        "cdc-daemon: public.good cannot be captured yet: public.good has no column 'at', named "
        "in capture.partition_column"
    ]
    path = config(tmp_path, tables, 'table = "public.good"\n[capture]\npartition_column = "id"\n')
    assert main(["init", "--config", str(path)]) == 3
    assert capsys.readouterr().err.splitlines() == [
        "cdc-daemon: public.good cannot be captured yet: public.good: capture.partition_column "
        "'id' is bigint; it must be a date or a timestamp"
    ]
