"""The built-in mapping: the agent's batches, status and events (DESIGN.md's topic tree).

The gateway and device come from the topic (the broker's ACL lets a gateway
write only under ``gw/<its id>/``), never from the payload: a payload that
names another gateway or device is refused, not believed.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

from .messages import (
    MAX_TS_MS,
    QUALITIES,
    BufferFigures,
    DataBatch,
    EventRow,
    Malformed,
    MetaRow,
    StatusRow,
    _json_type,
    check_json,
    check_scalar,
    check_text,
    check_ts,
    parse_json,
)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_INT64 = 2**63
_MISSING = object()
_KNOWN_TAGS: set[str] = set()  # tag names already checked (they repeat in every batch)
_KNOWN_TAGS_MAX = 100_000
_FINITE_CHECKED = frozenset({int, float, bool, type(None)})  # value types the hot path checks itself


def check_name(value: Any, where: str) -> str:
    if type(value) is not str or not NAME_RE.fullmatch(value):
        raise Malformed(f"{where}: {_show(value)} is not a valid name (letters, digits, '_', '.', '-')")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _object(payload: bytes) -> dict[str, Any]:
    doc = parse_json(payload)
    if type(doc) is not dict:
        raise Malformed(f"payload must be a JSON object, got {_json_type(doc)}")
    return doc


class _Inexact(Exception):
    """orjson read an integer beyond 64 bits as a float: decode the payload again, exactly."""


def decode_batch(gw: str, device: str, payload: bytes, received_at: int) -> DataBatch:
    """``gw/{gw}/data/{device}``: ``{"v":1,"gw","dev","seq","points":[{"tag","ts","v","q","err"?}]}``.

    Batches arrive by the thousand, so they are parsed with orjson (about
    2.5x the standard parser). Whatever that refuses or cannot read exactly
    (an integer beyond 64 bits, which it turns into a float) is decoded
    again from the standard parser's reading, whose errors name the problem.
    """
    check_name(gw, "topic gateway")
    check_name(device, "topic device")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        pass
    else:
        try:
            return _batch(gw, device, doc, received_at, exact=False, size=len(payload))
        except (Malformed, _Inexact):
            pass
    return _batch(gw, device, _object(payload), received_at, exact=True, size=len(payload))


def _batch(gw: str, device: str, doc: Any, received_at: int, *, exact: bool, size: int = 0) -> DataBatch:
    if type(doc) is not dict:
        raise Malformed(f"payload must be a JSON object, got {_json_type(doc)}")
    if doc.get("v") != 1 or type(doc.get("v")) is not int:
        raise Malformed(f"v: unsupported batch format {_show(doc.get('v'))} (this bridge reads v=1)")
    if doc.get("gw") != gw:
        raise Malformed(f"gw: payload says {_show(doc.get('gw'))} but the topic's gateway is {gw!r}")
    if doc.get("dev") != device:
        raise Malformed(f"dev: payload says {_show(doc.get('dev'))} but the topic's device is {device!r}")
    seq = doc.get("seq")
    if type(seq) is not int or not 0 <= seq < _INT64:
        raise Malformed(f"seq: must be a non-negative 64-bit integer, got {_show(seq)}")
    points = doc.get("points")
    if type(points) is not list:
        raise Malformed(f"points: must be an array, got {_json_type(points)}")
    rows: list[tuple[Any, ...]] = []
    append = rows.append
    known = _KNOWN_TAGS
    numbers = _FINITE_CHECKED
    max_ts = MAX_TS_MS
    for point in points:
        # The hot path, some 500,000 points/s per tenant: a point whose tag was
        # seen before, with an integer time in range, a number, bool or null,
        # quality good and no error passes on type and range tests alone.
        # Anything else takes the careful check, which names what is wrong.
        try:
            tag, ts, value = point["tag"], point["ts"], point["v"]
            fast = (
                tag in known
                and type(ts) is int
                and 0 <= ts <= max_ts
                and type(value) in numbers
                and len(point) == 4
                and point["q"] == "good"
            )
        except (KeyError, TypeError):  # missing keys, not an object, an unhashable tag
            fast = False
        if fast and (
            -_INT64 < value < _INT64 if type(value) is float else type(value) is not int or -_INT64 <= value < _INT64
        ):
            append((gw, device, tag, ts, value, "good", None, seq))
        else:
            append(_careful_row(gw, device, seq, len(rows), point, exact))
    return DataBatch(gw, device, seq, rows, received_at, size)


def _careful_row(gw: str, device: str, seq: int, i: int, point: Any, exact: bool) -> tuple[Any, ...]:
    """One point checked field by field: its row, or Malformed naming the field."""
    if type(point) is not dict:
        raise Malformed(f"points[{i}]: must be an object, got {_json_type(point)}")
    tag = point.get("tag")
    if type(tag) is not str or tag not in _KNOWN_TAGS:
        if type(tag) is not str or not NAME_RE.fullmatch(tag):
            raise Malformed(f"points[{i}].tag: {_show(tag)} is not a valid tag name")
        if len(_KNOWN_TAGS) < _KNOWN_TAGS_MAX:
            _KNOWN_TAGS.add(tag)
    ts = point.get("ts")
    if type(ts) is not int or ts < 0 or ts > MAX_TS_MS:
        check_ts(ts, f"points[{i}].ts")
    value = point.get("v", _MISSING)
    if value is _MISSING:
        raise Malformed(f"points[{i}].v: missing (use null for no value)")
    if not exact and type(value) is float and not -_INT64 < value < _INT64:
        raise _Inexact  # maybe an integer literal beyond 64 bits
    quality = point.get("q", "good")
    if quality != "good" and (type(quality) is not str or quality not in QUALITIES):
        raise Malformed(f"points[{i}].q: must be good, bad or uncertain, got {_show(quality)}")
    error = point.get("err")
    if error is not None:
        if type(error) is not str:
            raise Malformed(f"points[{i}].err: must be text, got {_json_type(error)}")
        try:
            check_text(error, f"points[{i}].err")
        except Malformed:
            error = error.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    try:
        check_scalar(value, f"points[{i}].v")
    except Malformed as exc:
        if type(value) in (list, dict):
            raise
        # A value no store can hold (a NUL in text, a lone surrogate, not finite, beyond 64 bits): this
        # reading is bad and says why; the batch's other readings are stored as they are.
        value, quality, error = None, "bad", f"refused by the bridge: {exc.reason}"
    return (gw, device, tag, ts, value, quality, error, seq)


def decode_status(gw: str, payload: bytes, received_at: int) -> StatusRow:
    """``gw/{gw}/status``: ``{"state":"online"|"offline","ts","version","config_hash"}``."""
    check_name(gw, "topic gateway")
    doc = _object(payload)
    state = doc.get("state")
    if state not in ("online", "offline"):
        raise Malformed(f"state: must be online or offline, got {_show(state)}")
    ts = check_ts(doc.get("ts"), "ts")
    version, config_hash = doc.get("version"), doc.get("config_hash")
    for key, value in (("version", version), ("config_hash", config_hash)):
        if value is not None:
            if type(value) is not str:
                raise Malformed(f"{key}: must be text, got {_json_type(value)}")
            check_text(value, key)
    figures = doc.get("buffer")
    buffer = None if figures is None else _buffer_figures(figures, ts)
    return StatusRow(gw, state, ts, version, config_hash, received_at, buffer)


_BUFFER_COUNTS = ("pending_batches", "pending_points", "unconfirmed_batches", "dropped_points")


def _buffer_figures(doc: Any, status_ts: int) -> BufferFigures:
    """The status's ``buffer`` object: counts are integers >= 0, times epoch ms or null."""
    if type(doc) is not dict:
        raise Malformed(f"buffer: must be an object, got {_json_type(doc)}")
    counts = []
    for key in _BUFFER_COUNTS:
        value = doc.get(key, 0)
        if type(value) is not int or not 0 <= value < _INT64:
            raise Malformed(f"buffer.{key}: must be an integer >= 0, got {_show(value)}")
        counts.append(value)
    times = []
    for key in ("oldest_pending_ts", "oldest_unconfirmed_ts"):
        value = doc.get(key)
        times.append(None if value is None else check_ts(value, f"buffer.{key}"))
    ts = status_ts if doc.get("ts") is None else check_ts(doc["ts"], "buffer.ts")
    return BufferFigures(ts, *counts, *times)


def decode_meta(gw: str, device: str, payload: bytes, received_at: int) -> MetaRow:
    """``gw/{gw}/meta/{device}``: the device's tags with their unit and description (an empty payload clears)."""
    check_name(gw, "topic gateway")
    check_name(device, "topic device")
    if not payload:
        return MetaRow(gw, device, None, received_at)
    doc = _object(payload)
    tags = doc.get("tags", [])
    if type(tags) is not list:
        raise Malformed(f"tags: must be a list, got {_json_type(tags)}")
    kept = []
    for i, tag in enumerate(tags):
        if type(tag) is not dict:
            raise Malformed(f"tags[{i}]: must be an object, got {_json_type(tag)}")
        row: dict[str, Any] = {"name": check_name(tag.get("name"), f"tags[{i}].name")}
        for key in ("type", "unit", "description"):
            value = tag.get(key)
            if value is not None and type(value) is not str:
                raise Malformed(f"tags[{i}].{key}: must be text, got {_json_type(value)}")
            row[key] = None if value is None else check_text(value, f"tags[{i}].{key}")
        row["writable"] = tag.get("writable") is True
        kept.append(row)
    return MetaRow(gw, device, check_json(kept, "tags"), received_at)


def decode_event(gw: str, payload: bytes, received_at: int) -> EventRow:
    """``gw/{gw}/events``: ``{"type","ts",…details}``, stored whole."""
    check_name(gw, "topic gateway")
    doc = _object(payload)
    kind = doc.get("type")
    if type(kind) is not str or not kind:
        raise Malformed(f"type: must be non-empty text, got {_show(kind)}")
    check_text(kind, "type")
    ts = check_ts(doc.get("ts"), "ts")
    text = check_json(doc, "payload")
    # Redelivery of the same event is stored once: events have no seq, so
    # the content (gateway, time, type and details) is the identity.
    digest = hashlib.sha256(text.encode()).hexdigest()[:32]
    return EventRow(gw, kind, ts, text, digest, received_at)
