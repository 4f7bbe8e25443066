"""Plans: the operator's limits per tenant, set with ``provisioning tenant plan`` or the API, and enforced.

One deployment for the file (brokers, proxy, API from the rendered files):
gateways and technicians beyond the plan are refused (also when requests
race), a revoked gateway frees its place, and the message size is the
broker's ``max_packet_size``, tried with a real Mosquitto.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioning import pki
from tests.provisioning_fixtures import Deployment, eventually, provisioning, registry_dump

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path_factory.mktemp("plans"), tenants=("plana", "planb")).start()
    try:
        yield deployment
    finally:
        deployment.stop()


def plan(dep: Deployment, tenant: str, *options: str, check: bool = True) -> Any:
    return provisioning(dep.data, "tenant", "plan", tenant, *options, check=check)


def csr(name: str) -> str:
    from cryptography.hazmat.primitives import serialization

    return pki.make_csr(pki.new_key(), name).public_bytes(serialization.Encoding.PEM).decode()


def test_plan_shows_sets_and_removes_limits(dep: Deployment) -> None:
    shown = plan(dep, "planb").stdout.splitlines()
    assert shown[0].split() == ["LIMIT", "VALUE", "IN", "USE"]
    assert [line.split()[:2] for line in shown[1:]] == [
        ["gateways", "none"],
        ["technicians", "none"],
        ["points_per_s", "none"],
        ["retention_days", "none"],
        ["message_size", "1048576"],
    ]
    out = plan(dep, "planb", "--points-per-s", "500", "--retention-days", "30", "--gateways", "7").stdout
    assert out.startswith("tenant planb: plan updated\n")
    doc = json.loads(plan(dep, "planb", "--json").stdout)
    assert doc == {
        "tenant": "planb",
        "limits": {"gateways": 7, "technicians": None, "points_per_s": 500, "retention_days": 30, "message_size": None},
        "usage": {"gateways": 0, "technicians": 0},
    }
    index = json.loads((dep.data / "tenants.json").read_text())
    entry = next(t for t in index["tenants"] if t["name"] == "planb")
    assert entry["limits"] == {"points_per_s": 500, "retention_days": 30}
    plan(dep, "planb", "--points-per-s", "none", "--gateways", "NONE")
    assert json.loads(plan(dep, "planb", "--json").stdout)["limits"]["gateways"] is None
    index = json.loads((dep.data / "tenants.json").read_text())
    assert next(t for t in index["tenants"] if t["name"] == "planb")["limits"] == {
        "points_per_s": None,
        "retention_days": 30,
    }


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (("--gateways", "many"), "Error: --gateways: expected a whole number or 'none', got 'many'"),
        (("--points-per-s", "0"), "Error: --points-per-s: must be within 1..1,000,000,000, got 0"),
        (  # a typo: more than the registry's integers hold (it was a traceback)
            ("--gateways", "99999999999999999999"),
            "Error: --gateways: must be within 0..10,000,000, got 99,999,999,999,999,999,999",
        ),
        (  # every hourly retention run failed with an OverflowError
            ("--retention-days", "9999999999999"),
            "Error: --retention-days: must be within 1..36,500, got 9,999,999,999,999",
        ),
        (("--retention-days", "\u0663"), "Error: --retention-days: expected a whole number or 'none', got '\u0663'"),
        (("--gateways", "1_000"), "Error: --gateways: expected a whole number or 'none', got '1_000'"),
        (("--message-size", "10"), "Error: --message-size: 10 bytes is not within 1024..268435455 (1KiB..256MiB)"),
        (
            ("--message-size", "big"),
            "Error: --message-size: expected a size like 64MiB or 500KB, got 'big', or 'none'",
        ),
    ],
)
def test_bad_limits_are_refused_in_one_line_and_change_nothing(
    dep: Deployment, options: tuple[str, ...], error: str
) -> None:
    before = registry_dump(dep.data)
    result = plan(dep, "planb", *options, check=False)
    assert (result.returncode, result.stderr.strip()) == (1, error)
    assert registry_dump(dep.data) == before
    result = plan(dep, "nosuch", check=False)
    assert result.returncode == 1 and result.stderr.startswith("Error: no tenant 'nosuch'")


def test_gateway_limit_holds_under_concurrent_enrolments_and_a_revoked_gateway_frees_its_place(
    dep: Deployment, tmp_path: Path
) -> None:
    plan(dep, "plana", "--gateways", "2")
    key = dep.key("plana", "--uses", "20")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda i: dep.api.post("/v1/provision", {"key": key, "csr": csr(f"gw-race-{i}")}),
                range(8),
            )
        )
    assert sorted(a.status_code for a in answers) == [201, 201] + [403] * 6
    refused = {a.json()["detail"].split(": gateway ")[0] for a in answers if a.status_code == 403}
    assert refused == {"tenant plana has 2 of 2 gateways its plan allows"}
    detail = next(a.json()["detail"] for a in answers if a.status_code == 403)
    assert detail.endswith(
        "is refused; revoke one (provisioning device revoke plana GW) or raise the limit "
        "(provisioning tenant plan plana --gateways N)"
    )
    assert json.loads(plan(dep, "plana", "--json").stdout)["usage"]["gateways"] == 2
    used = json.loads(provisioning(dep.data, "key", "list", "plana", "--json").stdout)
    assert next(k for k in used if key.split("_")[1] == k["id"])["uses"] == 2  # a refusal spends no use

    # The installer running agent provision sees the reason.
    result = dep.agent_provision("--key", key, "--name", "gw-third", "--state-dir", str(tmp_path / "third"))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "Error: the provisioning API refused (HTTP 403): tenant plana has 2 of 2 gateways its plan allows: gateway "
        "'gw-third' is refused; revoke one (provisioning device revoke plana GW) or raise the limit "
        "(provisioning tenant plan plana --gateways N)"
    )

    # A refusal is not an attack: many of them do not lock the key or the tenant out (no 429).
    for i in range(12):
        assert dep.api.post("/v1/provision", {"key": key, "csr": csr(f"gw-more-{i}")}).status_code == 403

    winner = next(a.json()["gateway"] for a in answers if a.status_code == 201)
    provisioning(dep.data, "device", "revoke", "plana", winner)
    result = dep.agent_provision("--key", key, "--name", "gw-third", "--state-dir", str(tmp_path / "third"))
    assert result.returncode == 0, result.stderr
    assert json.loads(plan(dep, "plana", "--json").stdout)["usage"]["gateways"] == 2
    plan(dep, "plana", "--gateways", "none")


def test_technician_limit(dep: Deployment, tmp_path: Path) -> None:
    plan(dep, "planb", "--technicians", "1")
    provisioning(dep.data, "technician-cert", "planb", "ann", "--out", str(tmp_path / "ann"))
    again = provisioning(dep.data, "technician-cert", "planb", "ann", "--out", str(tmp_path / "ann2"))
    assert again.returncode == 0  # the same technician, a fresh certificate: no new place taken
    result = provisioning(dep.data, "technician-cert", "planb", "bob", "--out", str(tmp_path / "bob"), check=False)
    assert (result.returncode, result.stderr.strip()) == (
        1,
        "Error: tenant planb has 1 of 1 technicians its plan allows: tech-bob is refused; revoke one "
        "(provisioning technician revoke planb NAME) or raise the limit (provisioning tenant plan planb "
        "--technicians N)",
    )
    assert not (tmp_path / "bob").exists()
    provisioning(dep.data, "technician", "revoke", "planb", "ann")
    provisioning(dep.data, "technician-cert", "planb", "bob", "--out", str(tmp_path / "bob"))
    plan(dep, "planb", "--technicians", "none")


def test_plan_through_the_api_takes_a_token_for_every_tenant(dep: Deployment) -> None:
    every = provisioning(dep.data, "operator-token", "create", "ops").stdout.split()[0]
    own = provisioning(dep.data, "operator-token", "create", "planb-ops", "--tenant", "planb").stdout.split()[0]

    def call(method: str, token: str, body: Any = None) -> httpx.Response:
        return httpx.request(
            method,
            f"{dep.api.url}/v1/tenants/planb/plan",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            verify=dep.api.context(),
        )

    assert call("GET", own).json()["limits"]["retention_days"] == 30  # set by the first test, or None alone
    answer = call("PUT", own, {"gateways": 3})
    assert answer.status_code == 403
    assert "plans are set with a token for every tenant" in answer.json()["detail"]
    answer = call("PUT", every, {"gateways": 3, "message_size": "64KiB", "retention_days": "none"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["limits"] == {
        "gateways": 3,
        "technicians": None,
        "points_per_s": None,
        "retention_days": None,
        "message_size": 65536,
    }
    assert "max_packet_size 65536" in (dep.data / "tenants" / "planb" / "mosquitto.conf").read_text()
    answer = call("PUT", every, {"gateways": -1})
    assert (answer.status_code, answer.json()) == (422, {"detail": "--gateways: must be within 0..10,000,000, got -1"})
    assert call("PUT", every, {"gateways": 1e20}).status_code == 422  # was a 500
    assert call("PUT", every, {"gateways": True}).status_code == 422  # was taken as 1
    call("PUT", every, {"gateways": "none", "message_size": None})
    assert call("PUT", every, {"message_size": "none"}).json()["limits"]["message_size"] is None


def test_message_size_is_the_brokers_packet_limit(dep: Deployment, tmp_path: Path) -> None:
    out = plan(dep, "plana", "--message-size", "2KiB").stdout
    assert "max_packet_size 2048; restart the tenant's broker (pid " in out
    assert "max_packet_size 2048" in (dep.data / "tenants" / "plana" / "mosquitto.conf").read_text()
    dep.brokers["plana"].stop()  # Mosquitto reads max_packet_size at start only
    dep.brokers["plana"].start()
    state = tmp_path / "gw"
    result = dep.agent_provision("--key", dep.key("plana"), "--name", "gw-size", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    watcher = dep.watch(" ".join(["mosquitto_sub", *dep.bridge_conn("plana"), "-t", "gw/gw-size/#", "-v"]))
    gateway = Publisher(dep, state)
    try:
        eventually(lambda: gateway.send(b"ready") and "gw/gw-size/events ready" in watcher.output(), 20, "subscriber")
        # An MQTT v5 publisher learns the limit at CONNACK (Maximum Packet Size) ...
        assert gateway.connack["MaximumPacketSize"] == 2048
        assert gateway.send(b"x" * 1900)
        watcher.wait_line(lambda line: line.startswith("gw/gw-size/events xxx"), 10, "the 1,900-byte message")
        # ... and one that sends a bigger packet anyway is disconnected with reason 0x95, "Packet too large".
        gateway.send(b"y" * 2100, wait=False)
        eventually(lambda: "Packet too large" in gateway.disconnects, 10, "the disconnect")
        # mosquitto_pub (libmosquitto) does not even send it: it exits 0, silently; MQTT v3.1.1 clients,
        # told no limit, are disconnected ("Error: The connection was lost.").
        v311 = [c for c in dep.conn(state) if c not in ("-V", "mqttv5")]
        forced = dep.pub(v311, "gw/gw-size/events", "z" * 2100, "-V", "mqttv311")
        assert (forced.returncode, forced.stderr.strip()) == (7, "Error: The connection was lost.")
        dep.pub(dep.conn(state), "gw/gw-size/events", "after")
        watcher.wait_line(lambda line: line == "gw/gw-size/events after", 10, "the message after")
        assert not any(line.startswith(("gw/gw-size/events yyy", "gw/gw-size/events zzz")) for line in watcher.output())
    finally:
        gateway.close()
        watcher.stop()
        plan(dep, "plana", "--message-size", "none")


class Publisher:
    """A gateway's MQTT v5 session through the proxy (paho, like the agent), noting CONNACK and disconnects."""

    def __init__(self, dep: Deployment, state: Path) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from factory_edge.mqtt import BrokerSettings, tls_context

        ident = json.loads((state / "identity.json").read_text())
        settings = BrokerSettings.from_url(
            ident["broker_url"].replace(":8883", f":{dep.proxy_port}"),
            connect_host="127.0.0.1",
            ca_file=str(state / ident["ca_file"]),
            cert_file=str(state / ident["cert_file"]),
            key_file=str(state / ident["key_file"]),
        )
        self.connack: dict[str, Any] = {}
        self.disconnects: list[str] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=ident["gateway"], protocol=mqtt.MQTTv5)
        self.client.tls_set_context(tls_context(settings))
        self.client.on_connect = lambda c, u, f, rc, props: self.connack.update(props.json() if props else {})
        self.client.on_disconnect = lambda c, u, f, rc, props: self.disconnects.append(str(rc))
        self.client.connect("127.0.0.1", dep.proxy_port)
        self.client.loop_start()

    def send(self, payload: bytes, *, wait: bool = True) -> bool:
        info = self.client.publish("gw/gw-size/events", payload, qos=1)
        if wait:
            info.wait_for_publish(5)
        return info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
