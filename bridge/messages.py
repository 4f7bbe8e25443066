"""What arrives from a tenant broker, and what it decodes into: rows for the tenant's tables.

Decoding is pure: a message becomes rows (a data batch, a status or event
row, mapped rows) or a ``Malformed`` reason that sends it to the dead
letters. Nothing here knows about MQTT connections or storage.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

QUALITIES = frozenset({"good", "bad", "uncertain"})
MAX_TS_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
INT64 = 2**63


class Malformed(Exception):
    """A payload the bridge cannot store as it is; the reason goes to the dead-letter table."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Received:
    """One PUBLISH from a tenant broker, as paho handed it over."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    generation: int  # which connection delivered it: a mid is only valid on its own connection
    sub_ids: tuple[int, ...]
    received_at: int  # epoch ms, the bridge's clock


@dataclass(frozen=True, slots=True)
class DataBatch:
    """A gateway's batch: ``rows`` are ``(gw, device, tag, ts, value, quality, error, seq)``."""

    gw: str
    device: str
    seq: int
    rows: list[tuple[Any, ...]]
    received_at: int
    size: int = 0  # the message's payload bytes (metering)


@dataclass(frozen=True, slots=True)
class BufferFigures:
    """The agent's buffer, as its retained status reports it (``buffer`` in ``gw/{gw}/status``)."""

    ts: int  # when the agent measured them
    pending_batches: int  # the backlog: batches the broker has not accepted yet
    pending_points: int
    unconfirmed_batches: int  # accepted, awaiting the tenant storage's confirmation
    dropped_points: int  # readings the buffer dropped (full, too old), its own count
    oldest_pending_ts: int | None
    oldest_unconfirmed_ts: int | None


@dataclass(frozen=True, slots=True)
class StatusRow:
    gw: str
    state: str
    ts: int
    version: str | None
    config_hash: str | None
    received_at: int
    buffer: BufferFigures | None = None


@dataclass(frozen=True, slots=True)
class MetaRow:
    """``gw/{gw}/meta/{device}``: the device's tags (JSON text of ``[{name, type, unit, description, writable}]``),
    or ``None`` when the retained meta was cleared (the device left the configuration)."""

    gw: str
    device: str
    tags: str | None
    received_at: int


@dataclass(frozen=True, slots=True)
class EventRow:
    gw: str
    type: str
    ts: int
    payload: str
    digest: str
    received_at: int


@dataclass(frozen=True, slots=True)
class MappedRow:
    table: str
    row: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    payload: bytes
    reason: str
    received_at: int


@dataclass
class Decoded:
    """A commit window's messages, sorted by destination table."""

    batches: list[DataBatch] = field(default_factory=list)
    statuses: list[StatusRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    metas: list[MetaRow] = field(default_factory=list)
    mapped: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)
    replies: list[tuple[str, bytes]] = field(default_factory=list)  # to publish after the commit (e.g. rebirths)

    @property
    def points(self) -> int:
        return sum(len(b.rows) for b in self.batches)


def _reject_constant(name: str) -> Any:
    raise Malformed(f"invalid JSON: {name} is not a JSON number")


def parse_json(payload: bytes) -> Any:
    """JSON as the standard has it: no NaN or Infinity, UTF-8, bounded nesting."""
    try:
        return json.loads(payload, parse_constant=_reject_constant)
    except Malformed:
        raise
    except RecursionError:
        raise Malformed("invalid JSON: nested too deeply") from None
    except UnicodeDecodeError:
        raise Malformed("invalid JSON: not UTF-8 text") from None
    except ValueError as exc:
        raise Malformed(f"invalid JSON: {getattr(exc, 'msg', exc)} at byte {getattr(exc, 'pos', '?')}") from None


def check_text(value: str, where: str) -> str:
    """Text every backend can store: UTF-8 encodable (no lone surrogates) and without NUL."""
    if "\x00" in value:
        raise Malformed(f"{where}: contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Malformed(f"{where}: not valid Unicode text (lone surrogate)") from None
    return value


def check_scalar(value: Any, where: str) -> Any:
    """A stored value: finite number within 64 bits, bool, text, or null."""
    kind = type(value)
    if kind is float:
        if not math.isfinite(value):
            raise Malformed(f"{where}: {value} is not a finite number")
    elif kind is int:
        if not -INT64 <= value < INT64:
            raise Malformed(f"{where}: integer out of the 64-bit range")
    elif kind is str:
        check_text(value, where)
    elif value is not None and kind is not bool:
        raise Malformed(f"{where}: must be a number, text, true/false or null (got {_json_type(value)})")
    return value


def check_json(value: Any, where: str) -> str:
    """JSON text every backend can store (PostgreSQL's jsonb refuses \\u0000)."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        raise Malformed(f"{where}: contains a number that is not finite") from None
    if "\\u0000" in text:
        raise Malformed(f"{where}: contains a NUL character")
    return check_text(text, where)


def check_ts(value: Any, where: str) -> int:
    if type(value) is not int:
        raise Malformed(f"{where}: must be an integer (epoch milliseconds), got {_json_type(value)}")
    if not 0 <= value <= MAX_TS_MS:
        raise Malformed(f"{where}: {value} is not an epoch time in milliseconds")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "true/false", int: "integer", float: "number", str: "text", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )
