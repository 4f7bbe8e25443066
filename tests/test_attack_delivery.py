"""Attacks on the delivery promise: a reading the agent buffered reaches the tenant's storage exactly once.

Real processes as in ``test_zero_loss.py``: ``agent run``, ``bridge run``,
Mosquitto, and the ground-truth Modbus machine. Each test states the
behaviour a user is owed; the long scenarios carry the ``fault`` marker.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import AgentProcess, Collector
from tests.bridge_fixtures import BridgeProcess, StoreView, settings_for, tenant_entry, wait_until, write_config
from tests.faults import GW, Plant, agent_config, check_exactly_once, finish
from tests.infra import Mosquitto, TenantPki

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def plant(tmp_path: Path) -> Iterator[Plant]:
    with Plant(tmp_path / "plant", units=(1, 2)) as machine:
        yield machine


def bridge_config(tmp_path: Path, pki: TenantPki, broker: Mosquitto, view: StoreView, **tenant: Any) -> Path:
    return write_config(tmp_path / "bridge.yaml", tenants=[tenant_entry(pki, broker, **tenant)], storage=view.storage,
                        ingest={"max_messages": 50})


# ---------------------------------------------------------------- a gateway whose buffer starts again


def test_a_replacement_box_with_a_fresh_buffer_has_its_readings_stored(
        tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, plant: Plant) -> None:
    """The documented replacement of a gateway (revoke, provision the same name on a new box), or a buffer
    lost with its SD card: the new buffer numbers its batches from 1 again. The store already holds
    ``(gw-01, 1..N)`` from the old box; the new box's readings must still be stored, not taken for repeats,
    confirmed and deleted from its buffer."""
    view = StoreView("sqlite", tmp_path / "store")
    config = agent_config(pki_acme, broker_acme.port, plant)
    with BridgeProcess(bridge_config(tmp_path, pki_acme, broker_acme, view)) as bridge:
        bridge.wait_connected()
        old_box = AgentProcess(tmp_path / "old-box", config).start()
        try:
            time.sleep(5)
            wait_until(lambda: old_box.status().get("buffer", {}).get("unconfirmed_batches", 1) == 0, timeout_s=30)
            assert old_box.stop() == 0
            first_life = old_box.status()["buffer"]["next_seq"] - 1
        finally:
            old_box.stop()
        assert first_life > 50
        # The replacement: same gateway id, a buffer of its own.
        new_box = AgentProcess(tmp_path / "new-box", config).start()
        try:
            time.sleep(4)
            finish(plant, new_box)
            second_life = new_box.status()["buffer"]["next_seq"] - 1
        finally:
            new_box.stop()
    report = check_exactly_once(plant, view, pki_acme.tenant)
    print(f"replacement box: first life {first_life} batches, second life {second_life} batches: {report}")


# ---------------------------------------------------------------- the bridge away for a while, then back


@pytest.mark.fault
def test_bridge_back_after_a_long_absence_does_not_make_the_agent_resend_its_whole_backlog(
        tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, plant: Plant) -> None:
    """The bridge is stopped for a while (its session keeps the queue in the broker); the agent probes now and
    then. When the bridge comes back, the broker hands it the queued batches in order; nothing was lost, so the
    agent should send again at most a handful (the probes), not the backlog a second time."""
    view = StoreView("sqlite", tmp_path / "store")
    config = bridge_config(tmp_path, pki_acme, broker_acme, view)
    with BridgeProcess(config) as bridge:
        bridge.wait_connected()  # its persistent session and subscription exist from now on
    with Collector(settings_for(pki_acme, broker_acme, "bridge"), [f"gw/{GW}/data/#"], client_id="wire") as wire:
        agent = AgentProcess(tmp_path / "agent", agent_config(pki_acme, broker_acme.port, plant,
                                                              buffer={"confirm_timeout": "2s"})).start()
        try:
            time.sleep(40)  # probes at ~2, 4, 8, 16, 32 s: the oldest batch, again and again
            away = agent.status()
            batches = away["buffer"]["next_seq"] - 1
            assert away["buffer"]["unconfirmed_batches"] > 0.9 * batches
            bridge = BridgeProcess(config, log=tmp_path / "bridge-back.log").start()
            try:
                finish(plant, agent, timeout_s=120)
            finally:
                bridge.stop()
            status = agent.status()
        finally:
            agent.stop()
        seqs = wire.seqs(GW)
    report = check_exactly_once(plant, view, pki_acme.tenant)
    repeats = len(seqs) - len(set(seqs))
    resent = status["publish"]["resent"]
    print(f"bridge away 40 s: {batches} batches buffered meanwhile, resent={resent}, repeats on the wire={repeats}, "
          f"{report}")
    assert resent <= 10 and repeats <= 10, (
        f"{resent} batches sent again ({repeats} repeats on the wire) for a backlog of {batches} that the broker "
        f"still held: nothing was lost")


# ---------------------------------------------------------------- a full disk, and a stop meanwhile


@pytest.fixture
def small_state_dir(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs for the agent's state directory (needs root), unmounted in teardown."""
    import subprocess

    mount = tmp_path / "state"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m,mode=0700", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.fault
def test_readings_dropped_on_a_full_disk_stay_counted_when_the_agent_is_stopped(
        tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, small_state_dir: Path) -> None:
    """Broker down, disk full: readings are dropped and counted. A clean stop (SIGTERM: an update, a reboot)
    while the disk is still full must not forget the count: every reading served is either in the buffer or
    counted as dropped, before and after the stop."""
    broker_acme.stop()  # down throughout: nothing leaves the buffer
    with Plant(tmp_path / "plant", units=(1,), bulk=400) as plant:
        config = agent_config(pki_acme, broker_acme.port, plant, state_dir=str(small_state_dir),
                              buffer={"min_free": "2MiB"})
        config["devices"] = plant.devices(poll="20ms")
        agent = AgentProcess(tmp_path / "agent", config)
        agent.state_dir = small_state_dir
        agent.start()
        try:
            wait_until(lambda: agent.status().get("writer", {}).get("disk_full"), timeout_s=120, interval_s=0.5,
                       what="the disk to fill")
            time.sleep(3)
            running = agent.status()["buffer"]
            assert agent.stop() == 0
        finally:
            agent.stop()
        served = plant.points_served()
    stopped = agent.status()["buffer"]
    per_poll = 1 + plant.bulk
    print(f"served={served} running: buffered={running['points']} dropped={running['dropped_by_reason']}; "
          f"stopped: buffered={stopped['points']} dropped={stopped['dropped_by_reason']}")
    assert stopped["dropped_by_reason"].get("disk_full", 0) >= running["dropped_by_reason"].get("disk_full", 0), (
        "a clean stop on a full disk forgot readings it had counted as dropped")
    assert served - per_poll <= stopped["points"] + stopped["dropped_points"] <= served


# ---------------------------------------------------------------- a big backlog awaiting confirmation


def prebuilt_backlog(state_dir: Path, batches: int, *, spread_s: float = 3600.0) -> int:
    """A buffer as an agent leaves it after a long bridge outage: ``batches`` small batches (5 points, one
    poll of a small device each), accepted by the broker in seq order over the last ``spread_s``, none
    confirmed. Returns the next seq."""
    from agent.buffer import Buffer
    from drivers.points import Point

    state_dir.mkdir(parents=True, exist_ok=True)
    now = int(time.time() * 1000)
    with Buffer(state_dir / "buffer.db", gateway=GW, max_bytes=256 * 1024**2, fsync=False) as buf:
        bodies = buf.encode("old", [Point("old", f"t{i}", now, float(i)) for i in range(5)], max_points=500,
                            max_bytes=256 * 1024)
        start = now - int(spread_s * 1000)
        step = spread_s * 1000 / batches
        with buf.transaction():
            for k in range(batches):
                buf.insert(bodies, start + int(k * step))
            buf._db.executemany("INSERT INTO accepted VALUES (?, ?)",
                                ((k + 1, start + int(k * step)) for k in range(batches)))
        return buf.next_seq


def poll_gaps_ms(plant: Plant, unit: int, since_ms: int) -> list[int]:
    """Time between consecutive reads of ``unit``'s counter, from the machine's own record."""
    times = [s.at_ms for s in plant.served() if s.unit == unit and s.value is not None and s.at_ms >= since_ms]
    return [b - a for a, b in zip(times, times[1:])]


@pytest.mark.fault
def test_polls_stay_on_schedule_while_the_bridge_drains_a_big_backlog(
        tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, plant: Plant) -> None:
    """The bridge was away for an hour; the agent's buffer holds 600,000 small batches the broker accepted
    (an hour of 20 devices polled at 100 ms, within the default 256 MiB). The bridge is back and works through
    the broker's queue in order, confirming as it commits (here: its confirmations, in order, at the pace of
    a bridge committing 50-message windows). Polling at 100 ms must stay on schedule meanwhile."""
    from factory_edge.acks import encode_acks
    from tests.bridge_fixtures import Gateway

    agent = AgentProcess(tmp_path / "agent", agent_config(pki_acme, broker_acme.port, plant,
                                                          buffer={"confirm_timeout": "1h"}))
    agent.config["devices"] = plant.devices(poll="100ms")
    agent.write_config({k: v for k, v in agent.config.items() if k != "state_dir"})
    total = 600_000
    prebuilt_backlog(agent.state_dir, total, spread_s=1800.0)
    agent.start()
    try:
        wait_until(lambda: agent.status().get("connection", {}).get("state") == "connected", timeout_s=30)
        time.sleep(2)
        since = int(time.time() * 1000)
        with Gateway(pki_acme, broker_acme, "bridge") as bridge:
            first = 1
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                bridge.publish(f"gw/{GW}/ack", encode_acks(range(first, first + 50)), wait=False)
                first += 50
                time.sleep(0.01)
        gaps = poll_gaps_ms(plant, 1, since)
        status = agent.status()
    finally:
        agent.stop()
    late = [g for g in gaps if g >= 190]  # a skipped 100 ms slot
    print(f"confirmed {first - 1} of {total}; agent confirmed_batches={status['publish']['confirmed_batches']} "
          f"resent={status['publish']['resent']} "
          f"polls={len(gaps) + 1} in 20 s, max gap={max(gaps)} ms, gaps >= 190 ms: {len(late)}")
    assert len(late) == 0, (f"{len(late)} of {len(gaps)} poll intervals skipped a slot while the backlog drained "
                            f"(worst {sorted(late)[-5:]} ms at a 100 ms poll)")


# ---------------------------------------------------------------- a reading larger than the broker takes


async def test_one_reading_larger_than_the_brokers_packet_limit_does_not_stall_the_gateway(
        tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, plant: Plant) -> None:
    """An OPC UA string (a recipe, a JSON document, an array as text) of 1.2 MB: one point, so one batch,
    above the tenant broker's ``max_packet_size`` (1 MiB). The broker ends the connection at such a packet.
    The gateway must not flap its connection forever re-sending it while its other readings wait: the
    oversize reading is refused (a bad point, a dead letter, a counted drop), everything else flows."""
    import asyncio

    from drivers.simulate.opcua_server import OpcuaSimulator
    from tests.helpers import free_port

    view = StoreView("sqlite", tmp_path / "store")
    async with OpcuaSimulator(port=free_port(), update_interval_s=None) as oven:
        await oven.set("Oven.Recipe", "R" * 1_200_000)
        config = agent_config(pki_acme, broker_acme.port, plant)
        config["devices"] = plant.devices(poll="100ms") + [
            {"name": "oven-1", "protocol": "opcua", "endpoint": oven.endpoint, "mode": "poll", "poll": "5s",
             "tags": [{"name": "recipe", "node": "ns=2;s=Oven.Recipe"}]}]
        with BridgeProcess(bridge_config(tmp_path, pki_acme, broker_acme, view)) as bridge:
            bridge.wait_connected()
            agent = AgentProcess(tmp_path / "agent", config).start()
            try:
                await asyncio.sleep(15)
                status = await asyncio.to_thread(agent.status)
            finally:
                agent.stop()
    lost = [e for e in agent.logs() if e.get("msg") == "connection to broker lost"]
    buffered = status["buffer"]["batches"] + status["buffer"]["unconfirmed_batches"]
    print(f"15 s: reconnects={status['connection']['reconnects']} last_error={status['connection']['last_error']!r} "
          f"still buffered={buffered} confirmed={status['publish']['confirmed_batches']} "
          f"reasons={sorted({e.get('reason') for e in lost})}")
    assert status["connection"]["reconnects"] <= 1, (
        f"the connection was lost {status['connection']['reconnects']} times in 15 s "
        f"({lost[-1].get('reason') if lost else ''})")
    assert buffered < 20, f"{buffered} batches still waiting after 15 s"


async def test_a_string_with_a_nul_character_does_not_keep_the_devices_other_readings_out_of_the_store(
        tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, plant: Plant) -> None:
    """OPC UA strings may hold NUL characters (fixed-size char arrays of a PLC). The bridge refuses text with
    NUL and dead-letters the whole batch, then confirms it: the agent deletes it. The device's other readings
    of that poll (its temperatures) must still reach the ``points`` table."""
    import asyncio

    from drivers.simulate.opcua_server import OpcuaSimulator
    from tests.helpers import free_port

    view = StoreView("sqlite", tmp_path / "store")
    async with OpcuaSimulator(port=free_port(), update_interval_s=None) as oven:
        await oven.set("Oven.Recipe", "Bread\x00\x00\x00")
        await oven.set("Oven.Zone1.Temp", 180.5)
        config = agent_config(pki_acme, broker_acme.port, plant)
        config["devices"] = [
            {"name": "oven-1", "protocol": "opcua", "endpoint": oven.endpoint, "mode": "poll", "poll": "200ms",
             "tags": [{"name": "recipe", "node": "ns=2;s=Oven.Recipe"},
                      {"name": "zone1_temp", "node": "ns=2;s=Oven.Zone1.Temp"}]}]
        with BridgeProcess(bridge_config(tmp_path, pki_acme, broker_acme, view)) as bridge:
            bridge.wait_connected()
            agent = AgentProcess(tmp_path / "agent", config).start()
            try:
                await asyncio.sleep(6)
                status = await asyncio.to_thread(agent.status)
            finally:
                agent.stop()
    temps = view.count(pki_acme.tenant, "points", "WHERE device = 'oven-1' AND tag = 'zone1_temp'")
    dead = view.rows(pki_acme.tenant, "SELECT reason FROM {dead_letters}")
    print(f"confirmed batches={status['publish']['confirmed_batches']} zone1_temp rows={temps} "
          f"dead letters={len(dead)} {dead[:1]}")
    assert temps > 0, f"no zone1_temp reading stored; {len(dead)} batches dead-lettered ({dead[:1]}) and confirmed"
