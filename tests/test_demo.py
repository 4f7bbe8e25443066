"""``./scripts/demo``, the README's first command, run headless as a person would run it.

The demo runs in a private mount namespace whose ``/etc/hosts`` is a
scratch file, so the names it adds there never touch this machine's file;
the test reads that scratch file to see them come and go. The
``mosquitto_sub`` line the demo prints is run exactly as printed.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from factory_edge.demo.processes import port_free
from factory_edge.demo.stack import GATEWAY, Ports
from factory_edge.hostsfile import BEGIN
from tests.helpers import ROOT
from tests.infra import _LIVE
from tests.provisioning_fixtures import Watcher, eventually

pytestmark = pytest.mark.timeout(300)

HOSTS = {"mqtt.acme.demo.localhost": "127.0.0.1"}
_IN_NAMESPACE = 'h=$1; shift; mount --bind "$h" /etc/hosts || exit 125; exec "$@"'


class Demo:
    """``scripts/demo ARGS`` in its own mount namespace, its output collected line by line."""

    def __init__(self, root: Path, offset: int, *args: str, demo_dir: Path | None = None) -> None:
        root.mkdir(exist_ok=True)
        self.hosts_file = root / "hosts"
        self.hosts_file.write_text("127.0.0.1 localhost\n::1 localhost\n")
        self.dir = demo_dir or root / "demo"
        unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]
        argv = [
            *unshare,
            "sh",
            "-c",
            _IN_NAMESPACE,
            "sh",
            str(self.hosts_file),
            str(ROOT / "scripts" / "demo"),
            "--dir",
            str(self.dir),
            "--port-offset",
            str(offset),
            *args,
        ]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            cwd=ROOT,
        )
        _LIVE[self.proc.pid] = self.proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True, name="demo output")
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, text: str, timeout_s: float) -> str:
        def found() -> str | None:
            if self.proc.poll() is not None and not self._thread.is_alive():
                raise AssertionError(f"the demo exited with {self.proc.returncode} before {text!r}:\n{self.output}")
            return next((line for line in list(self.lines) if text in line), None)

        try:
            return eventually(found, timeout_s, f"{text!r} from the demo")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- demo output:\n{self.output}") from None

    def technician_command(self) -> str:
        return self.wait_line("    mosquitto_sub ", 90).strip()

    def wait(self, timeout_s: float) -> int:
        code = self.proc.wait(timeout_s)
        self._thread.join(5)
        _LIVE.pop(self.proc.pid, None)
        return code

    def kill(self) -> None:
        """Kill it if it still runs (a failed test) and release its output pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        _LIVE.pop(self.proc.pid, None)
        self._thread.join(5)
        if self.proc.stdout:
            self.proc.stdout.close()


def _grew(watcher: Watcher, lines: int) -> bool:
    return len(watcher.output()) > lines


def _free_offset() -> int:
    for _ in range(200):
        # Below the ephemeral range (32768 on): no outgoing connection of a test beside it takes one meanwhile.
        offset = random.randrange(1000, 13900)
        ports = Ports.with_offset(offset)
        if all(port_free(port) for _, port in ports.named()):
            return offset
    raise AssertionError("no free set of ports for the demo")


def _leftovers(root: Path) -> list[str]:
    """Command lines of processes still running with a path under ``root``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(root) in cmdline and "pytest" not in cmdline:
                found.append(cmdline)
    return found


@pytest.fixture
def short_root() -> Iterator[Path]:
    # HAProxy's admin socket lives below the demo directory: keep the path short (108 bytes at most).
    root = Path(tempfile.mkdtemp(prefix="fe-demo-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _watch_until_data(command: str) -> tuple[Watcher, dict]:
    watcher = Watcher(HOSTS, shlex.split(command))
    line = watcher.wait_line(lambda x: x.startswith(f"gw/{GATEWAY}/data/"), 30, "live data in mosquitto_sub")
    return watcher, json.loads(line.split(" ", 1)[1])


def test_demo_once_fires_the_alert_and_the_printed_mosquitto_sub_shows_live_data(short_root: Path) -> None:
    offset = _free_offset()
    demo = Demo(short_root, offset, "--once")
    watcher = None
    try:
        command = demo.technician_command()
        assert command.startswith("mosquitto_sub -h mqtt.acme.demo.localhost -p ")
        # The names the demo added to (its view of) /etc/hosts while it runs.
        assert BEGIN in demo.hosts_file.read_text() and "mqtt.acme.demo.localhost" in demo.hosts_file.read_text()

        watcher, batch = _watch_until_data(command)
        assert batch["gw"] == GATEWAY and batch["seq"] >= 1 and batch["points"]
        assert all(p["q"] == "good" for p in batch["points"]), batch
        assert time.time() * 1000 - max(p["ts"] for p in batch["points"]) < 10_000  # live, not old
        firing = watcher.wait_line(
            lambda x: x.startswith(f"alerts/{GATEWAY}/cnc-1/spindle-overtemp ") and '"firing"' in x,
            150,
            "the alert firing in mosquitto_sub",
        )
        alert = json.loads(firing.split(" ", 1)[1])
        assert (alert["tenant"], alert["tag"], alert["severity"]) == ("acme", "spindle_temp", "critical")
        assert alert["value"] > 80

        assert demo.wait(180) == 0, demo.output
    finally:
        if watcher:
            watcher.stop()
        demo.kill()

    out = demo.output
    assert "ALERT FIRED  spindle-overtemp [critical] tenant acme, gw-demo/cnc-1" in out, out
    assert "alert resolved  spindle-overtemp" in out and "Stopped every process" in out, out
    assert "Error" not in out and "FAILED" not in out, out
    # Everything stopped, the hosts lines gone, every port free again.
    assert BEGIN not in demo.hosts_file.read_text()
    assert _leftovers(demo.dir) == []
    assert all(port_free(port) for _, port in Ports.with_offset(offset).named())
    # The bridge stored the gateway's data and the alert in acme's store, and nothing in globex's.
    with sqlite3.connect(f"file:{demo.dir / 'bridge' / 'acme.db'}?mode=ro", uri=True) as db:
        assert db.execute("SELECT count(*) FROM points WHERE gw = ?", (GATEWAY,)).fetchone()[0] > 50
        states = [r[0] for r in db.execute("SELECT state FROM alerts WHERE rule = 'spindle-overtemp' ORDER BY id")]
        assert states == ["pending", "firing", "resolved"]
        # The gateway's first message (agent provision's check) arrived: the bridge was subscribed before it.
        assert db.execute("SELECT count(*) FROM events WHERE type = 'provisioned'").fetchone()[0] == 1
    with sqlite3.connect(f"file:{demo.dir / 'bridge' / 'globex.db'}?mode=ro", uri=True) as db:
        assert db.execute("SELECT count(*) FROM points").fetchone()[0] == 0


def test_demo_runs_twice_and_ctrl_c_stops_everything(short_root: Path) -> None:
    offset = _free_offset()
    for run in (1, 2):
        demo = Demo(short_root, offset)
        watcher = None
        try:
            watcher, _ = _watch_until_data(demo.technician_command())
            if run == 1:  # a second demo started beside it refuses, and leaves the running one alone
                second = Demo(short_root / "second", offset, demo_dir=demo.dir)
                assert second.wait(60) == 1
                second.kill()
                assert "Error: " in second.output and f"the demo with pid {demo.proc.pid} runs there" in second.output
                assert (demo.dir / "agent" / "identity.json").exists()
                count = len(watcher.output())
                eventually(functools.partial(_grew, watcher, count + 3), 10, "the first demo's data still flowing")
            demo.proc.send_signal(signal.SIGINT)  # Ctrl-C
            assert demo.wait(30) == 0, demo.output
        finally:
            if watcher:
                watcher.stop()
            demo.kill()
        assert "Stopping." in demo.output and "Stopped every process" in demo.output, demo.output
        assert "Error" not in demo.output, demo.output
        assert f"{GATEWAY} in tenant acme" in demo.output  # provisioned anew in the emptied directory
        assert BEGIN not in demo.hosts_file.read_text(), f"run {run}"
        assert _leftovers(demo.dir) == [], f"run {run}"
        assert all(port_free(port) for _, port in Ports.with_offset(offset).named()), f"run {run}"


def test_hosts_block_replaces_a_stale_one_and_leaves_every_other_line(tmp_path: Path) -> None:
    from factory_edge import hostsfile

    hosts = tmp_path / "hosts"
    original = "127.0.0.1 localhost\n10.0.0.5 plc-5  # the press\n"
    begin, end = f"{BEGIN} /srv/demo (removed when that demo stops)", f"{hostsfile.END} /srv/demo"
    hosts.write_text(original + f"{begin}\n127.0.0.1 mqtt.old.demo.localhost\n{end}\n")
    inode = hosts.stat().st_ino
    hostsfile.edit(
        "add", "127.0.0.1", ["mqtt.acme.demo.localhost"], owner="/srv/demo", path=hosts
    )  # after a killed demo
    assert hosts.read_text() == original + f"{begin}\n127.0.0.1 mqtt.acme.demo.localhost\n{end}\n"
    hostsfile.edit("remove", owner="/srv/demo", path=hosts)
    assert hosts.read_text() == original
    assert hosts.stat().st_ino == inode  # edited in place: a bind-mounted /etc/hosts stays mounted


_TWO_DEMOS = """
import socket, sys
from pathlib import Path
from factory_edge.demo.stack import Ports, Stack

def resolves(name):
    try:
        return socket.getaddrinfo(name, None)[0][4][0]
    except OSError as exc:
        return f"Lookup error: {exc}"

first, second = (Stack(Path(d), Ports.with_offset(0)) for d in sys.argv[1:3])
first.resolve_names()
second.resolve_names()          # the names resolve already, through the first demo's block
first.down()                    # the first demo stops and takes its block out
print(resolves("mqtt.acme.demo.localhost"), resolves("mqtt.globex.demo.localhost"))
second.down()
print(resolves("mqtt.acme.demo.localhost").split(":")[0])
"""


def test_two_demos_keep_their_own_hosts_block(tmp_path: Path) -> None:
    """Issue 12 item 3: a demo that found the names resolving through another demo's block lost them when that one stopped."""
    hosts = tmp_path / "hosts"
    original = "127.0.0.1 localhost\n::1 localhost\n"
    hosts.write_text(original)
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]
    result = subprocess.run(
        [
            *unshare,
            "sh",
            "-c",
            _IN_NAMESPACE,
            "sh",
            str(hosts),
            sys.executable,
            "-c",
            _TWO_DEMOS,
            str(tmp_path / "demo-1"),
            str(tmp_path / "demo-2"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["127.0.0.1 127.0.0.1", "Lookup error"]
    assert hosts.read_text() == original
