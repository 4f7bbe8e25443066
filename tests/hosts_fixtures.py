"""A placed deployment on several "hosts" (network namespaces): broker hosts, proxies, MQTT clients.

- ``BrokerHostRunner``: what runs the tenant brokers on one broker host, as a
  systemd path unit would there: one ``mosquitto -c <conf>`` in the host's
  namespace for every ``<data>/hosts/<host>/<tenant>/mosquitto.conf``, started
  when the file appears and again if it exits while its file is still there.
  A conf renamed away (``tenant move``) is never restarted.
- ``start_proxy``: ``haproxy -W -db -f <data>/haproxy/haproxy.cfg`` in a
  proxy namespace (``FE_PROXY_NAME`` given, so each has its own admin socket).
- ``MqttClient``: a paho client over TLS through a proxy address with the
  tenant's SNI name, recording what it receives and when its QoS 1
  publications were acknowledged. Paho keeps every unacknowledged QoS 1
  message and sends it again after a reconnect, as a gateway keeps its
  unconfirmed batches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from provisioning import brokers, pki, tenants
from provisioning.layout import DataDir
from tests.netns import Network

PROXY_PORT = 8883
DOMAIN = "test"


class BrokerHostRunner:
    """Keeps one Mosquitto running per tenant conf in a broker host's directory, inside its namespace."""

    def __init__(self, net: Network, host: str, data: Path, logs: Path) -> None:
        self.net, self.host = net, host
        self.directory = DataDir(data).host_dir(host)
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[Path, subprocess.Popen[bytes]] = {}
        self.started: list[tuple[str, float]] = []  # (tenant, monotonic time) of every start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"broker host {host}", daemon=True)

    def start(self) -> BrokerHostRunner:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            for conf in sorted(self.directory.glob("*/mosquitto.conf")):
                proc = self.procs.get(conf)
                if (proc is None or proc.poll() is not None) and conf.exists():
                    tenant = conf.parent.name
                    with open(self.logs / f"{self.host}-{tenant}.log", "ab") as log:
                        self.procs[conf] = self.net.run_in(
                            self.host, ["mosquitto", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
                        )
                    self.started.append((tenant, time.monotonic()))
            self._stop.wait(0.02)

    def pid(self, tenant: str) -> int | None:
        proc = self.procs.get(self.directory / tenant / "mosquitto.conf")
        return proc.pid if proc is not None and proc.poll() is None else None

    def log(self, tenant: str) -> str:
        path = self.logs / f"{self.host}-{tenant}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def start_proxy(net: Network, host: str, data: Path, logs: Path, name: str) -> subprocess.Popen[bytes]:
    """HAProxy in master-worker mode from the rendered config, in ``host``'s namespace; returns once it accepts."""
    cfg = DataDir(data).haproxy_cfg
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"haproxy-{host}.log", "ab") as log:
        proc = net.run_in(
            host,
            ["haproxy", "-W", "-db", "-f", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "FE_PROXY_NAME": name},
        )
    address = net.address(host)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((address, PROXY_PORT), timeout=0.5).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log_text = (logs / f"haproxy-{host}.log").read_text()
                raise AssertionError(f"haproxy in {host} did not start:\n{log_text}") from None
            time.sleep(0.05)


def gateway_identity(data: Path, tenant: str, name: str, directory: Path) -> tuple[Path, Path]:
    """A gateway certificate (CN ``name``) from the tenant's CA, as the provisioning API would issue it."""
    files = DataDir(data).tenant(tenant)
    ca_key, ca_cert = tenants.load_ca(files)
    key, cert = pki.issue_client_cert(ca_key, ca_cert, name, days=1)
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"{tenant}-{name}.pem", directory / f"{tenant}-{name}.key"
    pki.write_private_key(key_file, key)
    pki.write_pem(cert_file, cert)
    return cert_file, key_file


class MqttClient:
    """A paho MQTT v5 client through a proxy address, SNI ``mqtt.<tenant>.test``, reconnecting by itself."""

    def __init__(
        self,
        *,
        tenant: str,
        identity: str,
        address: str,
        ca_file: Path,
        cert_key: tuple[Path, Path],
        session_expiry_s: int = 0,
        subscribe: str | None = None,
        reconnect_s: float = 0.2,
    ) -> None:
        link = brokers.AdminLink(
            host=f"mqtt.{tenant}.{DOMAIN}",
            port=PROXY_PORT,
            ca_file=ca_file,
            cert_file=cert_key[0],
            key_file=cert_key[1],
            dial=address,
        )
        self.address = address
        self.subscribe_to = subscribe
        self.session_expiry_s = session_expiry_s
        self.received: list[tuple[str, bytes]] = []
        self.ack_times: list[float] = []  # when the broker acknowledged each QoS 1 publication
        self._sent = 0  # QoS 1 publications so far
        self.connects = 0
        self.session_present: list[bool] = []
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=identity, protocol=paho.MQTTv5)
        client.tls_set_context(brokers.sni_context(link))
        client.reconnect_delay_set(min_delay=reconnect_s, max_delay=reconnect_s)  # type: ignore[arg-type]  # typed int, takes s
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *a: self.connected.clear()
        client.on_subscribe = lambda *a: self.subscribed.set()
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self.client = client

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            return
        self.connects += 1
        self.session_present.append(bool(flags.session_present))
        self.connected.set()
        if self.subscribe_to:
            client.subscribe(self.subscribe_to, qos=1)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            self.received.append((message.topic, bytes(message.payload)))

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            self.ack_times.append(time.monotonic())

    def start(self, timeout_s: float = 10.0) -> MqttClient:
        props = Properties(PacketTypes.CONNECT)
        if self.session_expiry_s:
            props.SessionExpiryInterval = self.session_expiry_s
        self.client.connect_async(
            self.address, PROXY_PORT, keepalive=10, clean_start=not self.session_expiry_s, properties=props
        )
        self.client.loop_start()
        if not self.connected.wait(timeout_s):
            self.stop()
            raise AssertionError(f"no MQTT session through {self.address}:{PROXY_PORT} within {timeout_s}s")
        if self.subscribe_to and not self.subscribed.wait(timeout_s):
            self.stop()
            raise AssertionError(f"no SUBACK for {self.subscribe_to} within {timeout_s}s")
        return self

    def publish(self, topic: str, payload: bytes) -> int:
        with self._lock:  # counted first: the acknowledgement may come before publish() returns
            self._sent += 1
        # Not under self._lock: paho calls on_publish holding its own lock, which publish() takes too.
        info = self.client.publish(topic, payload, qos=1)
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:  # paho holds at most 65,535 unacknowledged (one per packet id)
            raise AssertionError("paho's queue of unacknowledged publications is full: publish slower")
        return info.mid

    def unacked(self) -> int:
        """Publications the broker has not acknowledged yet (paho keeps them and sends them again).

        Counted, not looked up by packet id: ids repeat past 65,535, and paho
        calls ``on_publish`` once per publication, when it forgets it.
        """
        with self._lock:
            return self._sent - len(self.ack_times)

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [payload for _, payload in self.received]

    def stop(self) -> None:
        """Disconnect cleanly (a persistent session stays on the broker with its queue)."""
        self.client.disconnect()
        self.client.loop_stop()
