"""The systemd units verify, and the agent really speaks sd_notify (READY, WATCHDOG, STOPPING)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "systemd").glob("*.service"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt-get install systemd)")
@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    # The units name the installed commands (/usr/local/bin/...); point them at this checkout's.
    text = unit.read_text()
    for command in ("agent", "bridge", "provisioning"):
        text = text.replace(f"/usr/local/bin/{command} ", f"{Path(sys.executable).parent / command} ")
    copy = tmp_path / unit.name
    copy.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr.strip()) == (0, "")
    assert "Type=notify" in text and "WatchdogSec=" in text and "NoNewPrivileges=yes" in text


def test_agent_notifies_ready_feeds_the_watchdog_and_says_stopping() -> None:
    short = Path(tempfile.mkdtemp(prefix="fe-", dir="/tmp"))  # unix socket paths are short
    try:
        address = str(short / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(address)
        sock.settimeout(10)
        config = short / "agent.yaml"
        config.write_text(yaml.safe_dump({"gateway": "gw-01", "state_dir": str(short / "state"),
                                          "mqtt": {"url": f"mqtt://127.0.0.1:{free_port()}"}, "devices": []}))
        env = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC="1000000")
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            messages: list[str] = []
            deadline = time.monotonic() + 15
            while sum(m == "WATCHDOG=1" for m in messages) < 3 and time.monotonic() < deadline:
                messages += sock.recv(4096).decode().splitlines()
            assert "READY=1" in messages
            assert messages.index("READY=1") < len(messages) - 1
            assert sum(m == "WATCHDOG=1" for m in messages) >= 3
            assert any(m.startswith("STATUS=") for m in messages)
            proc.send_signal(signal.SIGTERM)
            while "STOPPING=1" not in messages:
                messages += sock.recv(4096).decode().splitlines()
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            sock.close()
    finally:
        shutil.rmtree(short, ignore_errors=True)
