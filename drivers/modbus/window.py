"""Slots for Modbus transactions on the wire, granted first come first served.

``TcpClient`` keeps at most ``size`` requests outstanding on a connection;
the rest wait here in the order they were made. ``alone`` waits until
nothing else is outstanding and keeps others out until it leaves: how a
request is sent again to see whether the device answers it when it is the
only one.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Window:
    """At most ``size`` holders at once, or one holder ``alone``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.busy = 0
        self.exclusive = False
        self._waiters: deque[tuple[bool, asyncio.Future[None]]] = deque()

    def _fits(self, alone: bool) -> bool:
        if alone:
            return self.busy == 0
        return not self.exclusive and self.busy < self.size

    def _take(self, alone: bool) -> None:
        self.busy += 1
        self.exclusive = alone

    async def enter(self, alone: bool) -> None:
        if not self._waiters and self._fits(alone):
            self._take(alone)
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (alone, granted)
        self._waiters.append(waiter)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.leave(alone)  # granted just as the caller was cancelled
            else:
                if waiter in self._waiters:  # else _wake already passed it over
                    self._waiters.remove(waiter)
                self._wake()
            raise

    def leave(self, alone: bool) -> None:
        self.busy -= 1
        if alone:
            self.exclusive = False
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            alone, granted = self._waiters.popleft()
            if granted.done():  # its caller was cancelled before it could be woken: the slot goes to the next
                continue
            self._take(alone)
            granted.set_result(None)
