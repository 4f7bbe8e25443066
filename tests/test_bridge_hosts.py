"""Bridge instances on two hosts share two tenants; one host dies (kill -9) mid-stream: nothing lost, nothing doubled.

Hosts are network namespaces joined by veth (``tests/netns.py``). The
tenant's Mosquitto and its PostgreSQL server (``tests/pgserver.py``) listen
on the root namespace's side of the link; a bridge instance runs in each of
the namespaces ``bridge1`` and ``bridge2``, reaching both across it. The
real agent polls a ground-truth machine (``tests/faults.py``) and delivers
with storage confirmations, so what the dead host's session still holds at
the broker is sent again by the agent and taken by the living host.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.agentproc import AgentProcess
from tests.bridge_fixtures import BridgeProcess, StoreView, tenant_entry, unique_tenant, wait_until, write_config
from tests.faults import Plant, agent_config, check_exactly_once, finish
from tests.helpers import ROOT
from tests.infra import Mosquitto, TenantPki
from tests.pgserver import PgServer, pg_bin

pytestmark = [
    pytest.mark.skipif(netns.available() is not None, reason=str(netns.available())),
    pytest.mark.skipif(pg_bin() is None, reason="PostgreSQL server binaries not installed"),
]


class HostBroker(Mosquitto):
    """A tenant's Mosquitto listening on one address (the hosts' link) instead of 127.0.0.1."""

    def __init__(self, conf_dir: Path, pki: TenantPki, address: str) -> None:
        super().__init__(conf_dir, pki)
        self.address = address

    def render(self) -> None:
        super().render()
        text = self.conf_file.read_text()
        self.conf_file.write_text(
            text.replace(f"listener {self.port} 127.0.0.1", f"listener {self.port} {self.address}")
        )


class HostBridge(BridgeProcess):
    """``bridge run`` inside a host's namespace (the PID is the bridge's own: ``ip netns exec`` execs it)."""

    def __init__(self, net: netns.Network, host: str, config: Path, *, instance: str) -> None:
        super().__init__(config, instance=instance, log=config.with_name(f"bridge-{host}-{instance}.log"))
        self.net = net
        self.host = host

    def start(self) -> HostBridge:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.net.argv(self.host, [sys.executable, "-m", *self.command()]),
                cwd=ROOT,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        return self


def ingest_sessions(bridge: BridgeProcess) -> list[dict[str, Any]]:
    """The bridge's ``connected to tenant broker`` lines of its own ingest session (not the alert/STATE role's)."""
    own = f"bridge.{bridge.instance}"
    return [e for e in bridge.logs() if e.get("msg") == "connected to tenant broker" and e.get("client_id") == own]


def both_tenants(bridge: BridgeProcess) -> list[dict[str, Any]]:
    sessions = ingest_sessions(bridge)
    return sessions if len(sessions) == 2 else []


@pytest.fixture
def net() -> Iterator[netns.Network]:
    with netns.Network() as network:
        network.add_host("bridge1")
        network.add_host("bridge2")
        yield network


@pytest.mark.timeout(300)
def test_one_bridge_host_killed_during_a_stream_loses_and_doubles_nothing(tmp_path: Path, net: netns.Network) -> None:
    tenants = [unique_tenant(n) for n in ("acme", "globex")]
    pkis = [TenantPki(tmp_path / f"pki-{t}", t) for t in tenants]
    with ExitStack() as stack:
        pg = stack.enter_context(PgServer(listen=net.gateway, trust_networks=(net.cidr,)))
        brokers = [stack.enter_context(HostBroker(tmp_path / f"broker-{p.tenant}", p, net.gateway)) for p in pkis]
        plants = [stack.enter_context(Plant(tmp_path / f"plant-{p.tenant}", units=(1, 2))) for p in pkis]
        view = StoreView("postgres", tmp_path, pg.dsn)
        storage = {"backend": "postgres", "dsn": pg.dsn}  # the link's address: the same from every host
        data = tmp_path / "provisioning"
        data.mkdir()
        entries = [tenant_entry(p, b, connect_host=net.gateway, storage=storage) for p, b in zip(pkis, brokers)]
        (data / "tenants.json").write_text(json.dumps({"tenants": entries}))
        config = write_config(
            tmp_path / "bridge.yaml",
            tenants=[],
            storage=storage,
            tenants_from=str(data),
            ingest={"max_messages": 50, "shared_session_expiry": "5s"},
        )
        one = HostBridge(net, "bridge1", config, instance="one").start()
        two = HostBridge(net, "bridge2", config, instance="two").start()
        agents = [
            AgentProcess(
                tmp_path / f"agent-{p.tenant}",
                agent_config(p, b.port, plant, mqtt={"connect_host": net.gateway}),
            )
            for p, b, plant in zip(pkis, brokers, plants)
        ]
        try:
            for bridge in (one, two):
                ingest = wait_until(partial(both_tenants, bridge), what=f"{bridge.instance}'s ingest sessions")
                assert all(e["subscriptions"].startswith("$share/bridge/") for e in ingest)
            for agent in agents:
                agent.start()
            wait_until(
                lambda: all(view.count(t, "batches") >= 20 for t in tenants), timeout_s=30, what="the streams under way"
            )
            before = [view.count(t, "batches") for t in tenants]
            two.kill()  # the host dies: its process gone, its sessions left at the brokers with their share queued
            time.sleep(4)
            assert all(view.count(t, "batches") > n for t, n in zip(tenants, before))  # the other host carries on
            for plant, agent in zip(plants, agents):
                finish(plant, agent, timeout_s=120)
        finally:
            for agent in agents:
                agent.stop()
            one.stop()
            two.stop()
        for tenant, plant, agent in zip(tenants, plants, agents):
            report = check_exactly_once(plant, view, tenant)
            assert report["stored"] == report["served"] > 100
            stored = view.rows(tenant, "SELECT count(*), count(DISTINCT (gw, seq)) FROM {batches}")
            assert stored[0][0] == stored[0][1]
            points = view.rows(
                tenant, "SELECT count(*) FROM (SELECT DISTINCT gw, device, tag, ts, seq FROM {points}) d"
            )
            assert points == [(view.count(tenant, "points"),)]
            resent = agent.status()["publish"]["resent"]
            print(
                f"{tenant}: two bridge hosts, one killed: {report}, batches={stored[0][0]}, resent by the agent={resent}"
            )
