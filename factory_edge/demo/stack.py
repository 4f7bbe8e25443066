"""Bringing the whole story up on loopback, step by step, with the real commands.

Every piece is the product's own command or a Debian package, run as a
user would: ``agent simulate``; ``provisioning init``, ``tenant create``,
``serve``, ``key create`` and ``technician-cert``; one ``mosquitto -c`` per
tenant on the config provisioning rendered; ``haproxy -W`` routing both
tenants by SNI; ``agent provision`` with a key, then ``agent run``; and
``bridge run`` with ``tenants_from`` the provisioning data directory.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from factory_edge import hostsfile
from factory_edge.errors import FactoryEdgeError

from .processes import Child, DemoError, port_free, port_open, run_tool

DOMAIN = "demo.localhost"
TENANTS = ("acme", "globex")
TENANT = TENANTS[0]  # the gateway's tenant
GATEWAY = "gw-demo"
ALERT_RULE = "spindle-overtemp"
ALERT_ABOVE = 80.0
ALERT_CLEAR_BELOW = 75.0
ALERT_FOR = "3s"
MARKER = ".factory-edge-demo"
PID_FILE = "demo.pid"
AGENT_TEMPLATE = Path(__file__).resolve().parents[2] / "config" / "agent-demo.yaml"
STEPS = 11
CONSOLE_ACCOUNT = "operator"


@dataclass(frozen=True)
class Ports:
    modbus: int
    opcua: int
    proxy: int
    api: int
    brokers: tuple[int, ...]  # one per tenant, on 127.0.0.1 behind the proxy
    console: int

    @classmethod
    def with_offset(cls, offset: int) -> Ports:
        return cls(
            5020 + offset,
            4840 + offset,
            8883 + offset,
            8443 + offset,
            tuple(18831 + i + offset for i in range(len(TENANTS))),
            9443 + offset,
        )

    def named(self) -> list[tuple[str, int]]:
        return [
            ("the Modbus simulator", self.modbus),
            ("the OPC UA simulator", self.opcua),
            ("HAProxy (MQTT over TLS)", self.proxy),
            ("the provisioning API", self.api),
            ("the fleet console", self.console),
            *((f"tenant {t}'s Mosquitto", p) for t, p in zip(TENANTS, self.brokers)),
        ]


def say(text: str = "") -> None:
    print(text, flush=True)


def tool(name: str) -> str:
    """The path of one of our commands (beside this Python) or of a system program."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DemoError(f"{name} not found: run ./scripts/setup (it installs mosquitto, mosquitto-clients, haproxy)")
    return found


def shown(path: str | Path) -> str:
    """A path or command as a person types it here: relative to the current directory when below it."""
    path = Path(path)
    if shutil.which(path.name) == str(path):
        return path.name
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class Stack:
    """The demo's processes and files under one directory; ``up()`` starts them, ``down()`` stops them."""

    def __init__(self, root: Path, ports: Ports) -> None:
        self.root = root.resolve()
        self.ports = ports
        self.logs = self.root / "logs"
        self.data = self.root / "provisioning"
        self.agent_state = self.root / "agent"
        self.agent_config = self.root / "agent.yaml"
        self.bridge_config = self.root / "bridge.yaml"
        self.store = self.root / "bridge" / f"{TENANT}.db"
        self.technician_dir = self.root / "technician"
        self.children: list[Child] = []
        self.hosts_names: list[str] = []
        self.technician_command = ""  # printed for the person running the demo
        self.watch_command = ""  # the demo's own watch: another technician, as one certificate holds one session
        self.hosts = [f"mqtt.{t}.{DOMAIN}" for t in TENANTS]
        self.console_state = self.root / "console"
        self.console_password = ""  # printed with the console's URL
        self._step = 0

    # -- steps -----------------------------------------------------------------

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        self._step += 1
        started = time.monotonic()
        print(f"[{self._step:>2}/{STEPS}] {what} ...", end="", flush=True)
        try:
            yield
        except KeyboardInterrupt:
            print(" interrupted", flush=True)
            raise
        except BaseException:
            print(" FAILED", flush=True)
            raise
        print(f" ok ({time.monotonic() - started:.1f} s)", flush=True)

    def detail(self, text: str) -> None:
        say(f"        {text}")

    def up(self) -> None:
        self.prepare()
        with self.step("simulated plant: agent simulate"):
            self.start(
                Child(
                    "simulator",
                    [
                        tool("agent"),
                        "simulate",
                        "--modbus-port",
                        str(self.ports.modbus),
                        "--opcua-port",
                        str(self.ports.opcua),
                        "--quiet",
                    ],
                    self.logs,
                ),
                lambda: port_open(self.ports.modbus) and port_open(self.ports.opcua),
            )
        self.detail(
            f"Modbus TCP 127.0.0.1:{self.ports.modbus} (cnc-1, press-1, compressor-1), "
            f"OPC UA opc.tcp://127.0.0.1:{self.ports.opcua}/factory-edge/ (oven-1)"
        )
        with self.step(f"provisioning: data directory, tenants {' and '.join(TENANTS)}"):
            self.provisioning("init", "--proxy-bind", "127.0.0.1", "--proxy-port", str(self.ports.proxy))
            for tenant, port in zip(TENANTS, self.ports.brokers):
                self.provisioning("tenant", "create", tenant, "--domain", DOMAIN, "--broker-port", str(port))
        for tenant, host in zip(TENANTS, self.hosts):
            self.detail(f"{tenant}: its own CA, broker mqtts://{host}:{self.ports.proxy}")
        with self.step("broker names resolve to this machine"):
            self.resolve_names()
        self.detail(hosts_note(self))
        with self.step(f"tenant brokers: one Mosquitto each, {' and '.join(TENANTS)}"):
            for tenant, port in zip(TENANTS, self.ports.brokers):
                conf = self.data / "tenants" / tenant / "mosquitto.conf"
                self.start(
                    Child(f"mosquitto-{tenant}", [tool("mosquitto"), "-c", str(conf)], self.logs),
                    functools.partial(port_open, port),
                )
        with self.step(f"SNI proxy: HAProxy on 127.0.0.1:{self.ports.proxy}"):
            self.start(
                Child(
                    "haproxy",
                    [tool("haproxy"), "-W", "-db", "-f", str(self.data / "haproxy" / "haproxy.cfg")],
                    self.logs,
                ),
                lambda: port_open(self.ports.proxy),
            )
        with self.step(f"provisioning API: https://127.0.0.1:{self.ports.api}"):
            self.start(
                Child(
                    "provisioning",
                    [tool("provisioning"), "serve", "--port", str(self.ports.api), "--data-dir", str(self.data)],
                    self.logs,
                    notify=True,
                )
            )
        with self.step(f"bridge run: every tenant's broker into SQLite, alert rule {ALERT_RULE}"):
            self.provisioning("bridge", "add", "demo")  # the process's own identity, bridge.demo, on every tenant
            self.write_bridge_config()
            bridge = self.start(
                Child("bridge", [tool("bridge"), "run", "--config", str(self.bridge_config)], self.logs, notify=True)
            )
            # Subscribed before any gateway exists, so its session holds everything from the first message.
            bridge.wait_ready(lambda: bridge.log_text().count("connected to tenant broker") >= len(TENANTS))
        with self.step(f"gateway {GATEWAY}: agent provision with a one-use key"):
            summary = self.provision_gateway()
        for line in summary:
            self.detail(line)
        with self.step("agent run: polling the machines, buffering, publishing"):
            self.write_agent_config()
            self.start(
                Child("agent", [tool("agent"), "run", "--config", str(self.agent_config)], self.logs, notify=True)
            )
        with self.step(f"fleet console: https://127.0.0.1:{self.ports.console}/, account {CONSOLE_ACCOUNT}"):
            self.console_password = secrets.token_urlsafe(12)
            account = ["account", "create", CONSOLE_ACCOUNT, "--role", "operator", "--password-stdin"]
            run_tool(
                [tool("console"), *account, "--state-dir", str(self.console_state)],
                self.logs,
                what="console account create",
                stdin=self.console_password + "\n",
            )
            self.start(
                Child(
                    "console",
                    [
                        tool("console"),
                        "serve",
                        *("--bridge-config", str(self.bridge_config), "--provisioning-dir", str(self.data)),
                        *("--state-dir", str(self.console_state), "--port", str(self.ports.console)),
                        *("--tls-name", "localhost", "--tls-name", "127.0.0.1"),
                    ],
                    self.logs,
                ),
                lambda: port_open(self.ports.console),
            )
        with self.step("technician certificate: read-only, 8 hours"):
            commands = []
            for name in ("demo", "demo-story"):
                out = self.provisioning(
                    "technician-cert", TENANT, name, "--hours", "8", "--out", str(self.technician_dir)
                )
                commands.append(
                    next((line.strip() for line in out.splitlines() if line.strip().startswith("mosquitto_sub ")), "")
                )
            self.technician_command, self.watch_command = commands
            if not all(commands):
                raise DemoError(f"provisioning technician-cert printed no mosquitto_sub command; see {self.logs}")

    def prepare(self) -> None:
        """Check the ports, then start from an empty directory (a previous run's files are replaced)."""
        other = _running_demo(self.root / PID_FILE)
        if other is not None:
            raise DemoError(
                f"{self.root}: the demo with pid {other} runs there; stop it (Ctrl-C) or choose another --dir"
            )
        busy = [f"{port} ({what})" for what, port in self.ports.named() if not port_free(port)]
        if busy:
            raise DemoError(
                f"127.0.0.1 port {', '.join(busy)} in use: is the demo already running? "
                "Stop it, or move every port with --port-offset N"
            )
        if self.root.exists():
            if any(self.root.iterdir()) and not (self.root / MARKER).exists():
                raise DemoError(f"{self.root}: exists and is not a demo directory; choose another --dir")
            shutil.rmtree(self.root)
        self.logs.mkdir(parents=True)
        (self.root / MARKER).write_text("state of ./scripts/demo; replaced by the next run\n")
        (self.root / PID_FILE).write_text(f"{os.getpid()}\n")
        self.root.chmod(0o700)  # CA keys and the gateway's key live below

    def start(self, child: Child, ready: Callable[[], bool] | None = None) -> Child:
        self.children.append(child.start())
        child.wait_ready(ready)
        return child

    def provisioning(self, *args: str) -> str:
        return run_tool(
            [tool("provisioning"), *args, "--data-dir", str(self.data)],
            self.logs,
            what=f"provisioning {' '.join(args[:2])}",
        )

    def resolve_names(self) -> None:
        """Names that do not resolve, or resolve only through another demo's block, go into a block of our own."""
        missing = [host for host in self.hosts if not hostsfile.resolves_to_loopback(host)]
        missing += [host for host in hostsfile.borrowed(self.hosts) if host not in missing]
        if missing:
            hostsfile.edit("add", "127.0.0.1", missing, owner=str(self.root))
            self.hosts_names = missing
            still = [host for host in missing if not hostsfile.resolves_to_loopback(host)]
            if still:
                raise DemoError(
                    f"{', '.join(still)} still does not resolve after adding it to {hostsfile.HOSTS}: "
                    "check 'hosts: files' in /etc/nsswitch.conf"
                )

    def provision_gateway(self) -> list[str]:
        key = self.provisioning("key", "create", TENANT, "--uses", "1", "--expires", "1h").split()[0]
        out = run_tool(
            [
                tool("agent"),
                "provision",
                "--url",
                f"https://127.0.0.1:{self.ports.api}",
                "--key",
                key,
                "--name",
                GATEWAY,
                "--ca-file",
                str(self.data / "api" / "ca.pem"),
                "--state-dir",
                str(self.agent_state),
            ],
            self.logs,
            what="agent provision",
        )
        summary = []
        for line in out.splitlines():  # the command's own summary, down to its first blank line
            if not line.strip():
                break
            summary.append(line.rstrip())
        return summary

    def write_agent_config(self) -> None:
        """config/agent-demo.yaml, reading this run's simulator ports, with its state here."""
        try:
            doc = yaml.safe_load(AGENT_TEMPLATE.read_text())
        except OSError as exc:
            raise DemoError(f"{AGENT_TEMPLATE}: {exc.strerror}; the demo runs from a checkout") from exc
        doc["gateway"] = GATEWAY
        doc["state_dir"] = str(self.agent_state)
        for device in doc["devices"]:
            if device["protocol"] == "modbus-tcp":
                device["port"] = self.ports.modbus
            elif device["protocol"] == "opcua":
                device["endpoint"] = f"opc.tcp://127.0.0.1:{self.ports.opcua}/factory-edge/"
        self.agent_config.write_text(yaml.safe_dump(doc, sort_keys=False))

    def write_bridge_config(self) -> None:
        doc = {
            "instance": "demo",
            "tenants_from": str(self.data),
            "storage": {"backend": "sqlite", "path": str(self.store.parent)},
            "alerts": {
                "rules": [
                    {
                        "name": ALERT_RULE,
                        "device": "cnc-*",
                        "tag": "spindle_temp",
                        "above": ALERT_ABOVE,
                        "for": ALERT_FOR,
                        "clear_below": ALERT_CLEAR_BELOW,
                        "severity": "critical",
                        "message": "{device} spindle at {value:.1f} degC (limit {threshold})",
                    },
                    {"name": "gateway-offline", "offline": True, "for": "10s", "severity": "warning"},
                ]
            },
        }
        self.bridge_config.write_text(yaml.safe_dump(doc, sort_keys=False))

    # -- stopping --------------------------------------------------------------

    def down(self) -> int:
        """Stop every child, newest first, and take the demo's names out of the hosts file; how many stopped."""
        stopped = len(self.children)
        for child in reversed(self.children):
            code = child.stop()
            if code not in (None, 0, -15, 143):
                say(f"        {child.name} exited with code {code}; see {shown(child.log_file)}")
        self.children.clear()
        if self.hosts_names:
            try:
                hostsfile.edit("remove", owner=str(self.root))
            except (OSError, FactoryEdgeError) as exc:
                say(f"        could not remove the demo's names from {hostsfile.HOSTS}: {exc}")
            self.hosts_names = []
        return stopped


def _running_demo(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if that process is still a running demo."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if pid != os.getpid() and b"factory_edge.demo" in cmdline else None


def hosts_note(stack: Stack) -> str:
    if stack.hosts_names:
        return f"{', '.join(stack.hosts_names)} added to {hostsfile.HOSTS} until the demo stops"
    return "the broker names already resolve to this machine"


__all__ = [
    "ALERT_ABOVE",
    "ALERT_CLEAR_BELOW",
    "ALERT_FOR",
    "ALERT_RULE",
    "CONSOLE_ACCOUNT",
    "DOMAIN",
    "GATEWAY",
    "TENANT",
    "TENANTS",
    "Ports",
    "Stack",
    "hosts_note",
    "say",
    "shown",
    "tool",
]
