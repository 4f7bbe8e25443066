"""A Modbus TCP machine that writes down every reading it serves: the ground truth of the zero-loss tests.

    python -m tests.groundtruth --port 5020 --log served.log [--units 1 2] [--bulk 500] [--delay-ms 300]

Each unit has, in holding registers, a uint64 ``counter`` at 0-3 that
increases by one on every read that covers it (so every reading the
agent takes has a value of its own), and ``--bulk`` more registers from
4 on (volume). Each read served is appended to ``--log`` and flushed before
the response leaves::

    <unit> <counter value, or -> <bulk registers served> <epoch ms>

``--delay-ms`` holds each answer that long after the reading is written down
(a slow device, or a response on its way): a reading served, not yet received.

SIGUSR1 makes every read fail from then on (a Modbus exception, so the
agent records ``bad`` points and no value): a test freezes the truth
before it stops the agent, so that no reading is served that the agent
could still lose in flight. It runs in a process of its own, so that a
busy test process never delays a response into the agent's timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path
from typing import Any, TextIO

from pymodbus.constants import ExcCodes

from drivers.config import Table
from drivers.simulate.modbus_server import ModbusSimulator, RegisterModel

COUNTER_REGISTERS = 4


class CountingUnit(RegisterModel):
    def __init__(self, unit: int, bulk: int, log: TextIO, state: dict[str, bool], delay_s: float = 0.0) -> None:
        super().__init__()
        self.unit, self.bulk, self.log, self.state = unit, bulk, log, state
        self.delay_s = delay_s
        self.counter = 0
        self.define(Table.HOLDING, 0, COUNTER_REGISTERS + bulk)
        self.set_registers(Table.HOLDING, COUNTER_REGISTERS, [(unit * 1000 + i) & 0xFFFF for i in range(bulk)])

    async def _sync(
        self, fc: int, start: int, address: int, count: int, registers: list[int], values: Any
    ) -> ExcCodes | None:
        if fc != 3 or values:
            return await super()._sync(fc, start, address, count, registers, values)
        if self.state["frozen"]:
            return ExcCodes.DEVICE_FAILURE
        value = "-"
        if address < COUNTER_REGISTERS:
            self.counter += 1
            self.set_registers(Table.HOLDING, 0, [(self.counter >> s) & 0xFFFF for s in (48, 32, 16, 0)])
            value = str(self.counter)
        lo, hi = max(address, COUNTER_REGISTERS), min(address + count, COUNTER_REGISTERS + self.bulk)
        self.log.write(f"{self.unit} {value} {max(0, hi - lo)} {time.time_ns() // 1_000_000}\n")
        self.log.flush()
        await super()._sync(fc, start, address, count, registers, values)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return None


async def serve(port: int, log_path: Path, units: list[int], bulk: int, delay_s: float = 0.0) -> None:
    state = {"frozen": False}
    with open(log_path, "a", encoding="ascii") as log:
        models = {unit: CountingUnit(unit, bulk, log, state, delay_s) for unit in units}
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, lambda: state.update(frozen=True))
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        async with ModbusSimulator(units=dict(models), port=port):
            print("serving", flush=True)
            await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--units", type=int, nargs="+", default=[1])
    parser.add_argument("--bulk", type=int, default=0)
    parser.add_argument("--delay-ms", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.log, args.units, args.bulk, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
