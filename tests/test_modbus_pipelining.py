"""Pipelined Modbus TCP reads (max_concurrent_requests) against real pymodbus servers on loopback."""

from __future__ import annotations

import asyncio
import logging

import pytest

from drivers.config import ModbusTcpDevice, Table
from drivers.modbus.driver import ModbusDriver
from drivers.points import Point, Quality
from drivers.simulate.modbus_server import ModbusSimulator, RegisterModel
from tests.helpers import free_port
from tests.test_modbus_driver import SilentDevice

REGISTERS = 1000  # 8 reads of at most 125 registers


def thousand_registers(port: int, **extra: object) -> ModbusTcpDevice:
    return ModbusTcpDevice.model_validate(
        {
            "protocol": "modbus-tcp",
            "name": "press",
            "host": "127.0.0.1",
            "port": port,
            "timeout": "300ms",
            "retries": 0,
            "tags": [{"name": f"r{i}", "address": i} for i in range(REGISTERS)],
            **extra,
        }
    )


def counting_model() -> RegisterModel:
    model = RegisterModel()
    model.set_registers(Table.HOLDING, 0, range(REGISTERS))
    return model


def assert_all_read(points: list[Point]) -> None:
    assert [(p.tag, p.value, p.quality) for p in points] == [(f"r{i}", i, Quality.GOOD) for i in range(REGISTERS)]


async def test_answers_out_of_order_reach_the_right_tags() -> None:
    port = free_port()
    async with ModbusSimulator(units={1: counting_model()}, port=port) as sim:
        sim.faults.delay(Table.HOLDING, range(0, 125), 0.1)  # the first read is answered last
        async with ModbusDriver(thousand_registers(port, max_concurrent_requests=8)) as driver:
            points = await driver.read()
    assert_all_read(points)
    sent = [r.transaction_id for r in sim.requests]
    assert len(sent) == 8 and sim.answers[-1] == sent[0] and sorted(sim.answers) == sorted(sent)


async def test_a_request_that_times_out_fails_only_its_own_tags() -> None:
    port = free_port()
    async with ModbusSimulator(units={1: counting_model()}, port=port) as sim:
        sim.faults.delay(Table.HOLDING, range(250, 375), None)  # the third read is never answered
        async with ModbusDriver(thousand_registers(port, max_concurrent_requests=4)) as driver:
            for _ in range(2):
                points = await driver.read()
                silent = [p for p in points if 250 <= int(p.tag[1:]) < 375]
                others = [p for p in points if not 250 <= int(p.tag[1:]) < 375]
                assert all(p.quality is Quality.BAD and p.error == "timeout" and p.value is None for p in silent)
                assert all(p.quality is Quality.GOOD and p.value == int(p.tag[1:]) for p in others)
                assert len(silent) == 125 and len(others) == 875
                # The device answered everything else: it is up, and keeps its connection and window.
                assert driver.state.value == "up"


@pytest.mark.parametrize("behaviour", ["drops what arrives while busy", "answers busy"])
async def test_a_device_taking_one_request_at_a_time_is_detected_and_read_completely(
    behaviour: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    # pymodbus' own server serves one request and loses what arrives meanwhile;
    # the other device answers "server device busy" (exception 6) instead.
    sim = ModbusSimulator(units={1: counting_model()}, port=port, pipelining=behaviour == "answers busy")
    sim.faults.max_outstanding = 1
    sim.faults.delay(Table.HOLDING, range(REGISTERS), 0.005)  # each request takes the device a moment
    caplog.set_level(logging.WARNING, logger="drivers.modbus.transport")
    async with sim, ModbusDriver(thousand_registers(port, max_concurrent_requests=8)) as driver:
        assert_all_read(await driver.read())
        assert [r.getMessage() for r in caplog.records if r.name == "drivers.modbus.transport"] == [
            "device takes one request at a time"
        ]
        before = sim.count()
        assert_all_read(await driver.read())
        assert sim.count() - before == 8  # one request per read: no retries, no busy answers
        assert_all_read(await driver.read())
    assert driver.state.value == "closed"


async def test_one_request_at_a_time_when_configured() -> None:
    port = free_port()
    async with ModbusSimulator(units={1: counting_model()}, port=port, pipelining=False) as sim:
        async with ModbusDriver(thousand_registers(port, max_concurrent_requests=1)) as driver:
            for _ in range(3):
                assert_all_read(await driver.read())
    assert sim.count() == 3 * 8


async def test_a_hole_is_found_with_requests_in_flight() -> None:
    model = counting_model()
    for address in range(300, 305):
        del model.tables[Table.HOLDING][address]
    tags = [{"name": f"r{i}", "address": i} for i in range(REGISTERS) if not 300 <= i < 305]
    tags.append({"name": "in_hole", "address": 302})
    port = free_port()
    async with ModbusSimulator(units={1: model}, port=port) as sim:
        dev = thousand_registers(port, max_concurrent_requests=8, tags=tags)
        async with ModbusDriver(dev) as driver:
            for _ in range(2):
                points = {p.tag: p for p in await driver.read()}
                assert points["in_hole"].error == "illegal data address"
                assert all(p.value == int(p.tag[1:]) for name, p in points.items() if name != "in_hole")
            before = sim.count()
            await driver.read()
            assert sim.count() - before == len(driver.plan)


class CountingSilentDevice(SilentDevice):
    """A hung PLC that counts the bytes it is sent."""

    received = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        while data := await reader.read(1024):
            self.received += len(data)


async def test_a_silent_device_is_given_up_after_the_first_requests_time_out() -> None:
    port = free_port()
    async with CountingSilentDevice(port) as device:
        async with ModbusDriver(thousand_registers(port, max_concurrent_requests=4)) as driver:
            points = await driver.read()
            assert all(p.quality is Quality.BAD and p.error == "timeout" for p in points)
            assert driver.state.value == "down"
            # The four requests on the wire timed out; the other four were never sent.
            assert device.received == 4 * 12


class OneAtATimeProxy:
    """In front of a real server: closes the connection when a request arrives while another is outstanding."""

    def __init__(self, port: int, upstream_port: int) -> None:
        self.port, self.upstream_port = port, upstream_port
        self.closed = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        outstanding = 0

        async def relay_answers() -> None:
            nonlocal outstanding
            while header := await up_reader.readexactly(6):
                body = await up_reader.readexactly(int.from_bytes(header[4:6], "big"))
                outstanding -= 1
                writer.write(header + body)

        relay = asyncio.create_task(relay_answers())
        try:
            while True:
                header = await reader.readexactly(6)
                body = await reader.readexactly(int.from_bytes(header[4:6], "big"))
                if outstanding:
                    self.closed += 1
                    return
                outstanding += 1
                up_writer.write(header + body)
        except asyncio.IncompleteReadError:
            pass
        finally:
            relay.cancel()
            writer.close()
            up_writer.close()

    async def __aenter__(self) -> OneAtATimeProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()


async def test_a_device_that_drops_the_connection_on_a_second_request_is_read_one_at_a_time() -> None:
    port, upstream = free_port(), free_port()
    async with ModbusSimulator(units={1: counting_model()}, port=upstream), OneAtATimeProxy(port, upstream) as proxy:
        dev = thousand_registers(port, max_concurrent_requests=8, poll="100ms")
        async with ModbusDriver(dev) as driver:
            errors = []
            for _ in range(50):
                points = await driver.read()
                if all(p.quality is Quality.GOOD for p in points):
                    break
                errors.append({p.error for p in points})
                await asyncio.sleep(0.1)
            assert_all_read(points)
            assert proxy.closed == 2 and {"connection lost"} in errors
            assert_all_read(await driver.read())
    assert proxy.closed == 2


async def test_a_waiter_cancelled_as_its_slot_frees_leaves_the_window_whole() -> None:
    """A poll cancelled (timeout, reload) while its request waits for a slot, just as the slot frees: the slot
    goes to the next waiter, not to the cancelled one, and nothing raises (seen under load with 4 in flight)."""
    from drivers.modbus.window import Window

    window = Window(1)
    await window.enter(False)
    cancelled = asyncio.create_task(window.enter(False))
    nxt = asyncio.create_task(window.enter(False))
    await asyncio.sleep(0)  # both wait
    cancelled.cancel()  # its future is cancelled now; the task learns it on its next step
    window.leave(False)  # the slot frees before that step
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.wait_for(nxt, 1)  # the next waiter got the slot
    assert window.busy == 1
    window.leave(False)
    assert window.busy == 0 and not window._waiters
