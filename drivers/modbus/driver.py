"""Modbus TCP and RTU driver (pymodbus, asyncio).

One driver per configured device. Reads follow the coalesced plan
(``plan.py``); a merged read refused with "illegal data address" is split
and the split plan kept. Every fault ends up as ``bad`` points with the
reason; a device that stops answering is retried with exponential backoff
and jitter, and polls in between return at once, so a dead device costs its
own schedule nothing and other devices nothing at all.

Devices on one RS-485 line (same serial port) share one port and take turns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from factory_edge.errors import DriverError
from factory_edge.logs import fields

from ..base import Backoff, DeviceState, Driver
from ..config import ModbusDeviceBase, ModbusRtuDevice, ModbusTag, ModbusTcpDevice, Table
from ..points import Point, now_ms
from . import codec
from .plan import Hole, Limits, Read, plan_reads, split

log = logging.getLogger(__name__)

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge",
    6: "device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}
ILLEGAL_DATA_ADDRESS = 2


class _Fault(Exception):
    """A request that got no usable answer; ``lost`` means the link, not the request, failed."""

    def __init__(self, reason: str, *, code: int | None = None, lost: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.lost = lost


class _Link:
    """A pymodbus client and the lock that serializes requests on it."""

    def __init__(self, client: AsyncModbusTcpClient | AsyncModbusSerialClient, key: str) -> None:
        self.client = client
        self.key = key
        self.lock = asyncio.Lock()
        self.users = 0


# RS-485 multi-drop: every device on a serial port shares its _Link.
_serial_links: dict[str, _Link] = {}


def _new_client(device: ModbusDeviceBase) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
    # reconnect_delay=0: pymodbus must not reconnect on its own; the driver
    # owns reconnects so it can back off and report state.
    if isinstance(device, ModbusTcpDevice):
        return AsyncModbusTcpClient(
            device.host, port=device.port, timeout=device.timeout, retries=device.retries,
            reconnect_delay=0, name=device.name,
        )
    assert isinstance(device, ModbusRtuDevice)
    return AsyncModbusSerialClient(
        device.serial, baudrate=device.baudrate, parity=device.parity, stopbits=device.stopbits,
        bytesize=device.bytesize, timeout=device.timeout, retries=device.retries,
        reconnect_delay=0, name=device.name,
    )


async def _diagnose_tcp(host: str, port: int, timeout_s: float) -> str:
    """Why a TCP connect failed, in a technician's words (pymodbus only logs it)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except asyncio.TimeoutError:
        return "connect timeout"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as exc:
        return exc.strerror.lower() if exc.strerror else str(exc)
    writer.close()
    return "connect failed"


class ModbusDriver(Driver):
    """Reads and writes one Modbus device over TCP or RTU."""

    device: ModbusDeviceBase

    def __init__(self, device: ModbusDeviceBase, **_options: Any) -> None:
        super().__init__(device)
        self.plan: list[Read] = plan_reads(device.tags, Limits.of(device))
        self.holes: list[Hole] = []
        self.requests = 0
        self._tags = {t.name: t for t in device.tags}
        self._decoders = {t.name: (t.register_count, codec.make_decoder(t)) for t in device.tags}
        self._backoff = Backoff(initial_s=min(1.0, device.poll), max_s=device.backoff_max)
        self._retry_at = 0.0
        self._link: _Link | None = None
        self._closed = False

    # ------------------------------------------------------------ connection

    def _get_link(self) -> _Link:
        if self._link is None:
            if isinstance(self.device, ModbusRtuDevice):
                key = self.device.serial
                link = _serial_links.get(key)
                if link is None:
                    link = _serial_links[key] = _Link(_new_client(self.device), key)
            else:
                link = _Link(_new_client(self.device), self.device.address)
            link.users += 1
            self._link = link
        return self._link

    async def _ensure_connected(self, link: _Link) -> bool:
        """Connect if needed and allowed by the backoff; False leaves ``last_error`` set."""
        if link.client.connected:
            return True
        if time.monotonic() < self._retry_at:
            return False
        ok = False
        try:
            ok = await asyncio.wait_for(link.client.connect(), self.device.timeout + 1.0)
        except (asyncio.TimeoutError, OSError, ModbusException):
            ok = False
        if ok:
            return True
        if isinstance(self.device, ModbusTcpDevice):
            reason = await _diagnose_tcp(self.device.host, self.device.port, self.device.timeout)
        elif not os.path.exists(self.device.serial):  # type: ignore[attr-defined]
            reason = f"no such serial port {self.device.serial}"  # type: ignore[attr-defined]
        else:
            reason = "cannot open serial port"
        self._fail(reason)
        return False

    def _fail(self, reason: str) -> None:
        """The link failed: back off before the next attempt."""
        delay = self._backoff.next_delay()
        self._retry_at = time.monotonic() + delay
        log.debug("retry later", extra=fields(device=self.device.name, err=reason, retry_in_s=round(delay, 2)))
        self._set_state(DeviceState.DOWN, reason)

    # ------------------------------------------------------------ requests

    async def _request(self, link: _Link, read: Read) -> list[int] | list[bool]:
        client = link.client
        call = {
            Table.COIL: client.read_coils,
            Table.DISCRETE: client.read_discrete_inputs,
            Table.HOLDING: client.read_holding_registers,
            Table.INPUT: client.read_input_registers,
        }[read.table]
        response = await self._call(call(read.start, count=read.count, device_id=self.device.unit))
        values = list(response.bits[: read.count]) if read.table.is_bits else list(response.registers)
        if len(values) < read.count:
            raise _Fault(f"short response: {len(values)} of {read.count} {'bits' if read.table.is_bits else 'registers'}")
        return values

    async def _call(self, request: Any) -> Any:
        """Await one pymodbus request; convert its failures into a _Fault (the one place we do)."""
        # pymodbus bounds each try by the timeout; this guards the whole call.
        guard_s = self.device.timeout * (self.device.retries + 1) + 1.0
        try:
            response = await asyncio.wait_for(request, guard_s)
        except (asyncio.TimeoutError, ModbusIOException) as exc:
            text = str(exc)
            if isinstance(exc, asyncio.TimeoutError) or "No response" in text:
                raise _Fault("timeout", lost=True) from exc
            raise _Fault(f"bad response: {text}", lost=True) from exc
        except ConnectionException as exc:
            raise _Fault("connection lost", lost=True) from exc
        except ModbusException as exc:
            raise _Fault(f"modbus error: {exc}", lost=True) from exc
        self.requests += 1
        if response.isError():
            code = getattr(response, "exception_code", None)
            raise _Fault(EXCEPTION_NAMES.get(code, f"exception {code}"), code=code)
        return response

    # ------------------------------------------------------------ reading

    async def read(self) -> list[Point]:
        """Read every tag once, following (and refining) the plan."""
        if self._closed:
            raise DriverError(f"{self.device.name}: driver is closed")
        link = self._get_link()
        async with link.lock:
            if not await self._ensure_connected(link):
                ts = now_ms()
                reason = self.last_error or "not connected"
                return [Point.bad(self.device.name, t.name, reason, ts) for t in self.device.tags]
            return await self._read_plan(link)

    async def _read_plan(self, link: _Link) -> list[Point]:
        points: list[Point] = []
        kept: list[Read] = []
        # (read, (split id, side)) — children of a refused read remember their parent.
        pending: list[tuple[Read, tuple[int, int] | None]] = [(r, None) for r in self.plan]
        splits: list[tuple[Read, Read]] = []
        succeeded: set[tuple[int, int]] = set()
        learned: list[Hole] = []
        lost: str | None = None
        while pending:
            read, parent = pending.pop(0)
            if lost is not None:
                kept.append(read)
                points += self._bad(read, lost)
                continue
            try:
                values = await self._request(link, read)
            except _Fault as fault:
                if fault.code == ILLEGAL_DATA_ADDRESS:
                    parts = split(read)
                    if len(parts) > 1:
                        log.info("splitting refused read", extra=fields(
                            device=self.device.name, read=str(read), into=" + ".join(map(str, parts))))
                        splits.append((parts[0], parts[1]))
                        n = len(splits) - 1
                        pending[0:0] = [(parts[0], (n, 0)), (parts[1], (n, 1))]
                        continue
                    learned.append((read.table, read.start, read.end))
                kept.append(read)
                points += self._bad(read, fault.reason)
                if fault.lost:
                    lost = fault.reason
                continue
            if parent is not None:
                succeeded.add(parent)
            kept.append(read)
            points += self._decode(read, values)
        # Both halves of a refused read worked: the hole is in the gap between them.
        for n, (left, right) in enumerate(splits):
            if (n, 0) in succeeded and (n, 1) in succeeded and right.start > left.end:
                learned.append((left.table, left.end, right.start))
        if learned:
            self.holes.extend(learned)
            self.plan = plan_reads(self.device.tags, Limits.of(self.device), self.holes)
            log.info("read plan adjusted around holes", extra=fields(
                device=self.device.name, holes=" ".join(f"{t} {s}..{e - 1}" for t, s, e in self.holes),
                requests=len(self.plan)))
        else:
            self.plan = kept
        if lost is not None:
            if isinstance(self.device, ModbusTcpDevice):
                # A TCP link that timed out may deliver a stale answer later:
                # start the next attempt on a fresh connection.
                link.client.close()
            self._fail(lost)
        else:
            self._backoff.reset()
            self.last_good_ms = now_ms()
            self._set_state(DeviceState.UP)
        return points

    def _bad(self, read: Read, reason: str) -> list[Point]:
        ts = now_ms()
        return [Point.bad(self.device.name, t.name, reason, ts) for t in read.tags]

    def _decode(self, read: Read, values: list[int] | list[bool]) -> list[Point]:
        ts = now_ms()
        device = self.device.name
        out = []
        if read.table.is_bits:
            for tag in read.tags:
                out.append(Point(device, tag.name, ts, bool(values[tag.address - read.start])))
            return out
        decoders = self._decoders
        for tag in read.tags:
            count, decode = decoders[tag.name]
            offset = tag.address - read.start
            out.append(Point(device, tag.name, ts, decode(values[offset: offset + count])))
        return out

    # ------------------------------------------------------------ writing

    async def write(self, tag: str, value: Any) -> None:
        """Encode ``value`` for the tag's type and order and write it (FC5, FC6 or FC16)."""
        spec: ModbusTag = self.writable_tag(tag)
        value = codec.coerce_write_value(spec, value)
        unit = self.device.unit
        link = self._get_link()
        async with link.lock:
            self._retry_at = 0.0  # an operator's write is worth an immediate attempt
            if not await self._ensure_connected(link):
                raise DriverError(f"{self.device.name}: cannot write {tag}: {self.last_error}")
            client = link.client
            try:
                if spec.table is Table.COIL:
                    await self._call(client.write_coil(spec.address, bool(value), device_id=unit))
                elif spec.bit is not None:
                    current = await self._call(client.read_holding_registers(spec.address, count=1, device_id=unit))
                    word = codec.set_bit(current.registers[0], spec.bit, bool(value))
                    await self._call(client.write_register(spec.address, word, device_id=unit))
                else:
                    registers = codec.encode(spec, value)
                    if len(registers) == 1:
                        await self._call(client.write_register(spec.address, registers[0], device_id=unit))
                    else:
                        await self._call(client.write_registers(spec.address, registers, device_id=unit))
            except _Fault as fault:
                if fault.lost:
                    self._fail(fault.reason)
                raise DriverError(f"{self.device.name}: cannot write {tag}: {fault.reason}") from fault
        log.info("tag written", extra=fields(device=self.device.name, tag=tag, value=value))

    # ------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.state = DeviceState.CLOSED
        link, self._link = self._link, None
        if link is not None:
            link.users -= 1
            if link.users <= 0:
                link.client.close()
                if _serial_links.get(link.key) is link:
                    del _serial_links[link.key]
