"""What every driver offers the agent: read once, run on a schedule, write a tag.

A driver owns one device's connection. Machine faults never raise out of
``read()``: they come back as ``bad`` points carrying the reason, so the
agent stores and publishes them like any other reading. ``run()`` is the
device's own task (``poll[press-1]``); a slow or dead device only ever
delays itself.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

from factory_edge.errors import WriteRefused
from factory_edge.logs import fields

from .configtypes import DeviceBase
from .points import Point

log = logging.getLogger(__name__)

Emit = Callable[[list[Point]], Awaitable[None]]


class DeviceState(enum.StrEnum):
    """Connection state of a device, shown as-is in ``agent status``."""

    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"
    CLOSED = "closed"


class Driver(abc.ABC):
    """One device. Use as ``async with open_driver(device) as driver:``."""

    def __init__(self, device: DeviceBase) -> None:
        self.device = device
        self.state = DeviceState.CONNECTING
        self.last_error: str | None = None
        self.last_good_ms: int | None = None
        self._stopping = asyncio.Event()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def read(self) -> list[Point]:
        """Read every tag once; faults become ``bad`` points, never exceptions."""

    @abc.abstractmethod
    async def write(self, tag: str, value: Any) -> None:
        """Write a tag marked writable; raises WriteRefused or DriverError."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection; the driver is done."""

    def stop(self) -> bool:
        """Have ``run()`` return once the read under way is emitted: the machine has served that reading.

        False if this driver cannot finish that way (its ``run()`` is to be cancelled).
        """
        self._stopping.set()
        return True

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def pause(self, delay_s: float) -> None:
        """Sleep ``delay_s``, or less if ``stop()`` is called meanwhile."""
        if delay_s <= 0 or self._stopping.is_set():
            await asyncio.sleep(0)
            return
        try:
            async with asyncio.timeout(delay_s):
                await self._stopping.wait()
        except TimeoutError:
            pass

    async def run(self, emit: Emit) -> None:
        """Poll on the device's own fixed-rate schedule until cancelled, or until ``stop()``."""
        loop = asyncio.get_running_loop()
        period = self.device.poll
        next_at = loop.time()
        while not self._stopping.is_set():
            points = await self.read()
            await emit(points)
            next_at += period
            now = loop.time()
            if next_at < now:
                missed = int((now - next_at) // period) + 1
                log.debug("poll overran", extra=fields(device=self.device.name, missed=missed))
                next_at += missed * period
            await self.pause(next_at - now)

    def writable_tag(self, name: str) -> Any:
        """The tag called ``name`` if it may be written; WriteRefused says why not."""
        tag = next((t for t in self.device.tags if t.name == name), None)
        if tag is None:
            raise WriteRefused(f"{self.device.name}: no tag named {name!r}")
        if not tag.writable:
            raise WriteRefused(f"{self.device.name}.{name} is not writable (mark it writable: true in the config)")
        return tag

    def _set_state(self, state: DeviceState, error: str | None = None) -> None:
        """Record a state change and log transitions (not every failed poll)."""
        if state is not self.state:
            if state is DeviceState.UP:
                log.info("device up", extra=fields(device=self.device.name, address=self.device.address))
            elif state is DeviceState.DOWN:
                log.warning(
                    "device down", extra=fields(device=self.device.name, address=self.device.address, err=error)
                )
            self.state = state
        if error is not None:
            self.last_error = error


def open_driver(device: DeviceBase, **options: Any) -> Driver:
    """The driver for a configured device (``protocol`` picks it)."""
    protocol = getattr(device, "protocol", None)
    if protocol in ("modbus-tcp", "modbus-rtu"):
        from .modbus.driver import ModbusDriver

        return ModbusDriver(device, **options)  # type: ignore[arg-type]
    if protocol == "opcua":
        from .opcua.driver import OpcuaDriver

        return OpcuaDriver(device, **options)  # type: ignore[arg-type]
    raise ValueError(f"no driver for protocol {protocol!r}")
