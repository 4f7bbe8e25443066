"""Durations (``500ms``, ``1s``, ``5m``) and sizes (``64MiB``) as written in configs."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}


def parse_duration(value: object) -> float:
    """Return seconds for ``500ms`` / ``1s`` / ``5m`` / ``2h`` / ``7d`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 500ms, 1s or 5m, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected a duration like 500ms, 1s or 5m, got {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Return bytes for ``64MiB`` / ``500KB`` / a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 64MiB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"expected a size like 64MiB or 500KB, got {value!r}")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {value!r}")
    return size


def format_duration(seconds: float) -> str:
    """The shortest config spelling of a duration (``0.5`` -> ``500ms``)."""
    if seconds < 1 or seconds != int(seconds):
        return f"{seconds * 1000:g}ms"
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{int(seconds)}s"


def plural(count: int, one: str, many: str | None = None) -> str:
    """``1 device``, ``2 devices``; ``many`` for irregular words (``batch``, ``batches``)."""
    return f"{count} {one if count == 1 else (many or one + 's')}"
