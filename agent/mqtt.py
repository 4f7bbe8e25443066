"""The agent's MQTT v5 session (paho-mqtt 2.x): will message, in-flight window, callbacks into asyncio.

``Link.open()`` dials once and returns a connected link or raises
PublishError with the reason in a technician's words (see
``factory_edge.mqtt``). The agent's connection manager owns reconnecting,
with backoff and jitter; paho's own reconnect is off, so a lost connection
ends its link and the buffer, not paho's memory, decides what is sent again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from factory_edge.mqtt import BrokerSettings, Connection

SESSION_EXPIRY_S = 7 * 24 * 3600  # commands queued for a week of downtime, then forgotten


class Link(Connection):
    """One connected MQTT session; dies with its TCP connection.

    Callbacks run on paho's network thread and are handed to the event loop
    (``on_ack(mid, ok)``, ``on_message(message)``, ``on_lost(reason)``).
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        will: tuple[str, bytes] | None,
        will_retain: bool = True,
        inflight: int,
        on_ack: Callable[[int, bool], None],
        on_message: Callable[[paho.MQTTMessage], None],
        on_lost: Callable[[str], None],
    ) -> None:
        super().__init__(
            settings, client_id=client_id, inflight=inflight, on_lost=on_lost, will=will, will_retain=will_retain
        )
        self._on_ack, self._on_message = on_ack, on_message
        self.client.on_publish = self._paho_publish
        self.client.on_message = self._paho_message

    # paho thread -> event loop
    def _paho_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self.loop.call_soon_threadsafe(self._on_ack, mid, not reason.is_failure)

    def _paho_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        self.loop.call_soon_threadsafe(self._on_message, message)

    async def open(self, *, timeout_s: float | None = None) -> None:
        """Dial, handshake TLS, send CONNECT and wait for CONNACK; PublishError says why not."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        await self._open(properties, timeout_s=self.settings.connect_timeout_s if timeout_s is None else timeout_s)

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, properties: Properties | None = None
    ) -> int | None:
        """Queue a publish on this connection; returns its mid, or None if the link is gone."""
        info = self._publish(topic, payload, qos=qos, retain=retain, properties=properties)
        return None if info is None else info.mid

    def subscribe(self, topics: Sequence[str]) -> None:
        # noLocal: the agent's own replies under cmd/ must not come back to it.
        self.client.subscribe([(topic, SubscribeOptions(qos=1, noLocal=True)) for topic in topics])
