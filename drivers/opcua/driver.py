"""The OPC UA driver: read every tag in one request, or subscribe to their changes.

::

    async with OpcuaDriver(device) as driver:
        points = await driver.read()            # one Read request for all tags
        await driver.write("setpoint", 180.0)   # tags marked writable only
        await driver.run(emit)                  # poll or subscribe (device.mode) until cancelled

The driver holds at most one session. It connects on first use; when the
server goes away it marks the device down, reports ``bad`` points saying
``connection lost``, and opens a new session with exponential backoff
(``backoff_max``), closing the old one first. In subscribe mode the new
session gets a new subscription and monitored items; browse paths are
resolved again, since a restarted server may number its nodes anew.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from asyncua import ua

from factory_edge.backoff import Backoff
from factory_edge.errors import DriverError, WriteRefused
from factory_edge.logs import fields

from ..base import DeviceState, Driver, Emit
from ..configtypes import OpcuaDevice
from ..points import Point, now_ms
from .connection import Session, client_certificate, close_session, open_session
from .monitor import Monitor
from .security import CertificateFiles, default_state_dir
from .values import coerce_for_write, point_from_datavalue

log = logging.getLogger(__name__)

CONNECTION_LOST = "connection lost"
_SESSION_GONE = frozenset(
    {
        CONNECTION_LOST,
        "BadSessionIdInvalid",
        "BadSessionClosed",
        "BadSessionNotActivated",
        "BadSecureChannelIdInvalid",
        "BadSecureChannelClosed",
        "BadConnectionClosed",
        "BadNotConnected",
        "BadServerHalted",
        "BadShutdown",
        "BadCommunicationError",
    }
)
"""Failures after which the session cannot be used again, even if the socket still looks open."""


class _Waiting(DriverError):
    """No session, and the next attempt is not due yet; the message is the last failure."""


class OpcuaDriver(Driver):
    """One OPC UA server (``protocol: opcua``).

    ``state_dir`` keeps the client certificate generated for secure
    endpoints, ``opcua-client-cert.pem`` and ``opcua-client-key.pem``
    (default ``~/.local/state/factory-edge/opcua``).
    """

    device: OpcuaDevice

    def __init__(self, device: OpcuaDevice, *, state_dir: Path | None = None) -> None:
        super().__init__(device)
        self.state_dir = state_dir if state_dir is not None else default_state_dir()
        self.sessions_opened = 0
        """Sessions this driver has opened so far (one per successful connect)."""
        self._tags = {tag.name: tag for tag in device.tags}
        self._session: Session | None = None
        self._monitor: Monitor | None = None
        self._certificate: CertificateFiles | None = None
        # Held while opening or closing a session: one attempt at a time, and a
        # new session only once the old one is closed.
        self._lock = asyncio.Lock()
        self._backoff = Backoff(max_s=device.backoff_max)
        self._retry_at = 0.0
        self._closing = asyncio.Event()

    async def read(self) -> list[Point]:
        """Read the Value of every tag in one Read request; faults become bad points."""
        try:
            session = await self._connected()
        except DriverError as exc:
            return self._bad_points(str(exc))
        if session.read_all is None:
            session.read_all = session.read_parameters([name for name in self._tags if name in session.nodes])
        values: list[ua.DataValue] = []
        if session.read_all.NodesToRead:
            try:
                values = await session.read(session.read_all)
            except DriverError as exc:
                if not await self._drop_if_gone(session, str(exc)):
                    self._set_state(DeviceState.DOWN, str(exc))
                return self._bad_points(str(exc))
        now = now_ms()
        by_node = iter(values)
        points = []
        for name in self._tags:
            if name in session.nodes:
                points.append(point_from_datavalue(self.device.name, name, next(by_node), default_ms=now))
            else:
                points.append(Point.bad(self.device.name, name, session.unresolved.get(name, "not resolved"), now))
        self._backoff.reset()
        self.last_good_ms = now
        self._set_state(DeviceState.UP)
        return points

    def stop(self) -> bool:
        """Poll mode finishes the read under way; a subscription has none (its ``run()`` is cancelled)."""
        return self.device.mode == "poll" and super().stop()

    async def run(self, emit: Emit) -> None:
        """Poll at ``device.poll`` (``mode: poll``), or stream a subscription's changes (``mode: subscribe``).

        Poll mode runs until cancelled or stopped, like ``Driver.run``;
        subscribe mode also returns when ``close()`` is called.
        """
        if self.device.mode == "poll":
            await super().run(emit)
            return
        reported = False  # bad points go out once per outage, not once per attempt
        while not self._closing.is_set():
            try:
                session = await self._connected()
            except _Waiting:
                await self._pause(self._retry_at - asyncio.get_running_loop().time())
                continue
            except DriverError as exc:
                if not reported and not self._closing.is_set():
                    await emit(self._bad_points(str(exc)))
                    reported = True
                continue
            reason = await self._stream(session, emit)
            if self._closing.is_set():
                return
            was_up = self.state is DeviceState.UP
            reported = reported and not was_up
            log.warning("subscription lost", extra=fields(device=self.device.name, err=reason))
            await self._drop_if_gone(session, CONNECTION_LOST)
            if not reported:
                await emit(self._bad_points(CONNECTION_LOST if was_up else reason))
                reported = True

    async def write(self, tag: str, value: Any) -> None:
        """Write a tag marked ``writable``, converted to the type of the value the node holds."""
        self.writable_tag(tag)
        session: Session | None = None
        try:
            session = await self._connected()
            if tag not in session.nodes:
                raise DriverError(session.unresolved.get(tag, "not resolved"))
            variant_type = await session.variant_type(tag)
            if variant_type is None:
                raise DriverError("the node holds no value to take its type from")
            try:
                coerced = coerce_for_write(value, variant_type)
            except ValueError as exc:
                raise WriteRefused(f"{self.device.name}: {tag}: {exc}") from None
            status = await session.write(tag, ua.Variant(coerced, variant_type))
        except WriteRefused:
            raise
        except DriverError as exc:
            if session is not None:
                await self._drop_if_gone(session, str(exc))
            raise DriverError(f"{self.device.name}: write {tag}: {exc}") from exc
        if not status.is_good():
            raise DriverError(f"{self.device.name}: write {tag}: {status.name}")
        log.info("tag written", extra=fields(device=self.device.name, tag=tag, value=coerced))

    async def close(self) -> None:
        """Close the session (deleting its subscription on the server); a running ``run()`` returns."""
        self._closing.set()
        if self._monitor is not None:
            self._monitor.interrupt("closed")
        async with self._lock:
            session, self._session = self._session, None
            if session is not None:
                await close_session(session, timeout_s=self.device.timeout)
        self._set_state(DeviceState.CLOSED)

    # ------------------------------------------------------------ internals

    async def _connected(self) -> Session:
        """The live session, opening one if it is due; ``DriverError`` says why there is none."""
        session = self._session
        if session is not None:
            if session.alive:
                return session
            await self._drop_if_gone(session, CONNECTION_LOST)
        async with self._lock:
            if self._closing.is_set():
                raise DriverError("driver closed")
            if self._session is not None:
                return self._session
            if asyncio.get_running_loop().time() < self._retry_at:
                raise _Waiting(self.last_error or CONNECTION_LOST)
            try:
                if self.device.security.policy != "None" and self._certificate is None:
                    self._certificate = await asyncio.to_thread(client_certificate, self.device, self.state_dir)
                session = await open_session(self.device, self._certificate)
            except DriverError as exc:
                self._retry_at = asyncio.get_running_loop().time() + self._backoff.next_delay()
                self._set_state(DeviceState.DOWN, str(exc))
                raise
            if self._closing.is_set():
                await close_session(session, timeout_s=self.device.timeout)
                raise DriverError("driver closed")
            self._session = session
            self.sessions_opened += 1
        log.info(
            "session opened",
            extra=fields(
                device=self.device.name,
                endpoint=self.device.endpoint,
                security=self.device.security.mode,
                unresolved=len(session.unresolved),
            ),
        )
        return session

    async def _drop_if_gone(self, session: Session, reason: str) -> bool:
        """After a failed request: if the session cannot serve again, mark the device down and close it."""
        if reason not in _SESSION_GONE and session.alive:
            return False
        if self._session is session:
            self._session = None
            self._retry_at = asyncio.get_running_loop().time() + self._backoff.next_delay()
            self._set_state(DeviceState.DOWN, CONNECTION_LOST)
            async with self._lock:
                await close_session(session, timeout_s=self.device.timeout)
        return True

    async def _stream(self, session: Session, emit: Emit) -> str:
        """Emit the subscription's points until the session fails; returns why it did."""
        monitor = self._monitor = Monitor(self.device, session)
        try:
            try:
                bad = await monitor.start()
            except DriverError as exc:
                return str(exc)
            self._backoff.reset()
            self._set_state(DeviceState.UP)
            if bad:
                await emit(bad)
            while True:
                try:
                    batch = await monitor.next_batch()
                except DriverError as exc:
                    return str(exc)
                if batch:
                    self.last_good_ms = now_ms()
                    await emit(batch)
        finally:
            self._monitor = None

    async def _pause(self, delay_s: float) -> None:
        """Sleep until the next attempt is due, or until the driver closes."""
        try:
            async with asyncio.timeout(max(delay_s, 0.0)):
                await self._closing.wait()
        except TimeoutError:
            pass

    def _bad_points(self, reason: str) -> list[Point]:
        now = now_ms()
        return [Point.bad(self.device.name, name, reason, now) for name in self._tags]
