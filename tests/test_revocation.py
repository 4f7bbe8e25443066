"""Revocation beyond gateways: a technician cut off now; a renewed gateway's old certificate revoked after the overlap;
retained messages only where the design has them; failure limits per key and per tenant.

On the deployment ``provisioning`` rendered, with ``provisioning serve``
running (its CRL upkeep, subscription rules and retained-message guard).
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from provisioning import pki
from tests.isolation_fixtures import Client, files_of, provision
from tests.provisioning_fixtures import ApiServer, Deployment, eventually, provisioning, registry_dump

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path_factory.mktemp("revoke"))
    provisioning(deployment.data, "init", "--renew-overlap", "2s")
    deployment.api = ApiServer(
        deployment.data,
        "--max-failures",
        "1000",
        "--max-key-failures",
        "3",
        "--max-tenant-failures",
        "5",
        "--crl-check",
        "1s",
        "--cert-lifetime",
        "1h",
        "--renew-from",
        "0",
    )
    deployment.servers = [deployment.proxy, deployment.api]
    try:
        yield deployment.start()
    finally:
        deployment.stop()


def test_a_revoked_technician_is_cut_off_at_once_and_refused_after(site: Deployment, tmp_path: Path) -> None:
    out = provisioning(site.data, "technician-cert", "acme", "rita", "--hours", "1", "--out", str(tmp_path))
    assert "subscription rules updated" in out.stdout
    host, ca = "mqtt.acme.test", str(site.data / "tenants" / "acme" / "ca.pem")
    tech = Client(
        site,
        host=host,
        ca=ca,
        cert=str(tmp_path / "tech-rita.pem"),
        key=str(tmp_path / "tech-rita.key"),
        client_id="rita",
    ).connect()
    try:
        assert tech.subscribe("gw/#") == 1
        started = time.monotonic()
        result = provisioning(site.data, "technician", "revoke", "acme", "rita")
        eventually(lambda: tech.disconnects, 10, "the technician's session to end")
        print(f"\nrevoked technician disconnected {time.monotonic() - started:.2f} s after 'technician revoke'")
    finally:
        tech.close()
    assert result.stdout.splitlines()[0] == "tech-rita revoked in tenant acme"
    assert "tech-rita's sessions ended; reconnecting is refused (certificate revoked)" in result.stdout
    assert "user tech-rita" not in (site.data / "tenants" / "acme" / "acl").read_text()
    again = Client(
        site,
        host=host,
        ca=ca,
        cert=str(tmp_path / "tech-rita.pem"),
        key=str(tmp_path / "tech-rita.key"),
        client_id="rita",
    )
    with pytest.raises(Exception, match="revoked|could not connect"):
        again.connect(timeout_s=3)
    again.client.loop_stop()
    listed = json.loads(provisioning(site.data, "technician", "list", "acme", "--json").stdout)
    assert [(t["technician"], t["state"]) for t in listed] == [("tech-rita", "revoked")]


def renew(site: Deployment, state: Path) -> tuple[x509.Certificate, x509.Certificate]:
    """A renewal as the agent makes it (signed by the current key); ``(old, new)``."""
    _, _, cert_file, key_file = files_of(state)
    old = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    key = pki.new_key()
    request = pki.make_csr(key, pki.common_name(old))
    signature = pki.sign_possession(pki.load_private_key(key_file), request.public_bytes(serialization.Encoding.DER))
    answer = site.api.post(
        "/v1/renew",
        {
            "certificate": old.public_bytes(serialization.Encoding.PEM).decode(),
            "csr": request.public_bytes(serialization.Encoding.PEM).decode(),
            "signature": base64.b64encode(signature).decode(),
        },
    )
    assert answer.status_code == 200, answer.text
    new = x509.load_pem_x509_certificate(answer.json()["certificate"].encode())
    pki.write_private_key(state / "new.key", key)
    pki.write_pem(state / "new.pem", new)
    return old, new


def test_renewal_revokes_the_superseded_certificate_after_the_overlap(site: Deployment, tmp_path: Path) -> None:
    state = provision(site, tmp_path, "acme", "gw-renewed")
    old, new = renew(site, state)
    host, ca, cert, key = files_of(state)
    # Within the overlap the old certificate still works (a gateway that lost the answer can retry).
    Client(site, host=host, ca=ca, cert=cert, key=key, client_id="old").connect().close()
    crl = site.data / "tenants" / "acme" / "crl.pem"
    eventually(
        lambda: old.serial_number in {r.serial_number for r in pki.load_crl(crl)},
        15,
        "the superseded certificate in the CRL",
    )
    time.sleep(0.5)  # the broker re-reads the CRL on its reload
    with pytest.raises(AssertionError, match="could not connect"):
        Client(site, host=host, ca=ca, cert=cert, key=key, client_id="old").connect(timeout_s=3)
    Client(
        site, host=host, ca=ca, cert=str(state / "new.pem"), key=str(state / "new.key"), client_id="new"
    ).connect().close()
    assert new.serial_number not in {r.serial_number for r in pki.load_crl(crl)}


def test_a_session_of_the_superseded_certificate_ends_when_the_overlap_does(site: Deployment, tmp_path: Path) -> None:
    """A stolen superseded certificate connected during the overlap is cut off once it is revoked, not kept on."""
    state = provision(site, tmp_path, "acme", "gw-overlap")
    old, _ = renew(site, state)
    host, ca, cert, key = files_of(state)
    thief = Client(site, host=host, ca=ca, cert=cert, key=key, client_id="gw-overlap").connect()
    try:
        crl = site.data / "tenants" / "acme" / "crl.pem"
        eventually(
            lambda: old.serial_number in {r.serial_number for r in pki.load_crl(crl)}, 15, "the old cert in the CRL"
        )
        eventually(lambda: thief.disconnects, 10, "the superseded certificate's session to end")
    finally:
        thief.close()


def test_failures_are_limited_per_key_and_per_tenant_from_any_address(site: Deployment) -> None:
    key = site.key("globex", "--uses", "1")
    used = provisioning(site.data, "key", "create", "globex", "--uses", "1").stdout.strip()
    bad = pki.make_csr(pki.new_key(), "bridge").public_bytes(serialization.Encoding.PEM).decode()
    # The address limit is high (1000); the key allows 3 failures, the tenant 5.
    codes = [site.api.post("/v1/provision", {"key": key, "csr": bad}).status_code for _ in range(4)]
    assert codes == [422, 422, 422, 429]
    refused = site.api.post("/v1/provision", {"key": key, "csr": bad})
    assert refused.json()["detail"].startswith(f"too many failed attempts for key {key.split('_')[1]}; retry in ")
    assert int(refused.headers["retry-after"]) > 0
    before = registry_dump(site.data)
    codes = [site.api.post("/v1/provision", {"key": used, "csr": bad}).status_code for _ in range(3)]
    assert codes == [422, 422, 429]  # the tenant's fifth failure came from another key
    assert (
        site.api.post("/v1/provision", {"key": used, "csr": bad})
        .json()["detail"]
        .startswith("too many failed attempts for tenant globex; retry in ")
    )
    assert registry_dump(site.data) == before


def test_failures_sent_all_at_once_are_limited_like_one_after_the_other(site: Deployment) -> None:
    """Twelve bad requests for one key at the same moment: the key allows 3 failures, so 3 are checked and the rest
    refused (429), not all checked before any is counted."""
    from concurrent.futures import ThreadPoolExecutor

    key = site.key("globex", "--uses", "1")
    bad = pki.make_csr(pki.new_key(), "bridge").public_bytes(serialization.Encoding.PEM).decode()
    with ThreadPoolExecutor(12) as pool:
        codes = sorted(
            pool.map(lambda _: site.api.post("/v1/provision", {"key": key, "csr": bad}).status_code, range(12))
        )
    assert codes.count(422) <= 3 and codes.count(429) >= 9, codes


def test_retained_messages_only_where_the_design_has_them(site: Deployment, tmp_path: Path) -> None:
    state = provision(site, tmp_path, "acme", "gw-retainer")
    gateway = Client.gateway(site, state).connect()
    persistence = site.data / "tenants" / "acme" / "data" / "mosquitto.db"
    eventually(lambda: persistence.exists(), 15, "the broker's first autosave")
    time.sleep(6)  # one autosave interval: the baseline holds everything so far
    baseline = persistence.stat().st_size
    body = "x" * 50_000
    try:
        for n in range(200):
            assert gateway.publish(f"gw/gw-retainer/data/flood-{n}", body, retain=True) == 0
        assert gateway.publish("gw/gw-retainer/status", '{"state":"online"}', retain=True) == 0
        assert gateway.publish("gw/gw-retainer/meta/press-1", '{"device":"press-1"}', retain=True) == 0
    finally:
        gateway.close()
    time.sleep(6)  # the next autosave
    grown = persistence.stat().st_size - baseline
    print(f"\n200 x 50 KB retained data messages: persistence grew by {grown} bytes")
    assert grown < 200_000  # 9.8 MB without the guard
    out = provisioning(site.data, "technician-cert", "acme", "late", "--hours", "1", "--out", str(tmp_path / "t"))
    assert out.returncode == 0
    tech = Client(
        site,
        host="mqtt.acme.test",
        ca=str(site.data / "tenants" / "acme" / "ca.pem"),
        cert=str(tmp_path / "t" / "tech-late.pem"),
        key=str(tmp_path / "t" / "tech-late.key"),
        client_id="late",
    ).connect()
    try:
        assert tech.subscribe("gw/gw-retainer/#") == 1
        time.sleep(1.0)
        topics = sorted(t for t, _ in tech.received())
    finally:
        tech.close()
    assert topics == ["gw/gw-retainer/meta/press-1", "gw/gw-retainer/status"]
    guard_log = site.api.log()
    assert guard_log.count('"msg": "retained message cleared"') >= 200


def test_stores_and_state_directories_are_private_whatever_the_umask(site: Deployment, tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        existing = tmp_path / "gw-umask"
        existing.mkdir(mode=0o755)
        os.chmod(existing, 0o755)
        provision(site, tmp_path, "acme", "gw-umask")
        from bridge.storage.sqlite import SqliteStore

        store = SqliteStore(tmp_path / "store", "acme")
        store.open()
        store.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(existing.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "store").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "store" / "acme.db").stat().st_mode) == 0o600
