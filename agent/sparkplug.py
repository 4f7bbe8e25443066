"""The agent as a Sparkplug B 3.0 edge node: births, deaths, data, commands, and its primary host.

The publisher (``publisher.py``) keeps doing what it does for JSON: drain
the buffer, wait for confirmations. In Sparkplug mode it asks this edge node
what to send instead::

    connect       will = NDEATH (bdSeq, persisted, +1 per connection)
    host online   NBIRTH (seq 0: bdSeq, Node Control/Rebirth, the agent's
                  version) and a DBIRTH per device that answers (every
                  tag: name, alias, datatype, last value)
    a batch       DDATA of its device, by alias, seq +1 (0-255); backlog and
                  batches sent again are ``is_historical``; the payload's
                  ``uuid`` is ``fe:<buffer seq>``, so the bridge stores it
                  once and confirms it on gw/{gw}/ack as for JSON
    device down   DDEATH; device back: DBIRTH. Meanwhile its batches (the
                  read failures, a backlog from before the death) are sent
                  as JSON on gw/{gw}/data/{device}: the store keeps them,
                  and the Sparkplug namespace has no DDATA of a dead device
    NCMD          Node Control/Rebirth: births again
    DCMD          a write of each metric to its tag (writable tags only)

With a primary host configured, nothing is published until its
``spBv1.0/STATE/<host>`` says online; when it goes offline the edge node
ends its session (NDEATH) and connects again to wait, buffering meanwhile.

Aliases are the tags' positions in the config (device by device, from 1),
so they are the same after a restart; a config reload brings new births.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.configtypes import DataType as TagType
from factory_edge.logs import fields
from factory_edge.sparkplug.payload import (
    BIRTH_UUID,
    DataType,
    Metric,
    Payload,
    PayloadError,
    batch_uuid,
    decode,
    encode,
)
from factory_edge.sparkplug.topics import MessageType, Topic, parse_state, state_topic

log = logging.getLogger(__name__)

BD_SEQ_FILE = "sparkplug-bdseq"
REBIRTH = "Node Control/Rebirth"
QUALITY = {"good": 192, "uncertain": 64, "bad": 0}
TYPES = {
    TagType.BOOL: DataType.BOOLEAN,
    TagType.INT16: DataType.INT16,
    TagType.UINT16: DataType.UINT16,
    TagType.INT32: DataType.INT32,
    TagType.UINT32: DataType.UINT32,
    TagType.INT64: DataType.INT64,
    TagType.UINT64: DataType.UINT64,
    TagType.FLOAT32: DataType.FLOAT,
    TagType.FLOAT64: DataType.DOUBLE,
    TagType.STRING: DataType.STRING,
}


Fits = Callable[[str, bytes], bool]  # whether the broker takes a message (topic, payload)


def _always(topic: str, payload: bytes) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 0


@dataclass(frozen=True, slots=True)
class Write:
    """A DCMD metric to write: the same path and checks as the JSON ``write`` command."""

    device: str
    tag: str
    value: Any


def declared_type(tag: Any) -> DataType | None:
    """The Sparkplug datatype a tag's config promises (None: the first value decides, e.g. OPC UA)."""
    kind = getattr(tag, "data_type", None)
    if kind is None:
        return None
    if getattr(tag, "scale", 1.0) != 1.0 or getattr(tag, "offset", 0.0) != 0.0:
        return DataType.DOUBLE  # scaled readings are numbers with decimals
    return TYPES[kind]


def inferred_type(value: Any) -> DataType:
    if isinstance(value, bool):
        return DataType.BOOLEAN
    if isinstance(value, int):
        return DataType.INT64
    if isinstance(value, float):
        return DataType.DOUBLE
    return DataType.STRING


class EdgeNode:
    """One gateway's Sparkplug identity and session state (owned by the publisher, on the event loop)."""

    def __init__(
        self,
        *,
        group: str,
        edge_node: str,
        devices: Sequence[Any],
        state_dir: Path,
        version: str,
        primary_host: str | None = None,
        data_qos: int = 0,
    ) -> None:
        self.group = group
        self.edge_node = edge_node
        self.state_dir = state_dir
        self.version = version
        self.primary_host = primary_host
        self.data_qos = data_qos
        self.bd_seq = self._load_bd_seq()
        self._seq = 0
        self.host_online = primary_host is None
        self.born = False
        self.devices_up: set[str] = set()
        self.unborn: set[str] = set()  # up, but their DBIRTH is larger than the broker takes: data goes as JSON
        self._latest: dict[tuple[str, str], tuple[Any, int, str, str | None]] = {}  # value, ts, quality, error
        self.configure(devices)

    def configure(self, devices: Sequence[Any]) -> None:
        """The devices and tags (again, after a reload): aliases and datatypes."""
        self.devices = {d.name: d for d in devices if getattr(d, "enabled", True)}
        self.aliases: dict[tuple[str, str], int] = {}
        self.types: dict[tuple[str, str], DataType | None] = {}
        alias = 1
        for device in self.devices.values():
            for tag in device.tags:
                self.aliases[(device.name, tag.name)] = alias
                self.types[(device.name, tag.name)] = declared_type(tag)
                alias += 1
        self.by_alias = {a: key for key, a in self.aliases.items()}

    # ---------------------------------------------------------------- topics

    def topic(self, kind: MessageType, device: str | None = None) -> str:
        return str(Topic(self.group, kind, self.edge_node, device))

    def subscriptions(self) -> list[str]:
        topics = [self.topic(MessageType.NCMD), str(Topic(self.group, MessageType.DCMD, self.edge_node, "+"))]
        if self.primary_host:
            topics.append(state_topic(self.primary_host))
        return topics

    # ---------------------------------------------------------------- session

    def connecting(self) -> Message:
        """A new connection: the next bdSeq (persisted first) and the will that carries it."""
        self.bd_seq = (self.bd_seq + 1) % 256
        self._save_bd_seq()
        self.born = False
        self.host_online = self.primary_host is None
        return self.death()

    def death(self) -> Message:
        payload = Payload(metrics=[Metric("bdSeq", DataType.INT64, self.bd_seq)], timestamp=_now())
        return Message(self.topic(MessageType.NDEATH), encode(payload), qos=1)

    def births(self, fits: Fits = _always) -> list[Message]:
        """NBIRTH and a DBIRTH for every device that answers: seq restarts at 0.

        A DBIRTH that ``fits`` says the broker would refuse (its Maximum Packet Size) is left out, without
        taking a seq number: that device stays unborn this session, its readings go to the store as JSON.
        """
        self._seq = 0
        now = _now()
        node = Payload(
            metrics=[
                Metric("bdSeq", DataType.INT64, self.bd_seq, timestamp=now),
                Metric(REBIRTH, DataType.BOOLEAN, False, timestamp=now),
                Metric("Properties/Version", DataType.STRING, self.version, timestamp=now),
            ],
            timestamp=now,
            seq=self._next_seq(),
            uuid=BIRTH_UUID,
        )
        self.born = True
        self.unborn.clear()
        out = [Message(self.topic(MessageType.NBIRTH), encode(node))]
        for name in self.devices:
            if name in self.devices_up:
                birth = self._device_birth_fitting(name, fits)
                if birth is not None:
                    out.append(birth)
        return out

    def _device_birth_fitting(self, device: str, fits: Fits) -> Message | None:
        seq = self._seq
        birth = self.device_birth(device)
        if fits(birth.topic, birth.payload):
            self.unborn.discard(device)
            return birth
        self._seq = seq  # not sent: no gap in the seq numbers the host counts
        if device not in self.unborn:
            self.unborn.add(device)
            log.error(
                "Sparkplug DBIRTH larger than the broker accepts: the device's readings go as JSON",
                extra=fields(device=device, bytes=len(birth.payload), tags=len(self.devices[device].tags)),
            )
        return None

    def device_birth(self, device: str) -> Message:
        metrics = []
        for tag in self.devices[device].tags:
            key = (device, tag.name)
            value, ts, quality, error = self._latest.get(key, (None, _now(), "bad", "no reading yet"))
            datatype = self.types[key] or (inferred_type(value) if value is not None else DataType.STRING)
            self.types[key] = self.types[key] or (datatype if value is not None else None)
            metrics.append(self._metric(tag.name, self.aliases[key], datatype, value, ts, quality, error, False))
        payload = Payload(metrics=metrics, timestamp=_now(), seq=self._next_seq(), uuid=BIRTH_UUID)
        return Message(self.topic(MessageType.DBIRTH, device), encode(payload))

    def device_death(self, device: str) -> Message:
        payload = Payload(metrics=[], timestamp=_now(), seq=self._next_seq())
        return Message(self.topic(MessageType.DDEATH, device), encode(payload))

    def device_state(self, device: str, up: bool, fits: Fits = _always) -> Message | None:
        """A device came up or went down: its birth or death, when the node is born (else nothing yet)."""
        if device not in self.devices:
            return None
        changed = (device not in self.devices_up) if up else (device in self.devices_up)
        (self.devices_up.add if up else self.devices_up.discard)(device)
        if not (changed and self.born):
            return None
        if up:
            return self._device_birth_fitting(device, fits)
        if device in self.unborn:  # never born: nothing to end
            self.unborn.discard(device)
            return None
        return self.device_death(device)

    def alive(self, device: str) -> bool:
        """Whether DDATA of the device may be published: born in this session and not dead since. The readings
        of a dead device (its read failures, a backlog from before its death) go to the store as JSON batches:
        after a DDEATH, the Sparkplug namespace has nothing of the device until its next DBIRTH."""
        return self.born and device in self.devices_up and device not in self.unborn

    # ---------------------------------------------------------------- data

    def observe(self, device: str, points: Iterable[Any]) -> None:
        """The newest reading of each tag, for the births."""
        for p in points:
            self._latest[(device, p.tag)] = (p.value, p.ts, str(p.quality), p.error)

    def data(self, seq: int, batch_payload: bytes, historical: bool) -> Message:
        """A buffered JSON batch as DDATA (PayloadError when a value does not fit its tag's datatype)."""
        doc = json.loads(batch_payload)
        device = doc["dev"]
        metrics = []
        for point in doc["points"]:
            key = (device, point["tag"])
            alias = self.aliases.get(key)
            if alias is None:
                raise PayloadError(f"tag {device}.{point['tag']} is not in the config any more")
            value = point.get("v")
            datatype = self.types.get(key) or (inferred_type(value) if value is not None else DataType.STRING)
            metrics.append(
                self._metric(
                    None, alias, datatype, value, point["ts"], point.get("q", "good"), point.get("err"), historical
                )
            )
        payload = Payload(metrics=metrics, timestamp=_now(), seq=self._next_seq(), uuid=batch_uuid(seq))
        return Message(self.topic(MessageType.DDATA, device), encode(payload), qos=self.data_qos)

    def _metric(
        self,
        name: str | None,
        alias: int,
        datatype: DataType,
        value: Any,
        ts: int,
        quality: str,
        error: str | None,
        historical: bool,
    ) -> Metric:
        properties: dict[str, Any] = {}
        if quality != "good":
            properties["Quality"] = QUALITY.get(quality, 0)
        if error:
            properties["fe.error"] = error
        if datatype in (DataType.FLOAT, DataType.DOUBLE) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        return Metric(
            name=name,
            datatype=datatype,
            value=value,
            alias=alias,
            timestamp=ts,
            is_historical=historical,
            properties=properties,
        )

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (self._seq + 1) % 256
        return seq

    # ---------------------------------------------------------------- incoming

    def on_message(self, topic: str, payload: bytes) -> tuple[str, list[Write]]:
        """What an incoming message asks: ``("rebirth"|"host_online"|"host_offline"|"write"|"", writes)``."""
        if self.primary_host and topic == state_topic(self.primary_host):
            state = parse_state(payload)
            if state is None:
                log.warning("primary host STATE does not parse", extra=fields(topic=topic))
                return "", []
            online = state[0]
            was, self.host_online = self.host_online, online
            if online == was:
                return "", []
            return ("host_online" if online else "host_offline"), []
        try:
            command = decode(payload)
        except PayloadError as exc:
            log.warning("Sparkplug command does not decode", extra=fields(topic=topic, err=str(exc)))
            return "", []
        if topic == self.topic(MessageType.NCMD):
            rebirth = any(m.name == REBIRTH and m.value is True for m in command.metrics)
            return ("rebirth" if rebirth else ""), []
        device = topic.rsplit("/", 1)[1]
        writes = []
        for metric in command.metrics:
            key = self.by_alias.get(metric.alias) if metric.name is None and metric.alias is not None else None
            tag = key[1] if key is not None and key[0] == device else metric.name
            if tag is not None:
                writes.append(Write(device, tag, metric.value))
        return "write", writes

    # ---------------------------------------------------------------- bdSeq on disk

    def _load_bd_seq(self) -> int:
        try:
            return int((self.state_dir / BD_SEQ_FILE).read_text().strip()) % 256
        except (OSError, ValueError):
            return 255  # the first connection uses 0

    def _save_bd_seq(self) -> None:
        path = self.state_dir / BD_SEQ_FILE
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(f"{self.bd_seq}\n")
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot save the Sparkplug bdSeq", extra=fields(path=str(path), err=str(exc)))


def _now() -> int:
    import time

    return time.time_ns() // 1_000_000
