"""The publisher: keeps one MQTT connection up and drains the buffer through it (task ``mqtt``).

Each connection (a ``Link``) starts with the retained birth on
``gw/{gw}/status``, the retained ``meta`` of every device, and the
subscriptions to ``gw/{gw}/cmd/#`` and (storage mode) ``gw/{gw}/ack``;
then batches go out as QoS 1 with at most ``inflight`` awaiting PUBACK.

A PUBACK marks a batch *accepted*; a confirmation on ``gw/{gw}/ack``
deletes it (``delivery.py`` says why a PUBACK is not enough, and when an
accepted batch is sent again). Two streams share the window, alternately,
so neither starves: *live* batches (buffered since this connection came
up) and *old* ones (the backlog buffered before it, merged in seq order
with accepted batches due to be sent again). A lost connection forgets
everything in flight; the buffer still holds it and the next connection
sends it again, with the same ``seq``.

Reconnecting: a short, capped, jittered delay (``mqtt.retry_initial``,
``mqtt.retry_max``), so the agent is back within about a second of the
broker's return however long it was away. Failures are logged with the
reason in words when the reason changes, then at growing intervals.
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

from factory_edge.acks import ack_topic, decode_acks
from factory_edge.backoff import Backoff
from factory_edge.errors import ConfigError, PublishError
from factory_edge.logs import fields
from factory_edge.mqtt import CLOSED_BY_BROKER, LAST_WORD_SETTLE_S, BrokerSettings
from factory_edge.sparkplug.payload import PayloadError

from .buffer import Batch
from .bufferread import BufferReader
from .delivery import DeliveryPolicy, SteadyClock
from .drain import OldStream
from .mqtt import Link
from .sparkplug import EdgeNode
from .writer import BufferWriter, Commit

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
    batches: int = 0  # first sends
    points: int = 0
    acked_points: int = 0  # accepted by the broker (first sends)
    confirmed_points: int = 0  # confirmed by the tenant's storage
    confirmed_batches: int = 0
    rejected: int = 0
    reconnects: int = 0
    connect_attempts: int = 0
    resent: int = 0  # accepted batches sent again (storage mode: unconfirmed)
    replayed: int = 0  # broker mode: accepted batches replayed after a reconnect
    last_confirmed: float | None = None
    connected_since: float | None = None
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=120))

    def points_per_s(self, window_s: float = 10.0) -> float:
        """Accepted points per second over the last ``window_s``."""
        now = time.monotonic()
        total = sum(n for t, n in self.recent if now - t <= window_s)
        return total / window_s


class RetryLog:
    """Connection failures in the journal: every new reason at once, the same one at growing intervals."""

    FIRST_REPEAT_S = 10.0
    MAX_REPEAT_S = 300.0

    def __init__(self, broker: str) -> None:
        self.broker = broker
        self.reason: str | None = None
        self.down_since: float | None = None
        self.attempts = 0
        self._next_at = 0.0
        self._interval = self.FIRST_REPEAT_S

    def failed(self, reason: str, retry_in_s: float) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
        self.attempts += 1
        if reason != self.reason:
            self.reason = reason
            self._interval = self.FIRST_REPEAT_S
            log.warning(
                "cannot connect to broker",
                extra=fields(broker=self.broker, err=reason, retry_in_s=round(retry_in_s, 2)),
            )
        elif now >= self._next_at:
            log.warning(
                "still cannot connect to broker",
                extra=fields(
                    broker=self.broker, err=reason, attempts=self.attempts, down_s=round(now - self.down_since, 1)
                ),
            )
            self._interval = min(self.MAX_REPEAT_S, self._interval * 2)
        else:
            return
        self._next_at = now + self._interval

    def lost(self) -> None:
        self.down_since = time.monotonic()

    def connected(self) -> dict[str, Any]:
        """The outage just ended: its figures for the 'connected' log line; reset."""
        figures = {}
        if self.down_since is not None:
            figures = {"down_s": round(time.monotonic() - self.down_since, 2), "attempts": self.attempts}
        self.reason, self.down_since, self.attempts, self._next_at = None, None, 0, 0.0
        return figures


class Publisher:
    """Owns the MQTT connection and the drain loop."""

    def __init__(
        self,
        *,
        settings: BrokerSettings,
        gateway: str,
        writer: BufferWriter,
        reader: BufferReader,
        policy: DeliveryPolicy,
        inflight: int,
        birth: Callable[[], dict[str, Any]],
        meta: Callable[[], dict[str, dict[str, Any]]],
        commands: CommandHandler,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 1.0,
        on_state: Callable[[], None] | None = None,
        edge: EdgeNode | None = None,
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.writer = writer
        self.reader = reader
        self.policy = policy
        self.inflight_limit = inflight
        self.birth = birth
        self.meta = meta
        self.commands = commands
        self._state = ConnectionState.DISCONNECTED
        self._on_state = on_state
        self.last_error: str | None = None
        self.stats = PublishStats()
        self._backoff = Backoff(initial_s=retry_initial_s, max_s=retry_max_s)
        self._retry_log = RetryLog(settings.describe())
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._clock = SteadyClock()
        self._inflight: dict[int, tuple[str, int, int]] = {}  # mid -> (kind, seq or event id, points)
        self._accepting: set[int] = set()  # batches PUBACKed, not yet recorded by the writer
        self._unanswered: set[int] = set()  # batches sent on a connection that ended before their PUBACK
        self._events_done: set[int] = set()  # events PUBACKed, not yet deleted by the writer
        self._acked: list[int] = []
        self._acked_events: list[int] = []
        self._link: Link | None = None
        self._commands: asyncio.TaskGroup | None = None
        self._refused_events: set[int] = set()  # refused by the broker on this connection
        self._closed_by_broker = False  # the last connection ended in a bare close by the broker
        self._attempts = 0  # connection attempts since the last connection was lost
        self._takeovers: deque[float] = deque(maxlen=3)  # when sessions looked taken over (monotonic)
        self.edge = edge  # Sparkplug B mode: what to send instead of the JSON topics
        self._probe_look_at = 0
        self._forget_at = 0
        self._rebirth = False  # births to (re)send on this connection

    @property
    def state(self) -> ConnectionState:
        return self._state

    @state.setter
    def state(self, value: ConnectionState) -> None:
        changed = value is not self._state
        self._state = value
        if changed and self._on_state is not None:
            self._on_state()

    @property
    def topic_root(self) -> str:
        return f"gw/{self.gateway}"

    def notify(self) -> None:
        """New batches or events are in the buffer."""
        self._wake.set()

    def committed(self, commit: Commit) -> None:
        """The writer's ``on_commit`` (its own thread): hand the news to the event loop."""
        self._loop.call_soon_threadsafe(self._committed, commit)

    def _committed(self, commit: Commit) -> None:
        self._accepting.difference_update(commit.accepted)
        self._events_done.difference_update(commit.events_done)
        if commit.confirmed is not None and commit.confirmed.batches:
            self.policy.confirmed(commit.confirmed.newest_first_ms)
            self.stats.confirmed_points += commit.confirmed.points
            self.stats.confirmed_batches += commit.confirmed.batches
            self.stats.last_confirmed = time.time()
        self._wake.set()

    async def flush(self, timeout_s: float) -> None:
        """While connected, wait (at most ``timeout_s``) until the broker has every buffered batch.

        Called when stopping, after the devices and the writer: a clean stop
        leaves nothing unsent (in storage mode, confirmations may still come:
        the broker keeps them for the next start).
        """
        deadline = self._loop.time() + timeout_s
        while self._loop.time() < deadline and self.state is ConnectionState.CONNECTED:
            if not self._inflight and not self._accepting and not self.reader.has_pending():
                return
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------ connection

    async def run(self) -> None:
        """Connect, drain, reconnect after a short jittered delay: until cancelled."""
        while True:
            self.state = ConnectionState.CONNECTING
            self.stats.connect_attempts += 1
            self._attempts += 1
            if self.edge is not None:
                death = self.edge.connecting()  # the NDEATH carrying this connection's bdSeq
                will, retain = (death.topic, death.payload), False
            else:
                will, retain = (
                    (f"{self.topic_root}/status", json.dumps(dict(self.birth(), state="offline")).encode()),
                    True,
                )
            try:
                # A TLS file replaced by something unreadable while running (checked at start) is retried
                # like a refused connection: the agent keeps polling and buffering, its status says why.
                link = Link(
                    self.settings,
                    client_id=self.gateway,
                    inflight=self.inflight_limit,
                    will=will,
                    will_retain=retain,
                    on_ack=self._on_ack,
                    on_message=self._on_message,
                    on_lost=self._on_lost,
                )
                await link.open()
            except (PublishError, ConfigError) as exc:
                delay = self._backoff.next_delay()
                self._retry_log.failed(str(exc), delay)
                self.last_error = str(exc)
                self.state = ConnectionState.DISCONNECTED
                await asyncio.sleep(delay)
                continue
            if self._closed_by_broker and self._attempts == 1:
                # Mosquitto 2.0 closes a taken-over session without the DISCONNECT 0x8E reaching us: a bare
                # close, and a new session accepted at the first attempt. A broker restarted within that
                # moment looks the same once; a second copy of our certificate keeps doing it.
                self._taken_over(
                    "the broker closed our session and accepted a new one at once (once alone, "
                    "this can also be a broker restarting within a second)"
                )
            self._closed_by_broker, self._attempts = False, 0
            self.writer.fit_packets(link.max_packet_size)  # batches written from now on fit this broker
            self._backoff.reset()
            self.last_error = None
            self.state = ConnectionState.CONNECTED
            self.stats.connected_since = time.time()
            counts = self.writer.buffer.figures()
            log.info(
                "connected to broker",
                extra=fields(
                    broker=self.settings.describe(),
                    backlog=counts.pending_batches,
                    unconfirmed=counts.unconfirmed_batches,
                    live_from_seq=self.writer.buffer.next_seq,
                    **self._retry_log.connected(),
                ),
            )
            self._link = link
            try:
                await self._session(link)
            finally:
                if not link.closed.is_set():
                    self._last_word(link)  # stopping
                self._link = None
                # Sent on this connection, never acknowledged: the broker may hold them, or may not.
                self._unanswered.update(i for kind, i, _ in self._inflight.values() if kind in ("batch", "resend"))
                self._inflight.clear()
                self._accepting.clear()
                self._events_done.clear()
                self.stats.connected_since = None
                await link.close(settle_s=LAST_WORD_SETTLE_S)  # the death or offline status acknowledged first
            self.state = ConnectionState.DISCONNECTED
            self.stats.reconnects += 1
            self._retry_log.lost()
            log.warning(
                "connection to broker lost", extra=fields(broker=self.settings.describe(), reason=self.last_error)
            )
            await asyncio.sleep(self._backoff.next_delay())

    def _on_lost(self, reason: str) -> None:
        self.last_error = reason
        self._closed_by_broker = reason == CLOSED_BY_BROKER
        if "taken over" in reason:
            self._taken_over("DISCONNECT 0x8E from the broker")
        self._wake.set()

    def _taken_over(self, evidence: str) -> None:
        # The broker binds the client id to the certificate: only a copy of this gateway's certificate and key
        # (a second agent given the same state directory, or a stolen key) can take the session.
        now = time.monotonic()
        self._takeovers.append(now)
        certain = "0x8E" in evidence or (len(self._takeovers) >= 2 and now - self._takeovers[-2] < 300)
        log.log(
            logging.ERROR if certain else logging.WARNING,
            "session taken over by another connection with our client id",
            extra=fields(
                broker=self.settings.describe(),
                client_id=self.gateway,
                evidence=evidence,
                hint="is this gateway's certificate in use elsewhere? If nothing here shares it, its key has leaked: "
                "revoke the device and provision it again",
            ),
        )

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
        elif kind in ("batch", "resend"):
            self._acked.append(ident)
            self._accepting.add(ident)
            if kind == "batch":
                self.stats.acked_points += points
                self.stats.recent.append((time.monotonic(), points))
        elif kind == "event":
            self._acked_events.append(ident)
            self._events_done.add(ident)
        self._wake.set()

    # ------------------------------------------------------------ the session

    async def _session(self, link: Link) -> None:
        if self.edge is None:
            link.publish(f"{self.topic_root}/status", json.dumps(self.birth()).encode(), retain=True)
        else:
            self._rebirth = self.edge.host_online  # else: births when the primary host says online
        for device, doc in self.meta().items():
            link.publish(f"{self.topic_root}/meta/{device}", json.dumps(doc).encode(), retain=True)
        self._refused_events.clear()
        policy = self.policy
        # Below: backlog; from here on: live. What the writer has committed (a write under way is live).
        boundary = self.writer.buffer.committed_next_seq
        stream = OldStream(
            self.reader,
            policy,
            boundary=boundary,
            limit=self.inflight_limit,
            replay_from=policy.replay_from(self.reader.newest_accepted_ms()),
        )
        live_after = boundary - 1
        old: deque[Batch] = deque()
        live: deque[Batch] = deque()
        turn_live = True
        flowing = self.edge is None  # Sparkplug: data flows from the births on, which may come later
        async with asyncio.TaskGroup() as commands:
            self._commands = commands
            topics = [f"{self.topic_root}/cmd/#"] + ([ack_topic(self.gateway)] if policy.storage else [])
            if self.edge is not None:
                topics += self.edge.subscriptions()
            link.subscribe(topics)
            while not link.closed.is_set():
                self._wake.clear()
                now = self._clock()
                self._flush_acks(now, stream.replay_from if stream.replaying else None)
                self._send_events(link)
                if self.edge is not None and not self._sparkplug_ready(link):
                    await self._wait_wake()
                    continue  # nothing is published before the births (primary host offline)
                if not flowing:
                    # What was buffered until the births is backlog (historical), not live.
                    flowing, boundary = True, self.writer.buffer.committed_next_seq
                    stream.boundary, live_after = boundary, boundary - 1
                while len(self._inflight) < self.inflight_limit:
                    if not old:
                        old.extend(stream.take(now, self._busy_seqs()))
                    if not live:
                        live.extend(self.reader.pending(live_after, self.inflight_limit))
                        if live:
                            live_after = live[-1].seq
                    source = live if (turn_live and live) or not old else old
                    if not source:
                        break
                    batch = source.popleft()
                    turn_live = source is old
                    if not self._publish(link, batch, old=source is old):
                        break
                self._probe(link, now)
                await self._wait_wake()
            self._flush_acks(self._clock(), None)
        self._commands = None

    async def _wait_wake(self) -> None:
        try:
            async with asyncio.timeout(1.0):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _sparkplug_ready(self, link: Link) -> bool:
        """Sparkplug mode: send the births when due; data may flow once they are out."""
        edge = self.edge
        assert edge is not None
        if self._rebirth and edge.host_online:
            self._rebirth = False
            for message in edge.births(link.fits):
                link.publish(message.topic, message.payload, qos=message.qos)
            log.info(
                "Sparkplug births published",
                extra=fields(
                    group=edge.group, edge_node=edge.edge_node, bd_seq=edge.bd_seq, devices=len(edge.devices_up)
                ),
            )
        return edge.born and edge.host_online

    def publish_status(self, *, meta: bool = False, removed: tuple[str, ...] = ()) -> None:
        """The retained status again, on the live connection (the configuration's state changed).

        ``meta``: every device's retained meta too (the devices changed); a
        device in ``removed`` gets its retained meta cleared.
        """
        link = self._link
        if link is None or link.closed.is_set():
            return
        if self.edge is None:
            link.publish(f"{self.topic_root}/status", json.dumps(self.birth()).encode(), retain=True)
        if meta:
            for device in removed:
                link.publish(f"{self.topic_root}/meta/{device}", b"", retain=True)
            for device, doc in self.meta().items():
                link.publish(f"{self.topic_root}/meta/{device}", json.dumps(doc).encode(), retain=True)

    def _last_word(self, link: Link) -> None:
        """A session we end ourselves says so: NDEATH, or the offline status (the will is for an unexpected loss).

        ``run()`` closes the link with ``LAST_WORD_SETTLE_S``: the broker acknowledges this first.
        """
        if self.edge is not None:
            death = self.edge.death()
            link.publish(death.topic, death.payload, qos=death.qos)
        else:
            link.publish(
                f"{self.topic_root}/status", json.dumps(dict(self.birth(), state="offline")).encode(), retain=True
            )

    def switch_broker(self, settings: BrokerSettings, *, why: str) -> None:
        """Connect to another broker: the current connection ends (cleanly), the next one dials ``settings``."""
        self.settings = settings
        self._retry_log = RetryLog(settings.describe())
        self._backoff.reset()
        link = self._link
        if link is not None and not link.closed.is_set():
            self.last_error = f"switching to {settings.describe()} ({why})"
            self._last_word(link)  # the old broker's subscribers see us leave, not a will
            link.closed.set()
        self._wake.set()

    def rebirth(self) -> None:
        """Sparkplug mode: send the births again on this connection (a reload changed the tags)."""
        self._rebirth = True
        self._wake.set()

    def device_state(self, device: str, up: bool) -> None:
        """Sparkplug mode: a device's birth or death, on the live connection."""
        if self.edge is None:
            return
        link = self._link
        message = self.edge.device_state(device, up) if link is None else self.edge.device_state(device, up, link.fits)
        if message is not None and link is not None and not link.closed.is_set():
            link.publish(message.topic, message.payload, qos=message.qos)

    def _busy_seqs(self) -> set[int]:
        return {ident for kind, ident, _ in self._inflight.values() if kind in ("batch", "resend")} | self._accepting

    def _publish(self, link: Link, batch: Batch, *, old: bool = False) -> bool:
        again = batch.accepted_ms is not None
        topic, payload, qos = f"{self.topic_root}/data/{batch.device}", batch.payload, 1
        limit = link.max_packet_size
        if limit is not None and not link.fits(topic, payload):
            # The broker would end the connection on it, again and again (measured as the JSON batch, before a
            # Sparkplug form takes a seq number). Buffered before this broker's limit was known (or under a
            # larger one): the writer cuts it into batches that fit. One a broker accepted, or may have received
            # (sent, then the connection ended before its PUBACK), cannot be cut: the store may hold it under its
            # seq, and its parts would be stored a second time. It is given up: counted as lost (too_large), or
            # in broker mode, where the broker's acceptance is the delivery, as released to it.
            if again or batch.seq in self._unanswered:
                reason = "released" if again and not self.policy.storage else "too_large"
                log.error(
                    "batch larger than the broker accepts: dropped",
                    extra=fields(seq=batch.seq, bytes=len(batch.payload), max_packet_size=limit, counted_as=reason),
                )
                self.writer.discard(batch.seq, reason)
                self._unanswered.discard(batch.seq)
            else:
                self.writer.split(batch.seq, limit, len(batch.payload))
            self._accepting.add(batch.seq)  # not offered again while the writer deletes it
            return True
        if self.edge is not None and self.edge.alive(batch.device):
            try:
                message = self.edge.data(batch.seq, batch.payload, historical=old or again)
                topic, payload, qos = message.topic, message.payload, message.qos
            except PayloadError as exc:
                # A tag gone from the config, or a value its Sparkplug datatype cannot hold: the batch still
                # reaches the store, as the JSON batch it is.
                log.warning("batch sent as JSON: it has no Sparkplug form", extra=fields(seq=batch.seq, err=str(exc)))
        mid = link.publish(topic, payload, qos=qos)
        if mid is None:
            return False
        self._unanswered.discard(batch.seq)
        self._inflight[mid] = ("resend" if again else "batch", batch.seq, batch.points)
        if again:
            if self.policy.storage:
                self.stats.resent += 1
            else:
                self.stats.replayed += 1
        else:
            self.stats.batches += 1
            self.stats.points += batch.points
        return True

    def _probe(self, link: Link, now: int) -> None:
        """Storage mode: the oldest unconfirmed batch, again, when nothing newer has been confirmed for a while."""
        if not self.policy.storage or len(self._inflight) >= self.inflight_limit or now < self._probe_look_at:
            return
        self._probe_look_at = now + 1000  # a look at most every second
        found = self.reader.oldest_unconfirmed()
        if found is None or found[0].seq in self._busy_seqs():
            return
        oldest, first_ms = found
        if self.policy.probe_due(first_ms, oldest.accepted_ms, now) and self._publish(link, oldest):
            self.policy.probed(now)
            log.info(
                "no storage confirmation yet: sending the oldest unconfirmed batch again",
                extra=fields(seq=oldest.seq, accepted_s_ago=round((now - first_ms) / 1000, 1)),
            )

    def _flush_acks(self, now: int, replay_from: int | None) -> None:
        if self._acked:
            acked, self._acked = self._acked, []
            self.writer.accepted(acked, now)
        if self._acked_events:
            acked, self._acked_events = self._acked_events, []
            self.writer.events_published(acked)
        forget = self.policy.forget_before(now, replay_from)
        if forget is not None and now >= self._forget_at:
            self._forget_at = now + 1000  # broker mode: the replay window moves on, a write a second is enough
            self.writer.forget_accepted(forget)

    def _send_events(self, link: Link) -> None:
        skip = (
            {ident for kind, ident, _ in self._inflight.values() if kind == "event"}
            | self._refused_events
            | self._events_done
        )
        topic = f"{self.topic_root}/events"
        for event_id, payload in self.reader.pending_events(10 + len(skip)):
            if event_id in skip:
                continue
            if not link.fits(topic, payload):
                # It can never be delivered, and must not hold the events after it back.
                log.error(
                    "event larger than the broker accepts: dropped",
                    extra=fields(event_id=event_id, bytes=len(payload), max_packet_size=link.max_packet_size),
                )
                self._events_done.add(event_id)
                self.writer.events_published([event_id])
                continue
            mid = link.publish(topic, payload)
            if mid is None:
                return
            self._inflight[mid] = ("event", event_id, 0)

    # ------------------------------------------------------------ incoming: confirmations and commands

    def _on_message(self, message: paho.MQTTMessage) -> None:
        if message.topic == ack_topic(self.gateway):
            self._on_confirmation(bytes(message.payload))
            return
        if self.edge is not None and message.topic.startswith("spBv1.0/"):
            self._on_sparkplug(message)
            return
        prefix = f"{self.topic_root}/cmd/"
        if not message.topic.startswith(prefix) or self._link is None or self._commands is None:
            return
        name = message.topic[len(prefix) :]
        if "/" in name:  # replies and anything deeper are not commands
            return
        self._commands.create_task(self._command(self._link, name, message), name=f"cmd[{name}]")

    def _on_sparkplug(self, message: paho.MQTTMessage) -> None:
        edge, link = self.edge, self._link
        assert edge is not None
        action, writes = edge.on_message(message.topic, bytes(message.payload))
        if action in ("rebirth", "host_online"):
            log.info(
                "Sparkplug births requested" if action == "rebirth" else "primary host online: births",
                extra=fields(primary_host=edge.primary_host),
            )
            self._rebirth = True
            self._wake.set()
        elif action == "host_offline" and link is not None and not link.closed.is_set():
            # Sparkplug 3.0: the edge node ends its session and waits for its host on a new one, buffering.
            log.warning(
                "primary host offline: ending the session until it is back",
                extra=fields(primary_host=edge.primary_host),
            )
            self._last_word(link)
            self.last_error = f"primary host {edge.primary_host} offline"
            link.closed.set()  # the session ends; run() disconnects and connects again
            self._wake.set()
        elif action == "write" and self._commands is not None:
            for write in writes:
                request = {"device": write.device, "tag": write.tag, "value": write.value}
                self._commands.create_task(self._dcmd(request), name=f"dcmd[{write.device}]")

    async def _dcmd(self, request: dict[str, Any]) -> None:
        """A DCMD metric: the JSON ``write`` command's path and checks; Sparkplug has no reply, the log says."""
        reply = await self.commands("write", request)
        log.info(
            "command",
            extra=fields(
                command="write",
                source="DCMD",
                device=request["device"],
                tag=request["tag"],
                ok=reply.get("ok"),
                error=reply.get("error"),
            ),
        )

    def _on_confirmation(self, payload: bytes) -> None:
        try:
            ranges = decode_acks(payload)
        except ValueError as exc:
            log.warning(
                "ignored a confirmation that does not parse", extra=fields(topic=ack_topic(self.gateway), err=str(exc))
            )
            return
        if ranges:
            self.writer.confirmed(ranges)

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
