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
    """A group of six tables, five refused for five reasons: one run of ``init`` exits 3 and
    prints every refusal on its own line, each naming ``[[tables]] watermark_column`` (the
    key as a group writes it, with the table's integer columns to choose from) or, for a table
    with no integer column, that watermark mode cannot capture it and logical mode can; a typo'd
    column gets the closest column's name."""
    path = config(
        tmp_path,
        tables,
        '[capture]\ngroup = "shop"\nmode = "watermark"\n'
        + "".join(
            f'[[tables]]\nname = "public.{t}"\n' for t in ("nokey", "textonly", "twokey", "uuidpk")
        )
        + '[[tables]]\nname = "public.good"\nwatermark_column = "idd"\n'
        + '[[tables]]\nname = "public.good2"\n',
    )
    assert main(["init", "--config", str(path)]) == 3
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "cdc-daemon: shop cannot be captured yet (6 problems):"
    assert lines[1:] == [
        "  - public.nokey has no primary key (nor a unique index on NOT NULL columns), so it "
        "cannot serve as its watermark: name an "
        "integer column a sequence fills (serial or identity) in [[tables]] watermark_column "
        '(its integer columns: a), or capture it with capture.mode = "logical"',
        "  - public.textonly cannot be captured in watermark mode: it has no integer column a "
        "sequence could fill to serve as its watermark (watermark mode reads new rows by such "
        'an id); capture it with capture.mode = "logical", which reads changes by key instead',
        "  - public.twokey's primary key has several columns, so it cannot serve as its "
        "watermark: name an integer column a sequence fills (serial or identity) in [[tables]] "
        'watermark_column (its integer columns: a, b), or capture it with capture.mode = "logical"',
        "  - public.uuidpk's primary key id is uuid, not an integer, so it cannot serve as its "
        "watermark: name an integer column a sequence fills (serial or identity) in [[tables]] "
        'watermark_column (its integer columns: n), or capture it with capture.mode = "logical"',
        "  - public.good has no column 'idd', named in [[tables]] watermark_column (did you mean "
        "'id'?)",
        "  - table 'public.good2' does not exist (or is not visible to this user)",
    ]


def test_the_one_table_shorthand_is_told_its_capture_keys(
    tables: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With ``postgres.table`` the same refusals name ``capture.watermark_column`` and
    ``capture.partition_column``, the keys that configuration uses."""
    path = config(tmp_path, tables, 'table = "public.nokey"\n')
    assert main(["init", "--config", str(path)]) == 3
    err = capsys.readouterr().err
    assert "in capture.watermark_column (its integer columns: a)" in err
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
