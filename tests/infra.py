"""Real tenant PKIs, Mosquitto brokers, an HAProxy SNI proxy, and private name resolution for tests.

Everything listens on 127.0.0.1 free ports, writes under the test's own
directory, and is stopped by PID: by the context managers and fixtures, and
as a last resort at interpreter exit. The machine's ``/etc/hosts`` is never
changed: ``resolve_in_namespace`` runs a client in a private mount namespace
where a temporary hosts file is bind-mounted over it, so ``mosquitto_sub -h
mqtt.acme.test`` sends that name as SNI and checks the broker certificate
against it, exactly as in production.
"""

from __future__ import annotations

import atexit
import datetime as dt
import os
import pwd
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cryptography import x509

from factory_edge import names
from factory_edge.demo.processes import terminate
from provisioning import pki as pkilib
from provisioning import render
from provisioning.render import TenantRoute
from tests.helpers import free_port

_LIVE: dict[int, subprocess.Popen[Any]] = {}  # pid -> process, for the exit-time safety net
BRIDGE_INSTANCES = ("test", "one", "two", "t0", "t1", "t2", "t3")  # bridge.<instance> identities of a TenantPki


class TenantPki:
    """A tenant's CA, broker certificate (``mqtt.<tenant>.<domain>``), CRL and client certificates, on disk."""

    def __init__(self, root: Path, tenant: str, domain: str = "test") -> None:
        self.root = Path(root)
        self.tenant = tenant
        self.domain = domain
        self.host = f"mqtt.{tenant}.{domain}"
        self.clients_dir = self.root / "clients"
        self.clients_dir.mkdir(parents=True, exist_ok=True)
        self.ca_key, self.ca_cert = pkilib.create_ca(f"{tenant} CA")
        self.ca_file = self.root / "ca.pem"
        self.ca_key_file = self.root / "ca.key"
        pkilib.write_pem(self.ca_file, self.ca_cert)
        pkilib.write_private_key(self.ca_key_file, self.ca_key)
        broker_key = pkilib.new_key()
        self.broker_cert_file = self.root / "broker.pem"
        self.broker_key_file = self.root / "broker.key"
        pkilib.write_private_key(self.broker_key_file, broker_key)
        pkilib.write_pem(
            self.broker_cert_file,
            pkilib.issue_server_cert(self.ca_key, self.ca_cert, broker_key.public_key(), self.host),
        )
        self.crl_file = self.root / "crl.pem"
        self.revoked: dict[int, dt.datetime] = {}
        self.certs: dict[str, x509.Certificate] = {}
        self._write_crl()
        self.bridge = self.client(pkilib.BRIDGE_ID)
        # The broker binds each client id to its certificate, so every bridge process and the alert role
        # have identities of their own; issued now so that the broker's ACL lists them from its start.
        for instance in BRIDGE_INSTANCES:
            self.client(names.bridge_identity(instance))
        self.client(names.BRIDGE_ALERTS_ID)

    def client(self, name: str, **validity: Any) -> tuple[Path, Path]:
        """Issue (or re-issue) a client certificate with CN ``name``; returns ``(cert_path, key_path)``.

        ``validity``: ``days``, ``hours``, ``not_before``, ``not_after`` as in
        ``pkilib.issue_client_cert``. Technicians (``tech-*``) only get read
        access once the broker's ACL lists them: start or ``reload()`` it after.
        """
        key, cert = pkilib.issue_client_cert(self.ca_key, self.ca_cert, name, **validity)
        cert_path, key_path = self.paths(name)
        pkilib.write_private_key(key_path, key)
        pkilib.write_pem(cert_path, cert)
        self.certs[name] = cert
        return cert_path, key_path

    def paths(self, name: str) -> tuple[Path, Path]:
        return self.clients_dir / f"{name}.pem", self.clients_dir / f"{name}.key"

    @property
    def bridges(self) -> list[str]:
        """Every bridge identity issued: ``bridge``, ``bridge.<instance>``, ``bridge-alerts``."""
        return sorted(name for name in self.certs if names.is_bridge(name))

    def bridge_identities(self) -> dict[str, dict[str, str]]:
        """``identities:`` for a bridge config: each pre-issued instance's certificate and key."""
        found = {}
        for instance in BRIDGE_INSTANCES:
            cert, key = self.paths(names.bridge_identity(instance))
            found[instance] = {"cert_file": str(cert), "key_file": str(key)}
        return found

    @property
    def technicians(self) -> list[str]:
        return sorted(name for name in self.certs if name.startswith(pkilib.TECHNICIAN_PREFIX))

    def revoke(self, name: str) -> int:
        """Add ``name``'s current certificate to the CRL file (reload the broker to apply); returns the serial."""
        serial = self.certs[name].serial_number
        self.revoked[serial] = dt.datetime.now(dt.UTC)
        self._write_crl()
        return serial

    def _write_crl(self) -> None:
        pkilib.write_pem(self.crl_file, pkilib.create_crl(self.ca_key, self.ca_cert, list(self.revoked.items())))


class _Process:
    """A foreground server process with its own log file, stopped by PID."""

    name = "process"

    def __init__(self, conf_dir: Path) -> None:
        self.dir = Path(conf_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_file = self.dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """Everything the process wrote so far (all runs)."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _spawn(self, argv: list[str]) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} already running (pid {self.pid})")
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
            )
        _LIVE[self.proc.pid] = self.proc

    def _wait_ready(self, ready: Callable[[], bool], timeout_s: float, log_offset: int) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if not self.running:
                code = self.proc.returncode if self.proc else None
                self.proc = None
                raise RuntimeError(f"{self.name} exited with code {code}:\n{self.log()[log_offset:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {timeout_s}s:\n{self.log()[log_offset:]}")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code (None if not running)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        try:
            return terminate(proc, timeout_s)
        finally:
            _LIVE.pop(proc.pid, None)

    def kill(self) -> None:
        """SIGKILL, as in a crash."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
            _LIVE.pop(proc.pid, None)

    def __enter__(self) -> Self:
        self.start()  # type: ignore[attr-defined]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class Mosquitto(_Process):
    """One tenant's broker: rendered config, TLS listener on ``127.0.0.1:port``, persistence kept across restarts."""

    name = "mosquitto"

    def __init__(self, conf_dir: Path, pki: TenantPki, port: int | None = None) -> None:
        super().__init__(conf_dir)
        self.pki = pki
        self.port = port or free_port()
        self.max_packet_size = render.MAX_PACKET_SIZE  # read at start: change it, then stop() and start()
        self.conf_file = self.dir / "mosquitto.conf"
        self.acl_file = self.dir / "acl"
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir(exist_ok=True)

    @property
    def host(self) -> str:
        """The SNI name clients use for this tenant (``mqtt.<tenant>.<domain>``)."""
        return self.pki.host

    @property
    def route(self) -> TenantRoute:
        return TenantRoute(name=self.pki.tenant, sni_host=self.pki.host, backend_addr=f"127.0.0.1:{self.port}")

    def render(self) -> None:
        """Write the config and the ACL (listing the PKI's technicians so far)."""
        self.conf_file.write_text(
            render.mosquitto_conf(
                port=self.port,
                cafile=str(self.pki.ca_file),
                certfile=str(self.pki.broker_cert_file),
                keyfile=str(self.pki.broker_key_file),
                crlfile=str(self.pki.crl_file),
                aclfile=str(self.acl_file),
                persistence_dir=str(self.data_dir),
                user=pwd.getpwuid(os.geteuid()).pw_name,
                max_packet_size=self.max_packet_size,
            )
        )
        self.acl_file.write_text(render.mosquitto_acl(technicians=self.pki.technicians, bridges=self.pki.bridges))

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        """Render and run ``mosquitto -c``; return once the TLS listener is open."""
        self.render()
        offset = len(self.log())
        self._spawn(["mosquitto", "-c", str(self.conf_file)])
        self._wait_ready(lambda: " running" in self.log()[offset:], timeout_s, offset)
        return self

    def reload(self, timeout_s: float = 5.0) -> None:
        """Re-render (ACL technicians), SIGHUP, and wait until the broker has re-read config, ACL and CRL."""
        if not self.running or self.proc is None:
            raise RuntimeError("mosquitto is not running")
        self.render()
        before = self.log().count("Reloading config")
        self.proc.send_signal(signal.SIGHUP)
        # The broker logs this line and then reloads in the same loop turn,
        # before it handles any new connection.
        self._wait_ready(lambda: self.log().count("Reloading config") > before, timeout_s, 0)


class Haproxy(_Process):
    """The SNI proxy in front of some tenant brokers, TLS passthrough, on ``127.0.0.1:port``."""

    name = "haproxy"

    def __init__(
        self, conf_dir: Path, routes: Iterable[TenantRoute | Mapping[str, Any]], port: int | None = None
    ) -> None:
        super().__init__(conf_dir)
        self.routes = [TenantRoute.of(r) for r in routes]
        self.port = port or free_port()
        self.cfg_file = self.dir / "haproxy.cfg"
        self.map_file = self.dir / "tenants.map"
        # A unix socket path must fit in 108 bytes; pytest's tmp paths may not.
        self._sock_dir = Path(tempfile.mkdtemp(prefix="fe-haproxy-"))
        self.stats_socket = self._sock_dir / "admin.sock"

    def render(self) -> None:
        self.map_file.write_text(render.haproxy_map(render.haproxy_routes(self.routes)))
        self.cfg_file.write_text(
            render.haproxy_cfg(
                bind="127.0.0.1",
                port=self.port,
                map_file=str(self.map_file),
                tenants=self.routes,
                stats_socket=str(self.stats_socket),
            )
        )

    def start(self, timeout_s: float = 10.0) -> Haproxy:
        """Render and run ``haproxy -f cfg -db``; return once it answers on its runtime socket."""
        self.render()
        self.stats_socket.unlink(missing_ok=True)
        offset = len(self.log())
        self._spawn(["haproxy", "-f", str(self.cfg_file), "-db"])
        # Listeners and the runtime socket are bound together, before the
        # process starts serving, so an answer means the port is open too.
        self._wait_ready(self._answers, timeout_s, offset)
        return self

    def runtime(self, command: str, timeout_s: float = 5.0) -> str:
        """Send one command to the runtime API (e.g. ``show map``) and return the answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(self.stats_socket))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def add_route(self, sni_host: str, backend: str) -> None:
        """Route a new SNI name to an existing backend at runtime (no reload, no dropped connection)."""
        answer = self.runtime(f"add map {self.map_file} {sni_host} {backend}")
        if answer.strip():
            raise RuntimeError(f"haproxy refused the route: {answer.strip()}")

    def _answers(self) -> bool:
        try:
            return "Pid:" in self.runtime("show info", timeout_s=1.0)
        except OSError:
            return False

    def stop(self, timeout_s: float = 5.0) -> int | None:
        code = super().stop(timeout_s)
        self.stats_socket.unlink(missing_ok=True)
        return code

    def close(self) -> None:
        """Stop and remove the runtime socket's directory."""
        self.stop()
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -- name resolution -------------------------------------------------------

# The hosts file is removed as soon as it is mounted (the mount keeps it
# alive), so nothing is left in /tmp whatever happens to the command.
_NS_SCRIPT = 'h=$1; shift; mount --bind "$h" /etc/hosts; rc=$?; rm -f "$h"; [ $rc -eq 0 ] || exit 125; exec "$@"'


def _namespace_argv(hosts: Mapping[str, str], argv: list[str]) -> tuple[list[str], str]:
    fd, path = tempfile.mkstemp(prefix="fe-hosts-")
    with os.fdopen(fd, "w") as f:
        f.write("127.0.0.1 localhost\n::1 localhost\n")
        f.writelines(f"{address} {name}\n" for name, address in hosts.items())
    os.chmod(path, 0o644)
    # Unprivileged users get a user namespace so that the mount is allowed.
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]
    return [*unshare, "sh", "-c", _NS_SCRIPT, "sh", path, *map(str, argv)], path


def resolve_in_namespace(hosts: Mapping[str, str], argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` where ``/etc/hosts`` maps ``hosts`` (name -> address); returns the Popen.

    The command's PID is the Popen's PID (unshare and sh exec it), so
    stopping the Popen stops the command. Exit code 125 means the private
    hosts file could not be mounted.
    """
    full, path = _namespace_argv(hosts, argv)
    try:
        proc = subprocess.Popen(full, **kwargs)
    except BaseException:
        os.unlink(path)
        raise
    weakref.finalize(proc, _unlink, path)
    _LIVE[proc.pid] = proc
    return proc


def run_in_namespace(
    hosts: Mapping[str, str], argv: list[str], *, timeout: float = 10.0, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run a one-shot command (e.g. ``mosquitto_pub``) as ``resolve_in_namespace`` does; output is captured text."""
    full, path = _namespace_argv(hosts, argv)
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    try:
        return subprocess.run(full, timeout=timeout, **kwargs)  # kills the command by PID on timeout
    finally:
        _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- MQTT command-line clients ---------------------------------------------


def tls_args(
    host: str,
    port: int,
    ca_file: Path,
    cert_key: tuple[Path, Path],
    *,
    client_id: str | None = None,
    mqtt_version: str = "mqttv5",
) -> list[str]:
    """Connection options for ``mosquitto_pub``/``mosquitto_sub``: ``-h host`` is the SNI name and checked name."""
    cert, key = cert_key
    args = [
        "-h",
        host,
        "-p",
        str(port),
        "--cafile",
        str(ca_file),
        "--cert",
        str(cert),
        "--key",
        str(key),
        "-V",
        mqtt_version,
    ]
    if client_id:
        args += ["-i", client_id]
    return args


class Subscriber:
    """A running ``mosquitto_sub`` whose messages are collected as ``(topic, payload)`` by a reader thread.

    Started with ``-d`` so the SUBACK is visible: ``wait_subscribed()``
    returns the granted QoS (or refusal code) of each subscription.
    """

    def __init__(self, hosts: Mapping[str, str], conn: list[str], topics: Iterable[str], *, qos: int = 1) -> None:
        # stdbuf: mosquitto_sub's debug lines (the SUBACK) are block-buffered into a pipe otherwise.
        argv = ["stdbuf", "-oL", "mosquitto_sub", *conn, "-q", str(qos), "-d", "-F", "MSG %t %p"]
        for topic in topics:
            argv += ["-t", topic]
        self.proc = resolve_in_namespace(
            hosts,
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="mosquitto_sub reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _pump(self, timeout_s: float) -> bool:
        """Move one line into ``output``; False at end of output or timeout."""
        try:
            line = self._lines.get(timeout=max(timeout_s, 0.0))
        except queue.Empty:
            return False
        if line is None:
            self._lines.put(None)
            return False
        self.output.append(line)
        return True

    def _wait(self, find: Callable[[], Any], timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while (result := find()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._pump(remaining):
                state = "timed out" if self.proc.poll() is None else f"exited {self.proc.returncode}"
                raise AssertionError(
                    f"mosquitto_sub ({state}): no {what} within {timeout_s}s; output:\n" + "\n".join(self.output)
                )
        return result

    def wait_subscribed(self, timeout_s: float = 10.0) -> list[int]:
        """The SUBACK codes (granted QoS, or >= 128 for refused) once the broker has answered."""
        line = self._wait(
            lambda: next((x for x in self.output if x.startswith("Subscribed (mid:")), None), timeout_s, "SUBACK"
        )
        return [int(code) for code in line.split(":", 2)[2].replace(",", " ").split()]

    @property
    def messages(self) -> list[tuple[str, str]]:
        """Every ``(topic, payload)`` received so far."""
        while self._pump(0):
            pass
        found = []
        for line in self.output:
            if line.startswith("MSG "):
                topic, _, payload = line[4:].partition(" ")
                found.append((topic, payload))
        return found

    def wait_message(self, topic: str, timeout_s: float = 10.0) -> str:
        """The payload of the first message on ``topic``."""
        return self._wait(
            lambda: next((p for t, p in self.messages if t == topic), None), timeout_s, f"message on {topic}"
        )

    def stop(self) -> None:
        terminate(self.proc)
        _LIVE.pop(self.proc.pid, None)
        self._reader.join(5)
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _kill_leftovers() -> None:
    for pid, proc in list(_LIVE.items()):
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        _LIVE.pop(pid, None)


atexit.register(_kill_leftovers)
