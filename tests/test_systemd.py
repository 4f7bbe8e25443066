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
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "systemd").glob("*.service"))


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt-get install systemd)"
)
@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    # The units name the installed commands (/usr/local/bin/...); point them at this checkout's.
    text = unit.read_text()
    for command in ("agent", "bridge", "provisioning", "console"):
        text = text.replace(f"/usr/local/bin/{command} ", f"{Path(sys.executable).parent / command} ")
    copy = tmp_path / unit.name
    copy.write_text(text)
    # --man=no: the agent's unit names its man page, which only the Debian package installs.
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stderr.strip()) == (0, "")
    assert "Type=notify" in text and "WatchdogSec=" in text and "NoNewPrivileges=yes" in text


def notifications(argv: list[str], workdir: Path) -> list[str]:
    """Run a service with a NOTIFY_SOCKET and a 1 s watchdog; stop it with SIGTERM; return what it said."""
    address = str(workdir / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(15)
    env = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC="1000000")
    proc = subprocess.Popen(
        [sys.executable, "-m", *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while sum(m == "WATCHDOG=1" for m in messages) < 3 and time.monotonic() < deadline:
            messages += sock.recv(4096).decode().splitlines()
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages and time.monotonic() < deadline:
            messages += sock.recv(4096).decode().splitlines()
        proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
    return messages


def assert_notify_protocol(messages: list[str]) -> None:
    assert "READY=1" in messages
    ready = messages.index("READY=1")
    assert sum(m == "WATCHDOG=1" for m in messages[ready:]) >= 3  # fed after READY, at the watchdog's pace
    assert "STOPPING=1" in messages[ready:]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fe-", dir="/tmp"))  # unix socket paths must stay short
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_agent_notifies_ready_feeds_the_watchdog_and_says_stopping(short_dir: Path) -> None:
    config = short_dir / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": "gw-01",
                "state_dir": str(short_dir / "state"),
                "mqtt": {"url": f"mqtt://127.0.0.1:{free_port()}"},
                "devices": [],
            }
        )
    )
    messages = notifications(["agent.cli", "run", "--config", str(config)], short_dir)
    assert_notify_protocol(messages)
    assert any(m.startswith("STATUS=") for m in messages)


def test_bridge_notifies_ready_and_feeds_the_watchdog(short_dir: Path) -> None:
    from tests.infra import TenantPki

    pki = TenantPki(short_dir / "pki", "acme")
    cert, key = pki.bridge
    config = short_dir / "bridge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"backend": "sqlite", "path": str(short_dir / "data")},
                "tenants": [
                    {
                        "name": "acme",
                        "url": f"mqtts://{pki.host}:{free_port()}",
                        "connect_host": "127.0.0.1",
                        "ca_file": str(pki.ca_file),
                        "cert_file": str(cert),
                        "key_file": str(key),
                    }
                ],
            }
        )
    )
    assert_notify_protocol(notifications(["bridge.cli", "run", "--config", str(config)], short_dir))


def test_provisioning_api_notifies_ready_and_feeds_the_watchdog(short_dir: Path) -> None:
    data = short_dir / "prov"
    subprocess.run(
        [sys.executable, "-m", "provisioning.cli", "init", "--data-dir", str(data)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )
    messages = notifications(
        ["provisioning.cli", "serve", "--data-dir", str(data), "--port", str(free_port())], short_dir
    )
    assert_notify_protocol(messages)


def test_console_notifies_ready_and_feeds_the_watchdog(short_dir: Path) -> None:
    config = short_dir / "bridge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"backend": "sqlite", "path": str(short_dir / "storage")},
                "tenants": [{"name": "acme", "url": "mqtts://mqtt.acme.example.com:8883"}],
            }
        )
    )
    argv = ["console.cli", "serve", "--bridge-config", str(config), "--state-dir", str(short_dir / "console")]
    messages = notifications([*argv, "--port", str(free_port())], short_dir)
    assert_notify_protocol(messages)


def test_a_supervisor_that_does_not_read_never_blocks_the_service(short_dir: Path) -> None:
    """A datagram socket queues about 10 messages; the service keeps running when nobody reads them."""
    from factory_edge.systemd import Notifier

    path = short_dir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as supervisor:
        supervisor.bind(str(path))
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        started = time.monotonic()
        for i in range(200):
            notifier.status(f"status {i}")
        assert time.monotonic() - started < 2.0
        assert supervisor.recv(4096) == b"STATUS=status 0"  # the first ones were delivered
