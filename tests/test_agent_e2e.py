"""The agent end to end: simulated machines → agent → TLS via HAProxy (SNI) → Mosquitto.

Real processes throughout: the agent runs as ``agent run`` in a subprocess
(so it can be killed with -9), Mosquitto and HAProxy are started by the
fixtures in conftest.py, the machines are the pymodbus / asyncua simulators.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.bufferread import read_stats
from drivers.config import Table
from drivers.simulate.machines import demo_machines
from drivers.simulate.modbus_server import ModbusSimulator, RegisterModel
from factory_edge.mqtt import BrokerSettings
from tests.agentproc import AgentProcess, Collector
from tests.helpers import free_port, wait_for
from tests.infra import Haproxy, Mosquitto, Subscriber, TenantPki, tls_args

pytestmark = pytest.mark.timeout(180)

GW = "gw-01"


def mqtt_section(pki: TenantPki, proxy_port: int, gateway: str = GW) -> dict[str, Any]:
    cert, key = pki.client(gateway)
    return {
        "url": f"mqtts://{pki.host}:{proxy_port}",
        "connect_host": "127.0.0.1",
        "ca_file": str(pki.ca_file),
        "cert_file": str(cert),
        "key_file": str(key),
    }


def counter_device(port: int, *, poll: str = "100ms", tags: int = 5) -> dict[str, Any]:
    return {
        "name": "line-1",
        "protocol": "modbus-tcp",
        "host": "127.0.0.1",
        "port": port,
        "unit": 1,
        "poll": poll,
        "timeout": "500ms",
        "tags": [{"name": f"r{i}", "address": i, "writable": i == 0} for i in range(tags)],
    }


def counter_model(tags: int = 5) -> RegisterModel:
    model = RegisterModel()
    model.set_registers(Table.HOLDING, 0, range(100, 100 + tags))
    return model


def bridge_view(pki: TenantPki, broker: Mosquitto, client_id: str = "bridge") -> Collector:
    """What the bridge would see: a persistent session straight to the tenant's broker."""
    cert, key = pki.bridge
    settings = BrokerSettings(
        host=pki.host,
        port=broker.port,
        tls=True,
        connect_host="127.0.0.1",
        ca_file=str(pki.ca_file),
        cert_file=str(cert),
        key_file=str(key),
    )
    return Collector(settings, [f"gw/{GW}/#"], client_id=client_id)


async def stop_and_collect(agent: AgentProcess, seen: Collector) -> tuple[list[int], Any]:
    """Stop the agent cleanly, then wait until ``seen`` has every batch it numbered: their seqs and the buffer's stats."""
    assert await asyncio.to_thread(agent.stop) == 0
    last = read_stats(agent.state_dir / "buffer.db")
    assert last is not None
    await asyncio.to_thread(seen.wait, lambda: max(seen.seqs(GW), default=0) >= last.next_seq - 1, 20, "every batch")
    return seen.seqs(GW), last


async def status_of(agent: AgentProcess, check: Callable[[dict[str, Any]], bool]) -> bool:
    """``check`` on ``agent status --json``, run in a thread: the simulators share this event loop."""
    return check(await asyncio.to_thread(agent.status))


def no_gaps(seqs: list[int]) -> None:
    unique = sorted(set(seqs))
    every = range(unique[0], unique[-1] + 1)
    assert unique == list(every), f"missing seqs: {sorted(set(every) - set(unique))}"


async def test_points_reach_mosquitto_sub_through_haproxy_by_sni(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, proxy: Haproxy, hosts: dict[str, str]
) -> None:
    from drivers.simulate.opcua_server import OpcuaSimulator

    modbus_port, opcua_port = free_port(), free_port()
    tech = pki_acme.client("tech-anna")
    broker_acme.reload()  # the ACL now lists the technician
    cnc = next(m for m in demo_machines() if m.name == "cnc-1")
    async with ModbusSimulator(machines=[cnc], port=modbus_port), OpcuaSimulator(port=opcua_port) as oven:
        config = {
            "gateway": GW,
            "mqtt": mqtt_section(pki_acme, proxy.port),
            "devices": [
                {
                    "name": "cnc-1",
                    "protocol": "modbus-tcp",
                    "host": "127.0.0.1",
                    "port": modbus_port,
                    "unit": 1,
                    "poll": "500ms",
                    "tags": [
                        f.tag().model_dump(mode="json", exclude_none=True, exclude={"deadband"})
                        for f in cnc.fields
                        if f.name in ("program", "part_count", "spindle_temp")
                    ],
                },
                {
                    "name": "oven-1",
                    "protocol": "opcua",
                    "endpoint": oven.endpoint,
                    "mode": "subscribe",
                    "poll": "200ms",
                    "tags": [
                        {"name": "zone1_temp", "node": "ns=2;s=Oven.Zone1.Temp", "unit": "degC"},
                        {"name": "recipe", "node": "ns=2;s=Oven.Recipe"},
                    ],
                },
            ],
        }
        conn = tls_args(pki_acme.host, proxy.port, pki_acme.ca_file, tech)
        with Subscriber(hosts, conn, [f"gw/{GW}/#"]) as sub, AgentProcess(tmp_path / "agent", config) as agent:
            sub.wait_subscribed()
            agent.start()
            await asyncio.to_thread(sub.wait_message, f"gw/{GW}/data/oven-1", 20)
            cnc_batch = json.loads(await asyncio.to_thread(sub.wait_message, f"gw/{GW}/data/cnc-1", 20))
            oven_batch = json.loads(sub.wait_message(f"gw/{GW}/data/oven-1"))
            status = json.loads(sub.wait_message(f"gw/{GW}/status"))
            meta = json.loads(sub.wait_message(f"gw/{GW}/meta/cnc-1"))
    assert set(cnc_batch) == {"v", "gw", "dev", "seq", "points"}
    assert (cnc_batch["v"], cnc_batch["gw"], cnc_batch["dev"]) == (1, GW, "cnc-1")
    by_tag = {p["tag"]: p for p in cnc_batch["points"]}
    assert by_tag["program"]["v"] == "O1234-BRACKET" and by_tag["program"]["q"] == "good"
    assert isinstance(by_tag["part_count"]["v"], int) and by_tag["spindle_temp"]["ts"] > 1.7e12
    assert {p["tag"] for p in oven_batch["points"]} <= {"zone1_temp", "recipe"} and oven_batch["dev"] == "oven-1"
    assert all(set(p) <= {"tag", "ts", "v", "q", "err"} for p in oven_batch["points"])
    assert status["state"] == "online" and status["version"] and status["config_hash"]
    assert {t["name"] for t in meta["tags"]} == {"program", "part_count", "spindle_temp"}


async def test_broker_outage_every_point_arrives(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, proxy: Haproxy
) -> None:
    port = free_port()
    async with ModbusSimulator(units={1: counter_model()}, port=port):
        config = {
            "gateway": GW,
            "mqtt": mqtt_section(pki_acme, proxy.port),
            "publish": {"inflight": 4},
            "devices": [counter_device(port, poll="50ms")],
        }
        with bridge_view(pki_acme, broker_acme) as seen, AgentProcess(tmp_path / "agent", config) as agent:
            agent.start()
            await asyncio.to_thread(seen.wait, lambda: len(seen.seqs(GW)) >= 10, 20, "first batches")
            broker_acme.stop()  # clean stop: the broker keeps its sessions on disk
            await asyncio.sleep(3)
            during = await asyncio.to_thread(agent.status)
            assert during["connection"]["state"] in ("connecting", "disconnected")
            assert during["buffer"]["batches"] > 20  # polling and buffering went on
            broker_acme.start()
            await wait_for(
                lambda: status_of(agent, lambda s: s.get("buffer", {}).get("batches", 99) < 5),
                timeout_s=30,
                interval_s=0.3,
                what="the backlog to drain",
            )
            await asyncio.sleep(1)
            seqs, last = await stop_and_collect(agent, seen)
            assert last.batches == 0
    no_gaps(seqs)
    assert max(seqs) == last.next_seq - 1
    assert all(len(d["points"]) == 5 for d in seen.docs(f"gw/{GW}/data/"))


async def test_broker_mode_replays_what_a_crashed_broker_acknowledged(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, proxy: Haproxy
) -> None:
    """``confirm: broker`` (a consumer other than the bridge): kill -9 of the broker while that consumer is
    away. The broker had acknowledged batches it had not saved yet (autosave every few seconds); the agent
    sends again what it acknowledged within ``replay`` before the connection was lost."""
    port = free_port()
    async with ModbusSimulator(units={1: counter_model()}, port=port):
        config = {
            "gateway": GW,
            "mqtt": mqtt_section(pki_acme, proxy.port),
            "buffer": {"confirm": "broker"},
            "devices": [counter_device(port, poll="50ms")],
        }
        seen = bridge_view(pki_acme, broker_acme).start()
        with AgentProcess(tmp_path / "agent", config) as agent:
            agent.start()
            await asyncio.sleep(6)  # past the broker's autosave: the bridge's session is on disk
            seen.stop()  # the bridge is away; the broker queues for it, in memory
            await asyncio.sleep(1.5)
            broker_acme.kill()
            broker_acme.start()
            seen.start()
            await wait_for(
                lambda: status_of(agent, lambda s: s.get("connection", {}).get("state") == "connected"),
                timeout_s=20,
                interval_s=0.2,
                what="the agent to reconnect",
            )
            await asyncio.sleep(1)
            seqs, last = await stop_and_collect(agent, seen)
            assert last.batches == 0
            assert (await asyncio.to_thread(agent.status))["publish"]["replayed"] > 0
        seen.stop()
    no_gaps(seqs)


async def test_backlog_drains_in_order_while_live_data_flows(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, proxy: Haproxy
) -> None:
    """A large backlog (buffered while offline) and live polls share the window: neither waits for the other."""
    from agent.buffer import Buffer
    from drivers.points import Point

    port = free_port()
    agent_dir = tmp_path / "agent"
    with Buffer(agent_dir / "state" / "buffer.db", gateway=GW, max_bytes=10**9) as buf:
        for i in range(3000):
            buf.add("line-1", [Point("line-1", f"r{t}", i, i) for t in range(5)], max_points=500, max_bytes=10**6)
        last_written = buf.next_seq - 1
    async with ModbusSimulator(units={1: counter_model()}, port=port):
        config = {
            "gateway": GW,
            "mqtt": mqtt_section(pki_acme, proxy.port),
            "publish": {"inflight": 2},
            "devices": [counter_device(port, poll="20ms")],
        }
        with bridge_view(pki_acme, broker_acme) as seen, AgentProcess(agent_dir, config) as agent:
            agent.start()
            await asyncio.to_thread(
                seen.wait,
                lambda: last_written in seen.seqs(GW) and max(seen.seqs(GW)) > last_written + 10,
                60,
                "the backlog and live batches",
            )
            await asyncio.to_thread(agent.stop)
            seqs = seen.seqs(GW)
            boundary = next(e["live_from_seq"] for e in agent.logs() if e.get("msg") == "connected to broker")
    # Batches buffered before the connection came up are backlog (3000 written
    # beforehand, plus the first polls); everything after is live.
    assert boundary > last_written
    backlog = [s for s in seqs if s < boundary]
    live = [s for s in seqs if s >= boundary]
    assert backlog == sorted(backlog) and live == sorted(live)  # each in order
    no_gaps(backlog)
    # Live batches were delivered before the backlog was through.
    assert seqs.index(live[0]) < seqs.index(last_written)


async def test_kill_9_during_drain_loses_nothing(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, proxy: Haproxy
) -> None:
    port = free_port()
    async with ModbusSimulator(units={1: counter_model()}, port=port):
        config = {
            "gateway": GW,
            "mqtt": mqtt_section(pki_acme, proxy.port),
            "publish": {"inflight": 2},
            "devices": [counter_device(port, poll="20ms")],
        }
        with bridge_view(pki_acme, broker_acme) as seen, AgentProcess(tmp_path / "agent", config) as agent:
            proxy.stop()  # the agent cannot reach the broker: it buffers
            agent.start()
            await wait_for(
                lambda: status_of(agent, lambda s: s.get("buffer", {}).get("batches", 0) > 150),
                timeout_s=30,
                interval_s=0.2,
                what="a backlog",
            )
            proxy.start()
            await asyncio.to_thread(seen.wait, lambda: len(seen.seqs(GW)) > 20, 30, "the drain to start")
            agent.kill()
            killed_at = len(seen.seqs(GW))
            agent.start()
            await wait_for(
                lambda: status_of(agent, lambda s: s.get("buffer", {}).get("batches", 99) < 5),
                timeout_s=30,
                interval_s=0.3,
                what="the drain to finish after restart",
            )
            seqs, _ = await stop_and_collect(agent, seen)
    assert killed_at < len(seqs)
    no_gaps(seqs)
    # Redelivered batches are byte-identical: same seq, same points.
    by_seq: dict[int, list[Any]] = {}
    for doc in seen.docs(f"gw/{GW}/data/"):
        by_seq.setdefault(doc["seq"], []).append(doc["points"])
    assert all(all(p == versions[0] for p in versions) for versions in by_seq.values())


async def test_full_buffer_drops_oldest_and_reports_it(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, proxy: Haproxy
) -> None:
    port = free_port()
    async with ModbusSimulator(units={1: counter_model(100)}, port=port):
        config = {
            "gateway": GW,
            "mqtt": mqtt_section(pki_acme, proxy.port),
            "buffer": {"max_bytes": "1MiB"},
            "devices": [counter_device(port, poll="20ms", tags=100)],
        }
        with bridge_view(pki_acme, broker_acme) as seen, AgentProcess(tmp_path / "agent", config) as agent:
            proxy.stop()
            agent.start()
            await wait_for(
                lambda: status_of(agent, lambda s: s.get("buffer", {}).get("dropped_points", 0) > 5000),
                timeout_s=30,
                interval_s=0.2,
                what="drops",
            )
            await asyncio.to_thread(agent.stop)
            dropped = (await asyncio.to_thread(agent.status))["buffer"]["dropped_points"]
            db = agent.state_dir / "buffer.db"
            on_disk = db.stat().st_size + (db.parent / "buffer.db-wal").stat().st_size
            assert on_disk <= 1024 * 1024  # max_bytes bounds the files, WAL included
            text = [e for e in agent.logs() if e.get("msg") == "buffer full: dropped oldest points"]
            assert sum(e["points"] for e in text) == dropped
            proxy.start()
            agent.write_config(dict(config, devices=[]))  # publish what is left; buffer nothing new
            agent.start()

            def drop_events() -> list[dict[str, Any]]:
                return [e for e in seen.docs(f"gw/{GW}/events") if e["type"] == "buffer_drop"]

            await asyncio.to_thread(
                seen.wait, lambda: sum(e["points"] for e in drop_events()) >= dropped, 30, "buffer_drop events"
            )
            seqs = sorted(set(seen.seqs(GW)))
    assert sum(e["points"] for e in drop_events()) == dropped
    assert all(e["reason"] == "full" for e in drop_events())
    # What was dropped is exactly the oldest: the survivors are one run of seqs up to the newest.
    assert seqs == list(range(seqs[0], seqs[-1] + 1)) and seqs[0] > min(e["seq_from"] for e in drop_events())


async def test_commands_ping_write_reload(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, proxy: Haproxy
) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    port = free_port()
    model = counter_model()
    async with ModbusSimulator(units={1: model}, port=port):
        config = {
            "gateway": GW,
            "mqtt": mqtt_section(pki_acme, proxy.port),
            "metrics_port": free_port(),
            "devices": [counter_device(port, poll="200ms")],
        }
        with bridge_view(pki_acme, broker_acme, "bridge") as bridge, AgentProcess(tmp_path / "agent", config) as agent:
            agent.start()
            await asyncio.to_thread(bridge.wait, lambda: bool(bridge.seqs(GW)), 20, "data")

            async def command(name: str, payload: Any, correlation: bytes) -> dict[str, Any]:
                props = Properties(PacketTypes.PUBLISH)
                props.CorrelationData = correlation
                props.ResponseTopic = f"gw/{GW}/cmd/{name}/reply"
                bridge.client.publish(f"gw/{GW}/cmd/{name}", json.dumps(payload), qos=1, properties=props)

                def reply() -> Any:
                    with bridge.lock:
                        return next(
                            (
                                json.loads(p)
                                for t, p, pr in bridge.messages
                                if t == f"gw/{GW}/cmd/{name}/reply"
                                and getattr(pr, "CorrelationData", None) == correlation
                            ),
                            None,
                        )

                await asyncio.to_thread(bridge.wait, lambda: reply() is not None, 10, f"{name} reply")
                return reply()

            pong = await command("ping", {}, b"c-1")
            assert pong["ok"] is True and pong["gw"] == GW
            written = await command("write", {"device": "line-1", "tag": "r0", "value": 4242}, b"c-2")
            assert written == {"ok": True, "device": "line-1", "tag": "r0", "value": 4242}
            assert model.get_registers(Table.HOLDING, 0, 1) == [4242]
            refused = await command("write", {"device": "line-1", "tag": "r1", "value": 1}, b"c-3")
            assert refused == {"ok": False, "error": "line-1.r1 is not writable (mark it writable: true in the config)"}
            unknown = await command("reboot", {}, b"c-4")
            assert unknown["ok"] is False and "unknown command 'reboot'" in unknown["error"]

            broken = dict(config, devices=[dict(counter_device(port), tags=[{"name": "x", "address": 70000}])])
            agent.write_config(broken)
            bad = await command("reload", {}, b"c-5")
            assert bad["ok"] is False and "devices[line-1].tags[x].address" in bad["error"]
            grown = dict(config, devices=[counter_device(port, poll="200ms", tags=7)])
            agent.write_config(grown)
            good = await command("reload", {}, b"c-6")
            assert good["ok"] is True and good["devices"] == ["line-1"]
            await asyncio.to_thread(
                bridge.wait,
                lambda: any(len(d["points"]) == 7 for d in bridge.docs(f"gw/{GW}/data/")),
                10,
                "the reloaded tags",
            )

            # The status file is written beside the polls, on a thread of its own: it follows them closely.
            await asyncio.to_thread(
                bridge.wait,
                lambda: agent.status().get("devices", {}).get("line-1", {}).get("state") == "up",
                10,
                "the status file to show the reloaded device up",
            )
            status = await asyncio.to_thread(agent.status)
            assert status["running"] and status["connection"]["state"] == "connected"
            text = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "agent.cli", "status", "--state-dir", str(agent.state_dir)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            lines = text.stdout.splitlines()
            assert agent.proc is not None
            assert lines[0] == f"gateway      {GW}  (running, pid {agent.proc.pid})"
            assert lines[1].startswith(f"broker       mqtts://{pki_acme.host}:{proxy.port} via 127.0.0.1  connected")
            assert lines[3] == "dropped      0 points"
            assert lines[5].startswith("config       local file, hash ")
            assert lines[7].split()[:3] == ["DEVICE", "STATE", "LAST"]
            assert lines[8].split()[:2] == ["line-1", "up"]
            assert status["devices"]["line-1"]["state"] == "up"
            metrics = await asyncio.to_thread(
                lambda: (
                    urllib.request.urlopen(f"http://127.0.0.1:{config['metrics_port']}/metrics", timeout=5)
                    .read()
                    .decode()
                )
            )
            assert f'factory_edge_connected{{gw="{GW}"}} 1' in metrics
            assert f'factory_edge_device_up{{gw="{GW}",device="line-1"}} 1' in metrics
            assert agent.alive


async def test_tls_failures_are_clear_and_retried(
    tmp_path: Path, pki_acme: TenantPki, pki_globex: TenantPki, broker_acme: Mosquitto, proxy: Haproxy
) -> None:
    from agent.mqtt import Link
    from factory_edge.errors import PublishError

    cert, key = pki_acme.client(GW)
    expired = pki_acme.client("gw-old", not_before=_days_ago(30), not_after=_days_ago(1))

    def settings(**over: Any) -> BrokerSettings:
        base = dict(
            host=pki_acme.host,
            port=proxy.port,
            tls=True,
            connect_host="127.0.0.1",
            ca_file=str(pki_acme.ca_file),
            cert_file=str(cert),
            key_file=str(key),
        )
        return BrokerSettings(**{**base, **over})

    async def error(s: BrokerSettings) -> str:
        link = Link(
            s,
            client_id="probe",
            will=None,
            inflight=1,
            on_ack=lambda *a: None,
            on_message=lambda m: None,
            on_lost=lambda r: None,
        )
        with pytest.raises(PublishError) as exc_info:
            await link.open(timeout_s=5)
        return str(exc_info.value)

    untrusted = await error(settings(ca_file=str(pki_globex.ca_file)))
    assert untrusted.startswith("TLS: broker certificate not trusted (") and untrusted.endswith("); check ca_file")
    assert await error(settings(host="mqtt.other.test", port=broker_acme.port)) == (
        "TLS: the broker's certificate is not valid for mqtt.other.test (hostname mismatch)"
    )
    assert "unknown SNI name mqtt.nope.test" in await error(settings(host="mqtt.nope.test"))
    assert await error(settings(cert_file=str(expired[0]), key_file=str(expired[1]))) == (
        f"TLS: our certificate {expired[0]} expired on {_days_ago(1):%Y-%m-%d %H:%M} UTC; renew it (agent provision --force)"
    )
    revoked = pki_acme.client("gw-revoked")
    pki_acme.revoke("gw-revoked")
    broker_acme.reload()
    assert await error(settings(cert_file=str(revoked[0]), key_file=str(revoked[1]))) in (
        "TLS: the broker refused our certificate: it has been revoked",
        "the broker closed the connection before CONNACK: it may have refused our certificate "
        "(revoked, or issued by a CA it does not trust)",
    )
    closed = free_port()
    assert await error(settings(port=closed)) == f"connection refused by 127.0.0.1:{closed}"

    # The agent itself: an unreachable proxy is retried every second at most, the process stays up,
    # and the journal gets the reason once (then a reminder at growing intervals), not every attempt.
    config = {"gateway": GW, "mqtt": {**mqtt_section(pki_acme, closed)}, "devices": []}
    with AgentProcess(tmp_path / "agent", config) as agent:
        agent.start()
        await asyncio.sleep(5)
        status = await asyncio.to_thread(agent.status)
        assert agent.alive
        assert status["connection"]["last_error"] == f"connection refused by 127.0.0.1:{closed}"
        assert 5 <= status["connection"]["connect_attempts"] <= 15  # 0.1 s, 0.2 s … capped at 1 s: not a tight loop
        warnings = [e for e in agent.logs() if "connect to broker" in e.get("msg", "")]
        assert [w["msg"] for w in warnings] == ["cannot connect to broker"]


def _days_ago(days: int) -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC) - dt.timedelta(days=days)


async def test_a_copy_of_the_gateways_certificate_is_logged_as_a_takeover(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, proxy: Haproxy
) -> None:
    """The broker binds the client id to the certificate: only a copy of this gateway's own certificate can take
    its session (a leaked key). The agent takes it back at once and says so, in words."""
    config = {"gateway": GW, "mqtt": mqtt_section(pki_acme, proxy.port), "devices": []}
    with AgentProcess(tmp_path / "agent", config) as agent:
        agent.start()
        await wait_for(
            lambda: status_of(agent, lambda s: s.get("connection", {}).get("state") == "connected"),
            timeout_s=20,
            interval_s=0.1,
            what="the agent to connect",
        )
        cert, key = pki_acme.client(GW)
        settings = BrokerSettings(
            host=pki_acme.host,
            port=proxy.port,
            tls=True,
            connect_host="127.0.0.1",
            ca_file=str(pki_acme.ca_file),
            cert_file=str(cert),
            key_file=str(key),
        )
        with Collector(settings, [], client_id="not-the-agents-id"):
            await wait_for(
                lambda: any(
                    e.get("msg") == "session taken over by another connection with our client id" for e in agent.logs()
                ),
                timeout_s=10,
                what="the takeover in the agent's log",
            )
        await wait_for(
            lambda: status_of(agent, lambda s: s.get("connection", {}).get("state") == "connected"),
            timeout_s=10,
            what="the agent back on its session",
        )
    logged = next(
        e for e in agent.logs() if e.get("msg") == "session taken over by another connection with our client id"
    )
    assert logged["client_id"] == GW and "certificate" in logged["hint"]
    assert f"Client {GW} already connected, closing old connection." in broker_acme.log()
