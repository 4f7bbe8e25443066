"""A whole provisioning deployment for tests, from the files ``provisioning`` renders.

``Deployment`` runs the real commands (``provisioning …`` and ``agent
provision`` as subprocesses), the tenant brokers as ``mosquitto -c
<data>/tenants/<t>/mosquitto.conf``, HAProxy as ``haproxy -W -f
<data>/haproxy/haproxy.cfg`` (master-worker, so ``provisioning`` can reload
it), and the API as ``provisioning serve`` over HTTPS on a free port.
Everything listens on 127.0.0.1 and is stopped by PID.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from factory_edge.demo.processes import terminate
from tests.helpers import free_port
from tests.infra import _LIVE, _Process, resolve_in_namespace, run_in_namespace

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
NOT_AUTHORIZED = "Warning: Publish 1 failed: Not authorized."


def provisioning(data: Path, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``provisioning ARGS --data-dir DATA``; with ``check`` a non-zero exit fails the test with its stderr."""
    argv = [PY, "-m", "provisioning.cli", *args, "--data-dir", str(data)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"provisioning {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def eventually(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)
    return result


def registry_dump(data: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table: to show a refused request changed nothing."""
    conn = sqlite3.connect(f"file:{data / 'registry.db'}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}
    finally:
        conn.close()


class RenderedMosquitto(_Process):
    """A tenant's Mosquitto running the config provisioning rendered."""

    name = "mosquitto"

    def __init__(self, data: Path, tenant: str) -> None:
        self.tenant = tenant
        self.conf = data / "tenants" / tenant / "mosquitto.conf"
        super().__init__(data / "logs" / tenant)

    def start(self, timeout_s: float = 10.0) -> RenderedMosquitto:
        offset = len(self.log())
        self._spawn(["mosquitto", "-c", str(self.conf)])
        self._wait_ready(lambda: " running" in self.log()[offset:], timeout_s, offset)
        return self


class RenderedHaproxy(_Process):
    """HAProxy in master-worker mode on the rendered config (reloaded by SIGUSR2 to the master)."""

    name = "haproxy"

    def __init__(self, data: Path, port: int) -> None:
        self.cfg = data / "haproxy" / "haproxy.cfg"
        self.port = port
        super().__init__(data / "logs" / "haproxy")

    def start(self, timeout_s: float = 10.0) -> RenderedHaproxy:
        offset = len(self.log())
        self._spawn(["haproxy", "-W", "-db", "-f", str(self.cfg)])
        self._wait_ready(self._listening, timeout_s, offset)
        return self

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        except OSError:
            return False
        return True

    def stop(self, timeout_s: float = 5.0) -> int | None:
        # SIGTERM to the master stops its workers too (the old ones after a reload included).
        return super().stop(timeout_s)


class ApiServer(_Process):
    """``provisioning serve`` on a free port; ``ca`` verifies it."""

    name = "api"

    def __init__(self, data: Path, *options: str, port: int | None = None) -> None:
        self.data = data
        self.port = port or free_port()
        self.options = options
        self.ca = data / "api" / "ca.pem"
        super().__init__(data / "logs" / f"api-{self.port}")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> ApiServer:
        offset = len(self.log())
        self._spawn(
            [
                PY,
                "-m",
                "provisioning.cli",
                "--log-format",
                "json",
                "serve",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data),
                *self.options,
            ]
        )
        self._wait_ready(self._answers, timeout_s, offset)
        return self

    def _answers(self) -> bool:
        if not self.ca.exists():
            return False
        try:
            return httpx.get(f"{self.url}/v1/health", verify=self.context(), timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, verify=self.context(), timeout=10.0, **kwargs)


class Watcher:
    """A running command (e.g. a printed ``mosquitto_sub``) whose output lines are collected by a thread."""

    def __init__(self, hosts: dict[str, str], argv: list[str]) -> None:
        self.proc = resolve_in_namespace(
            hosts,
            ["stdbuf", "-oL", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True, name="watcher")
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def output(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def wait_line(self, predicate: Callable[[str], bool], timeout_s: float, what: str) -> str:
        return eventually(lambda: next((x for x in self.output() if predicate(x)), None), timeout_s, what)

    def stop(self) -> None:
        terminate(self.proc)
        _LIVE.pop(self.proc.pid, None)
        self._thread.join(5)
        if self.proc.stdout:
            self.proc.stdout.close()


class Deployment:
    """Data dir, tenant brokers, the SNI proxy and the API, all from ``provisioning``'s rendered files."""

    def __init__(self, root: Path, tenants: Iterable[str] = ("acme", "globex"), *, domain: str = "test") -> None:
        self.root = root
        self.data = root / "data"
        self.domain = domain
        self.proxy_port = free_port()
        self.hosts = {"mqtt.nope.test": "127.0.0.1"}
        self.brokers: dict[str, RenderedMosquitto] = {}
        provisioning(self.data, "init", "--proxy-bind", "127.0.0.1", "--proxy-port", str(self.proxy_port))
        for tenant in tenants:
            self.add_tenant(tenant, start=False)
        self.proxy = RenderedHaproxy(self.data, self.proxy_port)
        self.api = ApiServer(self.data, "--max-failures", "1000")
        self.servers: list[_Process] = [self.proxy, self.api]

    def start(self) -> Deployment:
        for broker in self.brokers.values():
            broker.start()
        self.proxy.start()
        self.api.start()
        return self

    def add_tenant(self, tenant: str, *, start: bool = True) -> subprocess.CompletedProcess[str]:
        result = provisioning(
            self.data, "tenant", "create", tenant, "--domain", self.domain, "--broker-port", str(free_port())
        )
        self.hosts[f"mqtt.{tenant}.{self.domain}"] = "127.0.0.1"
        self.brokers[tenant] = RenderedMosquitto(self.data, tenant)
        if start:
            self.brokers[tenant].start()
        return result

    def stop(self) -> None:
        for server in (*self.servers, *self.brokers.values()):
            server.stop()

    def key(self, tenant: str, *options: str) -> str:
        return provisioning(self.data, "key", "create", tenant, *options).stdout.strip()

    def agent_provision(
        self, *args: str, url: str | None = None, ca: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """``agent provision`` where ``mqtt.<tenant>.test`` resolves to this machine."""
        argv = [PY, "-m", "agent.cli", "provision", "--url", url or self.api.url, *args]
        if ca:
            argv += ["--ca-file", str(self.api.ca)]
        return run_in_namespace(self.hosts, argv, timeout=timeout, cwd=ROOT)

    def identity(self, state_dir: Path) -> dict[str, str]:
        return json.loads((state_dir / "identity.json").read_text())

    def conn(self, state_dir: Path, *, host: str | None = None) -> list[str]:
        """mosquitto_pub/sub options for a provisioned gateway's identity, through the proxy."""
        ident = self.identity(state_dir)
        broker = ident["broker_url"].split("://", 1)[1].rsplit(":", 1)[0]
        return [
            "-h",
            host or broker,
            "-p",
            str(self.proxy_port),
            "--cafile",
            str(state_dir / ident["ca_file"]),
            "--cert",
            str(state_dir / ident["cert_file"]),
            "--key",
            str(state_dir / ident["key_file"]),
            "-V",
            "mqttv5",
        ]

    def pub(self, conn: list[str], topic: str, payload: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return run_in_namespace(self.hosts, ["mosquitto_pub", *conn, "-q", "1", "-t", topic, "-m", payload, *extra])

    def watch(self, command: str) -> Watcher:
        """Run a printed command line (shell words) as it is."""
        return Watcher(self.hosts, shlex.split(command))

    def bridge_conn(self, tenant: str) -> list[str]:
        files = self.data / "tenants" / tenant
        return [
            "-h",
            f"mqtt.{tenant}.{self.domain}",
            "-p",
            str(self.proxy_port),
            "--cafile",
            str(files / "ca.pem"),
            "--cert",
            str(files / "bridge.pem"),
            "--key",
            str(files / "bridge.key"),
            "-V",
            "mqttv5",
        ]


def key_files(*roots: Path) -> list[Path]:
    found = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            found += [Path(dirpath) / n for n in names if n.endswith(".key")]
    return found
