"""Structured logging: one line per event, as ``key=value`` text or JSON.

Code logs with fields, never with formatted sentences::

    log.warning("device down", extra=fields(device="press-1", err="timeout"))

Text lines read well in journald (which adds its own timestamp); JSON lines
(``--log-format json``) feed log shippers.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from typing import Any

_FIELDS = "fe_fields"


def fields(**values: Any) -> dict[str, Any]:
    """Wrap structured fields for the ``extra=`` argument of a log call."""
    return {_FIELDS: values}


def _quote(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    """``level=warning logger=drivers.modbus msg="device down" device=press-1``."""

    def __init__(self, *, with_time: bool) -> None:
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.with_time:  # local time with its offset: 2026-12-03T11:26:55.747+01:00
            stamp = datetime.fromtimestamp(record.created).astimezone()
            parts.append("ts=" + stamp.isoformat(timespec="milliseconds"))
        parts += [f"level={record.levelname.lower()}", f"logger={record.name}", f"msg={_quote(record.getMessage())}"]
        for key, value in getattr(record, _FIELDS, {}).items():
            if value is not None:  # an absent value is left out, never "err=None"
                parts.append(f"{key}={_quote(value)}")
        if record.exc_info and record.levelno >= logging.ERROR:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update((k, v) for k, v in getattr(record, _FIELDS, {}).items() if v is not None)
        if record.exc_info and record.levelno >= logging.ERROR:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(*, fmt: str = "text", level: str = "info") -> None:
    """Configure the root logger for a command-line tool (never called by library code)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        # Under systemd, journald stamps each line; elsewhere we add the time.
        handler.setFormatter(KeyValueFormatter(with_time=not _under_journald()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pymodbus and asyncua log every frame, retry and failed connect; our
    # driver logs say what matters, so theirs only surface as errors (or
    # everything, when debugging).
    # asyncua logs an ERROR with a traceback for every lost connection, which
    # the OPC UA driver already reports as "device down" with the reason.
    for noisy, quiet in (("pymodbus", logging.ERROR), ("asyncua", logging.CRITICAL)):
        logging.getLogger(noisy).setLevel(logging.DEBUG if root.level <= logging.DEBUG else max(quiet, root.level))


def _under_journald() -> bool:
    import os

    return bool(os.environ.get("JOURNAL_STREAM"))
