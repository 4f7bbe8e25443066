"""What the demo shows once everything runs: live data, a write command, an alert firing and resolving.

The demo watches through a ``mosquitto_sub`` command like the one it prints
for the technician (read-only certificate, ``gw/#`` and ``alerts/#``), with
a technician certificate of its own (the broker gives each certificate one
session: the printed command must not take the demo's), and sends commands
as the cloud side does, with ``mosquitto_pub`` and the operators' ``bridge``
certificate on ``gw/<gw>/cmd/write``. Switching the CNC's coolant
off heats its spindle; the bridge's rule fires above 80 degC, the demo
switches the coolant back on, and the alert resolves below 75.
"""

from __future__ import annotations

import json
import queue
import shlex
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from .processes import DemoError, die_with_parent, run_tool, terminate
from .stack import (
    ALERT_ABOVE,
    ALERT_CLEAR_BELOW,
    ALERT_FOR,
    ALERT_RULE,
    CONSOLE_ACCOUNT,
    GATEWAY,
    TENANT,
    Stack,
    hosts_note,
    say,
    shown,
    tool,
)

DATA_TIMEOUT_S = 30.0
TEMP_EVERY_S = 3.0


class Watch:
    """A running ``mosquitto_sub -v``: ``(topic, payload)`` lines through a queue, everything into a log."""

    def __init__(self, command: str, log_file: Path) -> None:
        argv = ["stdbuf", "-oL", *shlex.split(command)]  # line-buffered into the pipe
        self.log = open(log_file, "a", encoding="utf-8")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._read, name="technician mosquitto_sub", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next(self, timeout_s: float) -> tuple[str, str] | None:
        """The next message, or None when none came within ``timeout_s``; an error if mosquitto_sub ended."""
        try:
            line = self.lines.get(timeout=max(timeout_s, 0.01))
        except queue.Empty:
            return None
        if line is None:
            raise DemoError(
                f"the technician's mosquitto_sub exited with code {self.proc.wait()}; see {shown(self.log.name)}"
            )
        topic, _, payload = line.partition(" ")
        return topic, payload

    def stop(self) -> None:
        terminate(self.proc)
        self.thread.join(5)
        self.log.close()


def _clock(ms: Any = None) -> str:
    return datetime.fromtimestamp(ms / 1000 if isinstance(ms, (int, float)) else time.time()).strftime("%H:%M:%S")


def _json(payload: str) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return None


class Story:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.watch = Watch(stack.watch_command, stack.logs / "technician.log")
        self.alert_topic = f"alerts/{GATEWAY}/cnc-1/{ALERT_RULE}"
        self.last_temp_at = 0.0
        self.fired = False
        self.resolved = False

    def close(self) -> None:
        self.watch.stop()

    def command(self, payload: dict[str, Any]) -> None:
        """A write command to the gateway, sent as the cloud side does (the bridge's certificate)."""
        files = self.stack.data / "tenants" / TENANT
        run_tool(
            [
                tool("mosquitto_pub"),
                "-h",
                self.stack.hosts[0],
                "-p",
                str(self.stack.ports.proxy),
                "--cafile",
                str(files / "ca.pem"),
                "--cert",
                str(files / "bridge.pem"),
                "--key",
                str(files / "bridge.key"),
                "-V",
                "mqttv5",
                "-q",
                "1",
                "-t",
                f"gw/{GATEWAY}/cmd/write",
                "-m",
                json.dumps(payload),
            ],
            self.stack.logs,
            what="mosquitto_pub of a write command",
            timeout_s=15,
        )
        say(f"  {_clock()}  cloud → gateway  gw/{GATEWAY}/cmd/write {json.dumps(payload)}")

    def first_data(self) -> None:
        deadline = time.monotonic() + DATA_TIMEOUT_S
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.watch.next(remaining)
            if message and message[0].startswith(f"gw/{GATEWAY}/data/"):
                batch = _json(message[1]) or {}
                say(
                    f"  {_clock()}  live data: the technician's mosquitto_sub received {message[0]} "
                    f"(seq {batch.get('seq')}, {len(batch.get('points', []))} points)"
                )
                return
        raise DemoError(f"no data from {GATEWAY} within {DATA_TIMEOUT_S:g}s; see {shown(self.stack.logs)}/agent.log")

    def handle(self, topic: str, payload: str) -> None:
        doc = _json(payload)
        if not isinstance(doc, dict):
            return
        if topic == f"gw/{GATEWAY}/data/cnc-1":
            temp = next((p for p in doc.get("points", []) if p.get("tag") == "spindle_temp"), None)
            if temp and (time.monotonic() - self.last_temp_at >= TEMP_EVERY_S or (self.fired and not self.resolved)):
                self.last_temp_at = time.monotonic()
                say(f"  {_clock(temp.get('ts'))}  cnc-1 spindle_temp {temp.get('v')} degC")
        elif topic == f"gw/{GATEWAY}/cmd/write/reply":
            say(f"  {_clock()}  gateway → cloud  {topic} {payload}")
        elif topic == self.alert_topic:
            state = doc.get("state")
            if state == "firing" and not self.fired:
                self.fired = True
                say(
                    f"  {_clock(doc.get('ts'))}  ALERT FIRED  {ALERT_RULE} [{doc.get('severity')}] tenant "
                    f"{doc.get('tenant')}, {doc.get('gw')}/{doc.get('device')}: {doc.get('message')}"
                )
                say(
                    f"            (the bridge's rule: spindle_temp above {ALERT_ABOVE:g} for {ALERT_FOR}; "
                    f"it published this retained on {topic})"
                )
                say("  Switching the coolant back on:")
                self.command({"device": "cnc-1", "tag": "coolant", "value": True})
            elif state == "resolved" and self.fired and not self.resolved:
                self.resolved = True
                say(
                    f"  {_clock(doc.get('ts'))}  alert resolved  {ALERT_RULE}: spindle_temp {doc.get('value')} degC "
                    f"(below {ALERT_CLEAR_BELOW:g})"
                )
            elif state == "pending":
                say(
                    f"  {_clock(doc.get('ts'))}  alert pending  {ALERT_RULE}: spindle_temp {doc.get('value')} degC "
                    f"above {ALERT_ABOVE:g}, must hold {ALERT_FOR}"
                )

    def overheat(self, timeout_s: float) -> bool:
        """Coolant off, until the alert fired and resolved again; False when that took longer than ``timeout_s``."""
        say(f"Overheating the CNC: the coolant goes off; the bridge alerts above {ALERT_ABOVE:g} degC.")
        self.command({"device": "cnc-1", "tag": "coolant", "value": False})
        deadline = time.monotonic() + timeout_s
        while not self.resolved and (remaining := deadline - time.monotonic()) > 0:
            message = self.watch.next(min(remaining, 1.0))
            if message:
                self.handle(*message)
        return self.resolved

    def follow(self) -> None:
        """Until interrupted: alert changes as they happen."""
        while True:
            message = self.watch.next(1.0)
            if message and message[0].startswith("alerts/"):
                doc = _json(message[1]) or {}
                say(f"  {_clock(doc.get('ts'))}  alert {doc.get('state')}  {message[0]}: {doc.get('message')}")


def where(stack: Stack) -> None:
    """Where everything is, and the command a technician would paste."""
    p = stack.ports
    agent, bridge = shown(tool("agent")), shown(tool("bridge"))
    brokers = ", ".join(f"mqtts://{h}:{p.proxy}" for h in stack.hosts)
    say()
    say("The whole story is running on 127.0.0.1:")
    say(f"  machines      Modbus TCP :{p.modbus} (cnc-1, press-1, compressor-1), OPC UA :{p.opcua} (oven-1)")
    say(f"  gateway       {GATEWAY} of tenant {TENANT}:  {agent} status --state-dir {shown(stack.agent_state)}")
    say(f"  brokers       {brokers} (HAProxy routes by SNI; {hosts_note(stack)})")
    say(f"  provisioning  https://127.0.0.1:{p.api}  (CA {shown(stack.data / 'api' / 'ca.pem')})")
    say(
        f"  console       https://127.0.0.1:{p.console}/  log in as {CONSOLE_ACCOUNT}, password "
        f"{stack.console_password}  (CA {shown(stack.console_state / 'tls' / 'ca.pem')})"
    )
    say(
        f"  data          {shown(stack.store)}:  {bridge} query values --config {shown(stack.bridge_config)} "
        f"--tenant {TENANT}"
    )
    say(f"  logs          {shown(stack.logs)}/")
    say()
    say("Watch the gateway as a technician (read-only certificate, valid 8 hours); paste in another terminal:")
    say()
    say(f"    {stack.technician_command}")
    say()


def stored(stack: Stack) -> None:
    """What the bridge stored, through ``bridge query``."""
    bridge = tool("bridge")
    for what in ("counts", "alerts"):
        argv = [bridge, "query", what, "--config", str(stack.bridge_config), "--tenant", TENANT]
        out = run_tool(argv, stack.logs, what=f"bridge query {what}")
        say(f"$ {shown(bridge)} query {what} --config {shown(stack.bridge_config)} --tenant {TENANT}")
        for line in out.rstrip().splitlines()[:12]:
            say(f"  {line}")
