"""A stolen gateway certificate against other sessions: client-id takeover, shared-subscription hijack, forged acks.

The attacker holds one legitimate gateway certificate of tenant acme
(``agent provision`` made it); the victims are another gateway and the
bridge (``bridge run`` on ``tenants_from``), on the deployment that
``provisioning`` rendered. Each attack is the one an adversarial review
ran against the previous release; every seq the victim publishes during
it must be stored.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.isolation_fixtures import Client, bridge_config, data_batch, files_of, provision, start_bridge, stored_seqs
from tests.provisioning_fixtures import Deployment, eventually, provisioning

pytestmark = pytest.mark.timeout(180)

NOT_AUTHORIZED = 0x87


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path_factory.mktemp("iso"))
    try:
        yield deployment.start()
    finally:
        deployment.stop()


def publish_during(victim: Client, gateway: str, seqs: range, stop: threading.Event, pace_s: float) -> list[int]:
    """Publish one batch per seq (QoS 1) until ``stop``; the seqs the broker acknowledged."""
    acked = []
    for seq in seqs:
        if stop.is_set():
            break
        if victim.publish(f"gw/{gateway}/data/press-1", data_batch(gateway, seq)) == 0:
            acked.append(seq)
        time.sleep(pace_s)
    return acked


def take_over_loop(site: Deployment, state: Path, client_ids: list[str], seconds: float) -> int:
    """The attack: connect with each victim's client id and ``clean_start=0``, again and again."""
    rounds = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for client_id in client_ids:
            attacker = Client.gateway(site, state, client_id=client_id, clean_start=False, session_expiry_s=3600)
            attacker.connect()
            time.sleep(0.05)
            attacker.close()
            rounds += 1
    return rounds


@pytest.mark.parametrize("seconds", [6.0, pytest.param(20.0, marks=pytest.mark.fault)], ids=["6s", "20s"])
def test_a_stolen_gateway_certificate_cannot_take_over_the_bridge_or_another_gateway(
    site: Deployment, tmp_path: Path, seconds: float
) -> None:
    victim_state = provision(site, tmp_path, "acme", f"gw-victim-{int(seconds)}")
    thief_state = provision(site, tmp_path, "acme", f"gw-thief-{int(seconds)}")
    victim_id = victim_state.name
    # The victim's command session: persistent, subscribed, then offline while commands queue up.
    commands = Client.gateway(site, victim_state, clean_start=True, session_expiry_s=3600).connect()
    assert commands.subscribe(f"gw/{victim_id}/cmd/#") == 1
    commands.close()
    host, ca, _, _ = files_of(victim_state)
    files = site.data / "tenants" / "acme"
    sender = Client(
        site, host=host, ca=ca, cert=str(files / "bridge.pem"), key=str(files / "bridge.key"), client_id="operator"
    ).connect()
    for n in range(3):
        assert sender.publish(f"gw/{victim_id}/cmd/ping", f"queued {n}") == 0
    sender.close()

    # While the victim is away, the thief claims its client id to collect the queued commands.
    take_over_loop(site, thief_state, [victim_id], 1.0)

    bridge = start_bridge(bridge_config(site, tmp_path))
    victim = Client.gateway(site, victim_state, clean_start=False, session_expiry_s=3600).connect()
    stop = threading.Event()
    acked: list[int] = []
    publisher = threading.Thread(
        target=lambda: acked.extend(publish_during(victim, victim_id, range(1, 100_000), stop, 0.02))
    )
    try:
        eventually(lambda: len(victim.received()) == 3, 10, "the three queued commands")
        assert [p for _, p in victim.received()] == [b"queued 0", b"queued 1", b"queued 2"]
        publisher.start()
        # The bridge's and the victim gateway's client ids: what a thief would claim.
        rounds = take_over_loop(site, thief_state, ["bridge.main", victim_id], seconds)
        stop.set()
        publisher.join(30)
        assert rounds >= 10 and len(acked) >= 50
        eventually(lambda: stored_seqs(tmp_path, "acme", victim_id) >= set(acked), 20, "every acknowledged seq")
        assert victim.disconnects == []  # never kicked
    finally:
        stop.set()
        victim.close()
        bridge.stop()
    assert not [e for e in bridge.logs() if "taken over" in e.get("msg", "")]
    assert [e for e in bridge.logs() if e.get("msg") == "connection to tenant broker lost"] == []
    # Every thief's connection is its own session: the broker names each session after its certificate.
    sessions = re.findall(
        r"New client connected from \S+ as (\S+) \(p5, c\d, k\d+, u'([^']+)'\)", site.brokers["acme"].log()
    )
    assert (thief_state.name, thief_state.name) in sessions
    assert all(client_id == username for client_id, username in sessions)


def test_a_copy_of_the_bridges_own_certificate_is_logged_as_a_takeover(site: Deployment, tmp_path: Path) -> None:
    """The one takeover left (a second connection of the same identity: a leaked key) is loud on both sides."""
    bridge = start_bridge(bridge_config(site, tmp_path))
    files = site.data / "tenants" / "acme"
    cert, key = files / "bridges" / "bridge.main.pem", files / "bridges" / "bridge.main.key"
    try:
        copy = Client(
            site, host="mqtt.acme.test", ca=str(files / "ca.pem"), cert=str(cert), key=str(key), client_id="anything"
        ).connect()
        copy.close()
        bridge.wait_log("session taken over by another connection with our client id")
    finally:
        bridge.stop()
    assert "Client bridge.main already connected, closing old connection." in site.brokers["acme"].log()
    logged = next(
        e for e in bridge.logs() if e.get("msg") == "session taken over by another connection with our client id"
    )
    assert logged["tenant"] == "acme" and logged["client_id"] == "bridge.main"


def test_a_gateway_cannot_join_the_bridges_shared_subscription(site: Deployment, tmp_path: Path) -> None:
    victim_state = provision(site, tmp_path, "acme", "gw-share-victim")
    thief_state = provision(site, tmp_path, "acme", "gw-share-thief")
    bridge = start_bridge(bridge_config(site, tmp_path, shared_group="bridge"))
    thief = Client.gateway(site, thief_state).connect()
    victim = Client.gateway(site, victim_state).connect()
    try:
        assert thief.subscribe("$share/bridge/gw/+/data/+") == NOT_AUTHORIZED  # refused at SUBSCRIBE
        for seq in range(1, 31):
            assert victim.publish("gw/gw-share-victim/data/press-1", data_batch("gw-share-victim", seq)) == 0
        eventually(
            lambda: stored_seqs(tmp_path, "acme", "gw-share-victim") == set(range(1, 31)), 20, "all 30 batches stored"
        )
        assert thief.received() == []
    finally:
        thief.close()
        victim.close()
        bridge.stop()


def test_subscriptions_beyond_an_identitys_rights_are_refused_at_subscribe(site: Deployment, tmp_path: Path) -> None:
    state = provision(site, tmp_path, "acme", "gw-subs")
    other = provision(site, tmp_path, "acme", "gw-subs-other")
    gateway = Client.gateway(site, state).connect()
    try:
        refused = [
            "#",
            "gw/+/data/+",
            "gw/gw-subs-other/data/x",
            "gw/gw-subs-other/cmd/#",
            "gw/gw-subs-other/ack",
            "$share/bridge/gw/+/data/+",
            "$share/x/gw/gw-subs/cmd/#",
            "alerts/#",
            "$SYS/#",
            "+/gw-subs/ack",
        ]
        assert {t: gateway.subscribe(t) for t in refused} == {t: NOT_AUTHORIZED for t in refused}
        assert {t: gateway.subscribe(t) for t in ("gw/gw-subs/cmd/#", "gw/gw-subs/ack")} == {
            "gw/gw-subs/cmd/#": 1,
            "gw/gw-subs/ack": 1,
        }
    finally:
        gateway.close()
    out = provisioning(site.data, "technician-cert", "acme", "subs", "--hours", "1", "--out", str(tmp_path / "t"))
    assert "subscription rules updated" in out.stdout
    host, ca, _, _ = files_of(other)
    tech = Client(
        site,
        host=host,
        ca=ca,
        cert=str(tmp_path / "t" / "tech-subs.pem"),
        key=str(tmp_path / "t" / "tech-subs.key"),
        client_id="tech",
    ).connect()
    try:
        assert [tech.subscribe(t) for t in ("$share/bridge/gw/+/data/+", "#", "$SYS/#")] == [NOT_AUTHORIZED] * 3
        assert [tech.subscribe(t) for t in ("gw/#", "alerts/#", "gw/+/data/+")] == [1, 1, 1]
    finally:
        tech.close()


def test_only_bridge_identities_write_acks_and_a_gateway_reads_only_its_own(site: Deployment, tmp_path: Path) -> None:
    """``gw/<gw>/ack`` tells the agent what storage committed: a forged one would make it delete unstored data."""
    mine = provision(site, tmp_path, "acme", "gw-ack")
    theirs = provision(site, tmp_path, "acme", "gw-ack-other")
    gateway = Client.gateway(site, mine).connect()
    neighbour = Client.gateway(site, theirs).connect()
    files = site.data / "tenants" / "acme"
    host, ca, _, _ = files_of(mine)
    bridge = Client(
        site,
        host=host,
        ca=ca,
        cert=str(files / "bridges" / "bridge-alerts.pem"),
        key=str(files / "bridges" / "bridge-alerts.key"),
        client_id="acks",
    ).connect()
    try:
        assert gateway.subscribe("gw/gw-ack/ack") == 1
        assert neighbour.subscribe("gw/gw-ack/ack") == NOT_AUTHORIZED
        assert gateway.publish("gw/gw-ack/ack", '{"seq":[[1,100]]}') == NOT_AUTHORIZED
        assert neighbour.publish("gw/gw-ack/ack", '{"seq":[[1,100]]}') == NOT_AUTHORIZED
        assert bridge.publish("gw/gw-ack/ack", '{"seq":[[1,2]]}') == 0
        eventually(lambda: gateway.received() == [("gw/gw-ack/ack", b'{"seq":[[1,2]]}')], 10, "the bridge's ack")
        time.sleep(0.3)
        assert neighbour.received() == []
    finally:
        for client in (gateway, neighbour, bridge):
            client.close()
