"""One MQTT v5 session to a tenant broker, with acknowledgements in the bridge's hands (paho-mqtt 2.x).

``manual_ack``: paho sends the PUBACK of a QoS 1 message only when
``ack(mid)`` is called, which the ingest loop does after the message's rows
are committed, in the order the messages arrived. ``Receive Maximum`` tells
the broker how many unacknowledged messages it may hand over at once (the
commit window and the next one). The session is persistent (clean start
off, a session expiry): whatever the broker delivered but did not get a
PUBACK for is delivered again on the next connection.

TLS, the SNI override (``connect_host``) and the one-line connection errors
are shared with the agent (``factory_edge.mqtt``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from factory_edge.errors import PublishError
from factory_edge.mqtt import BrokerSettings, Connection

from .messages import Received


class Session(Connection):
    """One connection; dies with it. Callbacks arrive on paho's thread and are handed to the event loop."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        generation: int,
        receive_maximum: int,
        session_expiry_s: float,
        on_message: Callable[[Received], None],
        on_lost: Callable[[str], None],
        will: tuple[str, bytes] | None = None,
    ) -> None:
        # In flight: our own publishes (alerts); PUBACKs of what we receive are ours to send (ack).
        super().__init__(settings, client_id=client_id, inflight=100, on_lost=on_lost, will=will, manual_ack=True)
        self.generation = generation
        self.receive_maximum = receive_maximum
        self.session_expiry_s = session_expiry_s
        self._subacks: dict[int, asyncio.Future[list[Any]]] = {}
        self._on_message = on_message
        self.client.on_message = self._paho_message
        self.client.on_subscribe = self._paho_subscribe

    # ---------------------------------------------------------------- paho thread -> event loop

    def _paho_subscribe(self, client: Any, userdata: Any, mid: int, reasons: list[Any], properties: Any) -> None:
        def done() -> None:
            future = self._subacks.pop(mid, None)
            if future is not None and not future.done():
                future.set_result(list(reasons))

        self.loop.call_soon_threadsafe(done)

    def _paho_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = message._topic.decode("utf-8", "replace")
        props = getattr(message, "properties", None)
        ids = getattr(props, "SubscriptionIdentifier", None) if props is not None else None
        received = Received(
            topic=topic,
            payload=bytes(message.payload),
            qos=message.qos,
            mid=message.mid,
            generation=self.generation,
            sub_ids=tuple(ids or ()),
            received_at=int(time.time() * 1000),
        )
        self.loop.call_soon_threadsafe(self._on_message, received)

    def _abandon(self) -> None:
        for future in self._subacks.values():
            if not future.done():
                future.set_result([])

    # ---------------------------------------------------------------- event loop side

    async def open(self, *, timeout_s: float = 10.0) -> None:
        """Dial, TLS, CONNECT and wait for CONNACK; PublishError says why not."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = int(self.session_expiry_s)
        properties.ReceiveMaximum = self.receive_maximum
        await self._open(properties, timeout_s=timeout_s)

    async def subscribe(self, subscriptions: Sequence[tuple[str, int]], *, timeout_s: float = 10.0) -> list[str]:
        """Subscribe each ``(filter, subscription id)``; returns the filters the broker refused."""
        waits: list[tuple[str, asyncio.Future[list[Any]]]] = []
        for topic, sub_id in subscriptions:
            properties = Properties(PacketTypes.SUBSCRIBE)
            properties.SubscriptionIdentifier = sub_id
            # retainHandling=1: retained messages only for a new subscription, not at every reconnect.
            rc, mid = self.client.subscribe(
                topic, options=SubscribeOptions(qos=1, retainHandling=1), properties=properties
            )
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                raise PublishError(f"cannot subscribe to {topic}: connection lost")
            future = self.loop.create_future()
            self._subacks[mid] = future
            waits.append((topic, future))
        refused = []
        for topic, future in waits:
            try:
                async with asyncio.timeout(timeout_s):
                    reasons = await future
            except TimeoutError:
                raise PublishError(f"no SUBACK for {topic} within {timeout_s:g}s") from None
            if not reasons or any(r.is_failure for r in reasons):
                if self.closed.is_set():
                    raise PublishError(f"connection lost while subscribing to {topic}")
                refused.append(f"{topic} ({reasons[0] if reasons else 'no answer'})")
        return refused

    def ack(self, mid: int) -> None:
        """Send the PUBACK of a QoS 1 message (thread-safe in paho: queued for its network thread)."""
        self.client.ack(mid, 1)

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> bool:
        """Queue a QoS 1 publish on this connection (thread-safe in paho); False if the link is gone."""
        return self._publish(topic, payload, qos=1, retain=retain) is not None
