"""Deterministic object keys: the same batch is always written under the same names.

<prefix><table key>/dt=<YYYY-MM-DD>/<batch id><extension>
<prefix>_quarantine/<table key>/reason=<reason>/<batch id><extension>

``table`` is the table's ``TableName.key`` (``<schema>.<table>`` for a plain name; see
docs/design.md#the-tables-folder)."""

from __future__ import annotations

from cdc_daemon.batch.csv import EXTENSIONS, Codec


def object_key(prefix: str, table: str, day: str, batch: str, codec: Codec) -> str:
    return f"{prefix}{table}/dt={day}/{batch}{EXTENSIONS[codec]}"


def quarantine_key(prefix: str, table: str, reason: str, batch: str, codec: Codec) -> str:
    """Outside ``<prefix><table>/``, so the pipe never loads it."""
    return f"{prefix}_quarantine/{table}/reason={reason}/{batch}{EXTENSIONS[codec]}"
