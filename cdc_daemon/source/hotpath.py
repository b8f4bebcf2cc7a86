"""Which implementation of the per-change hot path runs: the compiled core (``_hotpath``, built
from ``_hotpath.c`` at install when a C compiler and Python's headers are there) or the
pure-Python code, which is the reference.

The core only takes the common path and answers None for anything else, so its callers run
the Python code on the same input then (``capture.logical.encode``, ``capture.logical.reader``):
rare and hostile values get the reference's bytes by construction. ``CDC_DAEMON_PURE_PYTHON=1``
forces the pure path (the tests run both).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Protocol

PURE_ENV = "CDC_DAEMON_PURE_PYTHON"


class Core(Protocol):
    """The functions of ``_hotpath`` (``_hotpath.pyi``)."""

    def decode_tuple(
        self, buf: bytes, pos: int, unchanged: object, /
    ) -> tuple[list[Any], int] | None: ...

    def encode_row(
        self, plan: bytes, partition: int, values: list[Any], /
    ) -> tuple[bytes, bytes] | None: ...

    def encode_change(
        self, buf: bytes, pos: int, plan: bytes, partition: int, op: bytes, lsn: int, ts: bytes, /
    ) -> tuple[bytes, bytes] | None: ...

    def encode_update(
        self, buf: bytes, pos: int, plan: bytes, partition: int, keys: bytes, lsn: int, ts: bytes, /
    ) -> tuple[bytes, bytes] | None: ...


def forced_pure() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


@functools.cache
def built() -> Core | None:
    """The compiled core, when the install built it (whatever ``CDC_DAEMON_PURE_PYTHON``)."""
    try:
        from cdc_daemon.source import _hotpath
    except ImportError:
        return None
    return _hotpath


def core() -> Core | None:
    """The core the daemon uses: None for the pure-Python path."""
    return None if forced_pure() else built()


def describe() -> str:
    """Which path runs, for the start's log line."""
    if forced_pure():
        return f"python ({PURE_ENV}=1)"
    return "compiled" if built() is not None else "python (the C extension was not built)"
