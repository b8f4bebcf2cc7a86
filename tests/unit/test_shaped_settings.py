"""The settings that shape a table's columns (``columns``, ``exclude_columns``,
``hash_columns``, ``deletes``) and the salt of ``hash_columns``: what is refused, with one
sentence each, and where the salt may come from."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdc_daemon.config import SALT_IN_FILE, TableSettings, load_settings
from cdc_daemon.errors import ConfigError
from cdc_daemon.source.table import Column, shape_problem, shaped_columns

SALT = "a-salt-of-enough-bytes-4c1d"


def write(tmp_path: Path, text: str, name: str = "cdc.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def table(**entry: object) -> str:
    lines = ["[[tables]]", 'name = "public.people"']
    for key, value in entry.items():
        shown = repr(value).replace("'", '"').replace("(", "[").replace(")", "]")
        lines.append(f"{key} = {shown}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"key": ["id"], "exclude_columns": ["id"]},
            "column 'id' is the table's key, so it cannot be left out",
        ),
        (
            {"key": ["id", "n"], "columns": ["id", "email"]},
            "column 'n' is the table's key, so it cannot be left out",
        ),
        (
            {"watermark_column": "n", "exclude_columns": ["n"]},
            "column 'n' is the table's watermark_column, so it cannot be left out",
        ),
        (
            {"partition_column": "born", "columns": ["id"]},
            "column 'born' is the table's partition_column, so it cannot be left out",
        ),
        ({"columns": ["id"], "exclude_columns": ["ssn"]}, "columns and exclude_columns are both"),
        ({"columns": []}, "columns is empty"),
        ({"exclude_columns": ["ssn", "ssn"]}, "exclude_columns names ssn twice"),
        (
            {"exclude_columns": ["ssn"], "hash_columns": ["ssn"]},
            "column 'ssn' is both hashed and left out",
        ),
        (
            {"partition_column": "born", "hash_columns": ["born"]},
            "column 'born' is the table's partition_column, whose day names the objects' dt= "
            "folders, so it cannot be hashed",
        ),
        ({"deletes": "archive"}, "deletes: Input should be 'hard' or 'soft'"),
    ],
)
def test_shapes_the_settings_refuse(tmp_path: Path, entry: dict[str, object], message: str) -> None:
    """A key, watermark or partition column left out, both lists set, an empty or repeated
    list, a column hashed and left out, the partition column hashed, an unknown ``deletes``:
    one sentence at settings load that names the table's entry."""
    path = write(tmp_path, table(**entry))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    text = str(caught.value)
    assert text.startswith(f"invalid configuration in {path}: [[tables]] entry 1: ")
    assert message in text
    assert "\n" not in text


COLUMNS = [Column(n, "text") for n in ("id", "name", "email", "ssn")]


def test_an_unknown_column_is_refused_with_the_closest_name() -> None:
    """A name the table does not have, in any of the three lists, is refused with one
    sentence naming the list and the closest column (the catalog is known only at init or
    start, so this is where the check is made)."""
    names = [c.name for c in COLUMNS]
    for setting in ("columns", "exclude_columns", "hash_columns"):
        spec = TableSettings.model_validate({"name": "public.people", setting: ["id", "emial"]})
        assert shape_problem(spec, "public.people", names, ("id",)) == (
            "public.people has no column 'emial', named in [[tables]] "
            f"{setting} (did you mean 'email'?)"
        )


def test_the_primary_key_left_out_is_refused_at_init() -> None:
    """Without ``key`` the merge key is the primary key, known from the catalog only: leaving
    it out is refused there, with the way forward (hash it instead)."""
    spec = TableSettings(name="public.people", exclude_columns=["id"])
    problem = shape_problem(spec, "public.people", [c.name for c in COLUMNS], ("id",))
    assert problem == (
        "public.people: key column 'id' cannot be left out of the capture (the warehouse merges "
        "by the key): capture it, hashed if it must not leave in clear (hash_columns)"
    )
    kept = shaped_columns(TableSettings(name="p", columns=["id", "ssn"]), "p", COLUMNS, ("id",))
    assert [c.name for c in kept] == ["id", "ssn"]
    kept = shaped_columns(TableSettings(name="p", exclude_columns=["ssn"]), "p", COLUMNS)
    assert [c.name for c in kept] == ["id", "name", "email"]


@pytest.mark.parametrize(
    "text",
    [
        f'hash_salt = "{SALT}"\n' + table(hash_columns=["email"]),
        f'[capture]\nhash_salt = "{SALT}"\n' + table(hash_columns=["email"]),
        table(hash_columns=["email"], hash_salt=SALT),
    ],
)
def test_a_salt_in_the_file_is_refused_without_echoing_it(tmp_path: Path, text: str) -> None:
    """A salt written in the configuration file (at the top, in ``[capture]`` or in a table's
    entry) is refused with the sentence saying where a salt goes, and the salt is not in
    it."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert SALT_IN_FILE in str(caught.value)
    assert SALT not in str(caught.value)


def test_the_salt_comes_from_the_environment_or_a_file_and_is_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``CDC_HASH_SALT``, or ``capture.hash_salt_file`` (its bytes, one trailing newline
    dropped) when set; no salt needed without ``hash_columns``; a missing or short salt is one
    sentence; the salt is in no repr of the settings or of itself."""
    path = write(tmp_path, table(hash_columns=["email"]))
    monkeypatch.delenv("CDC_HASH_SALT", raising=False)
    assert load_settings(write(tmp_path, table(), "plain.toml")).hash_salt() is None
    with pytest.raises(ConfigError, match=r"^hash_columns need a salt: set the environment"):
        load_settings(path).hash_salt()
    monkeypatch.setenv("CDC_HASH_SALT", SALT)
    settings = load_settings(path)
    salt = settings.hash_salt()
    assert salt is not None
    assert salt.get_secret_value() == SALT.encode()
    assert SALT not in repr(settings) + repr(salt) + str(salt)
    salt_file = tmp_path / "salt"
    salt_file.write_bytes(b"another-salt-from-a-file\n")
    settings = load_settings(path, capture={"hash_salt_file": str(salt_file)})
    salt = settings.hash_salt()
    assert salt is not None
    assert salt.get_secret_value() == b"another-salt-from-a-file"
    salt_file.write_bytes(b"tiny-9q")
    with pytest.raises(ConfigError, match="shorter than 16 bytes") as caught:
        settings.hash_salt()
    assert "tiny-9q" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"cannot read capture\.hash_salt_file"):
        load_settings(path, capture={"hash_salt_file": str(tmp_path / "none")}).hash_salt()
