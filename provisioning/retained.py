"""The retained-message guard: retained messages only where the design has them, and bounded there.

A gateway may write under its own root (``gw/<id>/…``), and MQTT lets it
set the retain flag on any of those publishes. The broker then keeps every
one, one per topic, in memory and in its persistence file, and hands all
of them to every new subscriber of ``gw/#``: 200 retained 50 KB "data"
messages on distinct topics grew a broker's persistence by 9.8 MB and
reached every technician. The design retains only ``gw/<id>/status`` and
``gw/<id>/meta/<device>`` (and the bridge's ``alerts/…``).

Stock Mosquitto 2.0 cannot refuse a retained publish by topic: its
``acl_file`` does not see the retain flag, and the dynamic-security plugin
of 2.0 has no retain rule (only a compiled plugin could; see
docs/security.md for why this is not one). So this guard, a task of
``provisioning serve`` per tenant (``retained[<tenant>]``), watches the
tenant's gateway topics with "retain as published" under its own identity
(``provisioning-guard``) and, for every retained message that is not
allowed, publishes an empty retained message to the same topic, which
deletes it at the broker:

- ``gw/+/data/+``, ``gw/+/events``, ``gw/+/cmd/+/reply``, and the Sparkplug
  edge node and device topics (``spBv1.0/<group>/<type>/<node>[/<device>]``):
  never retained;
- ``gw/+/status`` and ``gw/+/meta/+``: at most ``MAX_RETAINED_BYTES``, and
  at most ``MAX_META_DEVICES`` meta topics per gateway.

At every (re)connection the broker sends the guard every retained message
it holds, so what arrived while the guard was away is swept then.
Residual risk (measured in the tests): a retained message lives until the
guard has seen it, milliseconds under load; a subscriber that subscribes
in that window gets it once.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import defaultdict

from factory_edge import names
from factory_edge.logs import fields
from provisioning.brokers import AdminLink, sni_context

log = logging.getLogger(__name__)

MAX_RETAINED_BYTES = 64 * 1024
MAX_META_DEVICES = 256
WATCHED = (
    "gw/+/data/+",
    "gw/+/events",
    "gw/+/cmd/+/reply",
    "gw/+/status",
    "gw/+/meta/+",
    "spBv1.0/+/+/+",
    "spBv1.0/+/+/+/+",
)  # Sparkplug edge node and device topics (STATE is the bridge's)
RETRY_S = 5.0


def verdict(topic: str, size: int, meta_seen: dict[str, set[str]]) -> str | None:
    """Why a retained message on ``topic`` must go (None: it may stay). ``meta_seen`` counts meta topics per gateway."""
    parts = topic.split("/")
    if parts[0] == "spBv1.0" and len(parts) >= 4:
        return "retained where the design has none"  # Sparkplug retains only STATE
    if len(parts) < 3 or parts[0] != "gw":
        return None
    gateway, kind = parts[1], parts[2]
    if kind in ("data", "events", "cmd"):
        return "retained where the design has none"
    if size > MAX_RETAINED_BYTES:
        return f"retained message of {size} bytes (at most {MAX_RETAINED_BYTES})"
    if kind == "meta" and size > 0:
        devices = meta_seen[gateway]
        devices.add(topic)
        if len(devices) > MAX_META_DEVICES:
            devices.discard(topic)
            return f"more than {MAX_META_DEVICES} retained meta topics for {gateway}"
    if kind == "meta" and size == 0:
        meta_seen[gateway].discard(topic)
    return None


async def guard(tenant: str, link: AdminLink) -> None:
    """Task ``retained[<tenant>]``: clear disallowed retained messages on the tenant's broker, forever."""
    import aiomqtt
    from paho.mqtt.subscribeoptions import SubscribeOptions

    while True:
        meta_seen: dict[str, set[str]] = defaultdict(set)
        try:
            context = sni_context(link)
            async with aiomqtt.Client(
                link.dial,
                link.port,
                identifier=names.GUARD_ID,
                tls_context=context,
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=True,
                keepalive=30,
            ) as client:
                for topic in WATCHED:
                    # retainAsPublished: live publishes keep their retain flag, so a flood is seen as it happens;
                    # noLocal: not our own clearing messages.
                    await client.subscribe(topic, options=SubscribeOptions(qos=0, retainAsPublished=True, noLocal=True))
                log.info("retained-message guard watching", extra=fields(tenant=tenant))
                async for message in client.messages:
                    payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
                    if not message.retain or not payload:  # an empty retained message deletes one: let it
                        continue
                    reason = verdict(str(message.topic), len(payload), meta_seen)
                    if reason is None:
                        continue
                    await client.publish(str(message.topic), b"", qos=1, retain=True)
                    log.warning(
                        "retained message cleared",
                        extra=fields(tenant=tenant, topic=str(message.topic), bytes=len(payload), reason=reason),
                    )
        except (aiomqtt.MqttError, OSError, ssl.SSLError) as exc:
            log.warning(
                "retained-message guard disconnected; retrying",
                extra=fields(tenant=tenant, err=str(exc), retry_in_s=RETRY_S),
            )
        await asyncio.sleep(RETRY_S)


__all__ = ["MAX_META_DEVICES", "MAX_RETAINED_BYTES", "guard", "verdict"]
