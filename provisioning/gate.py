"""The provisioning API's door: how many connections, from whom, and for how long.

uvicorn accepts every connection its file descriptors allow and waits as
long as a client likes: a TLS handshake that never ends (asyncio's default
deadline is 60 s), or request headers sent one byte now and then, which
uvicorn waits for without any deadline. Measured: 300 such connections
from one address against a server with 256 descriptors held 248 of them,
and ``agent provision`` from elsewhere got no answer within 15 s. So this
server accepts connections itself and hands them to uvicorn's protocol:

- at most ``per_source`` open connections per client address and
  ``max_connections`` in all; beyond, a connection is closed as soon as it
  is accepted, before any TLS work (one warning per address and minute);
- the TLS handshake must finish within ``handshake_timeout_s``;
- a request must arrive in full within ``request_timeout_s`` of the
  connection (or of the previous answer on a kept-alive connection); while
  the service works on it the clock does not run.

Gateways enrol and renew with one request per connection, so the defaults
(20 per address, 512 in all, 5 s, 10 s) leave room for a site behind one
NAT address enrolling many boxes at once; see docs/provisioning.md.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn

from factory_edge.logs import fields

log = logging.getLogger(__name__)

ACCEPT_RETRY_S = 0.1  # after EMFILE and the like: the descriptors of closing connections come back


@dataclass(frozen=True)
class ApiLimits:
    per_source: int = 20
    max_connections: int = 512
    handshake_timeout_s: float = 5.0
    request_timeout_s: float = 10.0


def _deadlined(base: type[Any], timeout_s: float) -> type[Any]:
    """uvicorn's h11 protocol, closing a connection whose request has not arrived in full within ``timeout_s``."""

    class Deadlined(base):
        release: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._deadline = self.loop.call_later(timeout_s, self._check)

        def _check(self) -> None:
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.DONE:  # a whole request, being answered: not the client's delay
                self._deadline = self.loop.call_later(timeout_s, self._check)
                return
            log.info("API connection closed: no complete request in time", extra=fields(timeout_s=timeout_s))
            self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._deadline.cancel()
            if not self.transport.is_closing():
                self._deadline = self.loop.call_later(timeout_s, self._check)

        def connection_lost(self, exc: Exception | None) -> None:
            self._deadline.cancel()
            try:
                super().connection_lost(exc)
            finally:
                if self.release is not None:
                    self.release()

    return Deadlined


class GatedServer(uvicorn.Server):
    """uvicorn's server, accepting on ``listener`` through the limits of ``ApiLimits``."""

    def __init__(self, config: uvicorn.Config, listener: socket.socket, limits: ApiLimits) -> None:
        super().__init__(config)
        self.listener = listener
        self.limits = limits
        self.open: Counter[str] = Counter()
        self._warned: dict[str, float] = {}
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifespan.startup()
        config = self.config
        protocol_class = _deadlined(config.http_protocol_class, self.limits.request_timeout_s)
        loop = asyncio.get_running_loop()

        def create_protocol(release: Any) -> asyncio.Protocol:
            protocol = protocol_class(
                config=config, server_state=self.server_state, app_state=self.lifespan.state, _loop=loop
            )
            protocol.release = release
            return protocol

        self.servers = []
        self.listener.setblocking(False)
        self._accepting = loop.create_task(self._accept(create_protocol), name="api-accept")
        self.started = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        for task in list(self._handshakes):
            task.cancel()
        self.listener.close()
        await super().shutdown(sockets)

    async def _accept(self, create_protocol: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self.listener)
            except OSError as exc:  # out of descriptors: the listener's backlog waits for closing ones
                log.warning("API cannot accept a connection", extra=fields(err=str(exc), retry_in_s=ACCEPT_RETRY_S))
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            source = str(addr[0])
            if self.open[source] >= self.limits.per_source or sum(self.open.values()) >= self.limits.max_connections:
                conn.close()
                self._refused(source)
                continue
            self.open[source] += 1
            task = loop.create_task(self._open(conn, source, create_protocol), name=f"api-handshake[{source}]")
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _open(self, conn: socket.socket, source: str, create_protocol: Any) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.open[source] -= 1
                if self.open[source] <= 0:
                    del self.open[source]

        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: create_protocol(release),
                conn,
                ssl=self.config.ssl,
                ssl_handshake_timeout=self.limits.handshake_timeout_s,
            )
        except (OSError, ssl.SSLError, TimeoutError, asyncio.CancelledError) as exc:
            conn.close()
            release()
            if isinstance(exc, asyncio.CancelledError):
                raise

    def _refused(self, source: str) -> None:
        now = time.monotonic()
        if len(self._warned) > 10_000:  # many addresses: forget the old warnings
            self._warned = {k: t for k, t in self._warned.items() if now - t < 60.0}
        if now - self._warned.get(source, -3600.0) >= 60.0:
            self._warned[source] = now
            log.warning(
                "API connection refused: too many open connections",
                extra=fields(
                    source=source,
                    open_from_source=self.open[source],
                    open=sum(self.open.values()),
                    per_source=self.limits.per_source,
                    max_connections=self.limits.max_connections,
                ),
            )


__all__ = ["ApiLimits", "GatedServer"]
