"""Modbus read planning: 1,000 tags on one device, coalesced plan vs one request per tag.

    python bench/bench_modbus.py [--tags 1000] [--polls 20]

Runs a pymodbus server on a free loopback port and measures, in the same
run: the driver with its coalesced plan, the same driver forced to one
request per tag, and a raw pymodbus client
issuing the coalesced plan's requests with no decoding (the floor).
Requests per poll are counted at the server.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pymodbus.client import AsyncModbusTcpClient  # noqa: E402

from drivers.config import ModbusTcpDevice, Table  # noqa: E402
from drivers.modbus.driver import ModbusDriver  # noqa: E402
from drivers.modbus.plan import read_for  # noqa: E402
from drivers.simulate.modbus_server import ModbusSimulator, RegisterModel  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device(port: int, count: int, mix: bool, **extra: object) -> ModbusTcpDevice:
    # Contiguous uint16 tags, or (--mix) every 4th tag a float32 of 2 registers.
    tags, address = [], 0
    for i in range(count):
        if mix and i % 4 == 3:
            tags.append({"name": f"t{i}", "address": address, "type": "float32"})
            address += 2
        else:
            tags.append({"name": f"t{i}", "address": address, "type": "uint16"})
            address += 1
    return ModbusTcpDevice.model_validate({"protocol": "modbus-tcp", "name": "bench", "host": "127.0.0.1",
                                           "port": port, "timeout": "2s", "tags": tags, **extra})


async def time_polls(poll, polls: int) -> list[float]:
    await poll()  # warm-up: connect, and learn the plan
    times = []
    for _ in range(polls):
        started = time.perf_counter()
        await poll()
        times.append(time.perf_counter() - started)
    return times


async def main(tags: int, polls: int, mix: bool) -> None:
    model = RegisterModel()
    model.define(Table.HOLDING, 0, tags * 2)
    port = free_port()
    results: dict[str, tuple[float, float, float]] = {}
    async with ModbusSimulator(units={1: model}, port=port) as sim:
        for label, per_tag in (("coalesced", False), ("per-tag", True)):
            dev = device(port, tags, mix)
            async with ModbusDriver(dev) as driver:
                if per_tag:
                    # One request per tag: what a naive poller does.
                    driver.plan = [read_for(t.table, [t]) for t in dev.tags]
                before = sim.count()
                times = await time_polls(driver.read, polls)
                per_poll = (sim.count() - before) / (polls + 1)
                points = await driver.read()
                assert len(points) == tags and all(p.quality.value == "good" for p in points)
            results[label] = (per_poll, statistics.median(times), max(times))
        reads = ModbusDriver(device(port, tags, mix)).plan
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2)
        await client.connect()

        async def raw_poll() -> None:
            for r in reads:
                await client.read_holding_registers(r.start, count=r.count, device_id=1)

        before = sim.count()
        times = await time_polls(raw_poll, polls)
        results["raw pymodbus"] = ((sim.count() - before) / (polls + 1), statistics.median(times), max(times))
        client.close()

    kind = "uint16 and float32" if mix else "contiguous uint16"
    print(f"Modbus TCP, {tags} {kind} tags on one device, {polls} polls each (loopback)")
    print(f"{'plan':<14} {'requests/poll':>14} {'median cycle':>14} {'max cycle':>11}")
    for label, (per_poll, median, worst) in results.items():
        print(f"{label:<14} {per_poll:>14.0f} {median * 1000:>12.1f}ms {worst * 1000:>9.1f}ms")
    coalesced, per_tag, raw = results["coalesced"], results["per-tag"], results["raw pymodbus"]
    print(f"per-tag / coalesced: {per_tag[0] / coalesced[0]:.0f}x the requests, "
          f"{per_tag[1] / coalesced[1]:.1f}x the cycle time")
    print(f"coalesced driver / raw pymodbus (same requests, plus decoding): {coalesced[1] / raw[1]:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tags", type=int, default=1000)
    parser.add_argument("--polls", type=int, default=20)
    parser.add_argument("--mix", action="store_true", help="every 4th tag a float32 instead of all uint16")
    args = parser.parse_args()
    asyncio.run(main(args.tags, args.polls, args.mix))
