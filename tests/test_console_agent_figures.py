"""The console shows what the agent itself reports: its buffer (backlog, unconfirmed, dropped) and its tags' units.

Real processes end to end: a Modbus machine, ``agent run``, the tenant's
Mosquitto, ``bridge run`` into a SQLite store, and the console's JSON API
reading that store. The agent's figures travel in its retained status on
``gw/{gw}/status``, its tags' units in its retained meta on
``gw/{gw}/meta/{device}`` (docs/topics.md).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import pytest

from drivers.config import Table
from drivers.simulate.modbus_server import ModbusSimulator, RegisterModel
from factory_edge.mqtt import BrokerSettings
from tests.agentproc import AgentProcess, Collector
from tests.bridge_fixtures import BridgeProcess, tenant_entry, write_config
from tests.console_fixtures import PASSWORD, Client, logged_in, make_console
from tests.helpers import free_port
from tests.infra import Mosquitto, TenantPki

pytestmark = pytest.mark.timeout(120)

GW = "gw-figures"
REPUBLISH_S = 10  # agent.runtime.BUFFER_STATUS_EVERY_S


def agent_config(pki: TenantPki, broker: Mosquitto, modbus_port: int) -> dict[str, Any]:
    cert, key = pki.client(GW)
    return {
        "gateway": GW,
        "mqtt": {
            "url": f"mqtts://{pki.host}:{broker.port}",
            "connect_host": "127.0.0.1",
            "ca_file": str(pki.ca_file),
            "cert_file": str(cert),
            "key_file": str(key),
        },
        "devices": [
            {
                "name": "press-1",
                "protocol": "modbus-tcp",
                "host": "127.0.0.1",
                "port": modbus_port,
                "unit": 1,
                "poll": "100ms",
                "timeout": "500ms",
                "tags": [
                    {"name": "oil_temp", "address": 0, "unit": "degC", "description": "hydraulic oil, tank"},
                    {"name": "strokes", "address": 1},
                ],
            }
        ],
    }


def status_watch(pki: TenantPki, broker: Mosquitto) -> Collector:
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
    return Collector(settings, [f"gw/{GW}/status"], client_id="status-watch")


async def poll(get: Any, check: Any, *, timeout_s: float, what: str) -> Any:
    """``get()`` (blocking, in a thread) until ``check`` holds for what it returns; that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(get)
        if value is not None and check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {value}")
        await asyncio.sleep(0.2)


async def test_overview_shows_the_agents_backlog_after_an_outage_and_the_tags_units(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    storage = {"backend": "sqlite", "path": str(tmp_path / "storage"), "fsync": False}
    bridge_yaml = write_config(
        tmp_path / "bridge-run.yaml", tenants=[tenant_entry(pki_acme, broker_acme)], storage=storage
    )
    console = make_console(tmp_path, ["acme"])
    console.accounts.create("viewer", "viewer", PASSWORD, tenant="acme")
    api: Client
    api, _ = await asyncio.to_thread(logged_in, console, "viewer")  # the client runs its own event loop

    def row() -> dict[str, Any] | None:
        return next((r for r in api.get("/api/tenants/acme/fleet").json() if r["gateway"] == GW), None)

    model = RegisterModel()
    model.set_registers(Table.HOLDING, 0, [61, 7])
    port = free_port()
    try:
        async with ModbusSimulator(units={1: model}, port=port):
            with (
                BridgeProcess(bridge_yaml) as bridge,
                status_watch(pki_acme, broker_acme) as watch,
                AgentProcess(tmp_path / "agent", agent_config(pki_acme, broker_acme, port)) as agent,
            ):
                await asyncio.to_thread(bridge.wait_connected)
                agent.start()
                first = await poll(
                    row,
                    lambda r: r["state"] == "online" and r["backlog_batches"] is not None,
                    timeout_s=20,
                    what="birth",
                )
                assert first["dropped_points"] == 0

                # The units come from the retained meta, next to the values, and with the trend's series.
                page = await poll(
                    lambda: api.get(f"/api/tenants/acme/gateways/{GW}").json(),
                    lambda doc: doc["devices"],
                    timeout_s=10,
                    what="values",
                )
                tags = {t["tag"]: t for d in page["devices"] for t in d["tags"]}
                assert tags["oil_temp"]["value"] == 61 and tags["oil_temp"]["unit"] == "degC"
                assert tags["oil_temp"]["description"] == "hydraulic oil, tank"
                assert tags["strokes"]["unit"] is None and tags["strokes"]["description"] is None
                trend = await asyncio.to_thread(
                    api.get, f"/api/tenants/acme/trend?series={GW}/press-1/oil_temp&series={GW}/press-1/strokes"
                )
                assert [(s["series"], s["unit"]) for s in trend.json()["series"]] == [
                    (f"{GW}/press-1/oil_temp", "degC"),
                    (f"{GW}/press-1/strokes", None),
                ]

                # A broker outage: the agent buffers; its status on reconnecting says how much.
                outage = int(time.time() * 1000)
                broker_acme.stop()
                await asyncio.sleep(1.5)
                broker_acme.start()
                behind = await poll(
                    row, lambda r: r["buffer_ts"] > outage and r["backlog_batches"] > 0, timeout_s=15, what="a backlog"
                )
                # A restarted Mosquitto may publish the previous connection's will, restored with its session,
                # after the new connection's status: the state (and its since) is that "offline" until the next
                # status, REPUBLISH_S later; the figures are the new connection's all along.
                reconnected = behind["since"] if behind["state"] == "online" else None
                assert behind["oldest_backlog_ts"] is not None
                assert behind["oldest_backlog_ts"] < outage + 1000 < behind["buffer_ts"]  # buffered in the outage

                # Drained, and said so within the republish interval (not sooner: the figures move all along).
                # A live batch of the moment may be on its way to the broker as the figures are taken.
                def drained_since(r: dict[str, Any]) -> bool:
                    live = r["oldest_backlog_ts"] is None or r["oldest_backlog_ts"] > r["buffer_ts"] - 1000
                    return bool(r["buffer_ts"] > behind["buffer_ts"] and r["backlog_batches"] <= 1 and live)

                drained = await poll(row, drained_since, timeout_s=REPUBLISH_S + 8, what="the drained backlog")
                assert drained["buffer_ts"] - behind["buffer_ts"] >= REPUBLISH_S * 1000
                assert drained["state"] == "online" and drained["since"] == (reconnected or drained["since"])
                assert drained["unconfirmed_batches"] < 10  # the bridge confirms as it stores
            docs = [d for d in watch.docs(f"gw/{GW}/status") if d["state"] == "online"]
    finally:
        console.close()
    # Every online status carries the figures; those of one connection (one ts) come at least 10 s apart.
    assert all(set(d["buffer"]) >= {"pending_batches", "unconfirmed_batches", "dropped_points"} for d in docs)
    by_connection: dict[int, set[int]] = {}
    for d in docs:  # (a retained one arrives again when the watcher resubscribes)
        by_connection.setdefault(d["ts"], set()).add(d["buffer"]["ts"])
    assert any(len(times) > 1 for times in by_connection.values())
    for each in by_connection.values():
        times = sorted(each)
        assert all(b - a >= REPUBLISH_S * 1000 for a, b in itertools.pairwise(times)), times
