"""A real pymodbus server (TCP or RTU) playing machines from a register model.

``RegisterModel`` holds one unit's four tables as sparse maps; addresses not
in the model are holes and answer "illegal data address", as real devices
do. The server reads and writes the model on every request, so values set by
a test or by a machine's ``step`` are what the next request sees, and every
request is recorded (``requests``) so tests can count them at the server.

Over TCP the server answers pipelined requests, each as soon as it is ready
(``modbus_pipeline.py``), and ``faults`` makes chosen requests slow or
unanswered; ``pipelining=False`` is pymodbus' own server, which serves one
request at a time and loses the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from factory_edge.tasks import cancel_and_wait

from ..config import ModbusTag, Table
from ..modbus import codec
from .machines import Machine
from .modbus_pipeline import TABLE_OF_FC as _TABLE_OF_FC
from .modbus_pipeline import Faults, PipelinedTcpServer

log = logging.getLogger(__name__)


@dataclass
class RegisterModel:
    """One Modbus unit: sparse coil/discrete bits and holding/input registers."""

    tables: dict[Table, dict[int, int]] = field(default_factory=lambda: {t: {} for t in Table})

    def define(self, table: Table, start: int, count: int, value: int = 0) -> None:
        """Make ``count`` addresses from ``start`` exist (anything else is a hole)."""
        for address in range(start, start + count):
            self.tables[table].setdefault(address, value)

    def set_registers(self, table: Table, address: int, registers: Iterable[int]) -> None:
        for i, word in enumerate(registers):
            self.tables[table][address + i] = int(word) & (1 if table.is_bits else 0xFFFF)

    def get_registers(self, table: Table, address: int, count: int) -> list[int]:
        return [self.tables[table].get(a, 0) for a in range(address, address + count)]

    def put(self, tag: ModbusTag, value: Any) -> None:
        """Store a value the way the tag reads it (type, order, bit, scale)."""
        if tag.table.is_bits:
            self.set_registers(tag.table, tag.address, [1 if value else 0])
        elif tag.bit is not None:
            word = self.tables[tag.table].get(tag.address, 0)
            self.set_registers(tag.table, tag.address, [codec.set_bit(word, tag.bit, bool(value))])
        else:
            self.set_registers(tag.table, tag.address, codec.encode(tag, value))

    def get(self, tag: ModbusTag) -> Any:
        """Read a value back as the tag decodes it."""
        if tag.table.is_bits:
            return bool(self.tables[tag.table].get(tag.address, 0))
        return codec.decode(tag, self.get_registers(tag.table, tag.address, tag.register_count))

    def _runs(self, table: Table) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        for address in sorted(self.tables[table]):
            if runs and address == runs[-1][0] + runs[-1][1]:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((address, 1))
        return runs

    def sim_device(self, unit: int) -> SimDevice:
        """The pymodbus device: defined runs are valid addresses, gaps are holes."""
        blocks: list[list[SimData]] = []
        for table in (Table.COIL, Table.DISCRETE, Table.HOLDING, Table.INPUT):
            runs = self._runs(table)
            if table.is_bits:
                # pymodbus packs bits in words and has no holes in bit tables.
                top = max((s + c for s, c in runs), default=16)
                blocks.append([SimData(0, count=((top + 15) // 16) * 16, values=False, datatype=SimType.BITS)])
            elif runs:
                blocks.append([SimData(s, count=c, values=0, datatype=SimType.REGISTERS) for s, c in runs])
            else:
                blocks.append([SimData(0, count=1, datatype=SimType.INVALID)])
        return SimDevice(id=unit, simdata=tuple(blocks), action=self._sync)  # type: ignore[arg-type]

    async def _sync(
        self, fc: int, start: int, address: int, count: int, registers: list[int], values: list[int] | list[bool] | None
    ) -> ExcCodes | None:
        """pymodbus hook on every valid request: writes go into the model, reads come from it."""
        table = _TABLE_OF_FC[fc]
        if values:
            self.set_registers(table, address, [int(v) for v in values])
        if table.is_bits:
            # ``count`` is in 16-bit words here; bit n lives in word n // 16.
            first_word = address // 16
            for w in range(first_word, first_word + count):
                word = 0
                for b in range(16):
                    if self.tables[table].get(w * 16 + b):
                        word |= 1 << b
                registers[w - start] = word
        else:
            for a in range(address, address + count):
                registers[a - start] = self.tables[table].get(a, 0)
        return None  # no exception: the request is answered from ``registers``


@dataclass(frozen=True, slots=True)
class Request:
    """A request as the server received it."""

    unit: int
    function_code: int
    address: int
    count: int
    transaction_id: int = 0


class ModbusSimulator:
    """A pymodbus server on TCP (``port``) or a serial port (``serial``), playing units.

    ``async with ModbusSimulator(units={1: model}, port=5020) as sim:`` — or
    give ``machines`` to have their values move with time.
    """

    def __init__(
        self,
        *,
        units: dict[int, RegisterModel] | None = None,
        machines: list[Machine] | None = None,
        host: str = "127.0.0.1",
        port: int = 5020,
        serial: str | None = None,
        baudrate: int = 19200,
        parity: str = "N",
        stopbits: int = 1,
        update_interval_s: float = 0.5,
        pipelining: bool = True,
    ) -> None:
        self.machines = machines or []
        self.units: dict[int, RegisterModel] = dict(units or {})
        for machine in self.machines:
            model = self.units.setdefault(machine.unit, RegisterModel())
            for f in machine.fields:
                model.define(f.table, f.address, f.tag().register_count)
                model.put(f.tag(), machine.values[f.name])
        self.host, self.port, self.serial = host, port, serial
        self.serial_options = {"baudrate": baudrate, "parity": parity, "stopbits": stopbits}
        self.update_interval_s = update_interval_s
        self.pipelining = pipelining
        self.faults = Faults()
        self.requests: list[Request] = []
        self.answers: list[int] = []  # transaction ids of the answers, in the order they were sent
        self._server: ModbusTcpServer | ModbusSerialServer | None = None
        self._task: asyncio.Task[None] | None = None

    def _trace(self, sending: bool, pdu: Any) -> Any:
        if sending:
            self.answers.append(pdu.transaction_id)
        else:
            self.requests.append(
                Request(
                    pdu.dev_id,
                    pdu.function_code,
                    getattr(pdu, "address", 0),
                    getattr(pdu, "count", 0),
                    pdu.transaction_id,
                )
            )
        return pdu

    async def start(self) -> None:
        """Start serving (again, after ``stop``, on the same port)."""
        devices = [model.sim_device(unit) for unit, model in sorted(self.units.items())]
        if self.serial:
            self._server = ModbusSerialServer(devices, port=self.serial, trace_pdu=self._trace, **self.serial_options)  # type: ignore[arg-type]
        elif self.pipelining:
            self._server = PipelinedTcpServer(
                devices, address=(self.host, self.port), trace_pdu=self._trace, faults=self.faults
            )
        else:
            self._server = ModbusTcpServer(devices, address=(self.host, self.port), trace_pdu=self._trace)
        await self._server.serve_forever(background=True)
        if self.machines and self._task is None:
            self._task = asyncio.create_task(self._simulate(), name="simulate[modbus]")

    async def stop(self) -> None:
        """Stop serving; connected clients see the connection close."""
        await cancel_and_wait(self._task)
        self._task = None
        if self._server is not None:
            await self._server.shutdown()
            self._server = None

    async def __aenter__(self) -> ModbusSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _simulate(self) -> None:
        started = last = time.monotonic()
        while True:
            await asyncio.sleep(self.update_interval_s)
            now = time.monotonic()
            for machine in self.machines:
                model = self.units[machine.unit]
                # Setpoints written by clients flow into the machine first.
                for f in machine.fields:
                    if f.writable:
                        machine.values[f.name] = model.get(f.tag())
                machine.advance(now - started, now - last)
                for f in machine.fields:
                    model.put(f.tag(), machine.values[f.name])
            last = now

    def count(self, *, unit: int | None = None, function_code: int | None = None) -> int:
        """Requests received so far, optionally of one unit / function code."""
        return sum(
            1
            for r in self.requests
            if (unit is None or r.unit == unit) and (function_code is None or r.function_code == function_code)
        )
