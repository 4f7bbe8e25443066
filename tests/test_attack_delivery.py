"""Attacks on the delivery promise: a reading the agent buffered reaches the tenant's storage exactly once.

Real processes as in ``test_zero_loss.py``: ``agent run``, ``bridge run``,
Mosquitto, and the ground-truth Modbus machine. Each test states the
behaviour a user is owed; the long scenarios carry the ``fault`` marker.
"""

from __future__ import annotations

import itertools
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from tests.agentproc import AgentProcess, Collector
from tests.bridge_fixtures import (
    BridgeProcess,
    StoreView,
    pg_dsn,
    pg_schemas,
    settings_for,
    tenant_entry,
    unique_tenant,
    wait_until,
    write_config,
)
from tests.faults import GW, Plant, agent_config, check_exactly_once, finish
from tests.infra import Mosquitto, TenantPki

__all__ = ["pg_dsn", "pg_schemas"]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def plant(tmp_path: Path) -> Iterator[Plant]:
    with Plant(tmp_path / "plant", units=(1, 2)) as machine:
        yield machine


def bridge_config(tmp_path: Path, pki: TenantPki, broker: Mosquitto, view: StoreView, **tenant: Any) -> Path:
    return write_config(
        tmp_path / "bridge.yaml",
        tenants=[tenant_entry(pki, broker, **tenant)],
        storage=view.storage,
        ingest={"max_messages": 50},
    )


# ---------------------------------------------------------------- a gateway whose buffer starts again


def test_a_replacement_box_with_a_fresh_buffer_has_its_readings_stored(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, plant: Plant
) -> None:
    """The documented replacement of a gateway (revoke, provision the same name on a new box), or a buffer
    lost with its SD card: the new buffer numbers its batches afresh. The store already holds the old box's
    ``(gw-01, seq)``; the new box's readings must still be stored, not taken for repeats, confirmed and
    deleted from its buffer."""
    view = StoreView("sqlite", tmp_path / "store")
    config = agent_config(pki_acme, broker_acme.port, plant)
    with BridgeProcess(bridge_config(tmp_path, pki_acme, broker_acme, view)) as bridge:
        bridge.wait_connected()
        old_box = AgentProcess(tmp_path / "old-box", config)
        old_first = old_box.create_buffer()
        old_box.start()
        try:
            time.sleep(5)
            wait_until(lambda: old_box.status().get("buffer", {}).get("unconfirmed_batches", 1) == 0, timeout_s=30)
            assert old_box.stop() == 0
            first_life = old_box.status()["buffer"]["next_seq"] - old_first
        finally:
            old_box.stop()
        assert first_life > 50
        # The replacement: same gateway id, a buffer of its own.
        new_box = AgentProcess(tmp_path / "new-box", config)
        new_first = new_box.create_buffer()
        new_box.start()
        try:
            time.sleep(4)
            finish(plant, new_box)
            second_life = new_box.status()["buffer"]["next_seq"] - new_first
        finally:
            new_box.stop()
    report = check_exactly_once(plant, view, pki_acme.tenant)
    print(f"replacement box: first life {first_life} batches, second life {second_life} batches: {report}")


# ---------------------------------------------------------------- the bridge away for a while, then back


@pytest.mark.fault
@pytest.mark.parametrize("confirm_timeout,away_s", [("2s", 40), ("30s", 100)])
def test_bridge_back_after_a_long_absence_does_not_make_the_agent_resend_its_whole_backlog(
    confirm_timeout: str, away_s: int, tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, plant: Plant
) -> None:
    """The bridge is stopped for a while (its session keeps the queue in the broker); the agent probes now and
    then. When the bridge comes back, the broker hands it the queued batches in order; nothing was lost, so the
    agent should send again at most a handful (the probes), not the backlog a second time."""
    view = StoreView("sqlite", tmp_path / "store")
    config = bridge_config(tmp_path, pki_acme, broker_acme, view)
    with BridgeProcess(config) as bridge:
        bridge.wait_connected()  # its persistent session and subscription exist from now on
    with Collector(settings_for(pki_acme, broker_acme, "bridge"), [f"gw/{GW}/data/#"], client_id="wire") as wire:
        agent = AgentProcess(
            tmp_path / "agent",
            agent_config(pki_acme, broker_acme.port, plant, buffer={"confirm_timeout": confirm_timeout}),
        )
        first = agent.create_buffer()
        agent.start()
        try:
            time.sleep(away_s)  # probes at 1, 2, 4, 8, 16 x confirm_timeout: the oldest batch, again and again
            away = agent.status()
            batches = away["buffer"]["next_seq"] - first
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
    print(
        f"bridge away {away_s} s (confirm_timeout {confirm_timeout}): {batches} batches buffered meanwhile, resent={resent}, repeats on the wire={repeats}, "
        f"{report}"
    )
    assert resent <= 10 and repeats <= 10, (
        f"{resent} batches sent again ({repeats} repeats on the wire) for a backlog of {batches} that the broker "
        f"still held: nothing was lost"
    )


# ---------------------------------------------------------------- a full disk, and a stop meanwhile


@pytest.fixture
def small_state_dir(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs for the agent's state directory (needs root), unmounted in teardown."""
    import subprocess

    mount = tmp_path / "state"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m,mode=0700", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.fault
def test_readings_dropped_on_a_full_disk_stay_counted_when_the_agent_is_stopped(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, small_state_dir: Path
) -> None:
    """Broker down, disk full: readings are dropped and counted. A clean stop (SIGTERM: an update, a reboot)
    while the disk is still full must not forget the count: every reading served is either in the buffer or
    counted as dropped, before and after the stop."""
    broker_acme.stop()  # down throughout: nothing leaves the buffer
    with Plant(tmp_path / "plant", units=(1,), bulk=400) as plant:
        config = agent_config(
            pki_acme, broker_acme.port, plant, state_dir=str(small_state_dir), buffer={"min_free": "2MiB"}
        )
        config["devices"] = plant.devices(poll="20ms")
        agent = AgentProcess(tmp_path / "agent", config)
        agent.state_dir = small_state_dir
        agent.start()
        try:
            wait_until(
                lambda: agent.status().get("writer", {}).get("disk_full"),
                timeout_s=120,
                interval_s=0.5,
                what="the disk to fill",
            )
            time.sleep(3)
            running = agent.status()["buffer"]
            assert agent.stop() == 0
        finally:
            agent.stop()
        served = plant.points_served()
    stopped = agent.status()["buffer"]
    per_poll = 1 + plant.bulk
    print(
        f"served={served} running: buffered={running['points']} dropped={running['dropped_by_reason']}; "
        f"stopped: buffered={stopped['points']} dropped={stopped['dropped_by_reason']}"
    )
    assert stopped["dropped_by_reason"].get("disk_full", 0) >= running["dropped_by_reason"].get("disk_full", 0), (
        "a clean stop on a full disk forgot readings it had counted as dropped"
    )
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
        bodies = buf.encode(
            "old", [Point("old", f"t{i}", now, float(i)) for i in range(5)], max_points=500, max_bytes=256 * 1024
        )
        start = now - int(spread_s * 1000)
        step = spread_s * 1000 / batches
        first = buf.next_seq
        with buf.transaction():
            for k in range(batches):
                buf.insert(bodies, start + int(k * step))
            buf._db.executemany(
                "INSERT INTO accepted VALUES (?, ?, ?)",
                ((first + k, start + int(k * step), start + int(k * step)) for k in range(batches)),
            )
        return buf.next_seq


def poll_gaps_ms(plant: Plant, unit: int, since_ms: int) -> list[int]:
    """Time between consecutive reads of ``unit``'s counter, from the machine's own record."""
    times = [s.at_ms for s in plant.served() if s.unit == unit and s.value is not None and s.at_ms >= since_ms]
    return [b - a for a, b in itertools.pairwise(times)]


@pytest.mark.fault
def test_polls_stay_on_schedule_while_the_bridge_drains_a_big_backlog(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, plant: Plant
) -> None:
    """The bridge was away for an hour; the agent's buffer holds 600,000 small batches the broker accepted
    (an hour of 20 devices polled at 100 ms, within the default 256 MiB). The bridge is back and works through
    the broker's queue in order, confirming as it commits (here: its confirmations, in order, at the pace of
    a bridge committing 50-message windows). Polling at 100 ms must stay on schedule meanwhile."""
    from factory_edge.acks import encode_acks
    from tests.bridge_fixtures import Gateway

    agent = AgentProcess(
        tmp_path / "agent", agent_config(pki_acme, broker_acme.port, plant, buffer={"confirm_timeout": "1h"})
    )
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
    print(
        f"confirmed {first - 1} of {total}; agent confirmed_batches={status['publish']['confirmed_batches']} "
        f"resent={status['publish']['resent']} "
        f"polls={len(gaps) + 1} in 20 s, max gap={max(gaps)} ms, gaps >= 190 ms: {len(late)}"
    )
    assert len(late) == 0, (
        f"{len(late)} of {len(gaps)} poll intervals skipped a slot while the backlog drained "
        f"(worst {sorted(late)[-5:]} ms at a 100 ms poll)"
    )


# ---------------------------------------------------------------- a reading larger than the broker takes


async def test_one_reading_larger_than_the_brokers_packet_limit_does_not_stall_the_gateway(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, plant: Plant
) -> None:
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
        config["devices"] = [
            *plant.devices(poll="100ms"),
            {
                "name": "oven-1",
                "protocol": "opcua",
                "endpoint": oven.endpoint,
                "mode": "poll",
                "poll": "5s",
                "tags": [{"name": "recipe", "node": "ns=2;s=Oven.Recipe"}],
            },
        ]
        with BridgeProcess(bridge_config(tmp_path, pki_acme, broker_acme, view)) as bridge:
            bridge.wait_connected()
            agent = AgentProcess(tmp_path / "agent", config).start()
            try:
                await asyncio.sleep(15)
                status = await asyncio.to_thread(agent.status)
            finally:
                await asyncio.to_thread(agent.stop)  # the simulator shares this loop
    lost = [e for e in agent.logs() if e.get("msg") == "connection to broker lost"]
    buffered = status["buffer"]["batches"] + status["buffer"]["unconfirmed_batches"]
    print(
        f"15 s: reconnects={status['connection']['reconnects']} last_error={status['connection']['last_error']!r} "
        f"still buffered={buffered} confirmed={status['publish']['confirmed_batches']} "
        f"reasons={sorted({str(e.get('reason')) for e in lost})}"
    )
    assert status["connection"]["reconnects"] <= 1, (
        f"the connection was lost {status['connection']['reconnects']} times in 15 s "
        f"({lost[-1].get('reason') if lost else ''})"
    )
    assert buffered < 20, f"{buffered} batches still waiting after 15 s"


def test_batches_larger_than_a_small_packet_limit_are_split_and_every_reading_is_stored(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    """A tenant on a plan with a small message size (here 4 KiB: Mosquitto's ``max_packet_size``) and a
    machine of 300 registers: one poll is a batch of about 12 KB. The gateway buffered its first polls
    before it ever reached the broker (it did not know the limit yet), and cuts what it buffers later to the
    limit it learnt at CONNACK. Not one reading may be dropped for being in too big a batch."""
    view = StoreView("sqlite", tmp_path / "store")
    broker_acme.stop()
    broker_acme.max_packet_size = 4096
    with Plant(tmp_path / "plant", units=(1,), bulk=300) as plant:
        config = agent_config(pki_acme, broker_acme.port, plant)
        agent = AgentProcess(tmp_path / "agent", config).start()
        try:
            wait_until(lambda: agent.status().get("buffer", {}).get("batches", 0) >= 5, timeout_s=20)
            broker_acme.start()  # the first batches were cut for no particular broker: ~12 KB each
            with BridgeProcess(bridge_config(tmp_path, pki_acme, broker_acme, view)) as bridge:
                bridge.wait_connected()
                time.sleep(4)
                finish(plant, agent)
        finally:
            agent.stop()
        status = agent.status()
        report = check_exactly_once(plant, view, pki_acme.tenant)
        bulk = view.rows(pki_acme.tenant, "SELECT count(*) FROM {points} WHERE tag LIKE 'b%' AND quality = 'good'")
    splits = [e for e in agent.logs() if e.get("msg") == "batch larger than the broker accepts: split"]
    print(f"4 KiB packets, 300 registers: {report}, bulk readings stored {bulk[0][0]}, {len(splits)} batches split")
    assert status["buffer"]["dropped_points"] == 0, status["buffer"]
    assert splits and all(e["max_packet_size"] == 4096 for e in splits)
    # The device's retained meta (300 tags, ~20 KB) cannot be cut: it is not sent, and says so, rather than
    # have the broker end the connection on it again and again.
    assert not [e for e in agent.logs() if e.get("msg") == "connection to broker lost"]
    refused = [e for e in agent.logs() if e.get("msg") == "message larger than the broker accepts: not sent"]
    assert [e["topic"] for e in refused] == [f"gw/{GW}/meta/m1"]
    assert bulk[0][0] == plant.points_served() - report["served"]


async def test_a_string_with_a_nul_character_does_not_keep_the_devices_other_readings_out_of_the_store(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, plant: Plant
) -> None:
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
            {
                "name": "oven-1",
                "protocol": "opcua",
                "endpoint": oven.endpoint,
                "mode": "poll",
                "poll": "200ms",
                "tags": [
                    {"name": "recipe", "node": "ns=2;s=Oven.Recipe"},
                    {"name": "zone1_temp", "node": "ns=2;s=Oven.Zone1.Temp"},
                ],
            }
        ]
        with BridgeProcess(bridge_config(tmp_path, pki_acme, broker_acme, view)) as bridge:
            bridge.wait_connected()
            agent = AgentProcess(tmp_path / "agent", config).start()
            try:
                await asyncio.sleep(6)
                status = await asyncio.to_thread(agent.status)
            finally:
                await asyncio.to_thread(agent.stop)  # the simulator shares this loop
    temps = view.count(pki_acme.tenant, "points", "WHERE device = 'oven-1' AND tag = 'zone1_temp'")
    dead = view.rows(pki_acme.tenant, "SELECT reason FROM {dead_letters}")
    print(
        f"confirmed batches={status['publish']['confirmed_batches']} zone1_temp rows={temps} "
        f"dead letters={len(dead)} {dead[:1]}"
    )
    assert temps > 0, f"no zone1_temp reading stored; {len(dead)} batches dead-lettered ({dead[:1]}) and confirmed"


# ---------------------------------------------------------------- who may confirm


def test_only_a_bridge_can_confirm_a_gateways_batches(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, plant: Plant
) -> None:
    """No bridge runs: the agent's batches stay accepted and unconfirmed. Another gateway, a technician and the
    gateway's own identity publishing confirmations for every seq must change nothing; garbage from a bridge
    is ignored without harm."""
    from tests.bridge_fixtures import Gateway, Watcher

    tech = "tech-eve"
    pki_acme.client(tech)
    broker_acme.reload()
    everything = b'{"v":1,"seqs":[[0,9223372036854775807]]}'
    agent = AgentProcess(tmp_path / "agent", agent_config(pki_acme, broker_acme.port, plant)).start()
    try:
        wait_until(lambda: agent.status().get("buffer", {}).get("unconfirmed_batches", 0) > 20, timeout_s=20)
        with Watcher(pki_acme, broker_acme, ["gw/+/ack"], name="bridge.one") as seen:
            for name in ("gw-02", tech):
                with Gateway(pki_acme, broker_acme, name) as other:
                    for topic in (f"gw/{GW}/ack", f"gw/{name}/ack"):
                        info = other.publish(topic, everything, wait=False)
                        info.wait_for_publish(5)
            # A bridge sending garbage: not JSON, deep nesting, wrong shapes.
            with Gateway(pki_acme, broker_acme, "bridge") as bridge:
                for junk in (
                    b"\xff\xfe",
                    b"[" * 100_000,
                    b'{"v":1,"seqs":"all"}',
                    b'{"v":1,"seqs":[[5,1]]}',
                    b'{"v":1,"seqs":[[1.5,2]]}',
                    b"",
                    b"null",
                ):
                    bridge.publish(f"gw/{GW}/ack", junk)
            time.sleep(2)
            delivered = [t for t, *_ in seen.messages]
        status = agent.status()
        assert agent.alive
    finally:
        agent.stop()
    logs = agent.logs()
    text = (tmp_path / "agent" / "agent.log").read_text()
    print(
        f"acks seen by a bridge subscriber: {len(delivered)}; confirmed by the agent: "
        f"{status['publish']['confirmed_batches']}; unconfirmed: {status['buffer']['unconfirmed_batches']}"
    )
    assert status["publish"]["confirmed_batches"] == 0
    assert len(delivered) == 7  # only the bridge's own (garbage) messages reached the topic
    assert "Traceback" not in text, text[text.index("Traceback") :][:1500]
    assert sum(1 for e in logs if e.get("msg") == "ignored a confirmation that does not parse") >= 6


# ---------------------------------------------------------------- confirm: broker (a consumer other than the bridge)


@pytest.mark.fault
def test_broker_mode_three_broker_crashes_while_the_consumer_is_away_lose_no_batch(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, plant: Plant
) -> None:
    """``buffer.confirm: broker``: a third-party consumer with a persistent session is away; the broker is
    killed -9 three times while the agent publishes (each crash loses what it acknowledged since its last
    autosave, 5 s). The replay window (10 s, measured from the lost connection) must cover it: when the
    consumer comes back, every seq the agent wrote is in its queue."""
    from tests.faults import restart_broker_hard

    settings = settings_for(pki_acme, broker_acme, "bridge.two")
    consumer = Collector(settings, [f"gw/{GW}/data/#"], client_id="bridge.two").start()
    consumer.stop()  # away; its session and subscription stay
    time.sleep(6)  # the session reaches the broker's disk
    agent = AgentProcess(
        tmp_path / "agent", agent_config(pki_acme, broker_acme.port, plant, buffer={"confirm": "broker"})
    )
    first = agent.create_buffer()
    agent.start()
    try:
        for _ in range(3):
            time.sleep(3)
            restart_broker_hard(broker_acme)
        time.sleep(3)
        plant.freeze()
        wait_until(lambda: agent.status().get("buffer", {}).get("batches", 1) == 0, timeout_s=30)
        time.sleep(12)  # past the replay window
        status = agent.status()
        written = status["buffer"]["next_seq"] - first
    finally:
        agent.stop()
    with Collector(settings, [f"gw/{GW}/data/#"], client_id="bridge.two") as back:
        back.wait(lambda: len(set(back.seqs(GW))) >= written, 20, "the queued batches")
        seqs = set(back.seqs(GW))
    missing = sorted(set(range(first, first + written)) - seqs)
    print(
        f"broker mode: written={written} received={len(seqs)} replayed={status['publish']['replayed']} "
        f"missing={len(missing)} {missing[:10]}"
    )
    assert not missing


# ---------------------------------------------------------------- everything killed, in every order


@pytest.mark.fault
def test_agent_bridge_and_broker_killed_9_in_turn_lose_and_duplicate_nothing(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, plant: Plant
) -> None:
    """kill -9 of the agent, the bridge and the broker, in a seeded random order at random moments (0.2 to
    1.5 s apart), so that some land between a PUBACK and its record, between a commit and its confirmation,
    between a confirmation and its deletion. Exactly once, except what an agent kill took before the disk."""
    import random

    from tests.faults import restart_broker_hard

    rng = random.Random(10)
    view = StoreView("sqlite", tmp_path / "store")
    config = bridge_config(tmp_path, pki_acme, broker_acme, view)
    agent = AgentProcess(tmp_path / "agent", agent_config(pki_acme, broker_acme.port, plant)).start()
    bridge = BridgeProcess(config).start()
    kills: list[float] = []
    try:
        for i in range(30):
            time.sleep(rng.uniform(0.2, 1.5))
            victim = rng.choice(["agent", "bridge", "broker"])
            if victim == "agent":
                kills.append(time.time())
                agent.kill()
                agent.start()
            elif victim == "bridge":
                bridge.kill()
                bridge = BridgeProcess(config, log=tmp_path / f"bridge-{i}.log").start()
            else:
                restart_broker_hard(broker_acme)
        time.sleep(2)
        finish(plant, agent, timeout_s=120)
    finally:
        agent.stop()
        bridge.stop()
    report = check_exactly_once(plant, view, pki_acme.tenant, kills=kills)
    print(f"30 kills (agent {len(kills)}): {report}")


# ---------------------------------------------------------------- the broker's queue for the bridge overflows


class SmallQueueBroker(Mosquitto):
    """A tenant broker whose per-session queue holds only 200 messages: past it Mosquitto drops silently."""

    def render(self) -> None:
        super().render()
        text = self.conf_file.read_text()
        lines = [
            ("max_queued_messages 200" if line.startswith("max_queued_messages ") else line)
            for line in text.splitlines()
        ]
        self.conf_file.write_text("\n".join(lines) + "\n")


@pytest.mark.fault
def test_what_the_broker_dropped_from_a_full_queue_is_sent_again_and_stored_once(
    tmp_path: Path, pki_acme: TenantPki, plant: Plant
) -> None:
    """The bridge is away long enough for its session queue to overflow (the broker accepts every batch and
    drops what does not fit). When the bridge is back, the agent must find out and send the dropped batches
    again: every reading stored exactly once, within a minute or so of the bridge's return."""
    broker = SmallQueueBroker(tmp_path / "broker", pki_acme).start()
    try:
        assert "max_queued_messages 200" in broker.conf_file.read_text()
        view = StoreView("sqlite", tmp_path / "store")
        config = bridge_config(tmp_path, pki_acme, broker, view)
        with BridgeProcess(config) as bridge:
            bridge.wait_connected()
        agent = AgentProcess(tmp_path / "agent", agent_config(pki_acme, broker.port, plant)).start()
        try:
            time.sleep(25)  # ~1,000 batches: 800 more than the queue holds
            away = agent.status()["buffer"]
            bridge = BridgeProcess(config, log=tmp_path / "bridge-back.log").start()
            back = time.monotonic()
            try:
                finish(plant, agent, timeout_s=180)
                took = time.monotonic() - back
            finally:
                bridge.stop()
            status = agent.status()
        finally:
            agent.stop()
    finally:
        broker.stop()
    report = check_exactly_once(plant, view, pki_acme.tenant)
    print(
        f"queue overflow: unconfirmed while away={away['unconfirmed_batches']}, drained {took:.1f} s after the "
        f"bridge's return, resent={status['publish']['resent']}, {report}"
    )
    assert took < 60


# ---------------------------------------------------------------- a shared subscription with a stalled bridge


@pytest.mark.fault
def test_two_bridges_on_a_shared_subscription_one_stalled_lose_and_duplicate_nothing(
    tmp_path: Path, make_broker: Any, plant: Plant, pg_dsn: str, pg_schemas: list[str]
) -> None:
    """Two bridges share the subscription; one freezes (SIGSTOP: a GC pause, a swapped-out VM, a hung database)
    for 15 s, twice, with its connection open: what the broker handed it waits there. Resends may be
    false (the other bridge stores them); nothing may be lost or stored twice."""
    import os
    import signal

    tenant = unique_tenant("acme")
    pg_schemas.append(tenant)
    pki = TenantPki(tmp_path / "pki", tenant)
    broker = make_broker(pki)
    view = StoreView("postgres", tmp_path, pg_dsn)
    config = bridge_config(tmp_path, pki, broker, view, shared_group="bridge")
    steady = BridgeProcess(config, instance="one").start()
    stalled = BridgeProcess(config, instance="two").start()
    agent = AgentProcess(tmp_path / "agent", agent_config(pki, broker.port, plant)).start()
    try:
        for _ in range(2):
            time.sleep(3)
            assert stalled.proc is not None
            os.kill(stalled.proc.pid, signal.SIGSTOP)
            time.sleep(15)
            os.kill(stalled.proc.pid, signal.SIGCONT)
        finish(plant, agent, timeout_s=120)
        status = agent.status()
    finally:
        agent.stop()
        stalled.stop()
        steady.stop()
    report = check_exactly_once(plant, view, tenant)
    print(f"shared subscription, one bridge stalled 2 x 15 s: {report}, resent={status['publish']['resent']}")
    assert report["stored"] == report["served"]


def cpu_seconds(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.fault
def test_an_agent_waiting_with_a_full_buffer_is_nearly_idle(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, plant: Plant
) -> None:
    """Broker unreachable for hours, buffer full (256 MiB of small batches): the agent has nothing to do
    but poll one slow device. It must not burn a core re-reading its whole buffer (on a gateway's ARM CPU the
    same work is several times slower)."""
    broker_acme.stop()
    agent = AgentProcess(tmp_path / "agent", agent_config(pki_acme, broker_acme.port, plant))
    agent.config["devices"] = plant.devices(poll="1s")
    agent.write_config({k: v for k, v in agent.config.items() if k != "state_dir"})
    prebuilt_backlog(agent.state_dir, 600_000)
    agent.start()
    try:
        wait_until(lambda: agent.status().get("buffer", {}).get("unconfirmed_batches", 0) > 0, timeout_s=30)
        time.sleep(3)
        assert agent.proc is not None
        before, t0 = cpu_seconds(agent.proc.pid), time.monotonic()
        time.sleep(15)
        share = (cpu_seconds(agent.proc.pid) - before) / (time.monotonic() - t0)
    finally:
        agent.stop()
    print(f"idle agent with a full buffer: {share:.0%} of a core")
    assert share < 0.10, f"{share:.0%} of a core while waiting for the broker"


@pytest.mark.fault
@pytest.mark.parametrize(
    "units,bulk,poll_ms", [(2, 0, 50), (4, 100, 20)], ids=["40-small-batches-a-s", "200-batches-of-5kB-a-s"]
)
def test_broker_mode_replays_only_the_window_before_the_lost_connection(
    units: int, bulk: int, poll_ms: int, tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    """``confirm: broker``: the consumer is not our bridge and stores every message it gets. After one clean
    broker restart (nothing lost) the agent may send again what the broker accepted in the ``replay`` window
    (10 s) before the connection was lost, once. Batches first sent on the new connection must not be sent a
    second time, and accepted batches must not pile up in the buffer."""
    settings = settings_for(pki_acme, broker_acme, "bridge.two")
    with (
        Plant(tmp_path / "plant", units=tuple(range(1, units + 1)), bulk=bulk) as plant,
        Collector(settings, [f"gw/{GW}/data/#"], client_id="bridge.two") as consumer,
    ):
        config = agent_config(pki_acme, broker_acme.port, plant, buffer={"confirm": "broker"})
        config["devices"] = plant.devices(poll=f"{poll_ms}ms")
        agent = AgentProcess(tmp_path / "agent", config).start()
        try:
            time.sleep(15)
            broker_acme.stop()  # clean: the broker saves everything
            broker_acme.start()
            time.sleep(30)
            status = agent.status()
            plant.freeze()
            time.sleep(2)
        finally:
            agent.stop()
        time.sleep(3)
        seqs = consumer.seqs(GW)
    per_s = units * 1000 / poll_ms  # batches a second
    repeats = len(seqs) - len(set(seqs))
    print(
        f"broker mode, one clean restart, {per_s:.0f} batches/s: {len(set(seqs))} batches, {repeats} received "
        f"twice, replayed={status['publish']['replayed']}, accepted kept={status['buffer']['unconfirmed_batches']}, "
        f"unsent={status['buffer']['batches']}"
    )
    assert repeats <= 1.1 * 10 * per_s + 40, (
        f"{repeats} batches delivered twice after one restart (window: {10 * per_s:.0f})"
    )
    assert status["buffer"]["unconfirmed_batches"] <= 12 * per_s + 40


class FakeLink:
    """Stands in for an MQTT connection: records every publish and acknowledges it a moment later."""

    def __init__(self, publisher: Any) -> None:
        import asyncio

        self.publisher = publisher
        self.closed = asyncio.Event()
        self.sent: list[tuple[str, bytes]] = []
        self._mid = 0
        self.max_packet_size: int | None = None

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, properties: Any = None) -> int:
        import asyncio

        self._mid += 1
        self.sent.append((topic, payload))
        asyncio.get_running_loop().call_later(0.005, self.publisher._on_ack, self._mid, True)
        return self._mid

    def subscribe(self, topics: Any) -> None:
        pass

    def seqs(self) -> list[int]:
        import json

        return [json.loads(p)["seq"] for t, p in self.sent if "/data/" in t]


@pytest.mark.parametrize("confirm", ["storage", "broker"])
async def test_batches_committed_just_after_a_connection_came_up_are_sent_on_it(
    confirm: Literal["storage", "broker"], tmp_path: Path
) -> None:
    """The connection comes up while the buffer's writer is inside a transaction (on a slow SD card it nearly
    always is): the live stream starts after that write's seqs, which the backlog pass cannot see yet. Once
    the write commits, its batches must go out on this connection, not wait for the next reconnect."""
    import asyncio
    import threading

    from agent.buffer import Buffer
    from agent.bufferread import BufferReader
    from agent.delivery import DeliveryPolicy
    from agent.mqtt import BrokerSettings
    from agent.publisher import Publisher
    from agent.writer import BufferWriter
    from drivers.points import Point

    buffer = Buffer(tmp_path / "buffer.db", gateway=GW, max_bytes=64 * 1024**2, confirm=confirm)
    reader = BufferReader(buffer.path)
    holder: dict[str, Any] = {}
    writer = BufferWriter(
        buffer,
        max_points=500,
        max_batch_bytes=256 * 1024,
        queue_points=100_000,
        min_free_bytes=1024**2,
        on_commit=lambda c: holder["pub"].committed(c),
    )
    pub = Publisher(
        settings=BrokerSettings(host="broker.test", port=1883, tls=False),
        gateway=GW,
        writer=writer,
        reader=reader,
        policy=DeliveryPolicy(confirm, 30.0, 10.0),
        inflight=20,
        birth=lambda: {"state": "online"},
        meta=lambda: {},
        commands=None,  # type: ignore[arg-type]  # no command arrives in this test
    )
    holder["pub"] = pub
    points = [Point("m1", "served", int(time.time() * 1000), 1)]
    for _ in range(5):
        writer.submit("m1", points)
    assert writer.flush(5)
    base = reader.pending(0, 1)[0].seq
    late = {base + 5, base + 6, base + 7}
    # A write is under way (seqs base+5..base+7 taken, not yet committed) when the connection comes up.
    started, release = threading.Event(), threading.Event()

    def slow_write() -> None:
        with buffer.transaction():
            buffer.insert(buffer.encode("m1", points * 3, max_points=1, max_bytes=1000), int(time.time() * 1000))
            started.set()
            release.wait(5)

    thread = threading.Thread(target=slow_write)
    thread.start()
    started.wait(5)
    link = FakeLink(pub)
    session = asyncio.create_task(pub._session(link))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.5)
        release.set()  # the slow write commits
        thread.join()
        for _ in range(3):
            writer.submit("m1", points)  # live data goes on
            await asyncio.sleep(0.2)
        await asyncio.sleep(5)
    finally:
        link.closed.set()
        pub._wake.set()
        await asyncio.wait_for(session, 5)
        writer.close()
        reader.close()
        buffer.close()
    sent = sorted(set(link.seqs()))
    print(f"{confirm}: sent on the connection {sent}")
    assert late <= set(sent), f"seqs {sorted(late - set(sent))} never sent on this connection: {sent}"


# ---------------------------------------------------------------- a slow disk, and a stop


class SlowDiskAgent(AgentProcess):
    """``agent run`` under strace, every fsync/fdatasync of the process delayed: a worn SD card."""

    delay_us = 400_000

    def start(self) -> SlowDiskAgent:
        import subprocess
        import sys

        from tests.helpers import ROOT

        inject = [arg for call in ("fsync", "fdatasync") for arg in ("-e", f"inject={call}:delay_exit={self.delay_us}")]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    "strace",
                    "-f",
                    "--seccomp-bpf",
                    "-qq",
                    "-o",
                    "/dev/null",
                    "-e",
                    "trace=fsync,fdatasync",
                    *inject,
                    sys.executable,
                    "-m",
                    *self.command(),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        return self


def buffered_counters(state_dir: Path) -> dict[int, set[int]]:
    """Per unit, the counter values held in a stopped agent's buffer."""
    import json
    import sqlite3

    db = sqlite3.connect(f"file:{state_dir / 'buffer.db'}?mode=ro", uri=True)
    try:
        out: dict[int, set[int]] = {}
        for device, payload in db.execute("SELECT device, payload FROM batches"):
            for p in json.loads(payload)["points"]:
                if p["tag"] == "served" and p["q"] == "good":
                    out.setdefault(int(device[1:]), set()).add(int(p["v"]))
        return out
    finally:
        db.close()


@pytest.mark.fault
def test_on_a_slow_disk_polls_keep_time_and_a_stop_writes_every_reading_taken(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    """Every fsync takes 400 ms. Polling at 50 ms keeps its schedule (the writer makes fewer, larger commits);
    SIGTERM while readings wait for the disk writes them all before the process exits."""
    import os
    import signal

    if shutil.which("strace") is None:
        pytest.skip("strace not installed")
    broker_acme.stop()  # nothing leaves the buffer: it holds every reading taken
    with Plant(tmp_path / "plant", units=(1, 2), bulk=50) as plant:
        config = agent_config(pki_acme, broker_acme.port, plant)
        agent = SlowDiskAgent(tmp_path / "agent", config).start()
        try:
            wait_until(lambda: agent.status().get("buffer", {}).get("batches", 0) > 10, timeout_s=30)
            since = int(time.time() * 1000)
            time.sleep(10)
            gaps = poll_gaps_ms(plant, 1, since)
            running = agent.status()
            assert agent.proc is not None
            child = int(Path(f"/proc/{agent.proc.pid}/task/{agent.proc.pid}/children").read_text().split()[0])
            os.kill(child, signal.SIGTERM)  # the agent itself, under strace
            code = agent.proc.wait(60)
        finally:
            agent.stop()
        served: dict[int, dict[int, int]] = {}
        for s in plant.served():
            if s.value is not None:
                served.setdefault(s.unit, {})[s.value] = s.at_ms
    held = buffered_counters(agent.state_dir)
    missing = {u: sorted(set(v) - held.get(u, set())) for u, v in served.items()}
    late = [g for g in gaps if g >= 95]
    print(
        f"slow disk: commits={running.get('writer', {})}, poll gaps >= 95 ms: {len(late)} of {len(gaps)}, "
        f"exit={code}, missing after stop: { {u: (len(m), m[:5]) for u, m in missing.items()} }"
    )
    assert code == 0
    assert all(len(m) <= 1 for m in missing.values()), missing  # at most the poll under way at the signal
    assert len(late) <= len(gaps) // 100


# ---------------------------------------------------------------- what the drop counters say


@pytest.mark.fault
def test_readings_counted_as_dropped_are_not_also_stored(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    """The bridge is away and the buffer (``max_bytes: 1MiB``) fills: the oldest batches are dropped and
    counted as lost. Those the broker had already accepted still sit in the bridge's queue and are stored when
    it comes back. A reading must be either stored or counted as dropped, not both: otherwise the counters
    and the ``buffer_drop`` events report a loss that did not happen."""
    view = StoreView("sqlite", tmp_path / "store")
    with Plant(tmp_path / "plant", units=(1, 2), bulk=50) as plant:
        config = bridge_config(tmp_path, pki_acme, broker_acme, view)
        with BridgeProcess(config) as bridge:
            bridge.wait_connected()
        agent = AgentProcess(
            tmp_path / "agent",
            agent_config(pki_acme, broker_acme.port, plant, buffer={"confirm_timeout": "3s", "max_bytes": "1MiB"}),
        )
        agent.start()
        try:
            wait_until(
                lambda: sum(agent.status().get("buffer", {}).get("dropped_by_reason", {}).values()) > 0,
                timeout_s=60,
                what="the buffer to give batches up",
            )
            time.sleep(5)
            bridge = BridgeProcess(config, log=tmp_path / "bridge-back.log").start()
            try:
                finish(plant, agent, timeout_s=120)
            finally:
                bridge.stop()
            status = agent.status()
        finally:
            agent.stop()
        served = plant.points_served()
    stored = view.count(pki_acme.tenant, "points", "WHERE quality = 'good'")
    dropped = status["buffer"]["dropped_points"]
    events = view.rows(pki_acme.tenant, "SELECT payload FROM {events} WHERE type = 'buffer_drop'")
    print(
        f"served={served} stored={stored} dropped={dropped} (stored + dropped = {stored + dropped}); "
        f"buffer_drop events: {[e[0] for e in events][:2]}"
    )
    assert stored + dropped <= served, f"{stored + dropped - served} readings both stored and counted as dropped"


@pytest.mark.fault
def test_with_max_age_a_write_does_not_scan_the_whole_backlog(tmp_path: Path) -> None:
    """``buffer.max_age`` set, 600,000 batches waiting (a full 256 MiB buffer of small batches): each write of
    the buffer's thread must stay cheap. On a gateway's CPU a scan per commit takes a core."""
    from agent.buffer import Buffer
    from drivers.points import Point

    prebuilt_backlog(tmp_path, 600_000)
    timings = {}
    for max_age in (None, 7 * 86400.0):
        with Buffer(tmp_path / "buffer.db", gateway=GW, max_bytes=256 * 1024**2, max_age_s=max_age, fsync=False) as buf:
            points = [Point("m1", "served", int(time.time() * 1000), 1)]
            start = time.perf_counter()
            for _ in range(10):
                buf.add("m1", points, max_points=500, max_bytes=256 * 1024)
            timings[max_age] = (time.perf_counter() - start) / 10 * 1000
    print(
        f"one write with a 600,000-batch backlog: {timings[None]:.1f} ms without max_age, "
        f"{timings[7 * 86400.0]:.1f} ms with max_age"
    )
    assert timings[7 * 86400.0] < 10, f"{timings[7 * 86400.0]:.0f} ms per write with max_age set"


@pytest.mark.fault
def test_a_disk_filled_to_the_last_byte_by_another_program_still_lets_confirmations_make_room(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, small_state_dir: Path
) -> None:
    """The buffer stopped at ``min_free``; then another program (a log, a core dump) takes the last bytes of
    the filesystem. When the broker and the bridge are back, the agent publishes what it holds, the bridge
    stores it, and the confirmations must still delete it from the buffer: that is how room comes back."""
    import subprocess

    view = StoreView("sqlite", tmp_path / "store")
    with Plant(tmp_path / "plant", units=(1,), bulk=400) as plant:
        config = agent_config(
            pki_acme,
            broker_acme.port,
            plant,
            state_dir=str(small_state_dir),
            buffer={"confirm_timeout": "3s", "min_free": "2MiB"},
        )
        config["devices"] = plant.devices(poll="20ms")
        with BridgeProcess(bridge_config(tmp_path, pki_acme, broker_acme, view)) as bridge:
            bridge.wait_connected()
            broker_acme.stop()
            agent = AgentProcess(tmp_path / "agent", config)
            agent.state_dir = small_state_dir
            agent.start()
            try:
                wait_until(
                    lambda: agent.status().get("writer", {}).get("disk_full"),
                    timeout_s=120,
                    interval_s=0.5,
                    what="the disk to fill",
                )
                subprocess.run(
                    ["dd", "if=/dev/zero", f"of={small_state_dir / 'core.dump'}", "bs=4k"], capture_output=True
                )
                before = agent.status()["buffer"]
                broker_acme.start()
                try:

                    def confirmations_made_room() -> bool:
                        now = agent.status()  # one reading: several could straddle the drain
                        buf = now.get("buffer", {})
                        return (
                            now.get("publish", {}).get("confirmed_batches", 0) > 0
                            and buf.get("unconfirmed_batches", 0) + buf.get("batches", 0) < before["batches"] // 2
                        )

                    wait_until(
                        confirmations_made_room,
                        timeout_s=60,
                        interval_s=1,
                        what="confirmations to delete stored batches",
                    )
                finally:
                    status = agent.status()
                    stored = view.count(pki_acme.tenant, "points", "WHERE quality = 'good'")
                    print(
                        f"buffered before={before['batches']} now: pending={status['buffer']['batches']} "
                        f"unconfirmed={status['buffer']['unconfirmed_batches']} confirmed_batches="
                        f"{status['publish']['confirmed_batches']} stored points={stored} "
                        f"writer={status.get('writer')}"
                    )
                assert agent.alive
            finally:
                agent.stop()


@pytest.mark.fault
def test_agent_status_on_a_full_filesystem_says_the_agent_runs_and_what_it_dropped(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, small_state_dir: Path
) -> None:
    """The filesystem under the state directory is full (another program took the last byte). ``agent status``
    is what a technician runs then: it must say the agent is running, connected, and dropping readings."""
    import subprocess

    with Plant(tmp_path / "plant", units=(1,)) as plant:
        config = agent_config(pki_acme, broker_acme.port, plant, state_dir=str(small_state_dir))
        agent = AgentProcess(tmp_path / "agent", config)
        agent.state_dir = small_state_dir
        agent.start()
        try:
            wait_until(lambda: agent.status().get("connection", {}).get("state") == "connected", timeout_s=20)
            subprocess.run(["dd", "if=/dev/zero", f"of={small_state_dir / 'core.dump'}", "bs=4k"], capture_output=True)
            time.sleep(15)
            status = agent.status()
            assert agent.alive
        finally:
            agent.stop()
    print(
        f"agent status on a full filesystem: running={status.get('running')} "
        f"connection={status.get('connection', {}).get('state')} writer={status.get('writer')} "
        f"dropped={status.get('buffer', {}).get('dropped_by_reason')}"
    )
    assert status["running"] and status["connection"]["state"] == "connected"
    assert status["writer"]["disk_full"] and status["buffer"]["dropped_points"] > 0
