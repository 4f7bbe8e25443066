"""The built-in mapping: the agent's batches, status and events (DESIGN.md's topic tree).

The gateway and device come from the topic (the broker's ACL lets a gateway
write only under ``gw/<its id>/``), never from the payload: a payload that
names another gateway or device is refused, not believed.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from .messages import (
    MAX_TS_MS, QUALITIES, DataBatch, EventRow, Malformed, StatusRow, _json_type, check_json, check_scalar, check_text,
    check_ts, parse_json,
)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_INT64 = 2**63
_MISSING = object()
_KNOWN_TAGS: set[str] = set()  # tag names already checked (they repeat in every batch)
_KNOWN_TAGS_MAX = 100_000


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


def decode_batch(gw: str, device: str, payload: bytes, received_at: int) -> DataBatch:
    """``gw/{gw}/data/{device}``: ``{"v":1,"gw","dev","seq","points":[{"tag","ts","v","q","err"?}]}``."""
    check_name(gw, "topic gateway")
    check_name(device, "topic device")
    doc = _object(payload)
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
    for i, point in enumerate(points):
        # The hot path: ~50,000 points/s per tenant. Each check is cheap for good data and falls
        # through to the careful (and descriptive) one otherwise.
        if type(point) is not dict:
            raise Malformed(f"points[{i}]: must be an object, got {_json_type(point)}")
        tag = point.get("tag")
        if type(tag) is not str or tag not in known:
            if type(tag) is not str or not NAME_RE.fullmatch(tag):
                raise Malformed(f"points[{i}].tag: {_show(tag)} is not a valid tag name")
            if len(known) < _KNOWN_TAGS_MAX:
                known.add(tag)
        ts = point.get("ts")
        if type(ts) is not int or ts < 0 or ts > MAX_TS_MS:
            check_ts(ts, f"points[{i}].ts")
        value = point.get("v", _MISSING)
        kind = type(value)
        if kind is float:
            if value - value != 0.0:  # inf and nan (JSON has neither, but 1e999 parses as inf)
                check_scalar(value, f"points[{i}].v")
        elif kind is int:
            if not -_INT64 <= value < _INT64:
                check_scalar(value, f"points[{i}].v")
        elif value is _MISSING:
            raise Malformed(f"points[{i}].v: missing (use null for no value)")
        elif value is not None and kind is not bool:
            check_scalar(value, f"points[{i}].v")
        quality = point.get("q", "good")
        if quality != "good" and (type(quality) is not str or quality not in QUALITIES):
            raise Malformed(f"points[{i}].q: must be good, bad or uncertain, got {_show(quality)}")
        error = point.get("err")
        if error is not None:
            if type(error) is not str:
                raise Malformed(f"points[{i}].err: must be text, got {_json_type(error)}")
            check_text(error, f"points[{i}].err")
        append((gw, device, tag, ts, value, quality, error, seq))
    return DataBatch(gw, device, seq, rows, received_at)


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
    return StatusRow(gw, state, ts, version, config_hash, received_at)


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
