"""The command line's options: where they may be written, their help, what they refuse."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from cdc_daemon.cli import _parser, main
from cdc_daemon.logging import configure_logging


@pytest.fixture(autouse=True)
def _logging_reset() -> Iterator[None]:
    """``main()`` configures logging for the whole process, onto the test's captured stderr,
    which is closed after the test: later tests must not log there."""
    yield
    structlog.reset_defaults()


def bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "cdc.toml"
    path.write_text('[postgres]\ntable = "public.t"\n[batch]\nmax_rowz = 1\n')
    return path


@pytest.mark.parametrize(
    "where",
    [
        ["--config", "{path}", "status"],
        ["status", "--config", "{path}"],
        ["status", "--json", "--config", "{path}", "--log-format", "json"],
        ["--log-format", "console", "snowflake", "render", "--config", "{path}"],
        ["snowflake", "--config", "{path}", "render"],
        ["reconcile", "--once", "--config", "{path}"],
    ],
)
def test_global_options_are_read_before_or_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: list[str]
) -> None:
    """``--config`` (and ``--log-format``) are accepted before the command, after it, and after
    a subcommand's action: the file given is the one read (its typo is reported, exit 2)."""
    path = bad_config(tmp_path)
    assert main([part.format(path=path) for part in where]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"cdc-daemon: invalid configuration in {path}: unknown key 'batch.max_rowz' "
        "(did you mean 'batch.max_rows'?)\n"
    )


def test_an_option_after_the_command_wins_over_the_same_before_it(tmp_path: Path) -> None:
    """Given twice, the one after the command is used (the last written), and one given only
    before the command is kept (the subcommand's parser does not reset it to its default)."""
    args = _parser().parse_args(["--config", "a.toml", "status", "--config", "b.toml"])
    assert args.config == Path("b.toml")
    args = _parser().parse_args(["--config", "a.toml", "--log-format", "json", "status"])
    assert (args.config, args.log_format) == (Path("a.toml"), "json")
    args = _parser().parse_args(["status"])
    assert (args.config, args.log_format) == (None, None)


def _parsers(
    parser: argparse.ArgumentParser, name: str = "cdc-daemon"
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _parsers(sub, f"{name} {sub_name}")
    return found


def test_every_command_and_option_has_help() -> None:
    """Every command has a description for its ``--help`` page and a line in its parent's list,
    and every option and argument of every command has a help text."""
    for name, parser in _parsers(_parser()):
        assert parser.description, f"{name} has no description"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{name} {choice.dest} has no help line"
                continue
            what = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{what} has no help"
            assert action.help != argparse.SUPPRESS, f"{what} is hidden"


def test_local_offers_up_and_down_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``local`` takes up or down; a wrong word is refused (exit 2) naming only those two, and
    neither the refusal nor the help page mention the internal ``serve``."""
    with pytest.raises(SystemExit) as exit_:
        main(["local", "serv", "--dir", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'serv' (choose from up, down)" in err
    assert "serve" not in err
    with pytest.raises(SystemExit):
        main(["local", "--help"])
    assert "serve" not in capsys.readouterr().out


def test_reconcile_output_options_need_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without ``--once`` reconcile runs until stopped and logs its rounds, so ``--json`` and
    ``--completeness`` (which shape the one round's report) are refused with exit 2, before
    any configuration is read; with ``--once`` they are accepted."""
    for option in ("--json", "--completeness"):
        with pytest.raises(SystemExit) as exit_:
            main(["reconcile", option, "--config", str(tmp_path / "none.toml")])
        assert exit_.value.code == 2
        assert "go with --once" in capsys.readouterr().err
    args = _parser().parse_args(["reconcile", "--once", "--json", "--completeness"])
    assert (args.once, args.json, args.completeness) == (True, True, True)
    assert _parser().parse_args(["reconcile"]).once is False


@pytest.mark.parametrize(("fmt", "is_json"), [("auto", True), ("json", True), ("console", False)])
def test_log_format(fmt: str, is_json: bool) -> None:
    """``auto`` writes JSON lines to what is not a terminal (a file, a pipe); ``console`` forces
    the console renderer there, ``json`` JSON lines."""
    out = io.StringIO()
    configure_logging("info", fmt, file=out)  # type: ignore[arg-type]
    try:
        structlog.get_logger().info("thing_done", rows=3)
    finally:
        structlog.reset_defaults()
    line = out.getvalue().strip()
    if is_json:
        assert json.loads(line)["event"] == "thing_done"
    else:
        assert "thing_done" in line
        assert "rows=3" in line
        assert not line.startswith("{")


def test_the_demo_refuses_a_missing_csv_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``demo --csv`` naming no file is one sentence and exit 2, not a traceback after the
    local services have started."""
    missing = tmp_path / "retail.csv.gz"
    assert main(["demo", "--csv", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"cdc-daemon: --csv {missing}: there is no such file\n"
    assert captured.out == ""


@pytest.mark.parametrize(
    ("out", "says"),
    [
        ("{tmp}", "is a directory: name the report's file"),
        ("{tmp}/missing/r.html", "the folder {tmp}/missing does not exist"),
    ],
)
def test_a_report_path_that_cannot_be_written_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], out: str, says: str
) -> None:
    """``report --out`` naming a directory or a file in a missing folder is refused with one
    sentence (exit 2) before any query runs (the account named here does not exist), not a
    traceback after them."""
    path = tmp_path / "cdc.toml"
    path.write_text('[postgres]\ntable = "public.t"\n[snowflake]\naccount = "nowhere"\n')
    assert main(["report", "--config", str(path), "--out", out.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert says.format(tmp=tmp_path) in err


def test_a_warehouse_table_that_is_no_identifier_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``warehouse_table`` that is no plain Snowflake identifier (a dash here) is refused with
    the rule it breaks in words, not the regular expression (exit 2)."""
    path = tmp_path / "cdc.toml"
    path.write_text('[[tables]]\nname = "public.t"\nwarehouse_table = "Sales-2"\n')
    assert main(["snowflake", "render", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "warehouse_table: must be a plain Snowflake identifier: a letter or _" in err
    assert "pattern" not in err


def test_history_must_be_a_boolean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``history = "yes"`` (a string) is refused in one sentence rather than read as true."""
    path = tmp_path / "cdc.toml"
    path.write_text('[capture]\nmode = "logical"\n[[tables]]\nname = "public.t"\nhistory = "yes"\n')
    assert main(["snowflake", "render", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "history: Input should be a valid boolean" in err
