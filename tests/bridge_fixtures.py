"""Shared pieces of the bridge tests: real brokers, a gateway publisher, ``bridge run`` as a process, PostgreSQL.

Import explicitly (``from tests.bridge_fixtures import ...``); the pytest
fixtures here (``pg_dsn``, ``pg_tenant``) are registered by importing them
into a test module.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psycopg
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from psycopg import sql

from factory_edge import names
from factory_edge.mqtt import BrokerSettings, tls_context
from tests.helpers import ServiceProcess
from tests.infra import Mosquitto, TenantPki

PG_DSN = os.environ.get("FACTORY_EDGE_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


# ---------------------------------------------------------------- payloads


def batch(
    gw: str,
    device: str,
    seq: int,
    points: list[tuple[str, int, Any]] | int,
    *,
    ts0: int | None = None,
    quality: str = "good",
) -> bytes:
    """A data batch as the agent publishes it; ``points`` as ``(tag, ts, value)`` or a count of generated ones."""
    if isinstance(points, int):
        base = ts0 if ts0 is not None else 1_700_000_000_000 + seq * 1000
        points = [(f"t{i % 10}", base + i, float(seq * 1000 + i)) for i in range(points)]
    doc = {
        "v": 1,
        "gw": gw,
        "dev": device,
        "seq": seq,
        "points": [{"tag": t, "ts": ts, "v": v, "q": quality} for t, ts, v in points],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------- MQTT clients


def settings_for(pki: TenantPki, broker: Mosquitto, name: str) -> BrokerSettings:
    cert, key = pki.bridge if name == "bridge" else pki.client(name)
    return BrokerSettings(
        host=pki.host,
        port=broker.port,
        tls=True,
        connect_host="127.0.0.1",
        ca_file=str(pki.ca_file),
        cert_file=str(cert),
        key_file=str(key),
    )


class Gateway:
    """A gateway (or any client with a certificate of the tenant) publishing QoS 1 and waiting for PUBACKs."""

    def __init__(self, pki: TenantPki, broker: Mosquitto, name: str = "gw-01", *, inflight: int = 100) -> None:
        self.name = name
        self.settings = settings_for(pki, broker, name)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{name}-{secrets.token_hex(3)}", protocol=paho.MQTTv5
        )
        self.client.tls_set_context(tls_context(self.settings))
        self.client.max_inflight_messages_set(inflight)
        self.client.max_queued_messages_set(0)
        self._connected = threading.Event()
        self.client.on_connect = lambda *a: self._connected.set()

    def __enter__(self) -> Gateway:
        self.client.connect(self.settings.dial_host, self.settings.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise AssertionError(f"{self.name} could not connect")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False, wait: bool = True) -> Any:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if wait:
            info.wait_for_publish(10)
        return info

    def batches(
        self, device: str, seqs: range, points: int, *, pace_s: float = 0.0, stop: Callable[[], bool] | None = None
    ) -> int:
        """Publish one batch per seq (waiting for every PUBACK at the end); returns the points sent."""
        infos = []
        sent = 0
        for seq in seqs:
            if stop is not None and stop():
                break
            infos.append(
                self.client.publish(f"gw/{self.name}/data/{device}", batch(self.name, device, seq, points), qos=1)
            )
            sent += points
            if pace_s:
                time.sleep(pace_s)
        for info in infos:
            info.wait_for_publish(30)
        return sent


class Watcher:
    """A subscriber recording ``(topic, payload, arrival time, retained)``, e.g. on ``alerts/#`` (as the bridge identity)."""

    def __init__(self, pki: TenantPki, broker: Mosquitto, topics: list[str], name: str = "bridge") -> None:
        self.settings = settings_for(pki, broker, name)
        self.topics = topics
        self.messages: list[tuple[str, bytes, float, bool]] = []
        self.lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{name}-{secrets.token_hex(3)}", protocol=paho.MQTTv5
        )
        self.client.tls_set_context(tls_context(self.settings))
        self._subscribed = threading.Event()
        self.client.on_connect = self._subscribe
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message

    def _subscribe(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        for topic in self.topics:
            client.subscribe(topic, qos=1)

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload), time.monotonic(), bool(message.retain)))

    def __enter__(self) -> Watcher:
        self.client.connect(self.settings.dial_host, self.settings.port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("watcher could not subscribe")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def docs(self, prefix: str = "") -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(p) for t, p, _, _ in self.messages if t.startswith(prefix)]


# ---------------------------------------------------------------- the bridge


def tenant_entry(pki: TenantPki, broker: Mosquitto, **extra: Any) -> dict[str, Any]:
    """A ``tenants:`` entry: every pre-issued ``bridge.<instance>`` identity, and ``bridge-alerts`` for the alert role."""
    alerts_cert, alerts_key = pki.paths(names.BRIDGE_ALERTS_ID)
    return {
        "name": pki.tenant,
        "url": f"mqtts://{pki.host}:{broker.port}",
        "connect_host": "127.0.0.1",
        "ca_file": str(pki.ca_file),
        "identities": pki.bridge_identities(),
        "alerts_cert_file": str(alerts_cert),
        "alerts_key_file": str(alerts_key),
        **extra,
    }


def write_config(path: Path, *, tenants: list[dict[str, Any]], storage: dict[str, Any], **extra: Any) -> Path:
    path.write_text(yaml.safe_dump({"storage": storage, "tenants": tenants, **extra}, sort_keys=False))
    return path


class BridgeProcess(ServiceProcess):
    """``bridge run`` in a subprocess (so it can be killed with -9); stopped by PID."""

    def __init__(self, config: Path, *, instance: str = "test", log: Path | None = None) -> None:
        super().__init__(log or config.with_name(f"bridge-{instance}.log"))
        self.config = config
        self.instance = instance

    def command(self) -> list[str]:
        return ["bridge.cli", "--log-format", "json", "run", "--config", str(self.config), "--instance", self.instance]

    def wait_log(self, msg: str, *, count: int = 1, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(1 for entry in self.logs() if entry.get("msg") == msg) < count:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"bridge exited ({self.proc.returncode}):\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no log {msg!r} within {timeout_s}s:\n{self.log_path.read_text()[-4000:]}")
            time.sleep(0.05)

    def wait_connected(self, count: int = 1) -> None:
        self.wait_log("connected to tenant broker", count=count)

    def __enter__(self) -> BridgeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(
    predicate: Callable[[], Any], *, timeout_s: float = 20.0, what: str = "condition", interval_s: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


# ---------------------------------------------------------------- reading what was stored


def sqlite_rows(path: Path, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read a tenant file the way any other reader would (its own connection, read-only)."""
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(query, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        db.close()


def pg_rows(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            return conn.execute(query, params).fetchall()
        except psycopg.errors.UndefinedTable:
            return []


# ---------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """The test database, or a loud skip naming the DSN when it cannot be reached."""
    try:
        with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_DSN} (set FACTORY_EDGE_PG_DSN): {str(exc).strip()}")
    return PG_DSN


@pytest.fixture
def pg_schemas(pg_dsn: str) -> Iterator[list[str]]:
    """Tenant names whose schemas are dropped after the test (append to the list)."""
    names: list[str] = []
    yield names
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> StoreView:
    """Each test twice: on SQLite, and on PostgreSQL (``pg_dsn``, skipped loudly when unreachable)."""
    if request.param == "postgres":
        return StoreView("postgres", tmp_path, request.getfixturevalue("pg_dsn"))
    return StoreView("sqlite", tmp_path / "data")


def unique_tenant(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


# ---------------------------------------------------------------- storage views for both backends


class StoreView:
    """Where a test's bridge stores (SQLite directory or PostgreSQL), and plain SQL reads of a tenant's tables.

    Queries name tables as ``{points}``, ``{alerts}``, …: the tenant's file or schema is filled in.
    """

    def __init__(self, backend: str, directory: Path, dsn: str | None = None) -> None:
        self.backend = backend
        self.directory = directory
        self.dsn = dsn

    @property
    def storage(self) -> dict[str, Any]:
        if self.backend == "postgres":
            return {"backend": "postgres", "dsn": self.dsn}
        return {"backend": "sqlite", "path": str(self.directory)}

    def rows(self, tenant: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        tables = (
            "points",
            "batches",
            "status",
            "events",
            "alerts",
            "alert_state",
            "dead_letters",
            "latest",
            "webhook_outbox",
            "alert_series",
            "temps",
            "counters",
        )
        if self.backend == "postgres":
            assert self.dsn is not None
            text = query.format(**{t: f'"{tenant}".{t}' for t in tables}).replace("?", "%s")
            return pg_rows(self.dsn, text, params)
        return sqlite_rows(self.directory / f"{tenant}.db", query.format(**{t: t for t in tables}), params)

    def count(self, tenant: str, table: str, where: str = "") -> int:
        """Rows in a tenant's table (0 while the table does not exist yet)."""
        rows = self.rows(tenant, f"SELECT count(*) FROM {{{table}}} {where}")
        return int(rows[0][0]) if rows else 0


class MappingBroker(Mosquitto):
    """A tenant broker whose ACL also lets machine ``plc-7`` publish under ``plant/`` and the bridge read it."""

    def render(self) -> None:
        super().render()
        readers = "".join(f"user {name}\ntopic read plant/#\n\n" for name in self.pki.bridges)
        self.acl_file.write_text(
            self.acl_file.read_text() + "\n# third-party machines\n" + readers + "user plc-7\ntopic write plant/#\n"
        )


# ---------------------------------------------------------------- webhook endpoints


class WebhookServer:
    """A real local HTTP server recording every POST ``(headers, body)``; answers ``status``."""

    def __init__(self, status: int = 200, *, first: list[int] | None = None) -> None:
        import http.server

        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.status = status
        self.first = list(first or [])  # answers for the first requests, then ``status``
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append(({k: v for k, v in self.headers.items()}, body))
                self.send_response(server.first.pop(0) if server.first else server.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="webhook server", daemon=True)

    def __enter__(self) -> WebhookServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class BlackHole:
    """A dead endpoint: accepts TCP connections and never answers (the worst case for a webhook)."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(100)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.accepted: list[Any] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="black hole", daemon=True)

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted.append(conn)

    def __enter__(self) -> BlackHole:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(5)
        for conn in self.accepted:
            conn.close()
        self.sock.close()
