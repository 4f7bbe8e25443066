"""The Sparkplug B topic namespace: ``spBv1.0/{group}/{type}/{edge node}[/{device}]`` and ``spBv1.0/STATE/{host}``."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

NAMESPACE = "spBv1.0"


class MessageType(enum.StrEnum):
    NBIRTH = "NBIRTH"
    NDEATH = "NDEATH"
    DBIRTH = "DBIRTH"
    DDEATH = "DDEATH"
    NDATA = "NDATA"
    DDATA = "DDATA"
    NCMD = "NCMD"
    DCMD = "DCMD"

    @property
    def of_device(self) -> bool:
        return self.value.startswith("D")


@dataclass(frozen=True, slots=True)
class Topic:
    group: str
    type: MessageType
    edge_node: str
    device: str | None = None

    def __str__(self) -> str:
        tail = f"/{self.device}" if self.device is not None else ""
        return f"{NAMESPACE}/{self.group}/{self.type}/{self.edge_node}{tail}"


class TopicError(ValueError):
    pass


def parse(topic: str) -> Topic:
    """A Sparkplug topic (not STATE); TopicError says why a topic is not one."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != NAMESPACE:
        raise TopicError(f"{topic!r} is not a Sparkplug B topic ({NAMESPACE}/group/type/edge_node[/device])")
    try:
        kind = MessageType(parts[2])
    except ValueError:
        raise TopicError(f"{topic!r}: unknown message type {parts[2]!r}") from None
    if kind.of_device != (len(parts) == 5) or len(parts) > 5 or not all(parts[1:]):
        raise TopicError(
            f"{topic!r}: a {kind} topic is {NAMESPACE}/group/{kind}/edge_node" + ("/device" if kind.of_device else "")
        )
    return Topic(parts[1], kind, parts[3], parts[4] if len(parts) == 5 else None)


def state_topic(host_id: str) -> str:
    return f"{NAMESPACE}/STATE/{host_id}"


def state_payload(online: bool, timestamp_ms: int) -> bytes:
    """Sparkplug 3.0 STATE: JSON, retained, QoS 1 (the host's birth, and its will with ``online`` false)."""
    return json.dumps({"online": online, "timestamp": timestamp_ms}, separators=(",", ":")).encode()


def parse_state(payload: bytes) -> tuple[bool, int] | None:
    """``(online, timestamp)`` of a STATE message, None if it is not one."""
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict) or type(doc.get("online")) is not bool or type(doc.get("timestamp")) is not int:
        return None
    return doc["online"], doc["timestamp"]
