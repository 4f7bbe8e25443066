"""``bridge usage``: what each tenant and gateway stored per hour or day; threshold rules; a Prometheus exporter.

Everything is read from the tenants' stores (``usage_hourly``, written by
every bridge process in its commits, ``metering.py``), so the figures are
the same whichever process asks, and survive restarts::

    bridge usage --config bridge.yaml [--tenant T] [--gateway G] [--since 7d] [--by hour|day] [--json]
    bridge usage --config bridge.yaml --thresholds
    bridge usage serve --config bridge.yaml [--host 127.0.0.1] [--port 9108]

The exporter answers ``GET /metrics`` in the Prometheus text format,
reading the config (and ``tenants.json``: tenants added or moved) and the
stores at each scrape: counters per tenant and gateway (all
hours ever recorded, so ``rate()`` and ``increase()`` work), the tenants'
plan rates, and one gauge per threshold rule and tenant (1: above).
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from factory_edge.errors import ConfigError, StorageError
from factory_edge.logs import fields
from factory_edge.units import parse_duration

from . import metering
from .config import BridgeConfig, TenantConfig, load_config
from .metering import Usage
from .storage import make_store

log = logging.getLogger(__name__)

MAX_SINCE_S = 36_500 * 86_400  # a hundred years: more is a typo
DEFAULT_PORT = 9108
METRICS = (
    ("points", "factory_edge_usage_points_total", "Readings stored"),
    ("messages", "factory_edge_usage_messages_total", "Data messages (batches) stored"),
    ("bytes", "factory_edge_usage_bytes_total", "MQTT payload bytes of the data messages stored"),
    ("delayed_points", "factory_edge_usage_delayed_points_total", "Readings stored above the tenant's points_per_s"),
)


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "usage",
        help="points, messages and bytes stored per tenant and gateway; threshold rules; Prometheus exporter",
        description="Print what each tenant and gateway stored, per hour or day (UTC; days are sums of hours), "
        "from the tenants' stores: points, data messages, payload bytes and points delayed by the tenant's "
        "rate limit. --thresholds reports the tenants above the config's usage threshold rules. "
        "'bridge usage serve' runs the Prometheus usage exporter.",
    )
    _common(p)
    p.add_argument("--tenant", metavar="NAME", help="only this tenant")
    p.add_argument("--gateway", metavar="GW", help="only this gateway")
    p.add_argument("--since", default="7d", metavar="DURATION", help="from this long ago (default 7d)")
    p.add_argument("--by", choices=("hour", "day"), default="day", help="one row per hour or per day (default day)")
    p.add_argument("--json", action="store_true", help="print JSON: one object per row, periods in epoch ms")
    p.add_argument(
        "--thresholds",
        action="store_true",
        help="report the tenants above the usage threshold rules (config usage.thresholds) instead",
    )
    p.set_defaults(handler=run)
    serve = p.add_subparsers(dest="usage_command", metavar="serve", help="serve: run the Prometheus usage exporter")
    s = serve.add_parser(
        "serve",
        help="the Prometheus usage exporter",
        description="Serve GET /metrics (Prometheus text format): usage counters per tenant and gateway, the "
        "tenants' rate limits and the threshold rules crossed, read from the stores at each scrape.",
    )
    _common(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    s.add_argument(
        "--token-file",
        metavar="FILE",
        help="require 'Authorization: Bearer <the file's token>' (Prometheus: authorization.credentials_file); "
        "the file must not be readable by group or others",
    )
    s.set_defaults(handler=serve_command, default_log_level="info")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="bridge config (YAML): the tenants and where they store")


def _config(args: argparse.Namespace) -> BridgeConfig:
    if not args.config:
        raise ConfigError("--config: required (the bridge config, for the tenants and their storage)")
    return load_config(args.config)


def read_usage(
    config: BridgeConfig,
    tenant: TenantConfig,
    *,
    gw: str | None = None,
    since_ms: int | None = None,
    totals: bool = False,
) -> list[Usage]:
    """A tenant's ``usage_hourly`` rows ([] when it has stored nothing yet)."""
    store = make_store(config.tenant_storage(tenant), tenant.name)
    try:
        store.open_read()
    except StorageError as exc:
        if "no data yet" in str(exc):
            return []
        raise
    try:
        return store.usage(gw=gw, since_ms=since_ms, totals=totals)
    finally:
        store.close()


def _port(text: str) -> int:
    """argparse type: a TCP port, 0-65535 (0: any free one; argparse prints the error in one line)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0-65535)")
    return port


def run(args: argparse.Namespace) -> int:
    config = _config(args)
    tenants = [config.tenant(args.tenant)] if args.tenant else config.tenants
    try:
        window_s = parse_duration(args.since)
    except ValueError as exc:
        raise ConfigError(f"--since: {exc}") from None
    if window_s > MAX_SINCE_S:
        raise ConfigError(f"--since: {args.since} is more than {MAX_SINCE_S // 86400}d")
    since_ms = int((time.time() - window_s) * 1000)
    if args.thresholds:
        return _thresholds(config, tenants, since_ms, as_json=args.json)
    rows: list[tuple[str, Usage]] = []
    for tenant in tenants:
        hours = read_usage(config, tenant, gw=args.gateway, since_ms=since_ms)
        rows += [(tenant.name, u) for u in (metering.by_day(hours) if args.by == "day" else hours)]
    if args.json:
        print(json.dumps([{"tenant": t, args.by: u.period, **_counts(u)} for t, u in rows]))
        return 0
    if not rows:
        print(f"(no usage recorded since {_period(since_ms, args.by)})")
        return 0
    table = [("TENANT", "GATEWAY", args.by.upper(), "POINTS", "MESSAGES", "BYTES", "DELAYED POINTS")]
    table += [
        (t, u.gw, _period(u.period, args.by), f"{u.points}", f"{u.messages}", f"{u.bytes}", f"{u.delayed_points}")
        for t, u in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return 0


def _thresholds(config: BridgeConfig, tenants: Iterable[TenantConfig], since_ms: int, *, as_json: bool) -> int:
    found = []
    for tenant in tenants:
        found += metering.crossings(tenant.name, read_usage(config, tenant, since_ms=since_ms), config.usage.thresholds)
    if as_json:
        print(json.dumps([c.as_json() for c in found]))
    elif not found:
        print(f"no tenant above a threshold rule since {_period(since_ms, 'hour')}")
    else:
        print("\n".join(c.message() for c in found))
    return 0


def _counts(u: Usage) -> dict[str, Any]:
    return {
        "gateway": u.gw,
        "points": u.points,
        "messages": u.messages,
        "bytes": u.bytes,
        "delayed_points": u.delayed_points,
    }


def _period(ms: int, by: str) -> str:
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.strftime("%Y-%m-%d" if by == "day" else "%Y-%m-%d %H:00")


# -- the exporter ------------------------------------------------------------------


def exposition(config: BridgeConfig, *, now_s: float | None = None) -> str:
    """The Prometheus text exposition of every tenant's usage, rate limit and threshold rules."""
    window_start = int(((now_s or time.time()) - config.usage.window) * 1000)
    lines: list[str] = []
    samples: dict[str, list[str]] = {name: [] for _, name, _ in METRICS}
    limits: list[str] = []
    crossed: list[str] = []
    errors: list[str] = []
    for tenant in config.tenants:
        try:
            # The counters: summed by the database (a year of hours of every gateway is not fetched at each
            # scrape); the threshold rules: the hours of the window only.
            sums_by_gw = read_usage(config, tenant, totals=True)
            recent = read_usage(config, tenant, since_ms=window_start)
        except StorageError as exc:
            log.warning("cannot read a tenant's usage", extra=fields(tenant=tenant.name, err=str(exc)))
            errors.append(f'factory_edge_usage_read_errors{{tenant="{_label(tenant.name)}"}} 1')
            continue
        for sums in sorted(sums_by_gw, key=lambda u: u.gw):
            gw = sums.gw
            labels = f'tenant="{_label(tenant.name)}",gateway="{_label(gw)}"'
            for field, name, _ in METRICS:
                samples[name].append(f"{name}{{{labels}}} {getattr(sums, field)}")
        if tenant.limits.points_per_s is not None:
            limits.append(
                f'factory_edge_tenant_points_per_s_limit{{tenant="{_label(tenant.name)}"}} {tenant.limits.points_per_s}'
            )
        above = {c.rule for c in metering.crossings(tenant.name, recent, config.usage.thresholds)}
        for rule in config.usage.thresholds:
            crossed.append(
                f'factory_edge_usage_threshold_exceeded{{tenant="{_label(tenant.name)}",rule="{_label(rule.name)}"}} '
                f"{int(rule.name in above)}"
            )
    for _, name, text in METRICS:
        lines += [f"# HELP {name} {text}.", f"# TYPE {name} counter", *samples[name]]
    lines += [
        "# HELP factory_edge_tenant_points_per_s_limit The tenant's plan rate (points/s); absent: no limit.",
        "# TYPE factory_edge_tenant_points_per_s_limit gauge",
        *limits,
        "# HELP factory_edge_usage_threshold_exceeded 1 when the tenant's usage in the window is above the rule.",
        "# TYPE factory_edge_usage_threshold_exceeded gauge",
        *crossed,
    ]
    if errors:
        lines += [
            "# HELP factory_edge_usage_read_errors The tenant's store could not be read.",
            "# TYPE factory_edge_usage_read_errors gauge",
            *errors,
        ]
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Exporter:
    """``GET /metrics`` over HTTP (plain: put it on a private address, as Prometheus exporters are)."""

    def __init__(
        self,
        config: BridgeConfig,
        *,
        host: str,
        port: int,
        reload: Callable[[], BridgeConfig] | None = None,
        token: str | None = None,
    ) -> None:
        self.config = config
        expected = f"Bearer {token}".encode() if token else None
        self._reload = reload
        self._reload_error: str | None = None
        # One scrape reads the stores at a time (one connection per tenant, in turn): scrapes piling up wait
        # for it and answer with what it read if it started after they came, so the storage servers the
        # bridges need see at most one exporter connection whatever the number of requests.
        self._scraping = threading.Lock()
        self._last: tuple[float, bytes] | None = None
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                given = (self.headers.get("Authorization") or "").encode()
                if expected is not None and not hmac.compare_digest(given, expected):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Bearer realm="usage"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                try:
                    body = exporter.scrape()
                except Exception as exc:  # a scrape answers 500 with the reason; the exporter stays up
                    log.error("usage scrape failed", extra=fields(err=str(exc)))
                    self.send_error(500, str(exc).splitlines()[0][:200])
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"--port {port}: cannot listen on {host}: {exc.strerror or exc}") from None
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]

    def scrape(self) -> bytes:
        """The exposition, read now (or by the scrape that started after this request came)."""
        came = time.monotonic()
        with self._scraping:
            last = self._last
            if last is not None and last[0] >= came:
                return last[1]
            started = time.monotonic()
            body = exposition(self.current()).encode()
            self._last = (started, body)
            return body

    def current(self) -> BridgeConfig:
        """The config as it is now (``tenants.json`` is read again at each scrape, as the bridge follows it);
        a file that cannot be read (caught half-written) leaves the last good one in use."""
        if self._reload is None:
            return self.config
        try:
            self.config = self._reload()
        except ConfigError as exc:
            if str(exc) != self._reload_error:
                log.warning(
                    "cannot read the config again; the exporter keeps the last good tenants",
                    extra=fields(err=str(exc).splitlines()[0]),
                )
            self._reload_error = str(exc)
        else:
            self._reload_error = None
        return self.config

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def start(self) -> Exporter:
        threading.Thread(target=self.serve_forever, name="usage-exporter", daemon=True).start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _token(path: str) -> str:
    """The bearer token of ``--token-file``: a private file (no group or other bits), one non-empty line."""
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--token-file {path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    if mode & 0o077:
        raise ConfigError(f"--token-file {path}: mode {mode & 0o777:04o} lets others read it; chmod 600 {path}")
    if not text or "\n" in text:
        raise ConfigError(f"--token-file {path}: expected one line with the token")
    return text


def _loopback(host: str) -> bool:
    try:
        return all(
            ipaddress.ip_address(info[4][0]).is_loopback
            for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        )
    except (OSError, ValueError):
        return False


def serve_command(args: argparse.Namespace) -> int:
    config = _config(args)
    token = _token(args.token_file) if args.token_file else None
    exporter = Exporter(config, host=args.host, port=args.port, reload=lambda: load_config(args.config), token=token)
    if not _loopback(args.host) and token is None:
        log.warning(
            "usage exporter on a non-loopback address without --token-file: it names every tenant and gateway "
            "to whoever reaches it; give it a token or keep the address private to the monitoring network",
            extra=fields(host=args.host),
        )
    log.info("usage exporter listening", extra=fields(url=f"http://{args.host}:{exporter.port}/metrics"))
    # SIGTERM (systemd, kill) stops it cleanly: shutdown() waits for serve_forever, so from another thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=exporter.server.shutdown).start())
    try:
        exporter.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        exporter.server.server_close()
    return 0
