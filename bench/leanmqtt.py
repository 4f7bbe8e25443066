"""A lean MQTT v5 client over TLS for connection-scale benchmarks: many gateways per process.

A gateway here is one ``asyncio.Protocol`` on one TLS connection, with no
task of its own: CONNECT, PINGREQ at half the keepalive until the benchmark
says ``beat``, then one QoS 1 heartbeat batch per period from a timer, counting CONNACKs, PUBACKs and failures into a shared-memory row of
the worker process (``Counters``) that the benchmark reads without
stopping anyone. Only the packets the benchmark needs are encoded:
CONNECT (clean start, no session kept), PUBLISH QoS 0/1, PUBACK, SUBSCRIBE,
PINGREQ, DISCONNECT; everything else received is skipped by length.

Each gateway presents its own certificate (CN = gateway id; the broker makes
it the username and the client id) with SNI ``mqtt.<tenant>.<domain>`` and
checks the broker's certificate against that name, as the agent does.

``run_worker`` is a worker process's body: it loads its gateways' TLS
contexts, waits for ``go``, connects them at most ``parallel`` at a time
from their assigned loopback source addresses, starts their heartbeats on
``beat`` (so the CPU measured while connecting is the connections' own),
and keeps them heartbeating until ``stop``.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from typing import Any

KEEPALIVE_S = 30  # the agent's; heartbeats keep the connection busy well within it

# Counter slots of one worker's row.
CONNECTED, FAILED, CLOSED, SENT, ACKED, FIRST_OK_NS, LAST_OK_NS, HANDSHAKE_NS = range(8)
SLOTS = 8


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s: str) -> bytes:
    raw = s.encode()
    return len(raw).to_bytes(2, "big") + raw


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect_packet(client_id: str, *, keepalive_s: int = KEEPALIVE_S) -> bytes:
    """MQTT v5 CONNECT: clean start, no will, no credentials (the certificate is the identity)."""
    return packet(0x10, utf8("MQTT") + bytes([5, 0x02]) + keepalive_s.to_bytes(2, "big") + varint(0) + utf8(client_id))


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    """PUBLISH at QoS 1, no properties."""
    return packet(0x32, utf8(topic) + packet_id.to_bytes(2, "big") + varint(0) + payload)


def subscribe_packet(topic_filter: str, packet_id: int = 1, qos: int = 0) -> bytes:
    return packet(0x82, packet_id.to_bytes(2, "big") + varint(0) + utf8(topic_filter) + bytes([qos]))


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


class Packets:
    """Splits a byte stream into ``(first byte, body)`` MQTT packets."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buf += data
        out: list[tuple[int, bytes]] = []
        while len(self.buf) >= 2:
            length, shift, i = 0, 0, 1
            while True:
                if i >= len(self.buf):
                    return out
                byte = self.buf[i]
                length |= (byte & 0x7F) << shift
                shift += 7
                i += 1
                if not byte & 0x80:
                    break
            if len(self.buf) < i + length:
                return out
            out.append((self.buf[0], bytes(self.buf[i : i + length])))
            del self.buf[: i + length]
        return out


@dataclass(frozen=True)
class GatewaySpec:
    """One simulated gateway: its identity files, the name it dials and the address it dials."""

    gateway: str
    sni: str
    ca_file: str
    cert_file: str
    key_file: str
    host: str
    port: int
    source: str  # local address to connect from (the proxy limits connections per source address)


def tls_context(spec: GatewaySpec) -> ssl.SSLContext:
    """Verify the broker against the tenant CA and the SNI name; present the gateway's certificate."""
    ctx = ssl.create_default_context(cafile=spec.ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(spec.cert_file, spec.key_file)
    return ctx


class Gateway(asyncio.Protocol):
    """One connection: CONNECT, pings until ``start_beats``, then a QoS 1 heartbeat every ``period_s``."""

    def __init__(self, spec: GatewaySpec, counters: Any, period_s: float, connected: asyncio.Future[bool]) -> None:
        self.spec = spec
        self.counters = counters
        self.period_s = period_s
        self.connected = connected
        self.transport: asyncio.Transport | None = None
        self.packets = Packets()
        self.seq = 0
        self.topic = f"gw/{spec.gateway}/data/heartbeat"
        self.timer: asyncio.TimerHandle | None = None
        self.next_at = 0.0
        self.up = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(connect_packet(self.spec.gateway))

    def data_received(self, data: bytes) -> None:
        for first, body in self.packets.feed(data):
            kind = first >> 4
            if kind == 2:  # CONNACK: flags, reason code
                if len(body) >= 2 and body[1] == 0:
                    self.up = True
                    if not self.connected.done():
                        self.connected.set_result(True)
                    self.timer = asyncio.get_running_loop().call_later(KEEPALIVE_S / 2, self.ping)
                else:
                    reason = body[1] if len(body) >= 2 else -1
                    if not self.connected.done():
                        self.connected.set_exception(ConnectionError(f"CONNACK reason {reason:#x}"))
            elif kind == 4:  # PUBACK
                self.counters[ACKED] += 1
            elif kind == 14:  # DISCONNECT from the server
                if self.transport:
                    self.transport.close()

    def ping(self) -> None:
        if self.transport and not self.transport.is_closing():
            self.transport.write(PINGREQ)
            self.timer = asyncio.get_running_loop().call_later(KEEPALIVE_S / 2, self.ping)

    def start_beats(self) -> None:
        if self.timer:
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        # Spread the heartbeats over the period, as independent gateways would be; then a fixed
        # schedule (not "period after the last one"), so a busy loop does not slow the rate.
        self.next_at = loop.time() + random.uniform(0, self.period_s)
        self.timer = loop.call_at(self.next_at, self.beat)

    def beat(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.seq += 1
        now_ms = int(time.time() * 1000)
        payload = json.dumps(
            {
                "v": 1,
                "gw": self.spec.gateway,
                "dev": "heartbeat",
                "seq": self.seq,
                "points": [{"tag": "alive", "ts": now_ms, "v": 1, "q": "good"}],
            },
            separators=(",", ":"),
        ).encode()
        self.transport.write(publish_packet(self.topic, payload, self.seq % 65535 + 1))
        self.counters[SENT] += 1
        self.next_at += self.period_s
        self.timer = asyncio.get_running_loop().call_at(self.next_at, self.beat)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer:
            self.timer.cancel()
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("closed before CONNACK"))
        elif self.up:
            self.counters[CLOSED] += 1
        self.transport = None

    def close(self) -> None:
        if self.timer:
            self.timer.cancel()
        if self.transport and not self.transport.is_closing():
            self.transport.write(DISCONNECT)
            self.transport.close()


class Subscriber(asyncio.Protocol):
    """Counts every PUBLISH received on one subscription (QoS 0): the messages the broker delivered."""

    def __init__(self, client_id: str, topic_filter: str, ready: asyncio.Future[bool]) -> None:
        self.client_id = client_id
        self.topic_filter = topic_filter
        self.ready = ready
        self.received = 0
        self.packets = Packets()
        self.transport: asyncio.Transport | None = None
        self.pinger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(connect_packet(self.client_id))

    def data_received(self, data: bytes) -> None:
        for first, body in self.packets.feed(data):
            kind = first >> 4
            if kind == 3:
                self.received += 1
            elif kind == 2:
                if len(body) < 2 or body[1] != 0:
                    self.ready.set_exception(ConnectionError(f"subscriber CONNACK reason {body[1:2].hex()}"))
                    return
                assert self.transport is not None
                self.transport.write(subscribe_packet(self.topic_filter))
                self.ping()
            elif kind == 9 and not self.ready.done():  # SUBACK
                granted = body[-1] if body else 0x80
                if granted < 0x80:
                    self.ready.set_result(True)
                else:
                    self.ready.set_exception(ConnectionError(f"subscription refused ({granted:#x})"))

    def ping(self) -> None:
        if self.transport and not self.transport.is_closing():
            self.transport.write(PINGREQ)
            self.pinger = asyncio.get_running_loop().call_later(KEEPALIVE_S / 2, self.ping)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pinger:
            self.pinger.cancel()
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("subscriber closed"))
        self.transport = None

    def close(self) -> None:
        if self.pinger:
            self.pinger.cancel()
        if self.transport and not self.transport.is_closing():
            self.transport.write(DISCONNECT)
            self.transport.close()


async def open_subscriber(spec: GatewaySpec, topic_filter: str) -> Subscriber:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[bool] = loop.create_future()
    _, sub = await loop.create_connection(
        lambda: Subscriber(spec.gateway, topic_filter, ready),
        spec.host,
        spec.port,
        ssl=tls_context(spec),
        server_hostname=spec.sni,
    )
    await asyncio.wait_for(ready, 10)
    return sub


async def _connect(
    loop: asyncio.AbstractEventLoop,
    spec: GatewaySpec,
    ctx: ssl.SSLContext,
    counters: Any,
    period_s: float,
    gate: asyncio.Semaphore,
    errors: dict[str, int],
) -> Gateway | None:
    async with gate:
        connected: asyncio.Future[bool] = loop.create_future()
        started = time.monotonic_ns()
        try:
            _, gw = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Gateway(spec, counters, period_s, connected),
                    spec.host,
                    spec.port,
                    ssl=ctx,
                    server_hostname=spec.sni,
                    local_addr=(spec.source, 0),
                ),
                30,
            )
            await asyncio.wait_for(connected, 30)
        except (OSError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
            counters[FAILED] += 1
            reason = f"{type(exc).__name__}: {exc}"[:120]
            errors[reason] = errors.get(reason, 0) + 1
            return None
        done = time.monotonic_ns()
        counters[HANDSHAKE_NS] += done - started
        if not counters[FIRST_OK_NS]:
            counters[FIRST_OK_NS] = done
        counters[LAST_OK_NS] = done
        counters[CONNECTED] += 1
        return gw


def run_worker(
    specs: list[GatewaySpec],
    counters: Any,
    ready: Event,
    go: Event,
    beat: Event,
    stop: Event,
    errors_out: Any,
    period_s: float,
    parallel: int,
) -> None:
    """A worker process: TLS contexts first (not timed), connect on ``go``, heartbeat from ``beat`` to ``stop``.

    ``counters``: this worker's own ``RawArray('q', SLOTS)``; it is the only writer, the benchmark reads it.
    """
    row = counters
    contexts = [tls_context(spec) for spec in specs]
    ready.set()
    go.wait()
    errors: dict[str, int] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(parallel)
        gateways = await asyncio.gather(
            *(_connect(loop, s, c, row, period_s, gate, errors) for s, c in zip(specs, contexts, strict=True))
        )
        while not beat.is_set() and not stop.is_set():
            await asyncio.sleep(0.05)
        for gw in gateways:
            if gw is not None:
                gw.start_beats()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for gw in gateways:
            if gw is not None:
                gw.close()
        await asyncio.sleep(0.5)

    asyncio.run(main())
    errors_out.put(errors)


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True
