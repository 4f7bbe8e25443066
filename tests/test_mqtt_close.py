"""A clean close says its last word once: the broker acknowledges it before our DISCONNECT, and no will follows.

paho closes its socket right after writing DISCONNECT. Acknowledgements still
unread at that moment turn the close into a TCP reset, and a broker that had
not yet read the DISCONNECT loses it with the reset and publishes the will as
well: a Sparkplug host saw two NDEATHs for one clean stop.
"""

from __future__ import annotations

import asyncio
import json

from agent.mqtt import Link
from factory_edge.mqtt import LAST_WORD_SETTLE_S, BrokerSettings
from tests.agentproc import Collector
from tests.infra import Mosquitto, TenantPki

GW = "gw-close"
ROUNDS = 30


def settings_for(pki: TenantPki, broker: Mosquitto, name: str) -> BrokerSettings:
    cert, key = pki.client(name) if name != "bridge" else pki.bridge
    return BrokerSettings(
        host=pki.host,
        port=broker.port,
        tls=True,
        connect_host="127.0.0.1",
        ca_file=str(pki.ca_file),
        cert_file=str(cert),
        key_file=str(key),
    )


async def test_a_last_word_is_acknowledged_before_the_disconnect_and_no_will_follows(
    pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    settings = settings_for(pki_acme, broker_acme, GW)
    with Collector(settings_for(pki_acme, broker_acme, "bridge"), [f"gw/{GW}/status"], client_id="bridge") as seen:
        for n in range(ROUNDS):
            link = Link(
                settings,
                client_id=GW,
                inflight=1000,
                will=(f"gw/{GW}/status", json.dumps({"state": "offline", "will": n}).encode()),
                will_retain=False,
                on_ack=lambda mid, ok: None,
                on_message=lambda message: None,
                on_lost=lambda reason: None,
            )
            await link.open()
            for i in range(200):  # acknowledgements still streaming back when the last word goes out
                link.publish(f"gw/{GW}/data/m1", json.dumps({"seq": i}).encode())
            mid = link.publish(f"gw/{GW}/status", json.dumps({"state": "offline", "last": n}).encode())
            assert mid is not None
            await link.close(settle_s=LAST_WORD_SETTLE_S)
        await asyncio.to_thread(seen.wait, lambda: len(seen.docs(f"gw/{GW}/status")) >= ROUNDS, 20, "every last word")
        await asyncio.sleep(1.0)  # a will would follow its connection's close at once
        docs = seen.docs(f"gw/{GW}/status")
    wills = [d["will"] for d in docs if "will" in d]
    assert not wills, f"the broker published the will of clean closes {wills}"
    assert sorted(d["last"] for d in docs) == list(range(ROUNDS))
