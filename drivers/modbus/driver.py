"""Modbus TCP and RTU driver (pymodbus, asyncio).

One driver per configured device. Reads follow the coalesced plan
(``plan.py``); a merged read refused with "illegal data address" is split
and the split plan kept. Every fault ends up as ``bad`` points with the
reason; a device that stops answering is retried with exponential backoff
and jitter, and polls in between return at once, so a dead device costs its
own schedule nothing and other devices nothing at all.

A poll's requests go out together, up to the device's
``max_concurrent_requests`` at once on its TCP connection (``transport.py``
matches the answers by transaction id); on a serial line they go one at a
time, and devices on one RS-485 line (same serial port) share one port and
take turns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from pymodbus.client import AsyncModbusSerialClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from factory_edge.backoff import Backoff
from factory_edge.errors import DriverError
from factory_edge.logs import fields

from ..base import DeviceState, Driver
from ..configtypes import ModbusDeviceBase, ModbusRtuDevice, ModbusTag, ModbusTcpDevice, Table
from ..points import Point, now_ms
from . import codec, noise
from .plan import Hole, Limits, Read, plan_reads, split
from .transport import TcpClient, TransactionTimeout

log = logging.getLogger(__name__)
noise.install()

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


class _LinkLost(Exception):
    """A poll's read found the link dead: the poll's other reads stop."""


@dataclass
class _Poll:
    """What one poll learns on the way: holes in the map, and whether the link died."""

    holes: list[Hole] = field(default_factory=list)
    lost: str | None = None


Outcome = tuple[Read, "list[int] | list[bool] | _Fault"]


class _Link:
    """A connection (our TCP client, or pymodbus' serial client) and the lock that gives a poll or a write the whole of it."""

    def __init__(self, client: TcpClient | AsyncModbusSerialClient, key: str) -> None:
        self.client = client
        self.key = key
        self.lock = asyncio.Lock()
        self.users = 0


# RS-485 multi-drop: every device on a serial port shares its _Link.
_serial_links: dict[str, _Link] = {}


def _new_client(device: ModbusDeviceBase) -> TcpClient | AsyncModbusSerialClient:
    if isinstance(device, ModbusTcpDevice):
        return TcpClient(
            device.host,
            device.port,
            timeout_s=device.timeout,
            retries=device.retries,
            window=device.max_concurrent_requests,
            name=device.name,
        )
    assert isinstance(device, ModbusRtuDevice)
    # reconnect_delay=0: pymodbus must not reconnect on its own; the driver
    # owns reconnects so it can back off and report state.
    return AsyncModbusSerialClient(
        device.serial,
        baudrate=device.baudrate,
        parity=device.parity,
        stopbits=device.stopbits,
        bytesize=device.bytesize,
        timeout=device.timeout,
        retries=device.retries,
        reconnect_delay=0,
        name=device.name,
    )


def _connect_failure(exc: Exception) -> str:
    """Why a TCP connect failed, in a technician's words."""
    if isinstance(exc, TimeoutError):
        return "connect timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or "connect failed"


class ModbusDriver(Driver):
    """Reads and writes one Modbus device over TCP or RTU."""

    device: ModbusDeviceBase

    def __init__(self, device: ModbusDeviceBase, **_options: Any) -> None:
        super().__init__(device)
        self.plan: list[Read] = plan_reads(device.tags, Limits.of(device))
        self.holes: list[Hole] = []
        self.requests = 0
        self._tags = {t.name: t for t in device.tags}
        # Per tag: (name, registers, decoder), the decoder None when the register is the value.
        self._decoders = {
            t.name: (t.name, t.register_count, None if codec.is_plain_word(t) else codec.make_decoder(t))
            for t in device.tags
        }
        self._programs: dict[int, tuple[Read, list[tuple[str, int, int, codec.Decoder | None]]]] = {}
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
        client = link.client
        if isinstance(client, TcpClient):
            try:
                await client.connect()
                return True
            except (TimeoutError, OSError) as exc:
                self._fail(_connect_failure(exc))
                return False
        ok = False
        try:
            async with asyncio.timeout(self.device.timeout + 1.0):
                ok = await client.connect()
        except (TimeoutError, OSError, ModbusException):
            ok = False
        if ok:
            return True
        if not os.path.exists(self.device.serial):  # type: ignore[attr-defined]
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
        response = await self._call(call(read.start, count=read.count, device_id=self.device.unit), link)
        values = list(response.bits[: read.count]) if read.table.is_bits else list(response.registers)
        if len(values) < read.count:
            raise _Fault(
                f"short response: {len(values)} of {read.count} {'bits' if read.table.is_bits else 'registers'}"
            )
        return values

    async def _call(self, request: Awaitable[ModbusPDU], link: _Link) -> Any:
        """Await one request; convert its failures into a _Fault (the one place we do)."""
        try:
            if isinstance(link.client, TcpClient):
                # Bounded per try by the client; a request may also wait its
                # turn behind others, so no overall guard here.
                response = await request
            else:
                # pymodbus bounds each try by the timeout; this guards the whole call.
                async with asyncio.timeout(self.device.timeout * (self.device.retries + 1) + 1.0):
                    response = await request
        except TransactionTimeout as exc:
            # The device answered other requests meanwhile: only this one failed.
            raise _Fault("timeout", lost=not exc.link_alive) from exc
        except (TimeoutError, ModbusIOException) as exc:
            text = str(exc).removeprefix("Modbus Error: ").removeprefix("[Input/Output] ")
            if isinstance(exc, TimeoutError) or "No response" in text:
                raise _Fault("timeout", lost=True) from exc
            raise _Fault(f"bad response: {text}", lost=True) from exc
        except ConnectionException as exc:
            raise _Fault("connection lost", lost=True) from exc
        except ModbusException as exc:
            raise _Fault(f"modbus error: {exc}", lost=True) from exc
        self.requests += 1
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
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
        poll = _Poll()
        results: list[list[Outcome] | None] = [None] * len(self.plan)

        async def fetch(i: int, read: Read) -> None:
            results[i] = (await self._fetch(link, read, poll))[0]

        try:
            if isinstance(link.client, TcpClient):
                # All at once: the client keeps max_concurrent_requests on the
                # wire and the rest wait their turn, in plan order.
                async with asyncio.TaskGroup() as group:
                    for i, read in enumerate(self.plan):
                        group.create_task(fetch(i, read), name=f"read[{self.device.name}]")
            else:
                for i, read in enumerate(self.plan):
                    await fetch(i, read)
        except* _LinkLost:
            pass
        points: list[Point] = []
        kept: list[Read] = []
        for read, outcomes in zip(self.plan, results, strict=True):
            if outcomes is None:  # not read: the link died first
                outcomes = [(read, _Fault(poll.lost or "connection lost", lost=True))]
            for part, outcome in outcomes:
                kept.append(part)
                points += (
                    self._bad(part, outcome.reason) if isinstance(outcome, _Fault) else self._decode(part, outcome)
                )
        if poll.holes:
            self.holes.extend(poll.holes)
            self.plan = plan_reads(self.device.tags, Limits.of(self.device), self.holes)
            log.info(
                "read plan adjusted around holes",
                extra=fields(
                    device=self.device.name,
                    holes=" ".join(f"{t} {s}..{e - 1}" for t, s, e in self.holes),
                    requests=len(self.plan),
                ),
            )
        else:
            self.plan = kept
        if poll.lost is not None:
            if isinstance(link.client, TcpClient):
                # Start the next attempt on a fresh connection.
                link.client.close()
            self._fail(poll.lost)
        else:
            if isinstance(link.client, TcpClient) and link.client.stale:
                # The device ignored requests it may still hold: start clean.
                link.client.close()
            self._backoff.reset()
            self.last_good_ms = now_ms()
            self._set_state(DeviceState.UP)
        return points

    async def _fetch(self, link: _Link, read: Read, poll: _Poll) -> tuple[list[Outcome], bool]:
        """One planned read, split while the device refuses it; True if it worked as one request."""
        try:
            return [(read, await self._request(link, read))], True
        except _Fault as fault:
            if fault.lost:
                if poll.lost is None:
                    poll.lost = fault.reason
                raise _LinkLost from fault
            if fault.code != ILLEGAL_DATA_ADDRESS:
                return [(read, fault)], False
            parts = split(read)
            if len(parts) == 1:
                poll.holes.append((read.table, read.start, read.end))
                return [(read, fault)], False
        log.info(
            "splitting refused read",
            extra=fields(device=self.device.name, read=str(read), into=" + ".join(map(str, parts))),
        )
        left, right = parts
        if isinstance(link.client, TcpClient):
            async with asyncio.TaskGroup() as group:
                left_task = group.create_task(self._fetch(link, left, poll), name=f"read[{self.device.name}]")
                right_task = group.create_task(self._fetch(link, right, poll), name=f"read[{self.device.name}]")
            (left_out, left_ok), (right_out, right_ok) = left_task.result(), right_task.result()
        else:
            left_out, left_ok = await self._fetch(link, left, poll)
            right_out, right_ok = await self._fetch(link, right, poll)
        # Both halves worked: the hole is in the gap between them.
        if left_ok and right_ok and right.start > left.end:
            poll.holes.append((left.table, left.end, right.start))
        return left_out + right_out, False

    def _bad(self, read: Read, reason: str) -> list[Point]:
        ts = now_ms()
        return [Point.bad(self.device.name, t.name, reason, ts) for t in read.tags]

    def _program(self, read: Read) -> list[tuple[str, int, int, codec.Decoder | None]]:
        """How to decode a read's answer: (tag name, offset, registers, decoder) per tag, built once per read."""
        cached = self._programs.get(id(read))
        if cached is not None and cached[0] is read:
            return cached[1]
        if len(self._programs) > 2 * len(self.plan) + 16:
            self._programs.clear()  # reads of an older plan
        program = [
            (name, tag.address - read.start, count, decode)
            for tag in read.tags
            for name, count, decode in (self._decoders[tag.name],)
        ]
        self._programs[id(read)] = (read, program)
        return program

    def _decode(self, read: Read, values: list[int] | list[bool]) -> list[Point]:
        ts = now_ms()
        device = self.device.name
        program = self._program(read)
        if read.table.is_bits:
            return [Point(device, name, ts, bool(values[offset])) for name, offset, _, _ in program]
        return [
            Point(device, name, ts, values[offset] if decode is None else decode(values[offset : offset + count]))
            for name, offset, count, decode in program
        ]

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
                    await self._call(client.write_coil(spec.address, bool(value), device_id=unit), link)
                elif spec.bit is not None:
                    current = await self._call(
                        client.read_holding_registers(spec.address, count=1, device_id=unit), link
                    )
                    word = codec.set_bit(current.registers[0], spec.bit, bool(value))
                    await self._call(client.write_register(spec.address, word, device_id=unit), link)
                else:
                    registers = codec.encode(spec, value)
                    if len(registers) == 1:
                        await self._call(client.write_register(spec.address, registers[0], device_id=unit), link)
                    else:
                        await self._call(client.write_registers(spec.address, registers, device_id=unit), link)
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
