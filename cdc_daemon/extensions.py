"""Parts the daemon finds by name: entry points of the group ``cdc_daemon``.

The local tooling (``cdc_daemon.local``: the demo, the Snowflake emulator's dialect) registers
itself there (``pyproject.toml``). The daemon never imports ``local/``: a production install
runs without it, and asking for a part that is not installed gets one clear sentence.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from cdc_daemon.errors import ConfigError

GROUP = "cdc_daemon"


def load(name: str, what: str) -> Any:
    """The object registered as ``name``; ``what`` names it in the error message."""
    found = entry_points(group=GROUP, name=name)
    if not found:
        raise ConfigError(
            f"{what} is not installed (no entry point {name!r} in group {GROUP!r}): "
            "install cdc-daemon[local]"
        )
    try:
        return next(iter(found)).load()
    except ImportError as exc:
        raise ConfigError(f"{what} cannot be loaded ({exc}): install cdc-daemon[local]") from None
