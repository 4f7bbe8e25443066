"""The namespace harness: hosts reach each other and the root namespace, and nothing is left behind."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests import netns

pytestmark = pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))

ECHO = """
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen()
print("listening", flush=True)
while True:
    conn, peer = srv.accept()
    conn.sendall(f"hello {peer[0]}".encode()); conn.close()
"""

DIAL = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    print(s.recv(100).decode())
"""


def _wait_listening(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "listening", line


def test_hosts_ping_and_talk_tcp_to_each_other_and_the_root() -> None:
    with netns.Network() as net:
        a = net.add_host("a")
        b = net.add_host("b")
        assert a.address != b.address and a.address.startswith(f"10.217.{net.subnet}.")

        if shutil.which("ping"):  # iputils-ping is not on every machine; TCP below is the real check
            for src, dst in ((a, b), (b, a), (a, None)):
                target = dst.address if dst else net.gateway
                done = net.run(src.name, ["ping", "-c", "1", "-W", "2", target])
                assert done.returncode == 0, done.stdout + done.stderr

        # A server in namespace b, reached from namespace a and from the root namespace (this process).
        server = net.run_in("b", [sys.executable, "-c", ECHO, "7001"], stdout=subprocess.PIPE, text=True)
        _wait_listening(server)
        done = net.run("a", [sys.executable, "-c", DIAL, b.address, "7001"])
        assert done.stdout.strip() == f"hello {a.address}", done.stderr
        with socket.create_connection((b.address, 7001), timeout=5) as sock:
            assert sock.recv(100).decode() == f"hello {net.gateway}"

        # A server in the root namespace reached from a namespace through the gateway address.
        with socket.socket() as root_srv:
            root_srv.bind((net.gateway, 0))
            root_srv.listen()
            port = root_srv.getsockname()[1]
            dial = net.run_in(
                "a",
                [
                    sys.executable,
                    "-c",
                    "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).sendall(b'x')",
                    net.gateway,
                    str(port),
                ],
            )
            root_srv.settimeout(5)
            conn, peer = root_srv.accept()
            assert peer[0] == a.address
            conn.close()
            dial.wait(5)


def test_hosts_file_names_resolve_inside_the_namespace() -> None:
    with netns.Network() as net:
        net.add_host("a", hosts_file={"mqtt.acme.test": "10.217.0.99"})
        done = net.run("a", ["getent", "ahostsv4", "mqtt.acme.test"])
        assert done.stdout.split()[0] == "10.217.0.99"


def test_close_removes_everything_and_stops_processes_even_after_a_failure() -> None:
    prefix = None
    server = None
    with pytest.raises(RuntimeError, match="boom"):
        with netns.Network() as net:
            prefix = net.prefix
            net.add_host("a")
            net.add_host("b")
            server = net.run_in("a", ["sleep", "300"])
            assert set(netns.leftovers(prefix)) >= {f"{prefix}-a", f"{prefix}-b", f"{prefix}br"}
            raise RuntimeError("boom")
    assert prefix is not None and server is not None
    assert netns.leftovers(prefix) == []
    assert server.poll() is not None
    assert not (netns.STATE_DIR / f"{prefix}.json").exists()


def test_two_networks_side_by_side_get_distinct_subnets_and_names() -> None:
    with netns.Network() as one, netns.Network() as two:
        assert one.subnet != two.subnet and one.prefix != two.prefix
        one.add_host("x")
        two.add_host("x")
        assert one.address("x") != two.address("x")


def test_a_crashed_runs_network_is_swept_by_the_next() -> None:
    # A network recorded by a PID that is gone (as after kill -9 of a test worker).
    net = netns.Network()
    net.add_host("a")
    prefix = net.prefix
    record = netns.STATE_DIR / f"{prefix}.json"
    text = record.read_text().replace(f'"pid": {os.getpid()}', '"pid": 999999999')
    record.write_text(text)
    netns._OPEN.pop(prefix)
    net._closed = True  # as if this process had died without closing it
    time.sleep(0.01)
    with netns.Network():
        assert netns.leftovers(prefix) == []
    assert not record.exists()
