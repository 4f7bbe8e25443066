"""The publisher: keeps one MQTT connection up and drains the buffer through it.

Each connection (a ``Link``) starts with the retained birth on
``gw/{gw}/status``, the retained ``meta`` of every device and the ``cmd/#``
subscription; then batches go out as QoS 1 with at most ``inflight``
awaiting PUBACK. A batch leaves the buffer only when its PUBACK arrives.

After a reconnect the backlog (batches buffered before the connection came
up, and those acknowledged within the buffer's replay window, in case the
broker crashed before saving them) drains oldest first while live batches
keep flowing: the window is filled alternately from the two, so neither
starves. A lost connection
forgets everything in flight; the buffer still holds it and the next
connection sends it again, with the same ``seq``.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from drivers.base import Backoff
from factory_edge.errors import PublishError
from factory_edge.logs import fields

from .buffer import Batch, Buffer
from .mqtt import BrokerSettings, Link

log = logging.getLogger(__name__)

CommandHandler = Callable[[str, Any], Awaitable[dict[str, Any]]]


class ConnectionState(enum.StrEnum):
    """Shown as-is in ``agent status``."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    STOPPED = "stopped"


@dataclass
class PublishStats:
    batches: int = 0
    points: int = 0
    acked_points: int = 0
    rejected: int = 0
    reconnects: int = 0
    connect_attempts: int = 0
    replayed: int = 0
    connected_since: float | None = None
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=120))

    def points_per_s(self, window_s: float = 10.0) -> float:
        """Acknowledged points per second over the last ``window_s``."""
        now = time.monotonic()
        total = sum(n for t, n in self.recent if now - t <= window_s)
        return total / window_s


class Publisher:
    """Owns the MQTT connection and the drain loop (task ``mqtt``)."""

    def __init__(self, *, settings: BrokerSettings, gateway: str, buffer: Buffer, inflight: int,
                 birth: Callable[[], dict[str, Any]], meta: Callable[[], dict[str, dict[str, Any]]],
                 commands: CommandHandler, backoff_max_s: float = 60.0,
                 on_state: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.gateway = gateway
        self.buffer = buffer
        self.inflight_limit = inflight
        self.birth = birth
        self.meta = meta
        self.commands = commands
        self._state = ConnectionState.DISCONNECTED
        self._on_state = on_state
        self.last_error: str | None = None
        self.stats = PublishStats()
        self._backoff = Backoff(initial_s=1.0, max_s=backoff_max_s)
        self._wake = asyncio.Event()
        self._inflight: dict[int, tuple[str, int, int]] = {}  # mid -> (kind, seq or event id, points)
        self._acked: list[int] = []
        self._acked_events: list[int] = []
        self._link: Link | None = None
        self._commands: asyncio.TaskGroup | None = None
        self._refused_events: set[int] = set()  # refused by the broker on this connection

    @property
    def state(self) -> ConnectionState:
        return self._state

    @state.setter
    def state(self, value: ConnectionState) -> None:
        changed = value is not self._state
        self._state = value
        if changed and self._on_state is not None:
            self._on_state()

    def notify(self) -> None:
        """New batches or events are in the buffer."""
        self._wake.set()

    async def flush(self, timeout_s: float) -> None:
        """While connected, wait (at most ``timeout_s``) until the buffer is empty and nothing is in flight.

        Called when stopping, after the devices: a clean stop leaves nothing
        for the next start to send again.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (self.state is ConnectionState.CONNECTED and (self.buffer.depth or self._inflight)
               and loop.time() < deadline):
            await asyncio.sleep(0.05)

    @property
    def topic_root(self) -> str:
        return f"gw/{self.gateway}"

    # ------------------------------------------------------------ connection

    async def run(self) -> None:
        """Connect, drain, reconnect with backoff and jitter: until cancelled."""
        while True:
            self.state = ConnectionState.CONNECTING
            self.stats.connect_attempts += 1
            offline = dict(self.birth(), state="offline")
            link = Link(self.settings, client_id=self.gateway, inflight=self.inflight_limit,
                        will=(f"{self.topic_root}/status", json.dumps(offline).encode()),
                        on_ack=self._on_ack, on_message=self._on_message, on_lost=self._on_lost)
            try:
                await link.open()
            except PublishError as exc:
                delay = self._backoff.next_delay()
                if str(exc) != self.last_error:
                    log.warning("cannot connect to broker", extra=fields(
                        broker=self.settings.describe(), err=str(exc), retry_in_s=round(delay, 1)))
                self.last_error = str(exc)
                self.state = ConnectionState.DISCONNECTED
                await asyncio.sleep(delay)
                continue
            self._backoff.reset()
            self.last_error = None
            self.state = ConnectionState.CONNECTED
            self.stats.connected_since = time.time()
            log.info("connected to broker", extra=fields(broker=self.settings.describe(), backlog=self.buffer.depth,
                                                         live_from_seq=self.buffer.next_seq))
            self._link = link
            try:
                await self._session(link)
            finally:
                if not link.closed.is_set():
                    # Stopping: say so (the will is only for unexpected loss).
                    link.publish(f"{self.topic_root}/status", json.dumps(dict(self.birth(), state="offline")).encode(),
                                 retain=True)
                self._link = None
                self._inflight.clear()
                self.stats.connected_since = None
                await link.close()
            self.state = ConnectionState.DISCONNECTED
            self.stats.reconnects += 1
            log.warning("connection to broker lost", extra=fields(broker=self.settings.describe(), err=self.last_error,
                                                                  backlog=self.buffer.depth))
            await asyncio.sleep(self._backoff.next_delay())

    def _on_lost(self, reason: str) -> None:
        self.last_error = reason
        self._wake.set()

    def _on_ack(self, mid: int, ok: bool) -> None:
        entry = self._inflight.pop(mid, None)
        if entry is None:
            return
        kind, ident, points = entry
        if not ok:
            # The broker refused it (e.g. not authorized): keep it in the
            # buffer; it is tried again on the next connection, not this one.
            self.stats.rejected += 1
            if kind == "event":
                self._refused_events.add(ident)
            log.error("broker refused a message", extra=fields(kind=kind, id=ident))
        elif kind == "batch":
            self._acked.append(ident)
            self.stats.acked_points += points
            self.stats.recent.append((time.monotonic(), points))
        elif kind == "event":
            self._acked_events.append(ident)
        self._wake.set()

    # ------------------------------------------------------------ the session

    async def _session(self, link: Link) -> None:
        link.publish(f"{self.topic_root}/status", json.dumps(self.birth()).encode(), retain=True)
        for device, doc in self.meta().items():
            link.publish(f"{self.topic_root}/meta/{device}", json.dumps(doc).encode(), retain=True)
        self._refused_events.clear()
        boundary = self.buffer.next_seq  # below: backlog; from here on: live
        backlog_after, live_after = 0, boundary - 1
        backlog: deque[Batch] = deque()
        live: deque[Batch] = deque()
        backlog_done = False
        turn_live = True
        async with asyncio.TaskGroup() as commands:
            self._commands = commands
            link.subscribe(f"{self.topic_root}/cmd/#")
            while not link.closed.is_set():
                self._wake.clear()
                self._flush_acks()
                self._send_events(link)
                while len(self._inflight) < self.inflight_limit:
                    if not backlog and not backlog_done:
                        backlog.extend(self.buffer.batches_after(backlog_after, self.inflight_limit, below=boundary,
                                                                 replay=True))
                        backlog_done = not backlog
                    if not live:
                        live.extend(self.buffer.batches_after(live_after, self.inflight_limit))
                    source = live if (turn_live and live) or not backlog else backlog
                    if not source:
                        break
                    batch = source.popleft()
                    if source is live:
                        live_after = batch.seq
                    else:
                        backlog_after = batch.seq
                    turn_live = source is backlog
                    mid = link.publish(f"{self.topic_root}/data/{batch.device}", batch.payload)
                    if mid is None:
                        break
                    self._inflight[mid] = ("replay" if batch.acked else "batch", batch.seq, batch.points)
                    if batch.acked:
                        self.stats.replayed += 1
                    else:
                        self.stats.batches += 1
                        self.stats.points += batch.points
                try:
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
            self._flush_acks()
        self._commands = None

    def _flush_acks(self) -> None:
        if self._acked:
            acked, self._acked = self._acked, []
            self.buffer.ack(acked)
        if self._acked_events:
            acked, self._acked_events = self._acked_events, []
            self.buffer.ack_events(acked)

    def _send_events(self, link: Link) -> None:
        skip = {ident for kind, ident, _ in self._inflight.values() if kind == "event"} | self._refused_events
        for event_id, payload in self.buffer.pending_events(10 + len(skip)):
            if event_id in skip:
                continue
            mid = link.publish(f"{self.topic_root}/events", payload)
            if mid is None:
                return
            self._inflight[mid] = ("event", event_id, 0)

    # ------------------------------------------------------------ commands

    def _on_message(self, message: paho.MQTTMessage) -> None:
        prefix = f"{self.topic_root}/cmd/"
        if not message.topic.startswith(prefix) or self._link is None or self._commands is None:
            return
        name = message.topic[len(prefix):]
        if "/" in name:  # replies and anything deeper are not commands
            return
        self._commands.create_task(self._command(self._link, name, message), name=f"cmd[{name}]")

    async def _command(self, link: Link, name: str, message: paho.MQTTMessage) -> None:
        request = getattr(message, "properties", None)
        try:
            payload = json.loads(message.payload) if message.payload else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            reply: dict[str, Any] = {"ok": False, "error": f"payload is not JSON: {exc}"}
        else:
            reply = await self.commands(name, payload)
        topic = f"{self.topic_root}/cmd/{name}/reply"
        properties = Properties(PacketTypes.PUBLISH)
        response_topic = getattr(request, "ResponseTopic", None)
        # The ACL lets a gateway write only under its own root: honour a
        # response topic there, otherwise answer on the documented reply topic.
        if response_topic and response_topic.startswith(f"{self.topic_root}/"):
            topic = response_topic
        correlation = getattr(request, "CorrelationData", None)
        if correlation is not None:
            properties.CorrelationData = correlation
        log.info("command", extra=fields(command=name, ok=reply.get("ok"), error=reply.get("error")))
        if not link.closed.is_set():
            mid = link.publish(topic, json.dumps(reply).encode(), properties=properties)
            if mid is not None:
                self._inflight[mid] = ("reply", 0, 0)
