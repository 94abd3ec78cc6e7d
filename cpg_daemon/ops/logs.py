"""structlog, configured once: JSON lines under systemd, readable lines on a terminal.

Context (``watch``, ``path``, ``key``, ``upload_id``) is bound with
contextvars where the work happens, so every event carries it. Values of keys
that look like secrets are replaced before rendering, as a last line of
defence: nothing should log them in the first place.

When the output goes to the journal (systemd sets ``JOURNAL_STREAM`` to the stream's
device and inode), each line starts with its syslog priority (``<4>`` for a warning),
which journald strips and keeps, so ``journalctl -p warning -u cpg-daemon`` works.
A value longer than ``VALUE_LIMIT`` characters is cut, so that no line outgrows
journald's ``LineMax`` (48 KiB), whatever a client sent.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_SECRET_WORDS = ("secret", "token", "password", "credential")


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in list(event):
        lowered = name.lower()
        if any(word in lowered for word in _SECRET_WORDS):
            event[name] = "[redacted]"
    return event


PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
"""syslog priorities of the log levels (sd-daemon(3))."""
VALUE_LIMIT = 2000


def _cut_long_values(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name, value in event.items():
        text = value if isinstance(value, str) else None
        if text is None and isinstance(value, (dict, list, tuple)):
            text = json.dumps(value, default=str)
        if text is not None and len(text) > VALUE_LIMIT:
            event[name] = f"{text[:VALUE_LIMIT]}... ({len(text):,} characters, cut)"
    return event


def to_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal's (``JOURNAL_STREAM``, see systemd.exec(5))."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file: a test's StringIO
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def _with_priority(renderer: Any) -> Any:
    """The renderer's line, after the syslog priority prefix journald reads."""

    def render(logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        priority = PRIORITY.get(str(event.get("level", "info")), 6)
        return f"<{priority}>{renderer(logger, name, event)}"

    return render


def configure(log_format: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog for the whole process (log_format: json, console or auto)."""
    out = stream or sys.stderr
    if log_format == "auto":
        log_format = "console" if out.isatty() else "json"
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        colors = (
            out.isatty()
            and not os.environ.get("NO_COLOR")  # https://no-color.org
            # structlog colours a Windows console only through colorama (else SystemError)
            and (sys.platform != "win32" or importlib.util.find_spec("colorama") is not None)
        )
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
    if to_journal(out):
        renderer = _with_priority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            _cut_long_values,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
            if hasattr(logging, "getLevelNamesMapping")
            else getattr(logging, level.upper())
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the standard library (botocore, asyncio): render their
    # warnings the same way, so the output stays one format.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _redact,
                _cut_long_values,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    # A failed renewal is reported by cpg_daemon.s3.credentials, in one sentence.
    logging.getLogger("aiobotocore.credentials").setLevel(logging.CRITICAL)
