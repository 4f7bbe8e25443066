"""Prometheus metrics of the running agent on 127.0.0.1:<metrics_port>/metrics (text format 0.0.4)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from factory_edge.errors import ConfigError
from factory_edge.logs import fields

from .buffer import age_seconds
from .bufferread import BufferStats

if TYPE_CHECKING:
    from .runtime import Agent

log = logging.getLogger(__name__)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(agent: Agent, buf: BufferStats) -> str:
    """The exposition text: the same figures as ``agent status``."""
    s = agent.status()
    gw = f'gw="{_escape(agent.gateway)}"'
    dropped = dict(buf.drops)
    for reason, points in s["writer"]["dropped_unsaved"].items():  # not yet on disk: it had no room
        dropped[reason] = dropped.get(reason, 0) + points
    lines = [
        "# HELP factory_edge_connected 1 while connected to the broker.",
        "# TYPE factory_edge_connected gauge",
        f"factory_edge_connected{{{gw}}} {int(s['connection']['state'] == 'connected')}",
        "# HELP factory_edge_buffer_batches Batches the broker has not accepted yet.",
        "# TYPE factory_edge_buffer_batches gauge",
        f"factory_edge_buffer_batches{{{gw}}} {buf.batches}",
        "# HELP factory_edge_buffer_points Points the broker has not accepted yet.",
        "# TYPE factory_edge_buffer_points gauge",
        f"factory_edge_buffer_points{{{gw}}} {buf.points}",
        "# HELP factory_edge_buffer_unconfirmed_batches Batches accepted by the broker, not yet confirmed stored.",
        "# TYPE factory_edge_buffer_unconfirmed_batches gauge",
        f"factory_edge_buffer_unconfirmed_batches{{{gw}}} {buf.unconfirmed}",
        "# HELP factory_edge_buffer_oldest_unconfirmed_seconds Age of the oldest unconfirmed batch.",
        "# TYPE factory_edge_buffer_oldest_unconfirmed_seconds gauge",
        f"factory_edge_buffer_oldest_unconfirmed_seconds{{{gw}}} {round(age_seconds(buf.oldest_unconfirmed_ms) or 0, 1)}",
        "# HELP factory_edge_buffer_bytes Bytes of payload the broker has not accepted yet.",
        "# TYPE factory_edge_buffer_bytes gauge",
        f"factory_edge_buffer_bytes{{{gw}}} {buf.bytes}",
        "# HELP factory_edge_buffer_disk_bytes The buffer's files on disk (database pages in use and WAL).",
        "# TYPE factory_edge_buffer_disk_bytes gauge",
        f"factory_edge_buffer_disk_bytes{{{gw}}} {buf.disk_bytes}",
        "# HELP factory_edge_buffer_disk_full 1 while readings cannot be written (no room on disk).",
        "# TYPE factory_edge_buffer_disk_full gauge",
        f"factory_edge_buffer_disk_full{{{gw}}} {int(s['writer']['disk_full'])}",
        "# HELP factory_edge_buffer_dropped_points_total Points dropped, by reason.",
        "# TYPE factory_edge_buffer_dropped_points_total counter",
    ]
    for reason in sorted(dropped):
        lines.append(f'factory_edge_buffer_dropped_points_total{{{gw},reason="{_escape(reason)}"}} {dropped[reason]}')
    lines += [
        "# HELP factory_edge_published_points_total Points accepted by the broker.",
        "# TYPE factory_edge_published_points_total counter",
        f"factory_edge_published_points_total{{{gw}}} {s['publish']['acked_points']}",
        "# HELP factory_edge_confirmed_points_total Points the tenant's storage confirmed.",
        "# TYPE factory_edge_confirmed_points_total counter",
        f"factory_edge_confirmed_points_total{{{gw}}} {s['publish']['confirmed_points']}",
        "# HELP factory_edge_resent_batches_total Accepted batches sent again (unconfirmed, or replayed).",
        "# TYPE factory_edge_resent_batches_total counter",
        f"factory_edge_resent_batches_total{{{gw}}} {s['publish']['resent'] + s['publish']['replayed']}",
        "# HELP factory_edge_reconnects_total Broker connections lost.",
        "# TYPE factory_edge_reconnects_total counter",
        f"factory_edge_reconnects_total{{{gw}}} {s['connection']['reconnects']}",
        "# HELP factory_edge_device_up 1 while the device answers.",
        "# TYPE factory_edge_device_up gauge",
    ]
    for name, dev in s["devices"].items():
        lines.append(f'factory_edge_device_up{{{gw},device="{_escape(name)}"}} {int(dev["state"] == "up")}')
    lines += [
        "# HELP factory_edge_device_points_total Points read from the device.",
        "# TYPE factory_edge_device_points_total counter",
    ]
    for name, dev in s["devices"].items():
        lines.append(f'factory_edge_device_points_total{{{gw},device="{_escape(name)}"}} {dev["points"]}')
    return "\n".join(lines) + "\n"


async def serve_metrics(agent: Agent, port: int) -> None:
    """A minimal HTTP server for scrapes, on loopback only."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b"/"
            if path.split(b"?")[0] == b"/metrics":
                body, status = render(agent, await agent.buffer_stats()).encode(), b"200 OK"
            else:
                body, status = b"see /metrics\n", b"404 Not Found"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    try:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
    except OSError as exc:
        raise ConfigError(f"metrics_port: cannot listen on 127.0.0.1:{port}: {exc.strerror}") from exc
    log.info("metrics listening", extra=fields(address=f"127.0.0.1:{port}"))
    async with server:
        await server.serve_forever()
