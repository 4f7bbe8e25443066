"""The SNI proxy against a connection flood: limits per source address, per tenant, and a ClientHello deadline.

The attack of the review: connections that send a ClientHello for one
tenant's name and then stall. With ``maxconn 50`` and no other limit, 50 of
them kept another tenant's gateway out. Here the rendered HAProxy runs
with ``maxconn 50`` too, and the limits ``provisioning init`` sets.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.isolation_fixtures import Client, client_hello, closed_now, closed_within, provision, stalled
from tests.provisioning_fixtures import Deployment, eventually, provisioning

pytestmark = pytest.mark.timeout(120)

PER_SOURCE, PER_TENANT, MAXCONN = 20, 30, 50


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path_factory.mktemp("proxy"))
    result = provisioning(
        deployment.data,
        "init",
        "--proxy-maxconn",
        str(MAXCONN),
        "--proxy-per-source",
        str(PER_SOURCE),
        "--proxy-per-tenant",
        str(PER_TENANT),
        "--proxy-hello-timeout",
        "2s",
        "--proxy-idle-timeout",
        "90s",
    )
    assert "proxy limits: 20 connections per address, 30 per tenant, 50 in all; ClientHello within 2s" in result.stdout
    try:
        yield deployment.start()
    finally:
        deployment.stop()


def test_stalled_client_hellos_for_one_tenant_leave_the_others_connecting(site: Deployment, tmp_path: Path) -> None:
    victim = provision(site, tmp_path, "globex", "gw-g-flood")
    hello = client_hello("mqtt.acme.test")
    # 50 stalled handshakes for acme from three addresses (the per-source limit alone would stop one).
    flood = [stalled(site.proxy_port, f"127.0.0.{2 + i % 3}", hello) for i in range(50)]
    try:
        time.sleep(1.0)
        gone = closed_now(flood)
        alive = [s for s in flood if s not in gone]
        assert len(alive) <= PER_TENANT  # the rest were refused: acme's share is capped
        started = time.monotonic()
        gateway = Client.gateway(site, victim).connect()
        try:
            assert gateway.publish("gw/gw-g-flood/events", '{"type":"flood"}') == 0
        finally:
            gateway.close()
        print(
            f"\nglobex gateway connected and published in {time.monotonic() - started:.2f} s "
            f"beside {len(alive)} stalled acme handshakes"
        )
    finally:
        for sock in flood:
            sock.close()


def test_one_address_holds_at_most_its_share(site: Deployment) -> None:
    socks = [stalled(site.proxy_port, "127.0.0.9", None) for _ in range(PER_SOURCE + 5)]
    try:
        time.sleep(0.5)  # well within the hello timeout
        refused = closed_now(socks)
        assert len(refused) == 5  # refused at accept, before a byte is read
    finally:
        for sock in socks:
            sock.close()


def test_a_connection_without_a_client_hello_is_closed_after_the_hello_timeout(site: Deployment) -> None:
    unknown = stalled(site.proxy_port, "127.0.0.10", client_hello("mqtt.nope.test"))
    assert (closed_within(unknown, 1.0) or 99) < 1.0  # no backend for an unknown name: at once
    started = time.monotonic()
    silent = stalled(site.proxy_port, "127.0.0.10", None)
    partial = stalled(site.proxy_port, "127.0.0.10", client_hello("mqtt.acme.test")[:20])
    try:
        for sock in (silent, partial):
            assert closed_within(sock, 5.0) is not None
            closed = time.monotonic() - started
            assert 1.5 < closed < 3.5, closed  # the 2 s ClientHello deadline
    finally:
        for sock in (silent, partial, unknown):
            sock.close()


def test_limits_can_change_and_reload_the_proxy_without_dropping_a_connection(site: Deployment, tmp_path: Path) -> None:
    state = provision(site, tmp_path, "acme", "gw-reload")
    gateway = Client.gateway(site, state).connect()
    try:
        result = provisioning(site.data, "init", "--proxy-per-source", str(PER_SOURCE + 1))
        assert "proxy: proxy reloaded (pid" in result.stdout
        assert f"sc0_conn_cur gt {PER_SOURCE + 1}" in (site.data / "haproxy" / "haproxy.cfg").read_text()
        time.sleep(0.5)
        assert gateway.publish("gw/gw-reload/events", "{}") == 0 and gateway.disconnects == []
    finally:
        gateway.close()
        provisioning(site.data, "init", "--proxy-per-source", str(PER_SOURCE))
    bad = provisioning(site.data, "init", "--proxy-hello-timeout", "soon", check=False)
    assert (bad.returncode, bad.stderr) == (1, "Error: proxy hello-timeout 'soon' is not a duration like 5s or 2m\n")

    def proxy_answers() -> bool:
        socket.create_connection(("127.0.0.1", site.proxy_port), 1).close()
        return True

    eventually(proxy_answers, 5, "proxy")
