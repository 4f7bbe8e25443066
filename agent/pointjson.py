"""A point as the compact JSON of a data batch, by hand: this runs for every reading buffered.

A value that JSON or the tenant's store cannot hold becomes a ``bad``
point that says why, never a batch the bridge refuses: not a finite
number, text with a NUL character or a lone surrogate, text longer than
``MAX_TEXT_BYTES`` (a broker refuses packets over its ``max_packet_size``,
1 MiB as provisioned; one oversized reading must not hold a gateway's
whole stream back). Trailing NULs of a fixed-length PLC string are padding
and are dropped, as the Modbus codec does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from drivers.points import Point

MAX_TEXT_BYTES = 64 * 1024

Body = tuple[str, int, str]  # device, points, the batch's "points" array without brackets


def _text(value: str) -> tuple[str | None, str | None]:
    """``(json text, None)`` or ``(None, why it cannot be stored)``."""
    if "\x00" in value:
        value = value.rstrip("\x00")
        if "\x00" in value:
            return None, "text contains a NUL character"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return None, "text is not valid Unicode (lone surrogate)"
    if size > MAX_TEXT_BYTES:
        return None, f"text of {size} bytes is longer than {MAX_TEXT_BYTES}"
    return json.dumps(value, ensure_ascii=False), None


def point_json(point: Point, tags: dict[str, str]) -> str:
    """One point; ``tags`` caches the tag names' JSON."""
    value = point.value
    quality = point.quality.value
    error = point.error
    kind = type(value)
    text: str | None
    if value is None:
        text = "null"
    elif kind is bool:
        text = "true" if value else "false"
    elif kind is int:
        text = str(value)
    elif kind is float:
        if math.isfinite(value):  # type: ignore[arg-type]
            text = repr(value)
        else:
            # JSON has no NaN or Infinity: the reading is bad, and says why.
            text, quality, error = "null", "bad", f"not a finite number ({value})"
    else:
        text, why = _text(value if isinstance(value, str) else str(value))
        if text is None:
            text, quality, error = "null", "bad", why
    tag = tags.get(point.tag)
    if tag is None:
        tag = tags[point.tag] = json.dumps(point.tag, ensure_ascii=False)
    if error is None:
        return f'{{"tag":{tag},"ts":{point.ts},"v":{text},"q":"{quality}"}}'
    error = error.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return f'{{"tag":{tag},"ts":{point.ts},"v":{text},"q":"{quality}","err":{json.dumps(error, ensure_ascii=True)}}}'


def bodies(
    device: str, points: Sequence[Point], tags: dict[str, str], *, max_points: int, max_bytes: int
) -> list[Body]:
    """Points as batch bodies, cut by ``max_points`` and ``max_bytes``."""
    return _cut(device, [point_json(point, tags) for point in points], max_points=max_points, max_bytes=max_bytes)


def rebatch(
    device: str, points: Sequence[dict[str, Any]], *, max_points: int, max_bytes: int, alone: int, limit: int
) -> tuple[list[Body], bool]:
    """A buffered batch's points (as decoded from its payload) cut again, to fit a broker's ``limit``.

    Each body is at most ``max_bytes``, or a single point of at most ``alone`` bytes (what a batch of one
    point can hold within ``limit``). A point larger than that becomes a bad point of the same tag and time
    that says why (as a text over ``MAX_TEXT_BYTES`` does). Returns the bodies and whether anything was cut
    or replaced (False: the batch cannot be made smaller).
    """
    replaced = False

    def parts() -> Iterator[str]:
        nonlocal replaced
        for point in points:
            part = json.dumps(point, ensure_ascii=False, separators=(",", ":"))
            size = len(part.encode("utf-8"))
            if size > alone:
                replaced = True
                why = f"reading of {size} bytes does not fit the broker's max_packet_size of {limit} bytes"
                part = json.dumps(
                    {"tag": point.get("tag"), "ts": point.get("ts"), "v": None, "q": "bad", "err": why},
                    ensure_ascii=False,
                    separators=(",", ":"),
                )
            yield part

    out = _cut(device, parts(), max_points=max_points, max_bytes=max_bytes)
    return out, replaced or len(out) > 1


def _cut(device: str, encoded: Iterable[str], *, max_points: int, max_bytes: int) -> list[Body]:
    out = []
    parts: list[str] = []
    size = 0
    for part in encoded:
        length = len(part) if part.isascii() else len(part.encode("utf-8"))  # bytes, as the broker counts them
        if parts and (len(parts) >= max_points or size + length + 1 > max_bytes):
            out.append((device, len(parts), ",".join(parts)))
            parts, size = [], 0
        parts.append(part)
        size += length + 1
    if parts:
        out.append((device, len(parts), ",".join(parts)))
    return out
