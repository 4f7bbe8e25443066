"""The oven simulator: documented NodeIds, browse paths and a running simulation."""

from __future__ import annotations

import asyncio

from asyncua import Client, ua

from drivers.simulate.opcua_server import NAMESPACE_URI, OpcuaSimulator, node_table
from tests.helpers import free_port, wait_for


def test_node_table_documents_every_oven_node() -> None:
    assert node_table() == [
        ("ns=2;s=Oven.State", "String", "Heating, Baking or Unloading"),
        ("ns=2;s=Oven.Recipe", "String", "recipe of the batch in the oven"),
        ("ns=2;s=Oven.Setpoint", "Double", "target temperature, degC (writable)"),
        ("ns=2;s=Oven.Zone1.Temp", "Double", "zone 1 temperature, degC; follows the setpoint"),
        ("ns=2;s=Oven.Zone2.Temp", "Double", "zone 2 temperature, degC; lags zone 1"),
        ("ns=2;s=Oven.Heater.Power", "Float", "heater output, percent"),
        ("ns=2;s=Oven.Door.Open", "Boolean", "true while the door is open"),
        ("ns=2;s=Oven.BatchCount", "UInt32", "batches finished since the oven started"),
        ("ns=2;s=Oven.BatchStart", "DateTime", "when the batch in the oven started"),
    ]


async def test_documented_nodes_exist_and_the_oven_heats() -> None:
    async with OpcuaSimulator(port=free_port(), extra_nodes=3, update_interval_s=0.05) as sim:
        assert sim.endpoint == f"opc.tcp://127.0.0.1:{sim.port}/factory-edge/"
        async with Client(sim.endpoint, timeout=2) as client:
            assert await client.get_namespace_index(NAMESPACE_URI) == 2
            types = [
                await client.get_node(node_id).read_data_type_as_variant_type()
                for node_id in sim.node_ids + sim.extra_node_ids
            ]
            assert [t.name for t in types] == [kind for _, kind, _ in node_table()] + ["Double"] * 3
            paths = await client.translate_browsepaths(
                ua.NodeId(ua.Int32(ua.ObjectIds.ObjectsFolder)), ["2:Oven/2:Zone1/2:Temp", "2:Bench/2:Value2"]
            )
            assert [r.Targets[0].TargetId.to_string() for r in paths] == [
                "ns=2;s=Oven.Zone1.Temp",
                "ns=2;s=Bench.Value2",
            ]
            zone1 = client.get_node("ns=2;s=Oven.Zone1.Temp")
            first = await zone1.read_value()

            async def heated() -> bool:
                return await zone1.read_value() > first + 5

            await wait_for(heated, timeout_s=5, what="zone 1 heating toward the setpoint")
            assert await client.get_node("ns=2;s=Oven.State").read_value() == "Heating"

            await sim.set("Oven.Zone1.Temp", 99.5)  # a set value is held against the simulation
            await asyncio.sleep(0.2)
            assert await zone1.read_value() == 99.5

            assert await sim.tick_extra() == 1
            assert await sim.tick_extra() == 2
            values = [await client.get_node(n).read_value() for n in sim.extra_node_ids]
            assert values == [2.0, 2.000001, 2.000002]
