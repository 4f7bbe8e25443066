"""The Modbus driver against a real pymodbus server on loopback."""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Self

import pytest

from drivers.config import ModbusTag, ModbusTcpDevice, Table
from drivers.modbus.driver import ModbusDriver
from drivers.points import Point, Quality
from drivers.simulate.modbus_server import ModbusSimulator, RegisterModel
from factory_edge.errors import WriteRefused
from tests.helpers import free_port, wait_for
from tests.test_modbus_codec import CASES, wire

ORDERS = ["ABCD", "CDAB", "BADC", "DCBA"]


def device(port: int, tags: list[dict], **extra) -> ModbusTcpDevice:
    return ModbusTcpDevice.model_validate(
        {
            "protocol": "modbus-tcp",
            "name": extra.pop("name", "dev"),
            "host": "127.0.0.1",
            "port": port,
            "timeout": "300ms",
            "retries": 0,
            "tags": tags,
            **extra,
        }
    )


def by_tag(points: list[Point]) -> dict[str, Point]:
    return {p.tag: p for p in points}


async def test_every_type_and_byte_order_read_exactly() -> None:
    """Values laid out in the server's registers by hand decode to the exact values."""
    model = RegisterModel()
    tags: list[dict] = []
    expected: dict[str, object] = {}
    address = 0
    for kind, fmt, value in CASES:
        for order in ORDERS:
            registers = wire(fmt, value, order)
            model.set_registers(Table.HOLDING, address, registers)
            name = f"{kind}_{order}"
            tags.append({"name": name, "address": address, "type": kind, "order": order})
            expected[name] = value
            address += len(registers)
    model.set_registers(Table.HOLDING, 100, [0x5245, 0x4349, 0x5045, 0x2D37, 0x0000])  # "RECIPE-7"
    model.set_registers(Table.HOLDING, 110, [0x4552, 0x4943])  # "RECI" byte-swapped
    model.set_registers(Table.HOLDING, 120, [0b1010_0000_0000_0101, 713])
    model.set_registers(Table.INPUT, 0, [0xFF38])  # -200 as int16
    model.set_registers(Table.COIL, 0, [1, 0, 1])
    model.set_registers(Table.DISCRETE, 5, [1])
    tags += [
        {"name": "recipe", "address": 100, "type": "string", "length": 5},
        {"name": "recipe_swapped", "address": 110, "type": "string", "length": 2, "order": "BADC"},
        {"name": "bit0", "address": "120.0"},
        {"name": "bit1", "address": 120, "bit": 1},
        {"name": "bit15", "address": "120.15"},
        {"name": "temp", "address": 121, "type": "int16", "scale": 0.1, "offset": 1.5},
        {"name": "input_neg", "table": "input", "address": 0, "type": "int16"},
        {"name": "coil0", "table": "coil", "address": 0},
        {"name": "coil1", "table": "coil", "address": 1},
        {"name": "coil2", "table": "coil", "address": 2},
        {"name": "door", "table": "discrete", "address": 5},
    ]
    expected |= {
        "recipe": "RECIPE-7",
        "recipe_swapped": "RECI",
        "bit0": True,
        "bit1": False,
        "bit15": True,
        "temp": 72.8,
        "input_neg": -200,
        "coil0": True,
        "coil1": False,
        "coil2": True,
        "door": True,
    }
    port = free_port()
    async with ModbusSimulator(units={1: model}, port=port), ModbusDriver(device(port, tags, max_gap=0)) as driver:
        points = await driver.read()
    assert {p.tag: p.value for p in points} == expected
    assert all(p.quality is Quality.GOOD and p.error is None for p in points)


async def test_thousand_contiguous_tags_take_eight_requests() -> None:
    model = RegisterModel()
    model.set_registers(Table.HOLDING, 0, range(1000))
    tags = [{"name": f"r{i}", "address": i} for i in range(1000)]
    port = free_port()
    async with ModbusSimulator(units={1: model}, port=port) as sim, ModbusDriver(device(port, tags)) as driver:
        before = sim.count()
        points = await driver.read()
        assert sim.count() - before == 8
    assert [p.value for p in points] == list(range(1000))


async def test_max_registers_per_read_limits_the_plan() -> None:
    model = RegisterModel()
    model.set_registers(Table.HOLDING, 0, range(100))
    port = free_port()
    async with ModbusSimulator(units={1: model}, port=port) as sim:
        dev = device(port, [{"name": f"r{i}", "address": i} for i in range(100)], max_registers_per_read=30)
        async with ModbusDriver(dev) as driver:
            await driver.read()
    assert sorted(r.count for r in sim.requests) == [10, 30, 30, 30]


async def test_a_hole_in_the_map_fails_only_its_own_tag_and_the_split_is_remembered() -> None:
    model = RegisterModel()
    model.set_registers(Table.HOLDING, 0, range(100, 120))  # 0..19 exist
    model.set_registers(Table.HOLDING, 25, range(200, 215))  # 25..39 exist; 20..24 is a hole
    tags = [{"name": f"a{i}", "address": i} for i in range(20)]
    tags += [{"name": "in_hole", "address": 22}]
    tags += [{"name": f"b{i}", "address": 25 + i} for i in range(15)]
    port = free_port()
    async with ModbusSimulator(units={1: model}, port=port) as sim, ModbusDriver(device(port, tags)) as driver:
        first = by_tag(await driver.read())
        assert first["in_hole"].quality is Quality.BAD
        assert first["in_hole"].error == "illegal data address"
        assert all(first[f"a{i}"].value == 100 + i for i in range(20))
        assert all(first[f"b{i}"].value == 200 + i for i in range(15))
        before = sim.count()
        second = by_tag(await driver.read())
        # The second poll uses the learned plan: one request per read, no retries of the merged read.
        assert sim.count() - before == len(driver.plan) == 3
        assert second["a3"].value == 103 and second["in_hole"].error == "illegal data address"


class SilentDevice:
    """A device that accepts connections and never answers (a hung PLC)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.writers: list[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        while await reader.read(1024):
            pass

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


async def test_a_dead_device_never_delays_a_live_one() -> None:
    model = RegisterModel()
    model.set_registers(Table.HOLDING, 0, [42])
    live_port, hung_port, closed_port = free_port(), free_port(), free_port()
    polls: dict[str, list[list[Point]]] = {"live": [], "hung": [], "closed": []}

    def sink(name: str):
        async def emit(points: list[Point]) -> None:
            polls[name].append(points)

        return emit

    drivers = {
        "live": ModbusDriver(device(live_port, [{"name": "x", "address": 0}], name="live", poll="100ms")),
        "hung": ModbusDriver(
            device(hung_port, [{"name": "x", "address": 0}], name="hung", poll="100ms", timeout="500ms", retries=1)
        ),
        "closed": ModbusDriver(device(closed_port, [{"name": "x", "address": 0}], name="closed", poll="100ms")),
    }
    async with ModbusSimulator(units={1: model}, port=live_port), SilentDevice(hung_port):
        started = time.monotonic()
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(d.run(sink(n)), name=f"poll[{n}]") for n, d in drivers.items()]
            await asyncio.sleep(3.0)
            for task in tasks:
                task.cancel()
        elapsed = time.monotonic() - started
    states = {n: d.state.value for n, d in drivers.items()}
    for d in drivers.values():
        await d.close()
    # The live device kept its 100 ms schedule (allowing for a slow CI machine).
    assert len(polls["live"]) >= 0.8 * elapsed / 0.1
    assert all(p[0].value == 42 and p[0].quality is Quality.GOOD for p in polls["live"])
    assert polls["hung"] and all(p[0].quality is Quality.BAD for p in polls["hung"])
    assert polls["hung"][0][0].error == "timeout"
    assert polls["closed"][0][0].error == "connection refused"
    assert states == {"live": "up", "hung": "down", "closed": "down"}


async def test_reconnects_after_the_server_restarts() -> None:
    model = RegisterModel()
    model.set_registers(Table.HOLDING, 0, [7])
    port = free_port()
    sim = ModbusSimulator(units={1: model}, port=port)
    await sim.start()
    dev = device(port, [{"name": "x", "address": 0}], poll="100ms", backoff_max="1s")
    async with ModbusDriver(dev) as driver:
        assert (await driver.read())[0].value == 7
        await sim.stop()
        down = (await driver.read())[0]
        assert down.quality is Quality.BAD and down.error in ("connection lost", "connection refused", "timeout")
        model.set_registers(Table.HOLDING, 0, [8])
        await sim.start()

        async def recovered() -> bool:
            return (await driver.read())[0].value == 8

        await wait_for(recovered, timeout_s=5, interval_s=0.2, what="reads to recover after restart")
        assert driver.state.value == "up"
    await sim.stop()


async def test_writes_encode_type_and_order() -> None:
    model = RegisterModel()
    model.define(Table.HOLDING, 0, 20)
    model.set_registers(Table.HOLDING, 10, [0b0101])
    model.define(Table.COIL, 0, 4)
    tags = [
        {"name": "setpoint", "address": 0, "type": "float32", "order": "CDAB", "writable": True},
        {"name": "speed", "address": 2, "type": "int16", "scale": 0.1, "writable": True},
        {"name": "recipe", "address": 4, "type": "string", "length": 4, "writable": True},
        {"name": "total", "address": 8, "type": "uint32", "order": "DCBA", "writable": True},
        {"name": "flag", "address": "10.1", "writable": True},
        {"name": "run", "table": "coil", "address": 2, "writable": True},
        {"name": "locked", "address": 12},
    ]
    port = free_port()
    async with ModbusSimulator(units={1: model}, port=port), ModbusDriver(device(port, tags)) as driver:
        await driver.write("setpoint", 71.5)
        await driver.write("speed", -12.3)
        await driver.write("recipe", "AB-7")
        await driver.write("total", 4_000_000_000)
        await driver.write("flag", True)
        await driver.write("run", "on")
        values = {p.tag: p.value for p in await driver.read()}
        with pytest.raises(WriteRefused, match="dev.locked is not writable"):
            await driver.write("locked", 1)
        with pytest.raises(WriteRefused, match="no tag named 'nope'"):
            await driver.write("nope", 1)
        with pytest.raises(WriteRefused, match="out of range for int16"):
            await driver.write("speed", 5000)
    assert values == {
        "setpoint": 71.5,
        "speed": -12.3,
        "recipe": "AB-7",
        "total": 4_000_000_000,
        "flag": True,
        "run": True,
        "locked": 0,
    }
    # Exactly these registers reached the device: CDAB float, and bit 1 set without touching bits 0 and 2.
    assert model.get_registers(Table.HOLDING, 0, 2) == wire("f", 71.5, "CDAB")
    assert model.get_registers(Table.HOLDING, 8, 2) == wire("I", 4_000_000_000, "DCBA")
    assert model.get_registers(Table.HOLDING, 10, 1) == [0b0111]
    assert model.get_registers(Table.HOLDING, 2, 1) == [struct.unpack(">H", struct.pack(">h", -123))[0]]


def test_tag_model_rejects_impossible_tags() -> None:
    with pytest.raises(ValueError, match="type must be bool"):
        ModbusTag(name="c", table="coil", address=1, type="int16")
    with pytest.raises(ValueError, match="disagree"):
        ModbusTag.model_validate({"name": "b", "address": "4.2", "bit": 3})
