"""The only place structlog is configured.

JSON lines when stdout is not a terminal (systemd, CI), a console renderer on a TTY.
"""

from __future__ import annotations

import argparse
import logging
import sys

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")


def log_level(text: str) -> str:
    """An argparse `type`: a known log level (any case), else a one-line usage error."""
    if text.lower() not in LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LEVELS)}")
    return text.lower()


def configure_logging(*, json: bool | None = None, level: str = "info") -> None:
    """Configure structlog and the stdlib root logger once per process.

    `json=None` picks JSON unless stderr is a TTY. Logs go to stderr so that stdout stays free
    for command output (mellctl) and readiness lines (mellctl up).
    """
    if json is None:
        json = not sys.stderr.isatty()
    num_level = logging.getLevelNamesMapping().get(level.upper())
    if num_level is None:
        raise ValueError(f"unknown log level {level!r}")
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(num_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(
        level=num_level, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )
