"""The agent as a real process, and a paho subscriber that records what reaches the broker."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from factory_edge.mqtt import BrokerSettings, tls_context
from tests.helpers import ROOT, ServiceProcess


class AgentProcess(ServiceProcess):
    """``agent run`` in a subprocess with a config written from a dict; stopped by PID."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "agent.yaml"
        self.state_dir = workdir / "state"
        super().__init__(workdir / "agent.log")
        self.write_config(config)

    def write_config(self, config: dict[str, Any]) -> None:
        self.config = {"state_dir": str(self.workdir / "state"), **config}
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def create_buffer(self) -> int:
        """Create the agent's buffer now, as its first run would, and return the first seq it will write."""
        from agent.buffer import Buffer
        from agent.runtime import BUFFER_FILE

        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        buffer = Buffer(self.state_dir / BUFFER_FILE, gateway=str(self.config.get("gateway", "")), max_bytes=0)
        try:
            return buffer.next_seq
        finally:
            buffer.close()

    def command(self) -> list[str]:
        return ["agent.cli", "--log-format", "json", "run", "--config", str(self.config_path)]

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "agent.cli", "status", "--json", "--state-dir", str(self.state_dir)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode != 0:
            return {}
        return json.loads(out.stdout)

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Collector:
    """A persistent-session MQTT v5 subscriber (paho, own thread) recording every message in arrival order."""

    def __init__(self, settings: BrokerSettings, topics: list[str], *, client_id: str = "collector") -> None:
        self.settings = settings
        self.messages: list[tuple[str, bytes, Any]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self.client.tls_set_context(tls_context(settings))
        self.client.reconnect_delay_set(1, 2)
        self.topics = topics
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *a: self.connected.clear()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        for topic in self.topics:
            client.subscribe(topic, qos=1)
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload), getattr(message, "properties", None)))

    def start(self) -> Collector:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        self.client.connect(
            self.settings.dial_host, self.settings.port, keepalive=10, clean_start=False, properties=properties
        )
        self.client.loop_start()
        if not self.connected.wait(10):
            raise AssertionError("collector could not connect")
        time.sleep(0.2)  # SUBACK
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client._reset_sockets()  # paho's wake-up pair; a restarted collector makes a new one

    def docs(self, prefix: str) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(p) for t, p, _ in self.messages if t.startswith(prefix)]

    def seqs(self, gw: str) -> list[int]:
        """Data batch seqs in arrival order (duplicates kept)."""
        return [d["seq"] for d in self.docs(f"gw/{gw}/data/")]

    def wait(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
            time.sleep(0.05)

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
