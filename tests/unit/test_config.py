"""Configuration: TOML plus CDC_<SECTION>__<KEY> overrides, one-sentence errors, no secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdc_daemon.cli import main
from cdc_daemon.config import load_settings, redact_dsn
from cdc_daemon.errors import ConfigError

SECRET = "hunter2-marker"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cdc.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    """With no file and no environment: the table public.ecommerce_sales in watermark mode,
    partitioned by invoice_date, gzip objects, and the ledger in schema cdc of the source
    database."""
    settings = load_settings(None)
    assert settings.postgres.table == "public.ecommerce_sales"
    assert settings.capture.mode == "watermark"
    assert settings.capture.partition_column == "invoice_date"
    assert settings.batch.compression == "gzip"
    assert settings.state.schema_ == "cdc"
    assert settings.state_dsn == settings.postgres.dsn


def test_toml_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key can come from the file; an environment variable wins over the file."""
    path = write(
        tmp_path,
        '[postgres]\ndsn = "postgresql://u@db/x"\n[s3]\nbucket = "from-file"\nprefix = "raw"\n'
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
        load_settings(None)


def test_passwords_never_printed(tmp_path: Path) -> None:
    """The DSN is a secret: not in repr, not in a validation error, redacted for logs."""
    dsn = f"postgresql://app:{SECRET}@db:5432/sales"
    settings = load_settings(None, postgres={"dsn": dsn})
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
