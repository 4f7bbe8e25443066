"""Tenant brokers behind the SNI proxy, as a technician sees them with mosquitto_pub/mosquitto_sub.

Every client dials the proxy with ``-h mqtt.<tenant>.test`` (resolved in a
private mount namespace), so the name is sent as SNI and the broker
certificate is checked against it. "Cannot" is always shown by a reader that
receives a later message from the same flow but never the forbidden one.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from factory_edge.errors import ProvisioningError
from provisioning import render
from tests.infra import Haproxy, Mosquitto, Subscriber, TenantPki, run_in_namespace, tls_args

NOT_AUTHORIZED = "Warning: Publish 1 failed: Not authorized.\n"
TLS_ERROR = "A TLS error occurred."  # "Error: …" or "Unable to connect (…)", depending on timing


@dataclass
class Site:
    """Clients of one tenant, all dialling through the proxy."""

    pki: TenantPki
    broker: Mosquitto
    proxy: Haproxy
    hosts: dict[str, str]

    def conn(
        self, name: str, *, host: str | None = None, pki: TenantPki | None = None, trust: TenantPki | None = None
    ) -> list[str]:
        """Client ``name`` of ``pki`` (default: this tenant) trusting ``trust``'s CA (default: ``pki``'s)."""
        pki = pki or self.pki
        return tls_args(host or self.pki.host, self.proxy.port, (trust or pki).ca_file, pki.paths(name))

    def pub(
        self, name: str, topic: str, payload: str, *, retain: bool = False, debug: bool = False, **conn: object
    ) -> subprocess.CompletedProcess[str]:
        """``mosquitto_pub`` at QoS 1; ``debug`` (-d) prints the TLS alert a refused client gets."""
        argv = ["mosquitto_pub", *self.conn(name, **conn), "-q", "1", "-t", topic, "-m", payload]  # type: ignore[arg-type]
        return run_in_namespace(self.hosts, argv + (["-r"] if retain else []) + (["-d"] if debug else []))

    def sub(self, name: str, *topics: str) -> Subscriber:
        sub = Subscriber(self.hosts, self.conn(name), topics)
        try:
            assert sub.wait_subscribed() == [1] * len(topics)
        except BaseException:
            sub.stop()
            raise
        return sub


@pytest.fixture
def site(request: pytest.FixtureRequest, pki_acme: TenantPki, hosts: dict[str, str]) -> Site:
    # Certificates first, so the broker starts with tech-1 in its ACL.
    for name in ("gw-01", "gw-02", "tech-1"):
        pki_acme.client(name)
    proxy = request.getfixturevalue("proxy")
    return Site(pki_acme, request.getfixturevalue("broker_acme"), proxy, hosts)


def eventually(predicate: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    """Poll ``predicate`` (a log line written just after the client saw the outcome)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def batch(seq: int) -> str:
    return json.dumps(
        {
            "v": 1,
            "gw": "gw-01",
            "dev": "press-1",
            "seq": seq,
            "points": [{"tag": "spindle_temp", "ts": 1732280000123, "v": 71.2, "q": "good"}],
        },
        separators=(",", ":"),
    )


def test_gateway_data_reaches_a_technician_through_the_proxy(site: Site) -> None:
    with site.sub("tech-1", "gw/#") as tech:
        result = site.pub("gw-01", "gw/gw-01/data/press-1", batch(1042))
        assert (result.returncode, result.stderr) == (0, "")
        assert tech.wait_message("gw/gw-01/data/press-1") == batch(1042)
    assert eventually(lambda: "tenant_acme/acme" in site.proxy.log())  # it really went through the proxy


def test_gateway_writes_only_its_own_topics(site: Site) -> None:
    with site.sub("tech-1", "gw/#", "alerts/#") as tech:
        for topic in (
            "gw/gw-02/data/press-1",
            "gw/gw-02/status",
            "gw/gw-02/cmd/write",
            "gw/gw-01/cmd/write",
            "gw/gw-01/other",
            "alerts/gw-01/press-1/overtemp",
        ):
            result = site.pub("gw-01", topic, "forged")
            assert (topic, result.stderr) == (topic, NOT_AUTHORIZED)
        for topic in ("gw/gw-01/meta/press-1", "gw/gw-01/events", "gw/gw-01/cmd/ping/reply", "gw/gw-01/status"):
            assert site.pub("gw-01", topic, "ok").stderr == ""
        tech.wait_message("gw/gw-01/status")
        assert tech.messages == [
            ("gw/gw-01/meta/press-1", "ok"),
            ("gw/gw-01/events", "ok"),
            ("gw/gw-01/cmd/ping/reply", "ok"),
            ("gw/gw-01/status", "ok"),
        ]


def test_gateway_reads_only_its_own_commands(site: Site) -> None:
    # One identity, one session (the client id is the CN): gw-02 publishes before it subscribes.
    assert site.pub("gw-02", "gw/gw-02/data/press-1", batch(1)).stderr == ""
    with site.sub("gw-01", "gw/gw-02/cmd/#", "gw/#") as gw1, site.sub("gw-02", "gw/gw-02/cmd/#") as gw2:
        assert site.pub("bridge", "gw/gw-02/cmd/ping", "for gw-02").stderr == ""
        assert site.pub("bridge", "gw/gw-01/cmd/ping", "for gw-01").stderr == ""
        assert gw2.wait_message("gw/gw-02/cmd/ping") == "for gw-02"
        assert gw1.wait_message("gw/gw-01/cmd/ping") == "for gw-01"
        assert gw1.messages == [("gw/gw-01/cmd/ping", "for gw-01")]


def test_technician_cannot_publish(site: Site) -> None:
    with site.sub("bridge", "gw/#", "alerts/#") as bridge:
        for topic in (
            "gw/gw-01/cmd/write",
            "gw/gw-01/data/press-1",
            "gw/tech-1/data/press-1",
            "alerts/gw-01/press-1/overtemp",
        ):
            assert (topic, site.pub("tech-1", topic, "forged").stderr) == (topic, NOT_AUTHORIZED)
        assert site.pub("gw-01", "gw/gw-01/events", "after").stderr == ""
        bridge.wait_message("gw/gw-01/events")
        assert bridge.messages == [("gw/gw-01/events", "after")]


def test_bridge_sends_commands_and_alerts_but_no_gateway_data(site: Site) -> None:
    with site.sub("tech-1", "gw/#", "alerts/#") as tech:
        for topic in ("gw/gw-01/data/press-1", "gw/gw-01/status", "gw/bridge/status", "gw/gw-01/cmd/ping/reply"):
            assert (topic, site.pub("bridge", topic, "forged").stderr) == (topic, NOT_AUTHORIZED)
        assert site.pub("bridge", "gw/gw-01/cmd/ping", "ping").stderr == ""
        assert site.pub("bridge", "alerts/gw-01/press-1/overtemp", "firing", retain=True).stderr == ""
        tech.wait_message("alerts/gw-01/press-1/overtemp")
        assert tech.messages == [("gw/gw-01/cmd/ping", "ping"), ("alerts/gw-01/press-1/overtemp", "firing")]


def test_unknown_or_missing_sni_name_gets_no_connection(site: Site) -> None:
    started = time.monotonic()
    result = site.pub("gw-01", "gw/gw-01/events", "x", host="mqtt.nope.test")
    assert result.returncode != 0 and TLS_ERROR in result.stderr
    no_sni = site.pub("gw-01", "gw/gw-01/events", "x", host="127.0.0.1")  # an IP address sends no SNI
    assert no_sni.returncode != 0
    assert time.monotonic() - started < 4  # refused on the client hello, not after the 5 s inspect delay
    assert eventually(lambda: site.proxy.log().count("mqtts/<NOSRV>") == 2)
    assert "New connection" not in site.broker.log()


def test_certificate_from_another_tenant_gets_no_session(site: Site, broker_globex: Mosquitto) -> None:
    globex = broker_globex.pki
    globex.client("gw-01")
    # Same gateway id, globex's CA: acme's broker refuses it during the handshake.
    result = site.pub(
        "gw-01", "gw/gw-01/events", "intruder", pki=globex, trust=site.pki, host="mqtt.acme.test", debug=True
    )
    assert result.returncode != 0 and "alert unknown ca" in result.stdout
    assert eventually(lambda: "OpenSSL Error" in site.broker.log())
    assert "u'gw-01'" not in site.broker.log()  # no MQTT session was ever created
    # The same certificate is fine at its own tenant, through the same proxy.
    assert site.pub("gw-01", "gw/gw-01/events", "home", pki=globex, host="mqtt.globex.test").stderr == ""
    assert "u'gw-01'" in broker_globex.log()


def test_revoked_certificate_is_refused_at_handshake(site: Site) -> None:
    site.pki.client("gw-09")
    with site.sub("tech-1", "gw/#") as tech:
        assert site.pub("gw-09", "gw/gw-09/events", "before").stderr == ""
        site.pki.revoke("gw-09")
        site.broker.reload()
        refused = site.pub("gw-09", "gw/gw-09/events", "after", debug=True)
        assert refused.returncode != 0 and "alert certificate revoked" in refused.stdout
        assert site.pub("gw-01", "gw/gw-01/events", "others unaffected").stderr == ""
        tech.wait_message("gw/gw-01/events")
        assert tech.messages == [("gw/gw-09/events", "before"), ("gw/gw-01/events", "others unaffected")]


def test_expired_certificate_is_refused(site: Site) -> None:
    now = dt.datetime.now(dt.UTC)
    site.pki.client("gw-old", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1))
    result = site.pub("gw-old", "gw/gw-old/events", "x", debug=True)
    assert result.returncode != 0 and "alert certificate expired" in result.stdout


def test_broker_restart_keeps_port_and_retained_state(site: Site) -> None:
    assert site.pub("gw-01", "gw/gw-01/status", '{"state":"online"}', retain=True).stderr == ""
    port = site.broker.port
    assert site.broker.stop() == 0
    site.broker.start()
    with site.sub("tech-1", "gw/+/status") as tech:
        assert tech.wait_message("gw/gw-01/status") == '{"state":"online"}'
    pid = site.broker.pid
    site.broker.kill()
    assert pid is not None and not Path(f"/proc/{pid}").exists()
    site.broker.start()
    assert site.broker.port == port
    assert site.pub("gw-01", "gw/gw-01/events", "after a crash").stderr == ""


def test_route_added_at_runtime_without_reload(site: Site) -> None:
    alias = "mqtt.acme-alias.test"
    site.hosts[alias] = "127.0.0.1"
    with site.sub("tech-1", "gw/#") as tech:
        insecure = ["--insecure"]  # the broker certificate names mqtt.acme.test only
        argv = ["mosquitto_pub", *site.conn("gw-01", host=alias), *insecure, "-q", "1", "-t", "gw/gw-01/events"]
        assert run_in_namespace(site.hosts, [*argv, "-m", "before"]).returncode != 0
        site.proxy.add_route(alias, "tenant_acme")
        assert run_in_namespace(site.hosts, [*argv, "-m", "after"]).stderr == ""
        assert tech.wait_message("gw/gw-01/events") == "after"  # the subscriber's connection was never dropped
        assert tech.messages == [("gw/gw-01/events", "after")]


def test_acl_lists_only_valid_technicians() -> None:
    with pytest.raises(ProvisioningError, match=r"^technician identity 'gw-01' must be 'tech-<name>'"):
        render.mosquitto_acl(technicians=["gw-01"])
    with pytest.raises(ProvisioningError, match=r"^tenant acme: SNI name 'MQTT acme' is not a lowercase DNS name$"):
        render.haproxy_cfg(
            bind="127.0.0.1",
            port=8883,
            map_file="/x.map",
            tenants=[{"name": "acme", "sni_host": "MQTT acme", "backend_addr": "127.0.0.1:1"}],
        )
