"""structlog set-up: JSON lines when stdout is not a terminal, a console renderer when it is."""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog


def configure_logging(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    file: TextIO | None = None,
) -> None:
    """Log lines go to ``file`` (default: stdout); ``auto`` picks the console renderer when it
    is a terminal (with colours) and JSON lines otherwise, for a collector to parse."""
    out = sys.stdout if file is None else file
    terminal = out.isatty()
    json_lines = fmt == "json" or (fmt == "auto" and not terminal)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=terminal)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # The console renderer draws exceptions itself (and warns when they come formatted).
            *([structlog.processors.format_exc_info] if json_lines else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
