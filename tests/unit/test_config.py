"""Configuration: TOML plus CDC_<SECTION>__<KEY> overrides, one-sentence errors, no secrets."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cdc_daemon.cli import main
from cdc_daemon.config import NO_TABLE, TableSettings, load_settings, redact_dsn
from cdc_daemon.errors import CdcError, ConfigError
from cdc_daemon.worker import Worker

SECRET = "hunter2-marker"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cdc.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    """With only a table named: watermark mode, no partition column (the day of the read), gzip
    objects, and the ledger in schema cdc of the source database."""
    settings = load_settings(None, postgres={"table": "public.orders"})
    assert settings.table_specs == (TableSettings(name="public.orders"),)
    assert settings.capture.mode == "watermark"
    assert settings.capture.partition_column is None
    assert settings.batch.compression == "gzip"
    assert settings.state.schema_ == "cdc"
    assert settings.state_dsn == settings.postgres.dsn


def test_a_configuration_names_its_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """There is no default table: a configuration with neither ``[[tables]]`` nor
    ``postgres.table`` is one sentence saying so and exit 2 from the CLI, with no traceback."""
    with pytest.raises(ConfigError, match=r"^invalid configuration: no table to capture"):
        load_settings(None)
    path = write(tmp_path, '[s3]\nbucket = "b"\n')
    assert main(["--config", str(path), "run"]) == 2
    err = capsys.readouterr().err
    assert err == f"cdc-daemon: invalid configuration in {path}: {NO_TABLE}\n"


def test_tables_are_the_group_with_no_table_of_the_demo() -> None:
    """With ``[[tables]]`` the group is exactly those tables: ``postgres.table`` stays unset, and
    each table's partition column is its own (none unless named)."""
    settings = load_settings(
        None,
        capture={"group": "shop"},
        tables=[{"name": "shop.orders", "partition_column": "placed"}, {"name": "shop.items"}],
    )
    assert settings.postgres.table is None
    assert [(t.qualified, t.partition_column) for t in settings.table_specs] == [
        ("shop.orders", "placed"),
        ("shop.items", None),
    ]
    assert settings.group == "shop"


def test_shorthand_and_tables_together_are_refused() -> None:
    """``postgres.table`` beside ``[[tables]]`` naming another table is refused (one way to
    name the tables), with a sentence naming both keys."""
    with pytest.raises(ConfigError, match=r"postgres\.table and \[\[tables\]\] are both set"):
        load_settings(None, postgres={"table": "public.a"}, tables=[{"name": "public.b"}])


async def test_daemon_starting_names_the_group_and_its_tables() -> None:
    """``daemon_starting`` logs the group and its tables (not a table of the demo's): here before
    the ledger connection fails."""
    settings = load_settings(
        None,
        postgres={"dsn": "postgresql://nobody@127.0.0.1:1/none", "connect_timeout_s": 1},
        capture={"group": "shop"},
        tables=[{"name": "shop.orders"}, {"name": "shop.items"}],
        daemon={"retry_attempts": 1},
    )
    with capture_logs() as logs, contextlib.suppress(CdcError):
        await Worker(settings).serve()
    (starting,) = [e for e in logs if e["event"] == "daemon_starting"]
    assert starting["group"] == "shop"
    assert starting["tables"] == ["shop.orders", "shop.items"]
    assert "table" not in starting


def test_toml_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key can come from the file; an environment variable wins over the file."""
    path = write(
        tmp_path,
        '[postgres]\ndsn = "postgresql://u@db/x"\ntable = "t"\n'
        '[s3]\nbucket = "from-file"\nprefix = "raw"\n'
        '[batch]\nmax_rows = 10\n[state]\nschema = "ledger"\n',
    )
    monkeypatch.setenv("CDC_S3__BUCKET", "from-env")
    monkeypatch.setenv("CDC_BATCH__COMPRESSION", "zstd")
    settings = load_settings(path)
    assert settings.s3.bucket == "from-env"
    assert settings.s3.prefix == "raw/"
    assert settings.batch.max_rows == 10
    assert settings.batch.compression == "zstd"
    assert settings.state.schema_ == "ledger"
    assert settings.postgres.dsn.get_secret_value() == "postgresql://u@db/x"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[batch]\nmax_rowz = 1\n", "unknown key 'batch.max_rowz'"),
        ("[nope]\nx = 1\n", "unknown key 'nope'"),
        ("[batch]\nmax_rows = 'many'\n", "batch.max_rows"),
        ("[batch]\ncompression = 'brotli'\n", "batch.compression"),
        ("[batch\n", "is not valid TOML"),
    ],
)
def test_bad_files_give_one_sentence(tmp_path: Path, text: str, message: str) -> None:
    """An unknown key or section, a value of the wrong type or outside its choices, or a file
    that is not TOML is a ConfigError whose message names the key (or says the file is not valid
    TOML)."""
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_settings(write(tmp_path, text))


def test_missing_file() -> None:
    """A configuration path that does not exist is a ConfigError saying so."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(Path("/nonexistent/cdc.toml"))


def test_bad_environment_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """An invalid value from the environment (CDC_BATCH__MAX_ROWS=-5) is a ConfigError naming the
    key it sets."""
    monkeypatch.setenv("CDC_BATCH__MAX_ROWS", "-5")
    with pytest.raises(ConfigError, match=r"batch\.max_rows"):
        load_settings(None, postgres={"table": "t"})


def test_passwords_never_printed(tmp_path: Path) -> None:
    """The DSN is a secret: not in repr, not in a validation error, redacted for logs."""
    dsn = f"postgresql://app:{SECRET}@db:5432/sales"
    settings = load_settings(None, postgres={"dsn": dsn, "table": "t"})
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    assert SECRET not in redact_dsn(dsn)
    assert "app" in redact_dsn(dsn)
    path = write(tmp_path, f'[postgres]\ndsn = ["{dsn}"]\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert SECRET not in str(info.value)


def test_cli_reports_config_errors_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI turns an invalid configuration into exit code 2 and one line on stderr that starts
    with 'cdc-daemon: invalid configuration', without a traceback."""
    path = write(tmp_path, "[batch]\nmax_rows = 'x'\n")
    assert main(["--config", str(path), "run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cdc-daemon: invalid configuration")
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
