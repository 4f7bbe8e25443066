"""Several "hosts" on one machine: network namespaces on a private bridge, made and removed by the test.

::

    root namespace (pytest)                 namespace <prefix>-broker1
      <prefix>br  10.217.N.1/24  ──veth──►    eth0  10.217.N.10/24
                                 ──veth──►  namespace <prefix>-proxy   eth0  10.217.N.11/24
                                 ...

Each ``Network`` gets a prefix of its own (``t<pid, 6 hex><counter, 2 hex>``) carried
by every name it creates (namespaces, the bridge, the veth ends) and a /24
of its own in 10.217.0.0/16, chosen under a lock so parallel workers never
collide. The bridge end in the root namespace has ``.1``, so the test
process reaches every host's address directly, and each namespace has a
default route through it, so hosts reach the root namespace's listeners on
``.1`` (bind them to ``0.0.0.0`` or to ``network.gateway``).

``run_in(host, argv)`` starts a process inside a namespace and returns its
Popen (``ip netns exec`` execs the command, so the Popen's PID is the
command's PID; stop it by that PID). ``close()`` stops what is still
running in the namespaces, then deletes the namespaces (their veth pairs
go with them) and the bridge. It runs from the context manager, at
interpreter exit, and for a crashed earlier run: each network is recorded
under ``/run/fe-netns/`` with its creator's PID, and a new network removes
the leftovers of creators that are gone.

Namespaces have no DNS server: give clients the names they need with
``hosts_file`` (a lookup that falls through to DNS waits for its timeout).

Requires root (CAP_NET_ADMIN) and ``ip`` (iproute2); ``available()`` says
whether they are there, for ``pytest.skip``.
"""

from __future__ import annotations

import atexit
import fcntl
import ipaddress
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

STATE_DIR = Path("/run/fe-netns")
SUPERNET = "10.217"  # networks are 10.217.N.0/24, N in 1..254
_COUNTER = itertools.count()
_OPEN: dict[str, Network] = {}


def available() -> str | None:
    """None when namespaces can be made here, else the reason (for ``pytest.skip``)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "ip (iproute2) not installed: run `apt-get install iproute2`"
    return None


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


@dataclass(frozen=True)
class Host:
    """One namespace: ``name`` as given to ``add_host``, ``ns`` the namespace, ``address`` its IPv4 address."""

    name: str
    ns: str
    address: str


class Network:
    """A bridge in the root namespace and the namespaces plugged into it; a context manager."""

    def __init__(self, *, prefix: str | None = None) -> None:
        # Fixed width, so that no network's prefix is the beginning of another's (names are matched by prefix).
        self.prefix = prefix or f"t{os.getpid():06x}{next(_COUNTER) % 256:02x}"
        if len(self.prefix) > 9:
            raise ValueError(f"prefix {self.prefix!r} too long (interface names are at most 15 characters)")
        self.bridge = f"{self.prefix}br"
        self.hosts: dict[str, Host] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._hosts_dirs: list[Path] = []
        self._closed = False
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        with _locked():
            sweep_stale()
            self.subnet = _free_subnet()
            self.gateway = f"{SUPERNET}.{self.subnet}.1"
            self._record()
        _OPEN[self.prefix] = self
        try:
            stale = leftovers(self.prefix)  # only a dead process with our PID can have left these
            if stale:
                _remove(self.prefix, [name for name in stale if "-" in name], self.bridge)
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    @property
    def cidr(self) -> str:
        return f"{SUPERNET}.{self.subnet}.0/24"

    def add_host(self, name: str, *, hosts_file: Mapping[str, str] | None = None) -> Host:
        """A new namespace ``<prefix>-<name>`` with ``eth0`` on the bridge and the next free address.

        ``hosts_file`` (name -> address) becomes ``/etc/hosts`` for the
        processes ``run_in`` starts there (``ip netns exec`` bind-mounts
        ``/etc/netns/<ns>/hosts``), so clients in the namespace can use the
        TLS names certificates are issued for.
        """
        if name in self.hosts:
            raise ValueError(f"host {name!r} already exists")
        index = len(self.hosts)
        ns = f"{self.prefix}-{name}"
        address = f"{SUPERNET}.{self.subnet}.{10 + index}"
        outer, inner = f"{self.prefix}h{index}", f"{self.prefix}n{index}"
        self.hosts[name] = host = Host(name=name, ns=ns, address=address)
        self._record()
        _ip("netns", "add", ns)
        _ip("link", "set", "lo", "up", ns=ns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")
        _ip("link", "set", inner, "name", "eth0", ns=ns)
        _ip("addr", "add", f"{address}/24", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        _ip("route", "add", "default", "via", self.gateway, ns=ns)
        if hosts_file is not None:
            self.set_hosts_file(name, hosts_file)
        return host

    def set_hosts_file(self, name: str, hosts_file: Mapping[str, str]) -> None:
        """Replace ``/etc/hosts`` as seen by processes started in ``name`` from now on."""
        ns = self.hosts[name].ns
        directory = Path("/etc/netns") / ns
        directory.mkdir(parents=True, exist_ok=True)
        if directory not in self._hosts_dirs:
            self._hosts_dirs.append(directory)
        lines = ["127.0.0.1 localhost", "::1 localhost", *(f"{addr} {host}" for host, addr in hosts_file.items())]
        (directory / "hosts").write_text("\n".join(lines) + "\n")

    def address(self, name: str) -> str:
        return self.hosts[name].address

    def argv(self, name: str, argv: list[str]) -> list[str]:
        """``argv`` prefixed to run in host ``name`` (for callers that spawn processes themselves)."""
        return ["ip", "netns", "exec", self.hosts[name].ns, *map(str, argv)]

    def run_in(self, name: str, argv: list[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in host ``name``; the Popen's PID is the command's. Stopped at ``close()`` if still running."""
        popen.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(name, argv), **popen)
        self._procs.append(proc)
        return proc

    def run(
        self, name: str, argv: list[str], *, timeout: float = 30.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a one-shot command in host ``name``; output captured as text."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.argv(name, argv), timeout=timeout, **kwargs)

    def close(self) -> None:
        """Stop our processes, delete the namespaces and the bridge; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for proc in reversed(self._procs):
            _stop(proc)
        _remove(self.prefix, [host.ns for host in self.hosts.values()], self.bridge)
        for directory in self._hosts_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        (STATE_DIR / f"{self.prefix}.json").unlink(missing_ok=True)
        _OPEN.pop(self.prefix, None)

    def _record(self) -> None:
        record = {
            "pid": os.getpid(),
            "subnet": self.subnet,
            "bridge": self.bridge,
            "namespaces": [host.ns for host in self.hosts.values()],
        }
        path = STATE_DIR / f"{self.prefix}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _stop(proc: subprocess.Popen[Any], timeout_s: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _remove(prefix: str, namespaces: list[str], bridge: str) -> None:
    """Kill whatever still runs in our namespaces (they are ours alone), then delete them and the bridge."""
    for ns in namespaces:
        pids = _ip("netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    for ns in namespaces:
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
    # A veth whose namespace could not be deleted would keep its root end: remove those too.
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(": ")
        if len(parts) > 1:
            link = parts[1].split("@")[0]
            if link.startswith(prefix) and link != bridge:
                _ip("link", "del", link, check=False)
    _ip("link", "del", bridge, check=False)


def leftovers(prefix: str) -> list[str]:
    """Namespaces and links whose name starts with ``prefix`` (empty after ``close()``)."""
    found = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(": ")
        if len(parts) > 1:
            found.append(parts[1].split("@")[0])
    return [name for name in found if name.startswith(prefix)]


def sweep_stale() -> None:
    """Remove the networks recorded by processes that no longer exist (a crashed or killed test run)."""
    for path in STATE_DIR.glob("*.json"):
        try:
            record = json.loads(path.read_text())
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(pid):
            continue
        _remove(path.stem, list(record.get("namespaces", [])), str(record.get("bridge", f"{path.stem}br")))
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free_subnet() -> int:
    taken = set()
    for path in STATE_DIR.glob("*.json"):
        try:
            taken.add(int(json.loads(path.read_text())["subnet"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    in_use = _ip("-4", "-o", "addr", "show", check=False).stdout
    for token in in_use.split():
        if token.startswith(SUPERNET + "."):
            try:
                net = ipaddress.ip_interface(token).network
            except ValueError:
                continue
            taken.add(int(str(net.network_address).split(".")[2]))
    start = (os.getpid() * 7 + int(time.monotonic() * 1000)) % 254
    for offset in range(254):
        candidate = (start + offset) % 254 + 1
        if candidate not in taken:
            return candidate
    raise RuntimeError(f"no free /24 left in {SUPERNET}.0.0/16")


class _locked:
    """An exclusive lock on ``STATE_DIR/lock`` while a subnet is chosen and recorded."""

    def __enter__(self) -> None:
        self._fd = os.open(STATE_DIR / "lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def _close_all() -> None:
    for network in list(_OPEN.values()):
        network.close()


atexit.register(_close_all)
