"""Configuration pushed from the cloud: real Mosquitto (rendered config and ACL), the real agent, pymodbus.

The cloud side is the tenant's operator identity (CN ``bridge``) publishing
``{"version": N, "config": "<YAML>"}`` on ``gw/<gw>/cmd/config``, as
``provisioning config push`` does.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from agent.bufferread import read_stats
from drivers.config import Table
from drivers.simulate.modbus_server import ModbusSimulator, RegisterModel
from factory_edge.mqtt import BrokerSettings, tls_context
from tests.agentproc import AgentProcess, Collector
from tests.helpers import free_port
from tests.infra import Mosquitto, TenantPki

pytestmark = pytest.mark.timeout(120)

GW = "gw-01"


def identity(pki: TenantPki, broker: Mosquitto, name: str) -> BrokerSettings:
    cert, key = pki.paths(name) if name in pki.certs else pki.client(name)
    return BrokerSettings(
        host=pki.host,
        port=broker.port,
        tls=True,
        connect_host="127.0.0.1",
        ca_file=str(pki.ca_file),
        cert_file=str(cert),
        key_file=str(key),
    )


def agent_config(pki: TenantPki, broker: Mosquitto, modbus_port: int, *, tags: int = 3, **extra: Any) -> dict[str, Any]:
    cert, key = pki.paths(GW) if GW in pki.certs else pki.client(GW)
    config: dict[str, Any] = {
        "gateway": GW,
        "mqtt": {
            "url": f"mqtts://{pki.host}:{broker.port}",
            "connect_host": "127.0.0.1",
            "ca_file": str(pki.ca_file),
            "cert_file": str(cert),
            "key_file": str(key),
        },
        "buffer": {"confirm": "broker"},
        "remote_config": {"deadline": "3s"},
        "devices": [
            {
                "name": "line-1",
                "protocol": "modbus-tcp",
                "host": "127.0.0.1",
                "port": modbus_port,
                "poll": "100ms",
                "timeout": "300ms",
                "tags": [{"name": "r{address}", "addresses": f"0-{tags - 1}"}],
            }
        ],
        **extra,
    }
    return config


def model() -> RegisterModel:
    m = RegisterModel()
    m.set_registers(Table.HOLDING, 0, range(100, 120))
    return m


class Cloud(Collector):
    """The operator's view: everything under gw/<gw>/, and pushes on its command topic."""

    def __enter__(self) -> Cloud:
        self.start()
        return self

    def push(self, version: int, config: dict[str, Any] | str, gw: str = GW) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        info = self.client.publish(f"gw/{gw}/cmd/config", json.dumps({"version": version, "config": text}), qos=1)
        info.wait_for_publish(5)

    def replies(self) -> list[dict[str, Any]]:
        return self.docs(f"gw/{GW}/cmd/config/reply")

    def events(self, state: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.docs(f"gw/{GW}/events") if e.get("type") == "config" and state in (None, e["state"])]

    def statuses(self) -> list[dict[str, Any]]:
        return self.docs(f"gw/{GW}/status")

    def tags(self, since: int = 0, *, after_ms: int = 0) -> set[str]:
        """Tags with good points among the messages from index ``since``, read after ``after_ms``."""
        with self.lock:
            docs = [json.loads(p) for t, p, _ in self.messages[since:] if t.startswith(f"gw/{GW}/data/")]
        return {p["tag"] for d in docs for p in d["points"] if p["q"] == "good" and p["ts"] > after_ms}


def cloud(pki: TenantPki, broker: Mosquitto, client_id: str) -> Cloud:
    return Cloud(identity(pki, broker, "bridge"), [f"gw/{GW}/#"], client_id=client_id)


def wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def online(seen: Cloud) -> bool:
    return any(s.get("state") == "online" for s in seen.statuses())


async def all_delivered(agent: AgentProcess, seen: Cloud) -> list[int]:
    """Stop the agent cleanly; every seq it numbered reached the broker (none lost across the switch).

    Waits in threads: the simulators share this event loop."""
    assert await asyncio.to_thread(agent.stop) == 0
    last = read_stats(agent.state_dir / "buffer.db")
    assert last is not None
    await asyncio.to_thread(wait, lambda: max(seen.seqs(GW), default=0) >= last.next_seq - 1, 20, "every batch")
    seqs = sorted(set(seen.seqs(GW)))
    assert seqs == list(range(seqs[0], last.next_seq)), "a batch is missing"
    return seqs


@pytest.mark.fault
async def test_a_valid_push_is_applied_in_place_and_nothing_is_lost(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    port = free_port()
    async with ModbusSimulator(units={1: model()}, port=port):
        config = agent_config(pki_acme, broker_acme, port)
        with AgentProcess(tmp_path / "agent", config) as agent, cloud(pki_acme, broker_acme, "cloud-1") as seen:
            agent.start()
            await asyncio.to_thread(wait, lambda: seen.tags() >= {"r0", "r2"}, 15, "first points")
            pid = agent.proc.pid if agent.proc else None
            # A backlog: the broker goes away for a while, the agent buffers; the push comes with its return.
            await asyncio.to_thread(broker_acme.stop)
            await asyncio.sleep(1.5)
            backlog_until = read_stats(agent.state_dir / "buffer.db")
            assert backlog_until is not None and backlog_until.batches > 5
            await asyncio.to_thread(broker_acme.start)
            await asyncio.to_thread(seen.wait, seen.connected.is_set, 10, "cloud reconnect")
            new = agent_config(pki_acme, broker_acme, port, tags=8)
            new["devices"][0]["tags"].append({"name": "total", "address": 10, "type": "uint32", "unit": "pcs"})
            pushed_at = time.monotonic()
            mark = len(seen.messages)
            seen.push(1, new)
            await asyncio.to_thread(wait, lambda: seen.events("applied"), 15, "applied")
            applied_in = time.monotonic() - pushed_at
            assert applied_in < 5, applied_in
            await asyncio.to_thread(wait, lambda: {"r7", "total"} <= seen.tags(mark), 10, "points of the new tags")
            assert seen.replies()[0] == {
                "ok": True,
                "state": "applying",
                "version": 1,
                "hash": seen.events()[0]["hash"],
            }
            assert [e["state"] for e in seen.events()] == ["applying", "applied"]
            status = seen.statuses()[-1]
            assert status["config_version"] == 1 and status["config"]["source"] == "pushed"
            assert status["config_hash"] == status["config"]["hash"] == seen.events("applied")[0]["hash"]
            meta = seen.docs(f"gw/{GW}/meta/line-1")[-1]
            assert {"name": "total", "type": "uint32", "unit": "pcs", "writable": False} in meta["tags"]
            assert agent.proc is not None and agent.proc.pid == pid, "applied without a restart"
            seqs = await all_delivered(agent, seen)
            assert backlog_until.next_seq - backlog_until.batches in seqs and backlog_until.next_seq - 1 in seqs
            # The pushed configuration is the last good one: it survives a restart.
            agent.start()
            await asyncio.to_thread(wait, lambda: agent.status().get("config", {}).get("version") == 1, 15, "v1 again")


async def test_an_invalid_push_is_rejected_with_its_reasons_and_the_old_config_keeps_running(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    port = free_port()
    async with ModbusSimulator(units={1: model()}, port=port):
        config = agent_config(pki_acme, broker_acme, port)
        with AgentProcess(tmp_path / "agent", config) as agent, cloud(pki_acme, broker_acme, "cloud-2") as seen:
            agent.start()
            await asyncio.to_thread(wait, lambda: online(seen) and seen.tags() >= {"r0"}, 15, "first points")
            before = seen.statuses()[-1]["config_hash"]
            bad = agent_config(pki_acme, broker_acme, port)
            bad["devices"][0]["tags"] = [{"name": "r{address}", "addresses": "0-8", "type": "float32"}]
            seen.push(3, bad)
            await asyncio.to_thread(wait, lambda: seen.replies(), 10, "the reply")
            reply = seen.replies()[0]
            assert reply["ok"] is False and reply["state"] == "rejected" and reply["version"] == 3
            assert reply["reasons"] == [
                "config version 3: devices[line-1].tags[0].addresses: 0-8 is 9 addresses, not a whole number "
                "of elements of 2 (stride)"
            ]
            seen.push(4, "devices: [oops")
            await asyncio.to_thread(wait, lambda: len(seen.replies()) == 2, 10, "the second reply")
            assert (
                seen.replies()[1]["reasons"][0]
                == "config version 4: line 1 column 15: invalid YAML: expected ',' or ']', but got '<stream end>'"
            )
            fixed = agent_config(pki_acme, broker_acme, port)
            fixed["buffer"] = {"confirm": "storage"}
            seen.push(5, fixed)
            await asyncio.to_thread(wait, lambda: len(seen.replies()) == 3, 10, "the third reply")
            assert seen.replies()[2]["reasons"] == [
                "config version 5: buffer: cannot change while the agent runs (restart needed): "
                "change it in the local file"
            ]
            mark = len(seen.messages)
            await asyncio.to_thread(wait, lambda: seen.tags(mark) >= {"r0", "r2"}, 10, "the old tags still flowing")
            assert [e["state"] for e in seen.events()] == ["rejected"] * 3
            retained = seen.statuses()[-1]  # republished at each outcome
            assert retained["config_hash"] == before and retained["config"]["source"] == "local"
            assert retained["config"]["last"]["state"] == "rejected" and retained["config"]["last"]["version"] == 5
            await asyncio.to_thread(  # agent status: the status file, written every second
                wait, lambda: agent.status().get("config", {}).get("last", {}).get("version") == 5, 10, "agent status"
            )
            assert agent.status()["config_hash"] == before


@pytest.mark.fault
async def test_a_push_to_an_unreachable_broker_rolls_back_by_itself(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    port = free_port()
    async with ModbusSimulator(units={1: model()}, port=port):
        config = agent_config(pki_acme, broker_acme, port)
        with AgentProcess(tmp_path / "agent", config) as agent, cloud(pki_acme, broker_acme, "cloud-3") as seen:
            agent.start()
            await asyncio.to_thread(wait, lambda: online(seen) and seen.tags() >= {"r0"}, 15, "first points")
            wrong = agent_config(pki_acme, broker_acme, port, tags=5)
            wrong["mqtt"]["url"] = f"mqtts://{pki_acme.host}:{free_port()}"
            pushed, before = time.monotonic(), len(seen.statuses())
            seen.push(2, wrong)
            await asyncio.to_thread(wait, lambda: seen.events("rolled_back"), 20, "the rollback")
            # Leaving for the pushed broker, the gateway said so on this one (a clean DISCONNECT sends no will).
            assert "offline" in [s["state"] for s in seen.statuses()[before:]]
            took = time.monotonic() - pushed
            assert took < 3 + 5, took  # the deadline, then back on the old broker
            event = seen.events("rolled_back")[0]
            assert event["version"] == 2
            assert event["reason"].startswith(f"cannot reach the broker mqtts://{pki_acme.host}:")
            assert "within 3s" in event["reason"]
            status = seen.statuses()[-1]
            assert status["config"]["source"] == "local" and status["config"]["last"]["state"] == "rolled_back"
            # What was read under version 2 is delivered too (nothing lost); read after the rollback: version 1's tags.
            back = event["ts"]
            await asyncio.to_thread(
                wait, lambda: seen.tags(after_ms=back) >= {"r0", "r2"}, 10, "the old config polling"
            )
            assert "r4" in seen.tags() and "r4" not in seen.tags(after_ms=back + 200)
            await all_delivered(agent, seen)


@pytest.mark.fault
async def test_a_push_whose_devices_all_fail_rolls_back_by_itself(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    port = free_port()
    async with ModbusSimulator(units={1: model()}, port=port):
        config = agent_config(pki_acme, broker_acme, port)
        with AgentProcess(tmp_path / "agent", config) as agent, cloud(pki_acme, broker_acme, "cloud-4") as seen:
            agent.start()
            await asyncio.to_thread(wait, lambda: online(seen) and seen.tags() >= {"r0"}, 15, "first points")
            dead = agent_config(pki_acme, broker_acme, free_port())
            seen.push(2, dead)
            await asyncio.to_thread(wait, lambda: seen.events("rolled_back"), 20, "the rollback")
            reason = seen.events("rolled_back")[0]["reason"]
            assert reason.startswith(
                "1 of 1 devices that read fine before fail after 3s (more than remote_config.max_failed_share 0.5): "
                "line-1: "
            ), reason
            mark = len(seen.messages)
            await asyncio.to_thread(wait, lambda: seen.tags(mark) >= {"r0", "r2"}, 10, "good points again")
            await all_delivered(agent, seen)


@pytest.mark.fault
async def test_kill_9_while_applying_comes_back_on_the_old_config_and_says_so(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    port = free_port()
    async with ModbusSimulator(units={1: model()}, port=port):
        config = agent_config(pki_acme, broker_acme, port)
        config["remote_config"] = {"deadline": "30s"}
        with AgentProcess(tmp_path / "agent", config) as agent, cloud(pki_acme, broker_acme, "cloud-5") as seen:
            agent.start()
            await asyncio.to_thread(wait, lambda: online(seen) and seen.tags() >= {"r0"}, 15, "first points")
            dead = agent_config(pki_acme, broker_acme, free_port())
            dead["remote_config"] = {"deadline": "30s"}
            seen.push(7, dead)
            candidate = agent.state_dir / "config" / "candidate.json"
            await asyncio.to_thread(wait, candidate.exists, 10, "the candidate on disk")
            await asyncio.to_thread(wait, lambda: seen.events("applying"), 10, "applying")
            await asyncio.to_thread(agent.kill)
            agent.start()
            await asyncio.to_thread(wait, lambda: agent.status().get("config", {}).get("last"), 15, "status")
            last = (await asyncio.to_thread(agent.status))["config"]
            assert last["source"] == "local" and last["version"] is None
            assert last["last"]["state"] == "rolled_back" and last["last"]["version"] == 7
            assert last["last"]["reason"] == "the agent stopped while applying version 7; running the local file"
            assert not candidate.exists()
            mark = len(seen.messages)
            await asyncio.to_thread(wait, lambda: seen.tags(mark) >= {"r0", "r2"}, 15, "the old config polling")


def test_a_gateway_cannot_push_configuration_to_another(pki_acme: TenantPki, broker_acme: Mosquitto) -> None:
    """The rendered ACL: only bridge/operator identities write gw/<gw>/cmd/+; gw-02 and a technician are refused."""
    from paho.mqtt.reasoncodes import ReasonCode

    pki_acme.client("tech-anna")
    broker_acme.reload()
    results: dict[str, Any] = {}
    for name in ("gw-02", "tech-anna", GW, "bridge"):
        settings = identity(pki_acme, broker_acme, name)
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
        client.tls_set_context(tls_context(settings))
        acked: dict[str, Any] = {}
        client.on_publish = lambda c, u, mid, reason, p, acked=acked: acked.setdefault("reason", reason)
        client.connect("127.0.0.1", broker_acme.port, keepalive=10)
        client.loop_start()
        try:
            info = client.publish(f"gw/{GW}/cmd/config", json.dumps({"version": 9, "config": "devices: []"}), qos=1)
            info.wait_for_publish(5)
            wait(lambda acked=acked: "reason" in acked, 5, f"PUBACK for {name}")
        finally:
            client.disconnect()
            client.loop_stop()
        results[name] = acked["reason"]
    not_authorized = ReasonCode(paho.PacketTypes.PUBACK, identifier=0x87)
    assert results["gw-02"] == not_authorized
    assert results["tech-anna"] == not_authorized
    assert results[GW] == not_authorized  # not even its own command topic: commands come from the cloud
    assert results["bridge"].value in (0, 0x10)  # accepted (no subscribers matched: 0x10)


@pytest.mark.fault
async def test_failing_devices_within_the_allowed_share_keep_the_new_configuration(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    port = free_port()
    async with ModbusSimulator(units={1: model(), 2: model()}, port=port):
        config = agent_config(pki_acme, broker_acme, port)
        second = {**config["devices"][0], "name": "line-2", "unit": 2}
        config["devices"].append(second)
        with AgentProcess(tmp_path / "agent", config) as agent, cloud(pki_acme, broker_acme, "cloud-6") as seen:
            agent.start()
            await asyncio.to_thread(
                wait, lambda: online(seen) and len(seen.docs(f"gw/{GW}/data/line-2")) > 0, 15, "both"
            )
            half = json.loads(json.dumps(config))
            half["devices"][1]["port"] = free_port()  # line-2 now reads a dead port: 1 of 2, not more than 0.5
            started = time.monotonic()
            seen.push(1, half)
            await asyncio.to_thread(wait, lambda: seen.events("applied") or seen.events("rolled_back"), 20, "outcome")
            assert seen.events("applied") and not seen.events("rolled_back")
            assert time.monotonic() - started >= 3  # it waited the deadline for line-2 before deciding
            assert (await asyncio.to_thread(agent.status))["config"]["version"] == 1


@pytest.mark.fault
async def test_a_gateway_with_remote_configuration_off_refuses_every_push(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    port = free_port()
    async with ModbusSimulator(units={1: model()}, port=port):
        config = agent_config(pki_acme, broker_acme, port)
        config["remote_config"] = {"enabled": False}
        with AgentProcess(tmp_path / "agent", config) as agent, cloud(pki_acme, broker_acme, "cloud-7") as seen:
            agent.start()
            await asyncio.to_thread(wait, lambda: online(seen) and seen.tags() >= {"r0"}, 15, "first points")
            seen.push(1, agent_config(pki_acme, broker_acme, port, tags=5))
            await asyncio.to_thread(wait, lambda: seen.replies(), 10, "the reply")
            assert seen.replies()[0]["reasons"] == ["remote configuration is off here (remote_config.enabled: false)"]
            assert not (agent.state_dir / "config" / "candidate.json").exists()
