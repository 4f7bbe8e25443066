"""The bridge as a Sparkplug B host application: births, data and deaths from any edge node, into the store.

What each message becomes (pure: no I/O; the ingest loop owns the MQTT side)::

    NBIRTH  the node's aliases and metrics learnt; its metrics stored; status online (bdSeq noted)
    DBIRTH  the device's aliases learnt; its metrics stored; event device_up
    NDATA   node metrics stored (device = the edge node id)
    DDATA   device metrics stored (device = the Sparkplug device id)
    DDEATH  event device_down
    NDEATH  status offline, when its bdSeq is the current birth's (an older session's will is ignored)

Rows go to the same ``points`` table as the JSON batches: ``gw`` is the
edge node id, ``tag`` the metric name, ``ts`` the metric's timestamp (or
the payload's), ``quality`` from the metric's ``Quality`` property (OPC
codes: 192 good, 64-191 uncertain, below 64 bad; none: good).

A factory-edge birth (``uuid`` ``fe:birth``) only teaches aliases: its
values are copies of readings its batches deliver. Another edge node's
birth values are stored as readings.

Exactly once: an edge node of factory-edge names its buffer batch in the
payload's ``uuid`` (``fe:<seq>``); the store claims ``(gw, seq)`` once and
the bridge confirms it on ``gw/{gw}/ack``, as for JSON batches. Another
implementation's message is claimed under a key made from its edge node,
device, ``bdSeq``, ``seq`` and timestamp, so a redelivery is stored once.

Data the host cannot read (no birth seen, an unknown alias) asks the edge
node for a rebirth (``NCMD Node Control/Rebirth``, at most every
``REBIRTH_EVERY_S`` per node) and is kept as a dead letter, except a
factory-edge batch: it is neither stored nor confirmed, so the agent sends
it again after the rebirth. What does not decode is a dead letter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

from factory_edge.logs import fields
from factory_edge.sparkplug.payload import (
    BATCH_UUID,
    BIRTH_UUID,
    DataType,
    Metric,
    Payload,
    PayloadError,
    decode,
    encode,
)
from factory_edge.sparkplug.topics import MessageType, Topic, TopicError, parse

from .messages import DataBatch, DeadLetter, Decoded, EventRow, Received, StatusRow

log = logging.getLogger(__name__)

REBIRTH_EVERY_S = 5.0
SKIPPED = ("bdSeq", "Node Control/")  # bookkeeping metrics, not readings
_NAME = re.compile(r"^[^\x00-\x1f\x7f]{1,255}$")


@dataclass
class _Node:
    bd_seq: int | None = None
    aliases: dict[int, tuple[str | None, str, DataType]] = field(default_factory=dict)  # alias -> device, name, type
    types: dict[tuple[str | None, str], DataType] = field(default_factory=dict)
    devices: set[str] = field(default_factory=set)
    born: bool = False


@dataclass(frozen=True, slots=True)
class Rebirth:
    """Ask an edge node to publish its births again (``NCMD``)."""

    group: str
    edge_node: str

    @property
    def topic(self) -> str:
        return str(Topic(self.group, MessageType.NCMD, self.edge_node))

    @property
    def payload(self) -> bytes:
        return encode(Payload(metrics=[Metric("Node Control/Rebirth", DataType.BOOLEAN, True)]))


class SparkplugHost:
    """The births an edge node told us (per group and edge node): the state a host application keeps.

    Not thread-safe: one owner (the tenant's store thread, where windows are decoded).
    """

    def __init__(self) -> None:
        self.nodes: dict[tuple[str, str], _Node] = {}
        self._asked: dict[tuple[str, str], int] = {}  # when a rebirth was last asked (ms)

    def decode(self, message: Received, out: Decoded) -> None:
        topic_text, at = message.topic, message.received_at
        try:
            topic = parse(topic_text)
        except TopicError as exc:
            if not topic_text.startswith("spBv1.0/STATE/"):
                out.dead.append(DeadLetter(topic_text, message.payload, str(exc), at))
            return
        if topic.type in (MessageType.NCMD, MessageType.DCMD):
            return  # commands, ours or another host's: not data
        try:
            payload = decode(message.payload)
        except PayloadError as exc:
            out.dead.append(DeadLetter(topic_text, message.payload, str(exc), at))
            return
        key = (topic.group, topic.edge_node)
        node = self.nodes.setdefault(key, _Node())
        handler = {
            MessageType.NBIRTH: self._nbirth,
            MessageType.DBIRTH: self._dbirth,
            MessageType.NDATA: self._data,
            MessageType.DDATA: self._data,
            MessageType.DDEATH: self._ddeath,
            MessageType.NDEATH: self._ndeath,
        }[topic.type]
        handler(topic, node, payload, message, out)

    # ---------------------------------------------------------------- births and deaths

    def _nbirth(self, topic: Topic, node: _Node, payload: Payload, message: Received, out: Decoded) -> None:
        bd_seq = next((m.value for m in payload.metrics if m.name == "bdSeq"), None)
        node.bd_seq = bd_seq if type(bd_seq) is int else None
        node.aliases = {a: v for a, v in node.aliases.items() if v[0] is not None}  # the node's own are reborn
        node.types = {k: v for k, v in node.types.items() if k[0] is not None}
        node.born = True
        self._learn(node, None, payload)
        ts = payload.timestamp or message.received_at
        out.statuses.append(StatusRow(topic.edge_node, "online", ts, "sparkplug", None, message.received_at))
        if payload.uuid != BIRTH_UUID:
            self._store(topic, node, None, payload, message, out)

    def _dbirth(self, topic: Topic, node: _Node, payload: Payload, message: Received, out: Decoded) -> None:
        device = topic.device or ""
        if not node.born:
            self._ask_rebirth(topic, message, out, "a device birth before the node's")
        node.devices.add(device)
        self._learn(node, device, payload)
        out.events.append(self._event(topic, "device_up", device, payload, message))
        if payload.uuid != BIRTH_UUID:
            self._store(topic, node, device, payload, message, out)

    def _ddeath(self, topic: Topic, node: _Node, payload: Payload, message: Received, out: Decoded) -> None:
        device = topic.device or ""
        node.devices.discard(device)
        out.events.append(self._event(topic, "device_down", device, payload, message))

    def _ndeath(self, topic: Topic, node: _Node, payload: Payload, message: Received, out: Decoded) -> None:
        bd_seq = next((m.value for m in payload.metrics if m.name == "bdSeq"), None)
        if node.bd_seq is not None and bd_seq is not None and bd_seq != node.bd_seq:
            log.info(
                "ignored the death of an older session",
                extra=fields(edge_node=topic.edge_node, death_bd_seq=bd_seq, birth_bd_seq=node.bd_seq),
            )
            return
        node.born = False
        node.devices.clear()
        out.statuses.append(
            StatusRow(
                topic.edge_node,
                "offline",
                payload.timestamp or message.received_at,
                "sparkplug",
                None,
                message.received_at,
            )
        )

    def _learn(self, node: _Node, device: str | None, payload: Payload) -> None:
        for metric in payload.metrics:
            if metric.name is None:
                continue
            node.types[(device, metric.name)] = metric.datatype
            if metric.alias is not None:
                node.aliases[metric.alias] = (device, metric.name, metric.datatype)

    @staticmethod
    def _event(topic: Topic, kind: str, device: str, payload: Payload, message: Received) -> EventRow:
        ts = payload.timestamp or message.received_at
        doc = {"type": kind, "ts": ts, "device": device, "source": "sparkplug"}
        text = json.dumps(doc, separators=(",", ":"), sort_keys=True)
        digest = hashlib.sha256(f"{topic}|{payload.seq}|{text}".encode()).hexdigest()
        return EventRow(topic.edge_node, kind, ts, text, digest, message.received_at)

    # ---------------------------------------------------------------- data

    def _data(self, topic: Topic, node: _Node, payload: Payload, message: Received, out: Decoded) -> None:
        device = topic.device
        if not node.born or (device is not None and device not in node.devices):
            what = "data before the node's birth" if not node.born else f"data of device {device} before its birth"
            self._unreadable(topic, payload, message, out, what)
            return
        self._store(topic, node, device, payload, message, out)

    def _store(
        self, topic: Topic, node: _Node, device: str | None, payload: Payload, message: Received, out: Decoded
    ) -> None:
        rows: list[tuple[Any, ...]] = []
        seq = self._batch_seq(topic, payload)
        gw = topic.edge_node
        dev = device if device is not None else topic.edge_node
        for metric in payload.metrics:
            name, datatype = metric.name, metric.datatype
            if name is None and metric.alias is not None:
                known = node.aliases.get(metric.alias)
                if known is None or known[0] != device:
                    self._unreadable(topic, payload, message, out, f"unknown alias {metric.alias}")
                    return
                _, name, datatype = known
            if name is None or name.startswith(SKIPPED):
                continue
            if not _NAME.match(name):
                out.dead.append(
                    DeadLetter(
                        str(topic),
                        message.payload,
                        f"metric name {name[:40]!r} is not storable text",
                        message.received_at,
                    )
                )
                return
            if datatype is DataType.UNKNOWN:
                datatype = node.types.get((device, name), DataType.UNKNOWN)
            ts = metric.timestamp or payload.timestamp or message.received_at
            value, quality, error = _reading(metric)
            rows.append((gw, dev, name, ts, value, quality, error, seq))
        out.batches.append(DataBatch(gw, dev, seq, rows, message.received_at, len(message.payload)))

    def _batch_seq(self, topic: Topic, payload: Payload) -> int:
        match = BATCH_UUID.match(payload.uuid or "")
        if match and int(match.group(1)) < 2**63:
            return int(match.group(1))
        # Another implementation: a key of the message itself, negative so it never meets a factory-edge seq.
        key = f"{topic}|{payload.seq}|{payload.timestamp}|{[(m.alias, m.name, m.timestamp) for m in payload.metrics]}"
        return -int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "big") - 1

    def _unreadable(self, topic: Topic, payload: Payload, message: Received, out: Decoded, why: str) -> None:
        self._ask_rebirth(topic, message, out, why)
        if BATCH_UUID.match(payload.uuid or ""):
            return  # a factory-edge batch: not stored, not confirmed; the agent sends it again after the rebirth
        out.dead.append(DeadLetter(str(topic), message.payload, f"{why}: rebirth requested", message.received_at))

    def _ask_rebirth(self, topic: Topic, message: Received, out: Decoded, why: str) -> None:
        key = (topic.group, topic.edge_node)
        if message.received_at - self._asked.get(key, -(10**12)) < REBIRTH_EVERY_S * 1000:
            return
        self._asked[key] = message.received_at
        rebirth = Rebirth(topic.group, topic.edge_node)
        out.replies.append((rebirth.topic, rebirth.payload))
        log.info(
            "asking an edge node for its births", extra=fields(group=topic.group, edge_node=topic.edge_node, reason=why)
        )


def _reading(metric: Metric) -> tuple[Any, str, str | None]:
    """``(value, quality, error)`` of a metric, as the store keeps a reading."""
    value = metric.value
    if isinstance(value, bytes):
        value = value.hex()
    elif isinstance(value, list):
        value = json.dumps(value)
    elif isinstance(value, float) and not math.isfinite(value):  # not storable as a number
        return None, "bad", f"not a finite number ({value})"
    code = metric.properties.get("Quality")
    error = metric.properties.get("fe.error")
    if type(code) is int:
        quality = "good" if code >= 192 else "uncertain" if code >= 64 else "bad"
    else:
        quality = "good"
    return value, quality, error if isinstance(error, str) else None
