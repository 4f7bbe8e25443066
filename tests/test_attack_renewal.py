"""Renewal abuse with a stolen gateway certificate: minting fresh certificates early and often, and clones.

``provisioning serve`` with short certificate lifetimes, on the deployment
``provisioning`` rendered; gateways enrolled by ``agent provision``.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from provisioning import pki
from tests.isolation_fixtures import files_of, provision
from tests.provisioning_fixtures import ApiServer, Deployment, provisioning

pytestmark = pytest.mark.timeout(180)

LIFETIME_S = 6


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path_factory.mktemp("renewal"), tenants=("acme",))
    deployment.api = ApiServer(
        deployment.data, "--max-failures", "1000", "--max-key-failures", "3", "--cert-lifetime", f"{LIFETIME_S}s"
    )
    deployment.servers = [deployment.proxy, deployment.api]
    try:
        yield deployment.start()
    finally:
        deployment.stop()


def renewal(cert_file: Path, key_file: Path, new_key: pki.PrivateKey) -> dict[str, str]:
    """The body of a renewal as the agent sends it: the current certificate, a CSR for ``new_key``, signed."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    request = pki.make_csr(new_key, pki.common_name(cert))
    signature = pki.sign_possession(pki.load_private_key(key_file), request.public_bytes(serialization.Encoding.DER))
    return {
        "certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "csr": request.public_bytes(serialization.Encoding.PEM).decode(),
        "signature": base64.b64encode(signature).decode(),
    }


def devices(site: Deployment) -> dict[str, dict[str, object]]:
    listed = json.loads(provisioning(site.data, "device", "list", "acme", "--json").stdout)
    return {d["gateway"]: d for d in listed}


def test_a_stolen_certificate_cannot_mint_certificates_long_before_expiry(site: Deployment, tmp_path: Path) -> None:
    state = provision(site, tmp_path, "acme", "gw-early")
    _, _, cert, key = map(Path, files_of(state))
    answers = [site.api.post("/v1/renew", renewal(cert, key, pki.new_key())) for _ in range(5)]
    assert [a.status_code for a in answers[:3]] == [403, 403, 403]
    assert "too early" in answers[0].json()["detail"]
    assert answers[4].status_code == 429  # failures counted per gateway
    assert devices(site)["gw-early"]["renewals"] == 0


@pytest.mark.fault
def test_two_keys_renewing_one_gateway_flag_it_possibly_cloned(site: Deployment, tmp_path: Path) -> None:
    """The real gateway and the holder of its copied key both renew: the second is refused and the gateway flagged."""
    state = provision(site, tmp_path, "acme", "gw-clone")
    _, _, cert, key = map(Path, files_of(state))
    time.sleep(LIFETIME_S * 0.6)  # into the renewal window
    real = site.api.post("/v1/renew", renewal(cert, key, pki.new_key()))
    assert real.status_code == 200, real.text
    thief = site.api.post("/v1/renew", renewal(cert, key, pki.new_key()))
    assert thief.status_code == 403
    listed = devices(site)["gw-clone"]
    assert listed["possibly_cloned"] is True
    table = provisioning(site.data, "device", "list", "acme").stdout
    assert "possibly cloned" in next(line for line in table.splitlines() if line.startswith("gw-clone"))
