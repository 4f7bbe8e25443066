"""The demo's child processes: started with their own log file, waited on until ready, stopped by PID.

Children run in their own session, so a Ctrl-C in the terminal reaches only
the demo, which then stops them in reverse order of starting: the agent
and the bridge while the brokers they talk to are still up (the agent's
clean "offline" status reaches the bridge), the machines last. If the demo itself dies, Linux
sends each child SIGTERM (``PR_SET_PDEATHSIG``), so nothing is left behind.
Our own services report readiness the systemd way: each gets a
``NOTIFY_SOCKET`` of its own and is ready at ``READY=1``.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from factory_edge.errors import FactoryEdgeError

_PR_SET_PDEATHSIG = 1
_KEY = re.compile(r"fek_\S+")


class DemoError(FactoryEdgeError):
    """A step of the demo failed; the message says which and where its log is."""


def die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def terminate(proc: subprocess.Popen[Any], timeout_s: float = 5.0) -> int:
    """SIGTERM, then SIGKILL if it still runs after ``timeout_s``; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
    return proc.returncode


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return False
    return True


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` (a listener of ours could bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class ReadySocket:
    """A ``NOTIFY_SOCKET`` (abstract namespace) for one child; ``ready`` once it sent ``READY=1``."""

    def __init__(self, name: str) -> None:
        self.address = f"factory-edge-demo-{os.getpid()}-{name}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address)
        self.sock.setblocking(False)
        self.is_ready = False

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": "@" + self.address}

    def ready(self) -> bool:
        while not self.is_ready:
            try:
                message = self.sock.recv(4096)
            except BlockingIOError:
                break
            self.is_ready = b"READY=1" in message.split(b"\n")
        if self.is_ready:
            self.close()  # nothing more to hear (the service's later STATUS= lines are dropped)
        return self.is_ready

    def close(self) -> None:
        self.sock.close()  # idempotent


class Child:
    """One long-running process of the demo."""

    def __init__(
        self, name: str, argv: list[str], log_dir: Path, *, notify: bool = False, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_file = log_dir / f"{name}.log"
        self.notify = ReadySocket(name) if notify else None
        self.env = {**os.environ, **(env or {}), **(self.notify.env if self.notify else {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> Child:
        self._log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        return self

    def wait_ready(self, ready: Callable[[], bool] | None = None, *, timeout_s: float = 30.0) -> None:
        """Until ``ready()`` (default: READY=1 on its notify socket); a child that exits or hangs is an error."""
        check = ready or (self.notify.ready if self.notify else (lambda: True))
        deadline = time.monotonic() + timeout_s
        while not check():
            if self.proc is None or self.proc.poll() is not None:
                code = self.proc.returncode if self.proc else None
                raise DemoError(f"{self.name} exited with code {code}{self.tail()}")
            if time.monotonic() > deadline:
                raise DemoError(f"{self.name} not ready after {timeout_s:g}s{self.tail()}")
            time.sleep(0.05)

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 8) -> str:
        text = self.log_text().splitlines()[-lines:]
        return f"; {self.log_file} ends:\n" + "\n".join(f"    {line}" for line in text) if text else ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit code."""
        proc, self.proc = self.proc, None
        code = terminate(proc, timeout_s) if proc is not None else None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.notify is not None:
            self.notify.close()
        return code


def run_tool(argv: list[str], log_dir: Path, *, what: str, timeout_s: float = 60.0, stdin: str | None = None) -> str:
    """Run a one-shot command; its stdout, or a DemoError with its stderr. Both go to ``commands.log``.

    ``stdin`` (a password) is given to the command and never logged."""
    try:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise DemoError(f"{what}: no answer within {timeout_s:g}s ({' '.join(argv)})") from exc
    with open(log_dir / "commands.log", "a", encoding="utf-8") as log:
        text = f"$ {' '.join(argv)}\n{result.stdout}{result.stderr}(exit {result.returncode})\n\n"
        log.write(_KEY.sub("fek_…", text))  # provisioning keys are secrets: never in a log
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise DemoError(f"{what} failed (exit {result.returncode}): {detail[-1] if detail else 'no output'}")
    return result.stdout
