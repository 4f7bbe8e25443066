"""The agent's MQTT v5 session (paho-mqtt 2.x): will message, in-flight window, callbacks into asyncio.

``Link.open()`` dials once and returns a connected link or raises
PublishError with the reason in a technician's words (see
``factory_edge.mqtt``). The agent's connection manager owns reconnecting,
with backoff and jitter; paho's own reconnect is off, so a lost connection
ends its link and the buffer, not paho's memory, decides what is sent again.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from factory_edge.errors import PublishError
from factory_edge.mqtt import BrokerSettings, dial, disconnect, explain_disconnect, tls_context, wait_connack

SESSION_EXPIRY_S = 7 * 24 * 3600  # commands queued for a week of downtime, then forgotten


class Link:
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
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self._connack: asyncio.Future[str | None] = self.loop.create_future()
        self.closed = asyncio.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5, reconnect_on_failure=False
        )
        self.client.max_inflight_messages_set(inflight)
        self.client.max_queued_messages_set(0)
        self._tls: ssl.SSLContext | None = None
        if settings.tls:
            self._tls = tls_context(settings)
            self.client.tls_set_context(self._tls)
        if settings.username:
            self.client.username_pw_set(settings.username, settings.password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=will_retain)
        self._on_ack, self._on_message, self._on_lost = on_ack, on_message, on_lost
        self.max_packet_size: int | None = None
        self.client.on_connect = self._paho_connect
        self.client.on_disconnect = self._paho_disconnect
        self.client.on_publish = self._paho_publish
        self.client.on_message = self._paho_message
        self._lock = threading.Lock()

    # paho thread -> event loop
    def _paho_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        # MQTT v5: the largest packet the broker accepts (absent: no limit); a larger one ends the connection.
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None)
        result = None if not reason.is_failure else f"the broker refused the connection: {reason}"
        self.loop.call_soon_threadsafe(self._connack_received, result)

    def _connack_received(self, result: str | None) -> None:
        if not self._connack.done():
            self._connack.set_result(result)

    def _paho_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        text = explain_disconnect(bool(getattr(flags, "is_disconnect_packet_from_server", False)), reason)
        self.loop.call_soon_threadsafe(self._lost, text)

    def _paho_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self.loop.call_soon_threadsafe(self._on_ack, mid, not reason.is_failure)

    def _paho_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        self.loop.call_soon_threadsafe(self._on_message, message)

    def _lost(self, reason: str) -> None:
        if not self._connack.done():
            self._connack.set_result(f"{reason} before CONNACK")
        if not self.closed.is_set():
            self.closed.set()
            self._on_lost(reason)

    async def open(self, *, timeout_s: float | None = None) -> None:
        """Dial, handshake TLS, send CONNECT and wait for CONNACK; PublishError says why not."""
        timeout_s = self.settings.connect_timeout_s if timeout_s is None else timeout_s
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        await dial(self.client, self.settings, self._tls, properties, timeout_s=timeout_s)
        self.client.loop_start()
        refused = await wait_connack(self._connack, self.settings, timeout_s=timeout_s)
        if refused:
            await self.close()
            raise PublishError(refused)

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, properties: Properties | None = None
    ) -> int | None:
        """Queue a publish on this connection; returns its mid, or None if the link is gone."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return None
        return info.mid

    def subscribe(self, topics: Sequence[str]) -> None:
        from paho.mqtt.subscribeoptions import SubscribeOptions

        # noLocal: the agent's own replies under cmd/ must not come back to it.
        self.client.subscribe([(topic, SubscribeOptions(qos=1, noLocal=True)) for topic in topics])

    async def close(self) -> None:
        """Disconnect cleanly (no will message) and stop paho's thread."""
        if not self.closed.is_set():
            self.closed.set()
        await disconnect(self.client)
