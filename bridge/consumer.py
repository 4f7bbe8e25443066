"""Keeps one MQTT session to a tenant broker up, and hands its messages out in commit windows.

Each connection is a new ``Session`` with a new generation number. A
message can only be acknowledged on the connection that delivered it, so
when a connection is lost, whatever it delivered and was not yet committed
is dropped here: the broker delivers it again on the next connection.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Sequence

from factory_edge.backoff import Backoff
from factory_edge.errors import ConfigError, PublishError
from factory_edge.logs import fields
from factory_edge.mqtt import CLOSED_BY_BROKER, LAST_WORD_SETTLE_S, BrokerSettings
from factory_edge.sparkplug.topics import state_payload

from .messages import Received
from .mqtt import Session

log = logging.getLogger(__name__)


class ConnectionState(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"


class Consumer:
    """Task ``mqtt[<tenant>]``: connect, subscribe, reconnect with backoff; ``next_window`` for the ingest loop."""

    def __init__(
        self,
        *,
        tenant: str,
        settings: BrokerSettings,
        client_id: str,
        subscriptions: Sequence[tuple[str, int]],
        receive_maximum: int,
        session_expiry_s: float,
        backoff_max_s: float = 30.0,
        sparkplug_state: str | None = None,
    ) -> None:
        self.tenant = tenant
        # Sparkplug host application: ``spBv1.0/STATE/<host id>``, online at every connection, offline as the will.
        self.sparkplug_state = sparkplug_state
        self.settings = settings
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.receive_maximum = receive_maximum
        self.session_expiry_s = session_expiry_s
        self.state = ConnectionState.DISCONNECTED
        self.generation = 0
        self.last_error: str | None = None
        self.connects = 0
        self.connected = asyncio.Event()
        self._queue: asyncio.Queue[Received] = asyncio.Queue()
        self._session: Session | None = None
        self._backoff = Backoff(initial_s=0.5, max_s=backoff_max_s)
        self._closed_by_broker: str | None = None  # why the last session ended, if the broker ended it unexplained
        self._takeovers: deque[float] = deque(maxlen=3)  # when sessions looked taken over (monotonic)
        self._attempts = 0

    # ---------------------------------------------------------------- the connection task

    async def run(self) -> None:
        while True:
            self.state = ConnectionState.CONNECTING
            self.generation += 1
            self._attempts += 1
            session: Session | None = None
            born = int(time.time() * 1000)  # a STATE will carries its birth's timestamp (Sparkplug 3.0)
            will = (self.sparkplug_state, state_payload(False, born)) if self.sparkplug_state else None
            try:
                session = Session(
                    self.settings,
                    client_id=self.client_id,
                    generation=self.generation,
                    receive_maximum=self.receive_maximum,
                    session_expiry_s=self.session_expiry_s,
                    on_message=self._deliver,
                    on_lost=self._lost,
                    will=will,
                )
                await session.open()
                # Our session's queued messages arrive right after CONNACK, before the SUBACKs:
                # they must be acknowledgeable at once.
                self._session = session
                refused = await session.subscribe(self.subscriptions)
            except (PublishError, ConfigError) as exc:  # ConfigError: TLS files unreadable since the start
                self._session = None
                if session is not None:
                    await session.close()
                delay = self._backoff.next_delay()
                if str(exc) != self.last_error:
                    log.warning(
                        "cannot connect to tenant broker",
                        extra=fields(
                            tenant=self.tenant,
                            broker=self.settings.describe(),
                            err=str(exc),
                            retry_in_s=round(delay, 1),
                        ),
                    )
                self.last_error = str(exc)
                self.state = ConnectionState.DISCONNECTED
                await asyncio.sleep(delay)
                continue
            except BaseException:  # stopping while connecting: do not leave paho's thread behind
                self._session = None
                if session is not None:
                    await session.close()
                raise
            for topic in refused:
                log.error(
                    "broker refused a subscription (check the tenant's ACL for the bridge)",
                    extra=fields(tenant=self.tenant, topic=topic),
                )
            if self._closed_by_broker is not None and self._attempts == 1:
                self._taken_over(
                    self._closed_by_broker,
                    evidence="the broker ended a healthy session and accepted "
                    "this one again at once (once alone, this can also "
                    "be a broker restarting within a second)",
                )
            self._closed_by_broker = None
            self._attempts = 0
            self._backoff.reset()
            self.last_error = None
            self.connects += 1
            self.state = ConnectionState.CONNECTED
            self.connected.set()
            if self.sparkplug_state:
                session.publish(self.sparkplug_state, state_payload(True, born), retain=True)
            log.info(
                "connected to tenant broker",
                extra=fields(
                    tenant=self.tenant,
                    broker=self.settings.describe(),
                    client_id=self.client_id,
                    subscriptions=" ".join(t for t, _ in self.subscriptions),
                ),
            )
            try:
                await session.closed.wait()
            finally:
                self.connected.clear()
                self._session = None
                self.state = ConnectionState.DISCONNECTED
                if self.sparkplug_state and not session.closed.is_set():
                    # Stopping: say so (the will is only for an unexpected loss).
                    session.publish(self.sparkplug_state, state_payload(False, born), retain=True)
                await session.close(settle_s=LAST_WORD_SETTLE_S)
            await asyncio.sleep(self._backoff.next_delay())

    def _deliver(self, message: Received) -> None:
        if message.generation == self.generation:
            self._queue.put_nowait(message)

    def _lost(self, reason: str) -> None:
        if "taken over" in reason.lower():
            self._taken_over(reason, evidence="DISCONNECT 0x8E from the broker")
            return
        log.warning("connection to tenant broker lost", extra=fields(tenant=self.tenant, reason=reason))
        # Mosquitto 2.0 closes a taken-over session before its DISCONNECT 0x8E is sent: paho then reports
        # a bare close. A loss like that, followed by a reconnection accepted at the first attempt, is a
        # takeover (a broker restart or outage refuses the first attempt).
        self._closed_by_broker = reason if reason == CLOSED_BY_BROKER else None

    def _taken_over(self, reason: str, *, evidence: str) -> None:
        # The broker binds the client id to the certificate: only a copy of our own certificate
        # (another process given the same identity, or a stolen key) can do this.
        now = time.monotonic()
        self._takeovers.append(now)
        certain = "0x8E" in evidence or (len(self._takeovers) >= 2 and now - self._takeovers[-2] < 300)
        log.log(
            logging.ERROR if certain else logging.WARNING,
            "session taken over by another connection with our client id",
            extra=fields(
                tenant=self.tenant,
                client_id=self.client_id,
                broker=self.settings.describe(),
                reason=reason,
                evidence=evidence,
                hint="give every bridge process its own identity (provisioning bridge add NAME, "
                "bridge run --instance NAME); if none shares it, the key has leaked",
            ),
        )

    # ---------------------------------------------------------------- for the ingest loop

    async def next_window(self, max_messages: int, timeout_s: float | None) -> list[Received]:
        """Whatever arrived while the last commit ran (at least one message, or [] after ``timeout_s``)."""
        if self._queue.empty():
            try:
                async with asyncio.timeout(timeout_s):
                    first = await self._queue.get()
            except TimeoutError:
                return []
            window = [first]
        else:
            window = []
        queue = self._queue
        while len(window) < max_messages and not queue.empty():
            window.append(queue.get_nowait())
        return self.current(window)

    def current(self, window: list[Received]) -> list[Received]:
        """The messages of the live connection (the others will be delivered again)."""
        generation = self.generation
        if all(m.generation == generation for m in window):
            return window
        return [m for m in window if m.generation == generation]

    def ack(self, window: Sequence[Received]) -> int:
        """PUBACK the committed messages, in the order received; returns how many were acknowledged."""
        session = self._session
        if session is None:
            return 0
        count = 0
        for message in window:
            if message.qos and message.generation == session.generation:
                session.ack(message.mid)
                count += 1
        return count

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> bool:
        session = self._session
        return session is not None and session.publish(topic, payload, retain=retain)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
