"""Slow clients against the provisioning API: a flood of connections that never finish a request.

``provisioning serve`` runs with a file-descriptor limit of 256 (a small
copy of a real one: 1024 by default), so that exhausting it is cheap; one
source address opens connections that stall in the TLS handshake or in the
request headers, while a gateway elsewhere runs ``agent provision``.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.isolation_fixtures import client_hello, closed_now, provision, stalled
from tests.provisioning_fixtures import ApiServer, Deployment

pytestmark = pytest.mark.timeout(240)

FLOOD = 300


class LimitedApi(ApiServer):
    def _spawn(self, argv: list[str]) -> None:
        super()._spawn(["prlimit", "--nofile=256:256", "--", *argv])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path_factory.mktemp("api-flood"), tenants=("acme",))
    deployment.api = LimitedApi(
        deployment.data,
        "--max-failures",
        "1000",
        "--api-per-source",
        "20",
        "--api-request-timeout",
        "3s",
        "--api-handshake-timeout",
        "2s",
    )
    deployment.servers = [deployment.proxy, deployment.api]
    try:
        yield deployment.start()
    finally:
        deployment.stop()


def half_request(port: int, source: str, context: ssl.SSLContext) -> socket.socket | None:
    """A TLS connection that sends the first lines of a request and then nothing (slowloris); None if refused."""
    raw = socket.socket()
    raw.bind((source, 0))
    raw.settimeout(1.0)
    try:
        raw.connect(("127.0.0.1", port))
        tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
        tls.sendall(b"POST /v1/provision HTTP/1.1\r\nHost: x\r\n")
        return tls
    except OSError:
        raw.close()
        return None


def still_open(socks: list[socket.socket]) -> list[socket.socket]:
    """Those of ``socks`` the server has not closed."""
    readable, _, _ = select.select(socks, [], [], 0)
    gone = set()
    for sock in readable:
        sock.settimeout(0.05)
        try:
            if sock.recv(1) == b"":
                gone.add(sock)
        except TimeoutError:
            continue
        except OSError:
            gone.add(sock)
    return [s for s in socks if s not in gone]


@pytest.mark.fault
def test_a_flood_of_stalled_connections_from_one_address_leaves_provisioning_working(
    site: Deployment, tmp_path: Path
) -> None:
    hello = client_hello("127.0.0.1")
    socks: list[socket.socket] = []
    raw: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(FLOOD):
            sock = half_request(site.api.port, "127.0.0.2", site.api.context())
            if sock is None:
                refused += 1
            else:
                socks.append(sock)
        raw.extend(stalled(site.api.port, "127.0.0.3", hello[: len(hello) // 2]) for _ in range(15))
        time.sleep(0.5)
        held = len(still_open(socks))
        assert closed_now(raw) == []  # another address's handshakes, within its share: open for now
        print(f"\n{FLOOD} slow requests from one address: {held} held, {refused} refused")
        started = time.monotonic()
        provision(site, tmp_path, "acme", "gw-during-flood")  # from another address: 127.0.0.1
        print(f"provisioned during the flood in {time.monotonic() - started:.2f} s")
        assert held <= 20  # --api-per-source
        time.sleep(4.0)  # --api-request-timeout 3s, --api-handshake-timeout 2s: then closed
        assert still_open(socks) == [] and len(closed_now(raw)) == len(raw)
    finally:
        for sock in [*socks, *raw]:
            sock.close()
