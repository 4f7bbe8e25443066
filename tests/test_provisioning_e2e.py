"""Provisioning end to end: two tenants behind one HAProxy port, one Mosquitto each, the HTTPS API.

Everything runs from what ``provisioning`` renders into its data directory;
gateways are provisioned by the real ``agent provision`` and checked with
plain ``mosquitto_sub``/``mosquitto_pub``, as a technician would, with
``mqtt.<tenant>.test`` resolving to this machine in a private namespace.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from tests.infra import _LIVE, resolve_in_namespace, run_in_namespace
from tests.provisioning_fixtures import (
    NOT_AUTHORIZED,
    PY,
    ROOT,
    ApiServer,
    Deployment,
    eventually,
    key_files,
    provisioning,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    for binary in ("mosquitto", "mosquitto_sub", "haproxy"):
        if not any(os.access(Path(d) / binary, os.X_OK) for d in os.environ.get("PATH", "").split(":")):
            pytest.skip(f"{binary} not installed")
    deployment = Deployment(tmp_path_factory.mktemp("prov"))
    try:
        yield deployment.start()
    finally:
        deployment.stop()


@pytest.fixture(scope="module")
def technician(site: Deployment, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The mosquitto_sub command line ``provisioning technician-cert acme anna`` prints."""
    out = tmp_path_factory.mktemp("tech")
    result = provisioning(site.data, "technician-cert", "acme", "anna", "--hours", "2", "--out", str(out))
    assert "tech-anna: read-only on tenant acme until" in result.stdout
    assert "broker acme reloaded (pid" in result.stdout
    return next(line.strip() for line in result.stdout.splitlines() if line.strip().startswith("mosquitto_sub "))


def provision(site: Deployment, tmp: Path, tenant: str, name: str) -> Path:
    state = tmp / name
    result = site.agent_provision("--key", site.key(tenant, "--uses", "1"), "--name", name, "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    return state


def test_two_tenants_provision_and_publish_through_one_port(site: Deployment, technician: str, tmp_path: Path) -> None:
    assert re.fullmatch(
        rf"mosquitto_sub -h mqtt\.acme\.test -p {site.proxy_port} --cafile \S+/acme-ca\.pem "
        r"--cert \S+/tech-anna\.pem --key \S+/tech-anna\.key -V mqttv5 -t 'gw/#' -t 'alerts/#' -v",
        technician,
    )
    tech = site.watch(technician)  # exactly as printed
    try:
        # The technician's session is up once it sees a message; the bridge's commands are harmless.
        eventually(
            lambda: (
                site.pub(site.bridge_conn("acme"), "gw/warmup/cmd/ping", "{}").returncode == 0
                and any(line.startswith("gw/warmup/cmd/ping") for line in tech.output())
            ),
            10,
            "technician session",
        )

        key = site.key("acme", "--uses", "1", "--expires", "1h")
        started = time.monotonic()
        result = site.agent_provision("--key", key, "--name", "gw-a1", "--state-dir", str(tmp_path / "gw-a1"))
        assert result.returncode == 0, result.stderr
        tech.wait_line(lambda x: x.startswith("gw/gw-a1/events ") and '"provisioned"' in x, 10, "provisioned event")
        elapsed = time.monotonic() - started
        print(f"\nagent provision, key to first publish seen by a technician: {elapsed:.2f} s")
        assert elapsed < 15.0  # about 1 s on a quiet machine (printed above); this bounds a hang, not speed

        summary = result.stdout
        assert summary.startswith("Provisioned gw-a1 in tenant acme (")
        assert f"mqtts://mqtt.acme.test:{site.proxy_port}  connected, published gw/gw-a1/events in" in summary
        assert "(0600, made here, never sent)" in summary

        # The summary's ready-to-paste command works as printed: it sees this gateway's commands.
        lines = summary.splitlines()
        own = lines[lines.index("Commands sent to this gateway (paste here, as root):") + 1].strip()
        assert own.startswith("mosquitto_sub -h mqtt.acme.test -p ") and own.endswith(" -t 'gw/gw-a1/cmd/#'")
        watcher = site.watch(own)
        try:
            eventually(
                lambda: (
                    site.pub(site.bridge_conn("acme"), "gw/gw-a1/cmd/ping", "{}").returncode == 0
                    and "gw/gw-a1/cmd/ping {}" in watcher.output()
                ),
                10,
                "the printed command to see a command",
            )
        finally:
            watcher.stop()

        globex = provision(site, tmp_path, "globex", "gw-g1")
        assert site.pub(site.conn(globex), "gw/gw-g1/data/press-1", '{"v":1,"seq":1}').stderr == ""
        gw_a1 = site.conn(tmp_path / "gw-a1")
        assert site.pub(gw_a1, "gw/gw-a1/data/press-1", '{"v":1,"seq":1}').stderr == ""
        tech.wait_line(lambda x: x == 'gw/gw-a1/data/press-1 {"v":1,"seq":1}', 10, "acme data")
        assert not any("gw-g1" in line for line in tech.output())  # globex's data never reaches acme

        # Technicians read only: every publish is refused. (Another technician: one certificate holds one
        # session, since the broker makes its CN the client id.)
        other = provisioning(site.data, "technician-cert", "acme", "ben", "--hours", "1", "--out", str(tmp_path / "b"))
        tech_args = next(
            line.strip() for line in other.stdout.splitlines() if line.strip().startswith("mosquitto_sub ")
        ).split()
        tech_conn = tech_args[1 : tech_args.index("-t")]
        for topic in ("gw/gw-a1/cmd/write", "gw/gw-a1/data/press-1", "alerts/gw-a1/press-1/hot"):
            assert site.pub(tech_conn, topic, "forged").stderr.strip() == NOT_AUTHORIZED
        assert site.pub(gw_a1, "gw/gw-a1/events", "after").stderr == ""
        tech.wait_line(lambda x: x == "gw/gw-a1/events after", 10, "later event")
        assert not any("forged" in line for line in tech.output())
    finally:
        tech.stop()


def test_isolation_between_tenants_and_gateways(site: Deployment, tmp_path: Path) -> None:
    a2 = provision(site, tmp_path, "acme", "gw-a2")
    provision(site, tmp_path, "acme", "gw-a3")  # a real neighbour whose topics gw-a2 tries
    # An acme certificate at globex's name (same proxy port): refused in the handshake, no session.
    intruder = site.pub(site.conn(a2, host="mqtt.globex.test"), "gw/gw-a2/events", "x", "-d")
    assert intruder.returncode != 0
    assert "u'gw-a2'" not in site.brokers["globex"].log()
    # An unknown SNI name gets no connection at all.
    nope = site.pub(site.conn(a2, host="mqtt.nope.test"), "gw/gw-a2/events", "x")
    assert nope.returncode != 0 and "TLS error" in nope.stderr
    # Another gateway's topic root: refused.
    for topic in ("gw/gw-a3/data/press-1", "gw/gw-a3/status", "gw/gw-a3/cmd/write", "alerts/gw-a2/x/y"):
        assert (topic, site.pub(site.conn(a2), topic, "forged").stderr.strip()) == (topic, NOT_AUTHORIZED)
    # Another gateway's commands: never delivered; its own are.
    sub = site.watch(" ".join(["mosquitto_sub", *site.conn(a2), "-v", "-t", "gw/gw-a3/cmd/#", "-t", "gw/gw-a2/cmd/#"]))
    try:
        bridge = site.bridge_conn("acme")
        eventually(
            lambda: (
                site.pub(bridge, "gw/gw-a3/cmd/ping", "for a3").returncode == 0
                and site.pub(bridge, "gw/gw-a2/cmd/ping", "for a2").returncode == 0
                and "gw/gw-a2/cmd/ping for a2" in sub.output()
            ),
            10,
            "own command",
        )
        assert not any("for a3" in line for line in sub.output())
    finally:
        sub.stop()


def test_revoked_gateway_is_cut_off_within_10s_and_refused_after(site: Deployment, tmp_path: Path) -> None:
    state = provision(site, tmp_path, "acme", "gw-rv")
    connected = site.watch(" ".join(["mosquitto_sub", *site.conn(state), "-v", "-t", "gw/gw-rv/cmd/#"]))
    try:
        eventually(
            lambda: (
                site.pub(site.bridge_conn("acme"), "gw/gw-rv/cmd/ping", "hello").returncode == 0
                and "gw/gw-rv/cmd/ping hello" in connected.output()
            ),
            10,
            "connected gateway",
        )
        started = time.monotonic()
        result = provisioning(site.data, "device", "revoke", "acme", "gw-rv")
        eventually(lambda: connected.proc.poll() is not None, 10, "the revoked session to end")
        cut_off = time.monotonic() - started
        print(f"\nrevoked gateway disconnected {cut_off:.2f} s after 'provisioning device revoke'")
        assert cut_off < 10
        assert result.stdout.splitlines()[0] == "gw-rv revoked in tenant acme"
        assert "gw-rv's sessions ended; reconnecting is refused (certificate revoked)" in result.stdout
    finally:
        connected.stop()
    refused = site.pub(site.conn(state), "gw/gw-rv/events", "again", "-d")
    assert refused.returncode != 0 and "alert certificate revoked" in refused.stdout
    status = run_in_namespace(
        site.hosts, ["mosquitto_sub", *site.bridge_conn("acme"), "-t", "gw/gw-rv/status", "-C", "1", "-W", "5"]
    )
    assert json.loads(status.stdout)["state"] == "offline" and json.loads(status.stdout)["reason"] == "revoked"
    devices = json.loads(provisioning(site.data, "device", "list", "acme", "gw-rv", "--json").stdout)
    assert [(d["gateway"], d["state"]) for d in devices] == [("gw-rv", "revoked")]
    # The name may serve a replacement box, with a new key and certificate.
    replacement = provision(site, tmp_path / "new", "acme", "gw-rv")
    assert site.pub(site.conn(replacement), "gw/gw-rv/events", "replacement").stderr == ""


def test_new_tenant_joins_without_dropping_other_tenants(site: Deployment, technician: str, tmp_path: Path) -> None:
    tech = site.watch(technician)
    try:
        gw = provision(site, tmp_path, "acme", "gw-a9")
        eventually(
            lambda: (
                site.pub(site.conn(gw), "gw/gw-a9/events", "before").returncode == 0
                and "gw/gw-a9/events before" in tech.output()
            ),
            10,
            "technician session",
        )
        created = site.add_tenant("initech")
        assert re.search(r"proxy +\S+haproxy\.cfg: proxy reloaded \(pid \d+\)", created.stdout), created.stdout
        initech = provision(site, tmp_path, "initech", "gw-i1")
        assert site.pub(site.conn(initech), "gw/gw-i1/events", "hello").stderr == ""
        assert site.pub(site.conn(gw), "gw/gw-a9/events", "after").stderr == ""
        tech.wait_line(lambda x: x == "gw/gw-a9/events after", 10, "acme data after the reload")
        assert tech.proc.poll() is None  # the same connection, never dropped
    finally:
        tech.stop()


def test_agent_provision_twice_says_so_and_force_replaces(site: Deployment, tmp_path: Path) -> None:
    state = provision(site, tmp_path, "acme", "gw-twice")
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    key = site.key("acme", "--uses", "1")
    again = site.agent_provision("--key", key, "--name", "gw-twice2", "--state-dir", str(state))
    assert again.returncode == 1
    assert again.stderr == (
        f"Error: already provisioned as gw-twice for mqtts://mqtt.acme.test:{site.proxy_port} "
        f"({state}/identity.json); nothing changed: use --force to provision again\n"
    )
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    keys = json.loads(provisioning(site.data, "key", "list", "acme", "--json").stdout)
    assert next(k for k in keys if key.startswith(f"fek_{k['id']}_"))["uses"] == 0  # the key was not spent

    forced = site.agent_provision("--key", key, "--name", "gw-twice2", "--state-dir", str(state), "--force")
    assert forced.returncode == 0, forced.stderr
    assert site.identity(state)["gateway"] == "gw-twice2"
    assert not (state / "gw-twice.key").exists() and not (state / "gw-twice.pem").exists()


def test_private_keys_are_0600_and_data_dir_private(site: Deployment, tmp_path: Path) -> None:
    state = provision(site, tmp_path, "globex", "gw-perm")
    keys = key_files(site.data, state)
    assert {p.name for p in keys} >= {
        "ca.key",
        "broker.key",
        "bridge.key",
        "provisioning.key",
        "server.key",
        "gw-perm.key",
    }
    for path in keys:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for directory in (site.data, site.data / "tenants" / "acme", state):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert stat.S_IMODE((site.data / "registry.db").stat().st_mode) == 0o600
    # Only a CSR left the gateway: the service holds no copy of its key.
    gw_key = (state / "gw-perm.key").read_bytes()
    assert all(p.read_bytes() != gw_key for p in key_files(site.data))


def test_running_agent_renews_its_certificate_at_two_thirds(site: Deployment, tmp_path: Path) -> None:
    short = ApiServer(site.data, "--cert-lifetime", "6s", "--max-failures", "1000")
    site.servers.append(short)
    short.start()
    state = tmp_path / "gw-renew"
    result = site.agent_provision(
        "--key", site.key("acme", "--uses", "1"), "--name", "gw-renew", "--state-dir", str(state), url=short.url
    )
    assert result.returncode == 0, result.stderr
    first = x509.load_pem_x509_certificate((state / "gw-renew.pem").read_bytes())
    lifetime = first.not_valid_after_utc - first.not_valid_before_utc
    due = (first.not_valid_before_utc + lifetime * 2 / 3).timestamp()
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(state)}))
    log = open(tmp_path / "agent.log", "wb")
    agent = resolve_in_namespace(
        site.hosts,
        [PY, "-m", "agent.cli", "run", "--config", str(config)],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    log.close()
    try:

        def renewed() -> x509.Certificate | None:
            cert = x509.load_pem_x509_certificate((state / "gw-renew.pem").read_bytes())
            return cert if cert.serial_number != first.serial_number else None

        second = eventually(renewed, 15, "the agent to renew its certificate", interval_s=0.1)
        seen = time.time()
        assert seen >= due - 0.5, "renewed before two thirds of the lifetime"
        assert x509.load_pem_x509_certificate((state / "gw-renew.pem").read_bytes()).subject == first.subject
        assert stat.S_IMODE((state / "gw-renew.key").stat().st_mode) == 0o600
        assert second.not_valid_after_utc > first.not_valid_after_utc
        devices = json.loads(provisioning(site.data, "device", "list", "acme", "gw-renew", "--json").stdout)
        assert devices[0]["renewals"] >= 1 and devices[0]["state"] == "active"
        status = json.loads((state / "status.json").read_text())
        assert status["connection"]["state"] == "connected"
        # Key and certificate match, and the broker accepts the pair (this session replaces the agent's:
        # one certificate, one session).
        assert site.pub(site.conn(state), "gw/gw-renew/events", "renewed").stderr == ""
    finally:
        agent.terminate()
        agent.wait(10)
        _LIVE.pop(agent.pid, None)
    assert "certificate renewed" in (tmp_path / "agent.log").read_text()


def test_crl_is_reissued_before_it_expires(site: Deployment) -> None:
    fresh = provisioning(site.data, "crl", "refresh", "acme").stdout
    assert re.fullmatch(r"acme: fresh, valid until \S+ \S+ UTC \(unchanged\)\n", fresh)
    # A CRL with one day left (as if the service had been down for six days) is re-issued.
    from provisioning import pki

    files = site.data / "tenants" / "acme"
    ca_key, ca_cert = pki.load_private_key(files / "ca.key"), pki.load_cert(files / "ca.pem")
    revoked = list(pki.load_crl(files / "crl.pem"))
    pki.write_pem(
        files / "crl.pem",
        pki.create_crl(ca_key, ca_cert, [(r.serial_number, r.revocation_date_utc) for r in revoked], days=1),
    )
    out = provisioning(site.data, "crl", "refresh").stdout
    assert re.search(r"^acme: re-issued, valid until \S+ \S+ UTC \(broker acme reloaded \(pid \d+\)\)$", out, re.M)
    crl = pki.load_crl(files / "crl.pem")
    assert crl.next_update_utc is not None and crl.next_update_utc.timestamp() > time.time() + 6.9 * 86400
    assert {r.serial_number for r in crl} == {r.serial_number for r in revoked}  # nothing forgotten
