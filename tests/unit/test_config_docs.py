"""docs/configuration.md is generated from the settings' field descriptions: one source."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from cdc_daemon.config import Settings, TableSettings, reference_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_doc_matches_the_settings() -> None:
    """The committed docs/configuration.md is exactly what the settings render to, so a key
    added, renamed or redescribed in config.py without regenerating the file fails here
    (regenerate: ``python -m cdc_daemon.config > docs/configuration.md``)."""
    assert DOC.read_text() == reference_markdown()


def test_every_setting_is_described() -> None:
    """Every key of every section has a description: none is left undocumented."""
    for section, field in Settings.model_fields.items():
        assert field.description or section != "tables"
        model = TableSettings if section == "tables" else field.annotation
        assert isinstance(model, type)
        assert issubclass(model, BaseModel), section
        for name, info in model.model_fields.items():
            assert info.description, f"{section}.{info.alias or name} has no description"
