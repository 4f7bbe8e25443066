"""A reading taken is a reading stored, exactly once: broker, agent and bridge crashes, a full disk, outages.

Real processes throughout: ``agent run`` and ``bridge run`` (killed with -9),
the tenant's Mosquitto (killed with -9; it acknowledges before it saves),
HAProxy, SQLite and PostgreSQL stores, and a Modbus machine that writes down
every reading it serves (``tests/groundtruth.py``): the test compares the
store with that record. The long scenarios carry the ``fault`` marker
(``./scripts/test -m fault``); CI runs them too.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import AgentProcess
from tests.bridge_fixtures import (
    BridgeProcess,
    StoreView,
    pg_dsn,
    pg_schemas,
    tenant_entry,
    unique_tenant,
    wait_until,
    write_config,
)
from tests.faults import (
    GW,
    Plant,
    agent_config,
    check_exactly_once,
    finish,
    restart_broker_hard,
    wait_drained,
)
from tests.infra import Haproxy, Mosquitto, TenantPki

__all__ = ["pg_dsn", "pg_schemas"]

pytestmark = pytest.mark.timeout(300)
AUTOSAVE_S = 5  # the rendered Mosquitto config's autosave_interval


def store_for(backend: str, tmp_path: Path, request: pytest.FixtureRequest, tenant: str) -> StoreView:
    if backend == "postgres":
        request.getfixturevalue("pg_schemas").append(tenant)
        return StoreView("postgres", tmp_path, request.getfixturevalue("pg_dsn"))
    return StoreView("sqlite", tmp_path / "store")


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


def broker_away_scenario(
    tmp_path: Path, pki: TenantPki, broker: Mosquitto, proxy: Haproxy, plant: Plant, crashes: int
) -> None:
    view = StoreView("sqlite", tmp_path / "store")
    config = bridge_config(tmp_path, pki, broker, view)
    # The bridge subscribes once, and its session reaches the broker's disk; then it goes away.
    with BridgeProcess(config) as bridge:
        bridge.wait_connected()
    time.sleep(AUTOSAVE_S + 1)
    agent = AgentProcess(tmp_path / "agent", agent_config(pki, proxy.port, plant)).start()
    try:
        for _ in range(crashes):
            time.sleep(3)
            # The broker acknowledged what it holds for the absent bridge; the last seconds of it are not saved.
            restart_broker_hard(broker)
        time.sleep(2)
        during = agent.status()
        assert during["buffer"]["unconfirmed_batches"] > 0  # accepted by the broker, not yet stored: kept
        bridge = BridgeProcess(config, log=tmp_path / "bridge-later.log").start()
        try:
            finish(plant, agent)
        finally:
            bridge.stop()
    finally:
        agent.stop()
    report = check_exactly_once(plant, view, pki.tenant)
    assert report["lost_at_kills"] == 0 and report["stored"] == report["served"] > 100
    print(f"broker crashes={crashes}: {report}, resent={agent.status()['publish']['resent']}")


def test_broker_crash_while_the_bridge_is_away_loses_nothing(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, proxy: Haproxy, plant: Plant
) -> None:
    broker_away_scenario(tmp_path, pki_acme, broker_acme, proxy, plant, crashes=1)


@pytest.mark.fault
def test_three_broker_crashes_while_the_bridge_is_away_lose_nothing(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, proxy: Haproxy, plant: Plant
) -> None:
    broker_away_scenario(tmp_path, pki_acme, broker_acme, proxy, plant, crashes=3)


@pytest.mark.fault
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_agent_kill_9_ten_times(
    backend: str, tmp_path: Path, make_broker: Callable[..., Mosquitto], plant: Plant, request: pytest.FixtureRequest
) -> None:
    tenant = unique_tenant("acme")
    pki = TenantPki(tmp_path / "pki", tenant)
    broker = make_broker(pki)
    view = store_for(backend, tmp_path, request, tenant)
    kills: list[float] = []
    with BridgeProcess(bridge_config(tmp_path, pki, broker, view)) as bridge:
        bridge.wait_connected()
        agent = AgentProcess(tmp_path / "agent", agent_config(pki, broker.port, plant)).start()
        try:
            for _ in range(10):
                time.sleep(1.5)
                kills.append(time.time())
                agent.kill()
                agent.start()
            time.sleep(1.5)
            finish(plant, agent)
        finally:
            agent.stop()
    report = check_exactly_once(plant, view, tenant, kills=kills)
    print(f"agent kill -9 x10 ({backend}): {report}")


@pytest.mark.fault
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_bridge_kill_9_ten_times(
    backend: str, tmp_path: Path, make_broker: Callable[..., Mosquitto], plant: Plant, request: pytest.FixtureRequest
) -> None:
    tenant = unique_tenant("acme")
    pki = TenantPki(tmp_path / "pki", tenant)
    broker = make_broker(pki)
    view = store_for(backend, tmp_path, request, tenant)
    config = bridge_config(tmp_path, pki, broker, view)
    agent = AgentProcess(tmp_path / "agent", agent_config(pki, broker.port, plant)).start()
    bridge = BridgeProcess(config).start()
    try:
        for i in range(10):
            time.sleep(1.5)
            bridge.kill()
            bridge = BridgeProcess(config, log=tmp_path / f"bridge-{i}.log").start()
        finish(plant, agent)
    finally:
        agent.stop()
        bridge.stop()
    report = check_exactly_once(plant, view, tenant)
    assert report["stored"] == report["served"]
    print(f"bridge kill -9 x10 ({backend}): {report}")


@pytest.mark.fault
def test_two_bridges_on_a_shared_subscription_one_killed_repeatedly(
    tmp_path: Path, make_broker: Callable[..., Mosquitto], plant: Plant, pg_dsn: str, pg_schemas: list[str]
) -> None:
    tenant = unique_tenant("acme")
    pg_schemas.append(tenant)
    pki = TenantPki(tmp_path / "pki", tenant)
    broker = make_broker(pki)
    view = StoreView("postgres", tmp_path, pg_dsn)
    config = bridge_config(tmp_path, pki, broker, view, shared_group="bridge")
    steady = BridgeProcess(config, instance="one").start()
    flaky = BridgeProcess(config, instance="two").start()
    agent = AgentProcess(tmp_path / "agent", agent_config(pki, broker.port, plant)).start()
    try:
        for i in range(8):
            time.sleep(1.5)
            flaky.kill()
            flaky = BridgeProcess(config, instance="two", log=tmp_path / f"flaky-{i}.log").start()
        finish(plant, agent)
    finally:
        agent.stop()
        flaky.stop()
        steady.stop()
    report = check_exactly_once(plant, view, tenant)
    assert report["stored"] == report["served"]
    print(f"shared subscription, one bridge killed x8: {report}")


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_state_dir(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs for the agent's state directory, mounted by the test (root) and unmounted in teardown."""
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
def test_a_full_disk_is_survived_every_reading_is_stored_or_counted_and_the_backlog_delivered(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, proxy: Haproxy, small_state_dir: Path
) -> None:
    view = StoreView("sqlite", tmp_path / "store")
    with Plant(tmp_path / "plant", units=(1,), bulk=400) as plant:
        config = agent_config(
            pki_acme,
            proxy.port,
            plant,
            state_dir=str(small_state_dir),
            buffer={"confirm_timeout": "3s", "min_free": "2MiB"},
        )
        config["devices"] = plant.devices(poll="20ms")
        per_poll = 1 + plant.bulk
        with BridgeProcess(bridge_config(tmp_path, pki_acme, broker_acme, view)) as bridge:
            bridge.wait_connected()
            broker_acme.stop()  # down until the disk fills
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
                time.sleep(3)  # a while on a full disk: polling goes on, readings are counted
                full = agent.status()
                assert agent.alive and full["connection"]["state"] != "connected"
                assert full["buffer"]["dropped_by_reason"].get("disk_full", 0) > 0
                broker_acme.start()

                def backlog_drained() -> bool:
                    buf = agent.status().get("buffer", {})  # one reading: two could straddle the drain
                    return buf.get("unconfirmed_batches", 1) == 0 and buf.get("batches", 1) < 10

                wait_until(
                    backlog_drained,
                    timeout_s=120,
                    interval_s=0.5,
                    what="the backlog to drain",
                )
                assert agent.alive
                assert agent.stop() == 0  # the poll under way when stopping may be lost: at most one
                served = plant.points_served()
                # What the stop left buffered goes out with the next start (no devices: nothing new).
                agent.write_config(dict(config, devices=[]))
                agent.start()
                wait_drained(agent)
                assert agent.stop() == 0
            finally:
                agent.stop()
        status = agent.status()
        logs = [e.get("msg") for e in agent.logs()]
    stored = view.count(pki_acme.tenant, "points", "WHERE quality = 'good'")
    assert view.count(pki_acme.tenant, "points", "WHERE quality != 'good'") == 0  # every read succeeded
    dropped = status["buffer"]["dropped_points"]
    assert served - per_poll <= stored + dropped <= served, (stored, dropped, served)
    assert status["buffer"]["dropped_by_reason"].get("disk_full", 0) == dropped > 0
    assert "buffer cannot write: readings are dropped and counted until there is room" in logs
    assert "buffer writable again" in logs
    assert "Traceback" not in (tmp_path / "agent" / "agent.log").read_text()
    # The drops reached the cloud as events, once there was room to record them.
    events = view.rows(pki_acme.tenant, "SELECT payload FROM {events} WHERE type = 'buffer_drop'")
    assert sum(json.loads(p)["points"] for (p,) in events) == dropped
    print(f"full disk: served={served} stored={stored} dropped={dropped}")


# ---------------------------------------------------------------- back on the broker within 2 s


class FirstBatch:
    """A subscriber that reconnects within 0.1 s and notes when data from the agent arrives after a point in time."""

    def __init__(self, pki: TenantPki, broker: Mosquitto) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from factory_edge.mqtt import tls_context
        from tests.bridge_fixtures import settings_for

        self.settings = settings_for(pki, broker, "bridge")
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="first-batch", protocol=paho.MQTTv5)
        self.client.tls_set_context(tls_context(self.settings))
        self.client.reconnect_delay_set(0.05, 0.1)  # type: ignore[arg-type]  # paho types whole seconds; it takes floats
        self.client.on_connect = lambda c, *a: c.subscribe(f"gw/{GW}/data/#", qos=1)
        self.client.on_message = self._message
        self.max_seq = 0
        self.after: tuple[float, int] | None = None  # (monotonic time, seq) from which arrivals count
        self.arrived: float | None = None

    def _message(self, client: Any, userdata: Any, message: Any) -> None:
        seq = json.loads(message.payload)["seq"]
        if self.after is not None and self.arrived is None and seq > self.after[1]:
            self.arrived = time.monotonic()
        self.max_seq = max(self.max_seq, seq)

    def start(self) -> FirstBatch:
        self.client.connect(self.settings.dial_host, self.settings.port, keepalive=5)
        self.client.loop_start()
        return self

    def arm(self) -> None:
        """Count only batches newer than anything seen so far (a redelivered old one proves nothing)."""
        self.after, self.arrived = (time.monotonic(), self.max_seq), None

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def outage_reconnect_s(watch: FirstBatch, broker: Mosquitto, outage_s: float) -> float:
    """Stop the broker for ``outage_s``, start it, and return how long until the agent's next batch reached it."""
    await asyncio.to_thread(broker.stop)
    await asyncio.sleep(outage_s)
    watch.arm()
    await asyncio.to_thread(broker.start)
    back = time.monotonic()
    await asyncio.to_thread(
        wait_until,
        lambda: watch.arrived is not None,
        timeout_s=30,
        interval_s=0.01,
        what="a batch from the agent after the broker's return",
    )
    assert watch.arrived is not None
    return watch.arrived - back


@pytest.mark.parametrize(
    "outage_s", [5, pytest.param(30, marks=pytest.mark.fault), pytest.param(120, marks=pytest.mark.fault)]
)
async def test_back_on_the_broker_within_2_s_of_its_return(
    outage_s: int, tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, proxy: Haproxy
) -> None:
    with Plant(tmp_path / "plant") as plant:
        watch = FirstBatch(pki_acme, broker_acme).start()
        agent = AgentProcess(tmp_path / "agent", agent_config(pki_acme, proxy.port, plant)).start()
        try:
            await asyncio.to_thread(wait_until, lambda: watch.max_seq > 5, timeout_s=20, what="the first batches")
            after = await outage_reconnect_s(watch, broker_acme, outage_s)
        finally:
            agent.stop()
            watch.stop()
    assert after < 2.0, f"reconnected {after:.2f} s after the broker came back ({outage_s} s outage)"
    reasons = [
        e
        for e in agent.logs()
        if e.get("msg") in ("cannot connect to broker", "still cannot connect to broker", "connection to broker lost")
    ]
    lost = next(e for e in reasons if e["msg"] == "connection to broker lost")
    assert lost["reason"] == "the broker closed the connection"
    # The journal gets the reason in words, and not every attempt: a handful of lines for the whole outage.
    assert all("err" in e and "Unspecified" not in e["err"] for e in reasons if e["msg"] != "connection to broker lost")
    assert len(reasons) <= 3 + outage_s // 30
    connected = [e for e in agent.logs() if e.get("msg") == "connected to broker"][-1]
    assert connected["down_s"] >= outage_s and connected["attempts"] >= 1
    print(f"outage {outage_s} s: first batch at the broker {after:.2f} s after its return")


def test_sigterm_writes_every_completed_reading_before_exit(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, proxy: Haproxy, plant: Plant
) -> None:
    """No bridge: nothing is confirmed, so the buffer must hold every reading the agent completed before SIGTERM.
    Only a read cut short by the stop itself (the newest value served to each unit) may be missing."""
    from agent.bufferread import BufferReader

    agent = AgentProcess(tmp_path / "agent", agent_config(pki_acme, proxy.port, plant)).start()
    try:
        wait_until(lambda: len(plant.served()) > 40, timeout_s=20, what="some readings")
    finally:
        assert agent.stop() == 0
    reader = BufferReader(agent.state_dir / "buffer.db")
    buffered: dict[int, list[int]] = {}
    for batch in reader.pending(0, 10**6) + reader.resend(0, 10**6, first_before=2**62, sent_before=2**62):
        doc = json.loads(batch.payload)
        buffered.setdefault(int(doc["dev"][1:]), []).extend(p["v"] for p in doc["points"] if p["tag"] == "served")
    reader.close()
    for unit in plant.units:
        served = [s.value for s in plant.served() if s.unit == unit and s.value is not None]
        missing = set(served) - set(buffered.get(unit, []))
        assert missing <= {max(served)}, f"unit {unit}: completed readings not on disk at exit: {sorted(missing)}"
        assert len(buffered[unit]) == len(set(buffered[unit]))


def test_a_reading_answered_while_the_agent_stops_is_buffered_before_it_exits(tmp_path: Path) -> None:
    """SIGTERM lands while a request is out: the machine has taken the reading and answers 300 ms later. The
    agent takes that answer and buffers it before it exits (it does not cancel a poll under way), however
    often this is tried: every reading the machine served is in the buffer."""
    from agent.bufferread import BufferReader
    from tests.helpers import free_port

    with Plant(tmp_path / "plant", delay_ms=300) as plant:
        for attempt in range(3):
            config = {
                "gateway": GW,
                "mqtt": {"url": f"mqtt://127.0.0.1:{free_port()}"},  # no broker: everything stays buffered
                "devices": plant.devices(poll="100ms"),
            }
            agent = AgentProcess(tmp_path / f"agent-{attempt}", config).start()
            try:
                enough = 3 * (attempt + 1)
                wait_until(lambda: len(plant.served()) >= enough, timeout_s=30)  # noqa: B023 (called here)
                time.sleep(0.1 * attempt)  # each attempt stops at another moment of the request
                assert agent.stop() == 0
            finally:
                agent.kill()
    served = {s.value for s in plant.served() if s.value is not None}
    buffered: set[int] = set()
    for attempt in range(3):
        reader = BufferReader(tmp_path / f"agent-{attempt}" / "state" / "buffer.db")
        try:
            for batch in reader.pending(0, 100_000):
                doc = json.loads(batch.payload)
                buffered |= {int(p["v"]) for p in doc["points"] if p["tag"] == "served" and p.get("v") is not None}
        finally:
            reader.close()
    assert served - buffered == set(), f"served, never buffered: {sorted(served - buffered)}"
