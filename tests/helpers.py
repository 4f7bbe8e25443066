"""Small test utilities shared by the test modules."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parent.parent


def documented_models(page: Path) -> list[tuple[list[type], set[str]]]:
    """Each ``<!-- model: a.B c.D -->`` section of a docs page: the models it names and the keys its table lists."""
    out = []
    for section in re.split(r"<!-- model: ", page.read_text())[1:]:
        names, _, body = section.partition(" -->")
        models = []
        for dotted in names.split():
            module, _, attr = dotted.rpartition(".")
            models.append(getattr(importlib.import_module(module), attr))
        keys = set(re.findall(r"^\| `([a-z_]+)` \|", body.split("\n## ")[0].split("\n### ")[0], re.M))
        out.append((models, keys))
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.05,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` until it is true; fail the test with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)


class ServiceProcess:
    """A factory-edge command (``python -m <module> …``) in a subprocess, logging JSON lines to a file.

    Subclasses give the command line; stopped by PID: SIGTERM for a clean
    stop, SIGKILL (``kill``) for a crash.
    """

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """Module and arguments after ``python -m``."""
        raise NotImplementedError

    def start(self) -> Self:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *self.command()], cwd=ROOT, stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
        return self

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM (clean stop), SIGKILL if it does not exit in time; the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            # Hung: have it write its threads' stacks to its log (agent run registers SIGUSR2), then kill it.
            self.proc.send_signal(signal.SIGUSR2)
            time.sleep(1)
            self.proc.kill()
            return self.proc.wait(5)

    def kill(self) -> None:
        """kill -9: no chance to flush, close or say goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> list[dict[str, Any]]:
        """Every log line so far, parsed (a line that is not JSON comes back as ``{"msg": line}``)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"msg": line})
        return out
