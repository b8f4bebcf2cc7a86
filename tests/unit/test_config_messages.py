"""What a configuration mistake is told: the key or the environment variable to change, with
the closest valid name for a typo, and never a value (a DSN holds a password)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdc_daemon.config import load_settings
from cdc_daemon.errors import ConfigError

SECRET = "s3cr3t-pw"


def message(path: Path | None = None, **overrides: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, **overrides)
    return str(caught.value)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cdc.toml"
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _no_cdc_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("CDC_"):
            monkeypatch.delenv(name)


def test_typos_in_the_file_get_the_closest_key(tmp_path: Path) -> None:
    """Every unknown key of the file is named, in its section, with the valid key it is
    closest to (difflib): in a section, a section itself, the ``schema`` alias, and an entry of
    ``[[tables]]`` (which has no dotted name). All in one message."""
    path = write(
        tmp_path,
        '[postgres]\ndns = "x"\n[captur]\nmode = "watermark"\n[state]\nschem = "s"\n'
        '[capture]\ngroup = "g"\n[[tables]]\nname = "a.b"\nwatermak_column = "id"\n',
    )
    text = message(path)
    assert text.startswith(f"invalid configuration in {path}: ")
    assert "unknown key 'postgres.dns' (did you mean 'postgres.dsn'?)" in text
    assert "unknown key 'captur' (did you mean 'capture'?)" in text
    assert "unknown key 'state.schem' (did you mean 'state.schema'?)" in text
    assert (
        "unknown key 'watermak_column' in [[tables]] entry 1 (did you mean 'watermark_column'?)"
        in text
    )


def test_a_key_like_none_gets_no_guess(tmp_path: Path) -> None:
    """A key close to no valid one is named without a "did you mean"."""
    text = message(write(tmp_path, '[postgres]\ntable = "a.b"\n[batch]\nzzzz = 1\n'))
    assert text.endswith("unknown key 'batch.zzzz'")


def test_an_environment_typo_is_named_as_a_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``CDC_POSTGRES__DNS`` is reported as the environment variable it is, with the variable
    it was meant to be, and not blamed on the configuration file; its value (a DSN with a
    password) is not shown."""
    monkeypatch.setenv("CDC_POSTGRES__DNS", f"postgresql://u:{SECRET}@db/x")
    path = write(tmp_path, '[postgres]\ntable = "a.b"\n')
    text = message(path)
    assert text == (
        "invalid configuration: environment variable CDC_POSTGRES__DNS is not a setting "
        "(did you mean CDC_POSTGRES__DSN?)"
    )


def test_an_environment_variable_of_no_section_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pydantic-settings would ignore ``CDC_POSTGRE__DSN`` (no section ``postgre``) and leave the
    DSN at its default: it is refused, with the closest variable. A ``CDC_`` variable not shaped
    like a setting (``CDC_TEST_PG_DSN``, the tests' own) is left alone."""
    monkeypatch.setenv("CDC_TEST_PG_DSN", "postgresql://elsewhere/x")
    assert load_settings(None, postgres={"table": "a.b"}).postgres.table == "a.b"
    monkeypatch.setenv("CDC_POSTGRE__DSN", "postgresql://db/x")
    assert message(None, postgres={"table": "a.b"}) == (
        "invalid configuration: environment variable CDC_POSTGRE__DSN: there is no section "
        "'postgre' (did you mean CDC_POSTGRES__DSN?)"
    )


def test_each_problem_says_where_it_comes_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With problems in both, a bad value from the environment names its variable and the key
    it sets, and the file's problem names the file."""
    monkeypatch.setenv("CDC_BATCH__MAX_ROWS", "many")
    path = write(tmp_path, '[postgres]\ntable = "a.b"\n[s3]\nbuckt = "x"\n')
    text = message(path)
    assert text.startswith("invalid configuration: ")
    assert "environment variable CDC_BATCH__MAX_ROWS (batch.max_rows): Input should be" in text
    assert f"{path}: unknown key 's3.buckt' (did you mean 's3.bucket'?)" in text


def test_a_section_set_as_json_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole section or ``[[tables]]`` set by one variable: JSON that does not parse is named
    as that variable; a key inside it that is not one is named by its entry, with its guess."""
    monkeypatch.setenv("CDC_TABLES", "public.t")
    assert message(None).startswith(
        "invalid configuration: environment variable CDC_TABLES is not valid JSON"
    )
    monkeypatch.setenv("CDC_TABLES", '[{"name": "a.b", "partiton_column": "d"}]')
    assert message(None) == (
        "invalid configuration: environment variable CDC_TABLES: unknown key 'partiton_column' "
        "in [[tables]] entry 1 (did you mean 'partition_column'?)"
    )
