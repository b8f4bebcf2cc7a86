"""The warehouse client knows a ``Dialect`` and nothing of the emulator: the dialect is named by
``snowflake.dialect`` and found as an entry point; no setting exists for the emulator alone."""

from __future__ import annotations

import re

import pytest

from cdc_daemon.config import SnowflakeSettings
from cdc_daemon.errors import ConfigError
from cdc_daemon.local.warehouse import EmulatorDialect
from cdc_daemon.warehouse.client import Dialect, SnowflakeDialect, dialect_for


def test_the_dialect_is_named_and_found_as_an_entry_point() -> None:
    """``snowflake`` (the default) is Snowflake's own dialect; ``emulator`` is the local
    warehouse's, loaded through its entry point; a name no installed extension registers is one
    sentence naming it."""
    assert isinstance(dialect_for(SnowflakeSettings()), SnowflakeDialect)
    assert isinstance(dialect_for(SnowflakeSettings(dialect="emulator")), EmulatorDialect)
    with pytest.raises(ConfigError, match=r"^the warehouse dialect 'nonesuch' is not installed"):
        dialect_for(SnowflakeSettings(dialect="nonesuch"))


def test_no_setting_exists_for_the_emulator_alone() -> None:
    """The snowflake section has no emulator switch nor emulator folder."""
    assert not [name for name in SnowflakeSettings.model_fields if "emulator" in name]


def test_the_dialect_docstring_names_every_method() -> None:
    """Each method of the ``Dialect`` protocol is described in its docstring, and the docstring
    describes no method it lacks."""
    methods = {name for name in vars(Dialect) if not name.startswith("_")}
    described = set(re.findall(r"^\s+- ``(\w+)``(?: / ``(\w+)``)?", Dialect.__doc__ or "", re.M))
    named = {name for pair in described for name in pair if name}
    assert named == methods
    assert len(methods) == 9
    for dialect in (SnowflakeDialect, EmulatorDialect):
        assert methods <= set(vars(dialect)), dialect
