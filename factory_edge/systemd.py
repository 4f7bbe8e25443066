"""systemd service notifications (``Type=notify``): READY, WATCHDOG, STATUS, STOPPING.

A datagram to ``$NOTIFY_SOCKET`` as in sd_notify(3); without that variable
(not under systemd) every call does nothing. ``watchdog_interval_s`` is half
of ``WatchdogSec=`` (``$WATCHDOG_USEC``), the pace systemd recommends.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if address.startswith("@"):
            self._address = "\0" + address[1:]  # abstract socket namespace
        elif address.startswith("/"):
            self._address = address
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval_s: float | None = None
        if watchdog_usec.isdigit() and (not watchdog_pid or watchdog_pid == str(os.getpid())):
            self.watchdog_interval_s = int(watchdog_usec) / 1_000_000 / 2

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str) -> None:
        if self._address is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # Never wait on the supervisor: a datagram socket whose reader lags
            # (its queue holds ~10 messages) would block the event loop here.
            sock.setblocking(False)
            try:
                sock.sendto("\n".join(fields).encode(), self._address)
            except OSError:
                pass  # systemd went away (shutdown) or is not reading: nothing to tell

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")


async def follow_server(server: Any, ready: str) -> None:
    """READY (saying ``ready``) once a uvicorn ``server`` listens, the watchdog while it serves, STOPPING as it
    shuts down.

    uvicorn ends the process by re-raising SIGTERM after its shutdown, so
    STOPPING is sent when it starts to exit, not from a ``finally``.
    """
    systemd = Notifier()
    if not systemd.enabled:
        return
    while not server.started:
        await asyncio.sleep(0.05)
    systemd.ready(ready)
    loop = asyncio.get_running_loop()
    fed = 0.0
    while not server.should_exit:
        if systemd.watchdog_interval_s and loop.time() - fed >= systemd.watchdog_interval_s:
            systemd.watchdog()
            fed = loop.time()
        await asyncio.sleep(0.1)
    systemd.stopping()
