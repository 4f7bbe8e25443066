"""Modbus RTU over a real serial line: a socat pty pair, pymodbus serial server on one end."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drivers.config import ModbusRtuDevice, Table
from drivers.modbus.driver import ModbusDriver
from drivers.points import Quality
from drivers.simulate.modbus_server import ModbusSimulator, RegisterModel
from tests.helpers import wait_for
from tests.test_modbus_codec import wire

pytestmark = pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed (apt-get install socat)")


@pytest.fixture
async def serial_pair(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """Two connected pseudo-terminals, like a USB-RS485 adapter wired to a device."""
    agent_end, device_end = tmp_path / "ttyAGENT", tmp_path / "ttyDEVICE"
    proc = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={agent_end}", f"pty,raw,echo=0,link={device_end}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_for(lambda: agent_end.exists() and device_end.exists(), timeout_s=5, what="socat ptys")
        yield str(agent_end), str(device_end)
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def rtu_device(name: str, port: str, unit: int, tags: list[dict]) -> ModbusRtuDevice:
    # Linux pseudo-terminals refuse parity settings (EINVAL), so the line runs 8N1 here.
    return ModbusRtuDevice.model_validate(
        {
            "protocol": "modbus-rtu",
            "name": name,
            "serial": port,
            "baudrate": 19200,
            "parity": "N",
            "stopbits": 1,
            "unit": unit,
            "timeout": "500ms",
            "retries": 1,
            "tags": tags,
        }
    )


async def test_rtu_reads_two_units_on_one_line_and_writes(serial_pair: tuple[str, str]) -> None:
    agent_end, device_end = serial_pair
    flow_meter, drive = RegisterModel(), RegisterModel()
    flow_meter.set_registers(Table.INPUT, 0, wire("I", 123_456_789, "CDAB"))
    flow_meter.set_registers(Table.INPUT, 2, wire("f", 3.75, "ABCD"))
    drive.set_registers(Table.HOLDING, 0, [1480, 0])
    drive.define(Table.COIL, 0, 8)
    async with ModbusSimulator(units={3: flow_meter, 4: drive}, serial=device_end, baudrate=19200) as sim:
        meter_driver = ModbusDriver(
            rtu_device(
                "flow-3",
                agent_end,
                3,
                [
                    {"name": "flow", "table": "input", "address": 0, "type": "uint32", "order": "CDAB"},
                    {"name": "level", "table": "input", "address": 2, "type": "float32"},
                ],
            )
        )
        drive_driver = ModbusDriver(
            rtu_device(
                "drive-4",
                agent_end,
                4,
                [
                    {"name": "speed", "address": 0, "writable": True},
                    {"name": "enable", "table": "coil", "address": 1, "writable": True},
                ],
            )
        )
        async with meter_driver, drive_driver:
            # Both devices poll at once; they share the port and take turns on the line.
            meter, drv = await asyncio.gather(meter_driver.read(), drive_driver.read())
            assert {p.tag: p.value for p in meter} == {"flow": 123_456_789, "level": 3.75}
            assert {p.tag: p.value for p in drv} == {"speed": 1480, "enable": False}
            await drive_driver.write("speed", 900)
            await drive_driver.write("enable", True)
            assert {p.tag: p.value for p in await drive_driver.read()} == {"speed": 900, "enable": True}
            assert drive.get_registers(Table.HOLDING, 0, 1) == [900]
        assert {r.unit for r in sim.requests} == {3, 4}


async def test_rtu_unknown_unit_is_bad_and_its_neighbour_good(serial_pair: tuple[str, str]) -> None:
    agent_end, device_end = serial_pair
    model = RegisterModel()
    model.set_registers(Table.HOLDING, 0, [5])
    async with ModbusSimulator(units={1: model}, serial=device_end):
        async with (
            ModbusDriver(rtu_device("ghost", agent_end, 9, [{"name": "x", "address": 0}])) as ghost,
            ModbusDriver(rtu_device("real", agent_end, 1, [{"name": "x", "address": 0}])) as real,
        ):
            bad = (await ghost.read())[0]
            good = (await real.read())[0]
    # Real hardware stays silent (timeout); pymodbus's simulator answers "device failure".
    assert bad.quality is Quality.BAD and bad.error in ("timeout", "device failure")
    assert good.value == 5 and good.quality is Quality.GOOD


async def test_missing_serial_port_is_reported(tmp_path: Path) -> None:
    missing = str(tmp_path / "ttyUSB9")
    async with ModbusDriver(rtu_device("x", missing, 1, [{"name": "x", "address": 0}])) as driver:
        point = (await driver.read())[0]
    assert point.quality is Quality.BAD and point.error == f"no such serial port {missing}"
    assert not os.path.exists(missing)
