"""Modbus TCP poll cycle for 1,000 registers: sequential vs pipelined driver vs raw clients.

    python bench/bench_modbus.py [--tags 1000] [--polls 50] [--answer-ms 0 2] [--mix]

The simulated device (the project's pymodbus server) runs in its own
process on a free loopback port, so the client side's CPU is measured
alone. For each device answer time (``--answer-ms``: 0 is loopback as
fast as the server goes; 2 ms is in the range a PLC's Modbus server takes
per request; the simulator serves pipelined requests concurrently), the
same run measures:

- raw pymodbus: its async client issuing the driver's planned requests one
  after another, no decoding (pymodbus sends one request at a time): the
  baseline every line is compared with;
- raw pipelined: all planned requests written at once on a bare asyncio
  stream, answers read back, no decoding: the floor for pipelining;
- the driver with ``max_concurrent_requests`` 1 (sequential), 4 and 8,
  decoding every tag into points;
- at answer time 0 only, the driver with one request per tag (what a naive
  poller does).

Printed per line: requests per poll, median and p95 poll-cycle time, the
client's CPU per poll, and the cycle time as a ratio of raw pymodbus.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pymodbus.client import AsyncModbusTcpClient

from drivers.config import ModbusTcpDevice, Table
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.plan import Read, read_for
from drivers.simulate.modbus_server import ModbusSimulator, RegisterModel


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tag_list(count: int, mix: bool) -> list[dict[str, object]]:
    # Contiguous uint16 tags, or (--mix) every 4th tag a float32 of 2 registers.
    tags: list[dict[str, object]] = []
    address = 0
    for i in range(count):
        kind = "float32" if mix and i % 4 == 3 else "uint16"
        tags.append({"name": f"t{i}", "address": address, "type": kind})
        address += 2 if kind == "float32" else 1
    return tags


def device(port: int, count: int, mix: bool, **extra: object) -> ModbusTcpDevice:
    return ModbusTcpDevice.model_validate(
        {
            "protocol": "modbus-tcp",
            "name": "bench",
            "host": "127.0.0.1",
            "port": port,
            "timeout": "2s",
            "tags": tag_list(count, mix),
            **extra,
        }
    )


# ---------------------------------------------------------------- the device, in its own process


async def serve(port: int, registers: int, answer_ms: float) -> None:
    model = RegisterModel()
    model.set_registers(Table.HOLDING, 0, [i & 0xFFFF for i in range(registers)])
    async with ModbusSimulator(units={1: model}, port=port) as sim:
        if answer_ms:
            sim.faults.delay(Table.HOLDING, range(registers), answer_ms / 1000)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the bench closes stdin


class Device:
    """The simulator in a child process, answering each request after ``answer_ms``."""

    def __init__(self, registers: int, answer_ms: float) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(self.port), str(registers), str(answer_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "ready"

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=10)


# ---------------------------------------------------------------- measuring


Result = tuple[float, float, float, float]  # requests/poll, median s, p95 s, CPU s per poll


async def measure(poll: Callable[[], Awaitable[int]], polls: int) -> Result:
    for _ in range(3):
        await poll()  # warm-up: connect, learn the plan
    times, requests = [], 0
    cpu = time.process_time()
    for _ in range(polls):
        started = time.perf_counter()
        requests += await poll()
        times.append(time.perf_counter() - started)
    cpu = time.process_time() - cpu
    times.sort()
    return requests / polls, statistics.median(times), times[int(0.95 * (len(times) - 1))], cpu / polls


async def driver_poll(port: int, tags: int, mix: bool, polls: int, *, window: int, per_tag: bool = False) -> Result:
    dev = device(port, tags, mix, max_concurrent_requests=window)
    async with ModbusDriver(dev) as driver:
        if per_tag:
            driver.plan = [read_for(t.table, [t]) for t in dev.tags]

        async def poll() -> int:
            before = driver.requests
            points = await driver.read()
            assert len(points) == tags and points[-1].quality.value == "good", points[-1]
            return driver.requests - before

        return await measure(poll, polls)


async def raw_pymodbus(port: int, reads: list[Read], polls: int) -> Result:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2)
    await client.connect()

    async def poll() -> int:
        for r in reads:
            response = await client.read_holding_registers(r.start, count=r.count, device_id=1)
            assert not response.isError()
        return len(reads)

    try:
        return await measure(poll, polls)
    finally:
        client.close()


async def raw_pipelined(port: int, reads: list[Read], polls: int) -> Result:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    tid = 0

    async def poll() -> int:
        nonlocal tid
        frames = []
        for r in reads:
            tid = tid % 0xFFFF + 1
            frames.append(struct.pack(">HHHBBHH", tid, 0, 6, 1, 3, r.start, r.count))
        writer.write(b"".join(frames))
        for _ in reads:
            header = await reader.readexactly(6)
            await reader.readexactly(int.from_bytes(header[4:6], "big"))
        return len(reads)

    try:
        return await measure(poll, polls)
    finally:
        writer.close()


async def scenario(tags: int, mix: bool, polls: int, answer_ms: float) -> dict[str, Result]:
    registers = tags * 2 if mix else tags
    dev = Device(registers, answer_ms)
    try:
        reads = ModbusDriver(device(dev.port, tags, mix)).plan
        results = {
            "raw pymodbus": await raw_pymodbus(dev.port, reads, polls),
            "raw pipelined": await raw_pipelined(dev.port, reads, polls),
            "driver sequential": await driver_poll(dev.port, tags, mix, polls, window=1),
            "driver pipelined 4": await driver_poll(dev.port, tags, mix, polls, window=4),
            "driver pipelined 8": await driver_poll(dev.port, tags, mix, polls, window=8),
        }
        if not answer_ms:
            results["driver per-tag"] = await driver_poll(
                dev.port, tags, mix, max(3, polls // 10), window=1, per_tag=True
            )
        return results
    finally:
        dev.close()


async def main(tags: int, polls: int, answer_times: list[float], mix: bool) -> None:
    kind = "uint16 and float32" if mix else "contiguous uint16"
    load = os.getloadavg()
    print(
        f"Modbus TCP, {tags} {kind} tags on one device, {polls} polls per line; "
        f"device in its own process on loopback; load average {load[0]:.2f} on {os.cpu_count()} CPUs"
    )
    for answer_ms in answer_times:
        results = await scenario(tags, mix, polls, answer_ms)
        raw = results["raw pymodbus"][1]
        print(f"\ndevice answer time {answer_ms:g} ms per request")
        print(
            f"{'':<20} {'requests/poll':>13} {'median cycle':>13} {'p95 cycle':>10} "
            f"{'client CPU/poll':>16} {'vs raw pymodbus':>16}"
        )
        for label, (per_poll, median, p95, cpu) in results.items():
            print(
                f"{label:<20} {per_poll:>13.0f} {median * 1000:>11.2f}ms {p95 * 1000:>8.2f}ms "
                f"{cpu * 1000:>14.2f}ms {median / raw:>15.2f}x"
            )
        seq, pipe = results["driver sequential"][1], results["driver pipelined 8"][1]
        print(
            f"pipelined 8 / sequential: {pipe / seq:.2f}x the cycle time "
            f"({1 / pipe:.0f} vs {1 / seq:.0f} polls/s possible)"
        )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        asyncio.run(serve(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tags", type=int, default=1000)
    parser.add_argument("--polls", type=int, default=50)
    parser.add_argument(
        "--answer-ms",
        type=float,
        nargs="+",
        default=[0.0, 2.0],
        help="time the simulated device takes to answer each request",
    )
    parser.add_argument("--mix", action="store_true", help="every 4th tag a float32 instead of all uint16")
    args = parser.parse_args()
    asyncio.run(main(args.tags, args.polls, args.answer_ms, args.mix))
