"""Sparkplug B end to end: the agent as an edge node, the bridge as the host application, Tahu as the referee.

Real processes (``agent run``, ``bridge run``, Mosquitto), the ground-truth
machine, and Eclipse Tahu's JavaScript packages: ``sparkplug-payload``
decodes what the agent publishes, and ``sparkplug-client`` is a third-party
edge node whose data the bridge must store.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from factory_edge.mqtt import tls_context
from factory_edge.sparkplug.payload import DataType, Metric, Payload, decode, encode
from tests.agentproc import AgentProcess
from tests.bridge_fixtures import BridgeProcess, StoreView, settings_for, tenant_entry, wait_until, write_config
from tests.faults import GW, Plant, agent_config, check_exactly_once, finish
from tests.infra import Mosquitto, TenantPki
from tests.sparkplug_fixtures import CodecPeer, tahu_codec, tahu_modules

__all__ = ["tahu_codec", "tahu_modules"]

pytestmark = pytest.mark.timeout(240)
GROUP = "plant-1"


class Sniffer:
    """A subscriber on ``spBv1.0/#`` keeping every message (topic, payload) in order: what a host would see."""

    def __init__(self, pki: TenantPki, broker: Mosquitto, name: str = "tech-sniffer") -> None:
        self.settings = settings_for(pki, broker, name)
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
        self.client.tls_set_context(tls_context(self.settings))
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe("spBv1.0/#", qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._message

    def _message(self, client: Any, userdata: Any, message: Any) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def __enter__(self) -> Sniffer:
        self.client.connect(self.settings.dial_host, self.settings.port)
        self.client.loop_start()
        assert self.subscribed.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def of(self, kind: str) -> list[tuple[str, bytes]]:
        with self.lock:
            return [(t, p) for t, p in self.messages if t.split("/")[2] == kind]

    def wait(self, predicate: Callable[[], Any], what: str, timeout_s: float = 20) -> Any:
        return wait_until(predicate, timeout_s=timeout_s, what=what)


def sparkplug_config(pki: TenantPki, broker: Mosquitto, plant: Plant, **sparkplug: Any) -> dict[str, Any]:
    return agent_config(pki, broker.port, plant, sparkplug={"group_id": GROUP, **sparkplug})


def test_births_data_and_death_are_read_by_tahu_and_stored_once_by_the_bridge(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, tahu_codec: CodecPeer
) -> None:
    pki_acme.client("tech-sniffer")
    broker_acme.reload()
    view = StoreView("sqlite", tmp_path / "store")
    config = write_config(tmp_path / "bridge.yaml", tenants=[tenant_entry(pki_acme, broker_acme)], storage=view.storage)
    with (
        Plant(tmp_path / "plant", units=(1, 2)) as plant,
        Sniffer(pki_acme, broker_acme) as sniff,
        BridgeProcess(config) as bridge,
    ):
        bridge.wait_connected()
        agent = AgentProcess(tmp_path / "agent", sparkplug_config(pki_acme, broker_acme, plant)).start()
        try:
            sniff.wait(lambda: len(sniff.of("DDATA")) > 20, "DDATA")
            finish(plant, agent)
        finally:
            agent.stop()
        report = check_exactly_once(plant, view, pki_acme.tenant)
        assert report["stored"] == report["served"] > 20

    nbirth = tahu_codec.decode(sniff.of("NBIRTH")[0][1])
    assert sniff.of("NBIRTH")[0][0] == f"spBv1.0/{GROUP}/NBIRTH/{GW}"
    assert int(nbirth["seq"]) == 0
    by_name = {m["name"]: m for m in nbirth["metrics"]}
    assert by_name["bdSeq"]["type"] == "Int64" and by_name["Node Control/Rebirth"]["value"] is False
    dbirths = {t.split("/")[-1]: tahu_codec.decode(p) for t, p in sniff.of("DBIRTH")}
    assert set(dbirths) == {"m1", "m2"}
    served = {m["name"]: m for m in dbirths["m1"]["metrics"]}["served"]
    assert served["type"] == "UInt64" and int(served["alias"]) >= 1
    # DDATA: by alias, no names; seq continues from the births, 0-255.
    seqs = [int(tahu_codec.decode(p)["seq"]) for _, p in sniff.of("DBIRTH") + sniff.of("DDATA")]
    assert seqs[:3] == [1, 2, 3] or sorted(seqs[:2]) == [1, 2]
    data = tahu_codec.decode(sniff.of("DDATA")[0][1])
    assert all("name" not in m and int(m["alias"]) >= 1 for m in data["metrics"])
    assert data["uuid"].startswith("fe:")
    # A clean stop publishes the NDEATH with the birth's bdSeq.
    death = tahu_codec.decode(sniff.of("NDEATH")[-1][1])
    assert int(death["metrics"][0]["value"]) == int(by_name["bdSeq"]["value"])
    assert view.rows(pki_acme.tenant, "SELECT state FROM {status} ORDER BY received_at") == [("online",), ("offline",)]


def test_kill_9_of_the_agent_delivers_its_ndeath_with_the_birth_bdseq(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, tahu_codec: CodecPeer
) -> None:
    pki_acme.client("tech-sniffer")
    broker_acme.reload()
    with Plant(tmp_path / "plant") as plant, Sniffer(pki_acme, broker_acme) as sniff:
        agent = AgentProcess(tmp_path / "agent", sparkplug_config(pki_acme, broker_acme, plant)).start()
        try:
            sniff.wait(lambda: sniff.of("DDATA"), "DDATA")
            agent.kill()
            sniff.wait(lambda: sniff.of("NDEATH"), "the will: NDEATH")
            agent.start()
            sniff.wait(lambda: len(sniff.of("NBIRTH")) == 2, "the second birth")
        finally:
            agent.stop()
    births = [tahu_codec.decode(p) for _, p in sniff.of("NBIRTH")]
    deaths = [tahu_codec.decode(p) for _, p in sniff.of("NDEATH")]

    def bd_seq(doc: dict[str, Any]) -> int:
        return int(next(m["value"] for m in doc["metrics"] if m["name"] == "bdSeq"))

    assert bd_seq(deaths[0]) == bd_seq(births[0])  # the will carried the first session's bdSeq
    assert bd_seq(births[1]) == (bd_seq(births[0]) + 1) % 256


def test_a_device_that_stops_answering_gets_its_ddeath_and_a_dbirth_when_it_is_back(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, tahu_codec: CodecPeer
) -> None:
    pki_acme.client("tech-sniffer")
    broker_acme.reload()
    press = Plant(tmp_path / "press", units=(7,))
    view = StoreView("sqlite", tmp_path / "store")
    bridge_yaml = write_config(
        tmp_path / "bridge.yaml", tenants=[tenant_entry(pki_acme, broker_acme)], storage=view.storage
    )
    with (
        Plant(tmp_path / "plant") as plant,
        Sniffer(pki_acme, broker_acme) as sniff,
        BridgeProcess(bridge_yaml) as bridge,
    ):
        bridge.wait_connected()
        config = sparkplug_config(pki_acme, broker_acme, plant)
        config["devices"] += press.devices(timeout="500ms")
        press.start()
        agent = AgentProcess(tmp_path / "agent", config).start()
        try:
            m7 = f"spBv1.0/{GROUP}/%s/{GW}/m7"
            sniff.wait(lambda: (m7 % "DDATA") in {t for t, _ in sniff.of("DDATA")}, "DDATA of m7")
            press.stop()  # m7 stops answering; m1 goes on
            sniff.wait(lambda: sniff.of("DDEATH"), "the DDEATH of m7")
            press.start()
            sniff.wait(lambda: [t for t, _ in sniff.of("DBIRTH")].count(m7 % "DBIRTH") == 2, "m7's birth when back")
            sniff.wait(lambda: sniff.messages[-1][0] == m7 % "DDATA", "m7's data again")
            press.freeze()
            finish(plant, agent)
        finally:
            agent.stop()
            press.stop()
        # Everything m1 served is stored once; m7's read failures while it was dead reached the store too.
        assert check_exactly_once(plant, view, pki_acme.tenant)["served"] > 0
        failures = view.rows(
            pki_acme.tenant, "SELECT count(*), min(error) FROM {points} WHERE device = 'm7' AND quality = 'bad'"
        )
        assert failures[0][0] > 0 and failures[0][1], failures
    with sniff.lock:
        m7_life = [(t.split("/")[2], p) for t, p in sniff.messages if t.endswith("/m7")]
    kinds = [kind for kind, _ in m7_life]
    assert [t for t, _ in sniff.of("DDEATH")] == [m7 % "DDEATH"]  # m1 never died
    death = kinds.index("DDEATH")
    assert kinds[0] == "DBIRTH" and "DDATA" in kinds[:death]
    # After the death, nothing of m7 until its new birth; then its data again.
    assert kinds[death + 1] == "DBIRTH", kinds[death : death + 5]
    assert "DDATA" in kinds[death + 2 :]
    ddeath = tahu_codec.decode(m7_life[death][1])
    rebirth = tahu_codec.decode(m7_life[death + 1][1])
    assert ddeath["metrics"] == [] and int(ddeath["timestamp"]) > 0
    assert "served" in {m["name"] for m in rebirth["metrics"]}
    # The node's seq runs on through the death and the rebirth, 0-255.
    seqs = [int(tahu_codec.decode(p)["seq"]) for _, p in m7_life[death : death + 2]]
    assert seqs[1] == (seqs[0] + 1) % 256 or seqs[1] > seqs[0]


def ncmd(pki: TenantPki, broker: Mosquitto, topic: str, payload: bytes) -> None:
    settings = settings_for(pki, broker, "bridge")
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bridge", protocol=paho.MQTTv5)
    client.tls_set_context(tls_context(settings))
    client.connect(settings.dial_host, settings.port)
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def test_rebirth_on_ncmd_and_a_dcmd_write_reaches_the_machine(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    from drivers.config import Table
    from drivers.simulate.modbus_server import ModbusSimulator, RegisterModel
    from tests.helpers import free_port

    pki_acme.client("tech-sniffer")
    broker_acme.reload()
    port = free_port()
    model = RegisterModel()
    model.set_registers(Table.HOLDING, 0, [7, 8])
    import asyncio

    async def scenario() -> None:
        async with ModbusSimulator(units={1: model}, port=port):
            config = {
                **agent_config(pki_acme, broker_acme.port, Plant(tmp_path / "unused")),
                "sparkplug": {"group_id": GROUP},
                "devices": [
                    {
                        "name": "press-1",
                        "protocol": "modbus-tcp",
                        "host": "127.0.0.1",
                        "port": port,
                        "unit": 1,
                        "poll": "100ms",
                        "tags": [{"name": "setpoint", "address": 0, "writable": True}, {"name": "count", "address": 1}],
                    }
                ],
            }
            with Sniffer(pki_acme, broker_acme) as sniff:
                agent = AgentProcess(tmp_path / "agent", config).start()
                try:
                    await asyncio.to_thread(sniff.wait, lambda: sniff.of("DBIRTH"), "DBIRTH")
                    births = len(sniff.of("NBIRTH"))
                    rebirth = encode(Payload(metrics=[Metric("Node Control/Rebirth", DataType.BOOLEAN, True)]))
                    await asyncio.to_thread(ncmd, pki_acme, broker_acme, f"spBv1.0/{GROUP}/NCMD/{GW}", rebirth)
                    await asyncio.to_thread(sniff.wait, lambda: len(sniff.of("NBIRTH")) > births, "the rebirth")
                    birth = decode(sniff.of("DBIRTH")[-1][1])
                    alias = next(m.alias for m in birth.metrics if m.name == "setpoint")
                    write = encode(Payload(metrics=[Metric(None, DataType.UINT16, 4242, alias=alias)]))
                    await asyncio.to_thread(ncmd, pki_acme, broker_acme, f"spBv1.0/{GROUP}/DCMD/{GW}/press-1", write)
                    for _ in range(100):
                        if model.get_registers(Table.HOLDING, 0, 1) == [4242]:
                            break
                        await asyncio.sleep(0.1)
                    assert model.get_registers(Table.HOLDING, 0, 1) == [4242]
                    refused = encode(Payload(metrics=[Metric("count", DataType.UINT16, 1)]))
                    await asyncio.to_thread(ncmd, pki_acme, broker_acme, f"spBv1.0/{GROUP}/DCMD/{GW}/press-1", refused)
                    await asyncio.sleep(1)
                    assert model.get_registers(Table.HOLDING, 1, 1) != [1]  # not writable: refused
                finally:
                    await asyncio.to_thread(agent.stop)  # the simulator shares this loop
            logs = [e for e in agent.logs() if e.get("msg") == "command"]
            assert any(e.get("ok") is False and "not writable" in (e.get("error") or "") for e in logs)

    asyncio.run(scenario())


def test_a_third_party_edge_node_is_stored_and_its_death_fires_the_offline_alert(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, tahu_modules: Path
) -> None:
    import os

    from tests.sparkplug_fixtures import HERE

    view = StoreView("sqlite", tmp_path / "store")
    config = write_config(
        tmp_path / "bridge.yaml",
        tenants=[tenant_entry(pki_acme, broker_acme)],
        storage=view.storage,
        alerts={"rules": [{"name": "gone", "offline": True}]},
    )
    cert, key = pki_acme.client("tahu-1")
    with BridgeProcess(config) as bridge:
        bridge.wait_connected()
        node = subprocess.run(
            [
                "node",
                str(HERE / "edge_node.js"),
                f"mqtts://127.0.0.1:{broker_acme.port}",
                str(pki_acme.ca_file),
                str(cert),
                str(key),
                pki_acme.host,
                GROUP,
                "tahu-1",
                "25",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "NODE_PATH": str(tahu_modules)},
        )
        assert "sent 25" in node.stdout, node.stderr
        wait_until(
            lambda: view.count(pki_acme.tenant, "points", "WHERE gw = 'tahu-1' AND tag = 'flow'") >= 26,
            what="the Tahu node's data",
        )
        wait_until(
            lambda: view.count(pki_acme.tenant, "alerts", "WHERE gw = 'tahu-1' AND state = 'firing'"),
            what="the offline alert",
        )
    flows = view.rows(
        pki_acme.tenant,
        "SELECT value FROM {points} WHERE gw = 'tahu-1' AND device = 'pump-1' AND tag = 'flow' ORDER BY ts",
    )
    assert [v for (v,) in flows] == [0.0] + [i * 1.5 for i in range(1, 26)]  # the birth's value, then by alias
    starts = view.rows(pki_acme.tenant, "SELECT value FROM {points} WHERE gw = 'tahu-1' AND tag = 'starts' ORDER BY ts")
    assert [int(v) for (v,) in starts] == list(range(7, 33))
    voltage = view.rows(pki_acme.tenant, "SELECT device, value FROM {points} WHERE tag = 'Supply Voltage'")
    assert voltage == [("tahu-1", 24.5)]  # a node metric: the device is the edge node
    assert view.rows(pki_acme.tenant, "SELECT state FROM {status} WHERE gw = 'tahu-1' ORDER BY received_at") == [
        ("online",),
        ("offline",),
    ]
    assert view.count(pki_acme.tenant, "dead_letters") == 0


def test_primary_host_offline_buffers_and_the_backlog_arrives_as_history_in_order(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    pki_acme.client("tech-sniffer")
    broker_acme.reload()
    view = StoreView("sqlite", tmp_path / "store")
    config = write_config(tmp_path / "bridge.yaml", tenants=[tenant_entry(pki_acme, broker_acme)], storage=view.storage)
    with Plant(tmp_path / "plant") as plant, Sniffer(pki_acme, broker_acme) as sniff:
        bridge = BridgeProcess(config).start()
        agent = AgentProcess(
            tmp_path / "agent", sparkplug_config(pki_acme, broker_acme, plant, primary_host="factory-edge")
        ).start()
        try:
            sniff.wait(lambda: len(sniff.of("DDATA")) > 5, "data while the host is online")
            bridge.stop()  # a clean stop publishes STATE offline: the edge node ends its session and waits
            sniff.wait(lambda: sniff.of("NDEATH"), "the edge node's death")
            time.sleep(0.5)
            quiet = len(sniff.of("DDATA"))
            time.sleep(3)
            assert len(sniff.of("DDATA")) == quiet  # nothing published while the host is away
            assert agent.status()["buffer"]["batches"] > 20  # buffered meanwhile
            bridge = BridgeProcess(config, log=tmp_path / "bridge-back.log").start()
            sniff.wait(lambda: len(sniff.of("NBIRTH")) == 2, "births once the host is back")
            finish(plant, agent)
        finally:
            agent.stop()
            bridge.stop()
    report = check_exactly_once(plant, view, pki_acme.tenant)
    assert report["stored"] == report["served"]
    sent = [decode(p) for _, p in sniff.of("DDATA")]
    before = {d.uuid for d in sent[:quiet]}  # sent while the host was online, maybe not yet confirmed
    history = [
        int(d.uuid[3:])
        for d in sent[quiet:]
        if d.uuid and d.uuid not in before and d.metrics and all(m.is_historical for m in d.metrics)
    ]
    # The backlog, as history, in seq order (a batch the host had not confirmed before it went away is sent
    # again when its confirmation is overdue, wherever that falls).
    assert len(history) > 20 and history == sorted(history)


@pytest.mark.fault
def test_broker_crashes_and_agent_kill_9_in_sparkplug_mode_lose_nothing_and_store_nothing_twice(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    from tests.faults import restart_broker_hard

    view = StoreView("sqlite", tmp_path / "store")
    config = write_config(tmp_path / "bridge.yaml", tenants=[tenant_entry(pki_acme, broker_acme)], storage=view.storage)
    kills: list[float] = []
    with Plant(tmp_path / "plant", units=(1, 2)) as plant, BridgeProcess(config) as bridge:
        bridge.wait_connected()
        agent = AgentProcess(tmp_path / "agent", sparkplug_config(pki_acme, broker_acme, plant)).start()
        try:
            for round_ in range(6):
                time.sleep(1.5)
                if round_ % 2:
                    restart_broker_hard(broker_acme)  # DDATA is QoS 0: what was on the way is gone
                else:
                    kills.append(time.time())
                    agent.kill()
                    agent.start()
            time.sleep(1.5)
            finish(plant, agent, timeout_s=90)
        finally:
            agent.stop()
    report = check_exactly_once(plant, view, pki_acme.tenant, kills=kills)
    print(f"sparkplug, broker kill -9 x3 and agent kill -9 x3: {report}")


def test_only_state_may_stay_retained_in_the_sparkplug_namespace() -> None:
    from collections import defaultdict

    from provisioning.retained import verdict

    seen: dict[str, set[str]] = defaultdict(set)
    assert verdict("spBv1.0/plant-1/NBIRTH/gw-01", 10, seen) == "retained where the design has none"
    assert verdict("spBv1.0/plant-1/DDATA/gw-01/press-1", 10, seen) == "retained where the design has none"
    assert verdict("spBv1.0/STATE/factory-edge", 40, seen) is None


def test_a_gateway_publishes_only_as_its_own_edge_node_and_reads_only_its_own_commands(
    pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    pki_acme.client("tech-sniffer")
    broker_acme.reload()
    outcome: dict[int | str, Any] = {}  # PUBACK reasons by mid, and "received": the topics that came in

    def client(name: str) -> paho.Client:
        settings = settings_for(pki_acme, broker_acme, name)
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
        c.tls_set_context(tls_context(settings))
        c.on_publish = lambda cl, u, mid, reason, props: outcome.__setitem__(mid, str(reason))
        c.on_message = lambda cl, u, m: outcome.setdefault("received", []).append(m.topic)
        c.connect(settings.dial_host, settings.port)
        c.loop_start()
        return c

    thief, victim = client("gw-02"), client(GW)
    try:
        victim.subscribe([(f"spBv1.0/{GROUP}/NCMD/{GW}", 1), (f"spBv1.0/{GROUP}/NCMD/gw-02", 1)])
        time.sleep(0.3)
        forged = thief.publish(f"spBv1.0/{GROUP}/NDATA/{GW}", b"x", qos=1)
        own = thief.publish(f"spBv1.0/{GROUP}/NDATA/gw-02", encode(Payload(metrics=[])), qos=1)
        command = thief.publish(f"spBv1.0/{GROUP}/NCMD/{GW}", b"x", qos=1)
        wait_until(lambda: all(m in outcome for m in (forged.mid, own.mid, command.mid)), what="PUBACKs")
        time.sleep(0.3)
    finally:
        thief.disconnect()
        thief.loop_stop()
        victim.disconnect()
        victim.loop_stop()
    assert outcome[forged.mid] == "Not authorized" and outcome[command.mid] == "Not authorized"
    assert outcome[own.mid] in ("Success", "No matching subscribers")  # allowed (0x00 or 0x10)
    assert "received" not in outcome  # no command reached gw-01, and gw-02's are not readable by gw-01


def test_a_bridge_started_after_the_births_asks_for_them_and_stores_everything_once(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    pki_acme.client("tech-sniffer")
    broker_acme.reload()
    view = StoreView("sqlite", tmp_path / "store")
    config = write_config(tmp_path / "bridge.yaml", tenants=[tenant_entry(pki_acme, broker_acme)], storage=view.storage)
    with Plant(tmp_path / "plant") as plant, Sniffer(pki_acme, broker_acme) as sniff:
        agent = AgentProcess(tmp_path / "agent", sparkplug_config(pki_acme, broker_acme, plant)).start()
        try:
            sniff.wait(lambda: len(sniff.of("DDATA")) > 10, "data before any host application")
            with BridgeProcess(config) as bridge:
                bridge.wait_connected()
                sniff.wait(lambda: sniff.of("NCMD"), "the bridge asking for a rebirth")
                sniff.wait(lambda: len(sniff.of("NBIRTH")) == 2, "the rebirth")
                finish(plant, agent)
        finally:
            agent.stop()
    request = decode(sniff.of("NCMD")[0][1])
    assert [(m.name, m.value) for m in request.metrics] == [("Node Control/Rebirth", True)]
    report = check_exactly_once(plant, view, pki_acme.tenant)
    assert report["stored"] == report["served"]
    assert view.count(pki_acme.tenant, "dead_letters") == 0  # factory-edge batches wait for the rebirth instead
