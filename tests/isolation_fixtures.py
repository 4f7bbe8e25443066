"""Attackers and victims on a real deployment: gateways provisioned by ``agent provision``, MQTT v5 clients
holding their certificates, ``bridge run`` on ``tenants_from``, and a raw TLS ClientHello for proxy floods.

Everything goes through what ``provisioning`` rendered: the tenant brokers,
the SNI proxy and ``provisioning serve`` of a ``Deployment``.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from factory_edge.mqtt import BrokerSettings, tls_context
from tests.bridge_fixtures import BridgeProcess, batch, sqlite_rows
from tests.provisioning_fixtures import Deployment


def provision(site: Deployment, tmp: Path, tenant: str, name: str) -> Path:
    """A gateway provisioned the real way; returns its state directory."""
    state = tmp / name
    result = site.agent_provision("--key", site.key(tenant, "--uses", "1"), "--name", name, "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    return state


def files_of(state: Path) -> tuple[str, str, str, str]:
    """``(broker host, ca, cert, key)`` of a provisioned gateway."""
    ident = json.loads((state / "identity.json").read_text())
    host = ident["broker_url"].split("://", 1)[1].rsplit(":", 1)[0]
    return host, str(state / ident["ca_file"]), str(state / ident["cert_file"]), str(state / ident["key_file"])


class Client:
    """An MQTT v5 client with some certificate of the tenant, through the SNI proxy; records what happens to it."""

    def __init__(
        self,
        site: Deployment,
        *,
        host: str,
        ca: str,
        cert: str,
        key: str,
        client_id: str,
        clean_start: bool = True,
        session_expiry_s: int = 0,
    ) -> None:
        settings = BrokerSettings(
            host=host,
            port=site.proxy_port,
            tls=True,
            connect_host="127.0.0.1",
            ca_file=ca,
            cert_file=cert,
            key_file=key,
        )
        self.settings = settings
        self.clean_start = clean_start
        self.session_expiry_s = session_expiry_s
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5, reconnect_on_failure=False
        )
        self.client.tls_set_context(tls_context(settings))
        self.connected = threading.Event()
        self.disconnects: list[str] = []
        self.messages: list[tuple[str, bytes]] = []
        self.subacks: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.set() if not rc.is_failure else None
        self.client.on_disconnect = lambda c, u, f, rc, p: self.disconnects.append(str(rc))
        self.client.on_message = self._message
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.__setitem__(mid, [r.value for r in rcs])

    @classmethod
    def gateway(cls, site: Deployment, state: Path, client_id: str | None = None, **options: Any) -> Client:
        host, ca, cert, key = files_of(state)
        return cls(site, host=host, ca=ca, cert=cert, key=key, client_id=client_id or state.name, **options)

    def _message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def connect(self, timeout_s: float = 10.0) -> Client:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        self.client.connect(
            self.settings.dial_host, self.settings.port, keepalive=30, clean_start=self.clean_start, properties=props
        )
        self.client.loop_start()
        if not self.connected.wait(timeout_s):
            raise AssertionError(f"{self.client._client_id!r} could not connect")
        return self

    def subscribe(self, topic: str, timeout_s: float = 10.0) -> int:
        """The SUBACK code for ``topic`` (1: granted QoS 1, 0x87 = 135: not authorized)."""
        _, mid = self.client.subscribe(topic, qos=1)
        deadline = time.monotonic() + timeout_s
        while mid not in self.subacks:
            if time.monotonic() > deadline:
                raise AssertionError(f"no SUBACK for {topic}")
            time.sleep(0.01)
        return self.subacks[mid][0]

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False, timeout_s: float = 10.0) -> int:
        """Publish QoS 1 and wait for the PUBACK; its reason code (0 success, 135 not authorized)."""
        codes: list[int] = []
        self.client.on_publish = lambda c, u, mid, rc, p: codes.append(rc.value)
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout_s)
        deadline = time.monotonic() + timeout_s
        while not codes and time.monotonic() < deadline:
            time.sleep(0.005)
        return codes[0] if codes else -1

    def received(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def bridge_config(site: Deployment, tmp: Path, *, shared_group: str | None = None) -> Path:
    """A bridge config on the deployment's ``tenants_from`` (or its tenants spelled out, with a shared group)."""
    config: dict[str, Any] = {"storage": {"backend": "sqlite", "path": str(tmp / "store")}}
    if shared_group is None:
        config["tenants_from"] = str(site.data)
    else:
        entries = json.loads((site.data / "tenants.json").read_text())["tenants"]
        config["tenants"] = [{**entry, "shared_group": shared_group} for entry in entries]
    path = tmp / "bridge.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_bridge(config: Path, instance: str = "main") -> BridgeProcess:
    bridge = BridgeProcess(config, instance=instance).start()
    bridge.wait_log("connected to tenant broker", count=2)  # acme and globex
    return bridge


def stored_seqs(tmp: Path, tenant: str, gateway: str) -> set[int]:
    return {
        row[0]
        for row in sqlite_rows(tmp / "store" / f"{tenant}.db", "SELECT seq FROM batches WHERE gw = ?", (gateway,))
    }


def data_batch(gateway: str, seq: int) -> bytes:
    return batch(gateway, "press-1", seq, 3)


def client_hello(server_name: str) -> bytes:
    """The bytes of a real TLS ClientHello naming ``server_name`` (SNI), as the first flight of a client."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def stalled(port: int, source: str, hello: bytes | None) -> socket.socket:
    """A connection from ``source`` that sends ``hello`` (or nothing) and then nothing more."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    if hello:
        sock.sendall(hello)
    return sock


def closed_within(sock: socket.socket, timeout_s: float) -> float | None:
    """Seconds until the peer closed ``sock`` (or reset it), None if still open after ``timeout_s``."""
    started = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - started < timeout_s:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
        if data == b"":
            return time.monotonic() - started
    return None


def closed_now(socks: list[socket.socket]) -> list[socket.socket]:
    """Those of ``socks`` the peer has closed or reset by now (checked all at once, without waiting)."""
    readable, _, _ = select.select(socks, [], [], 0)
    gone = []
    for sock in readable:
        try:
            if sock.recv(65536, socket.MSG_DONTWAIT) == b"":
                gone.append(sock)
        except BlockingIOError:
            continue
        except OSError:
            gone.append(sock)
    return gone


__all__ = [
    "Client",
    "bridge_config",
    "client_hello",
    "closed_now",
    "closed_within",
    "data_batch",
    "files_of",
    "provision",
    "stalled",
    "start_bridge",
    "stored_seqs",
]
