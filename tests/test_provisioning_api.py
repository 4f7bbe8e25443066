"""The HTTPS provisioning API, as ``provisioning serve`` runs it: statuses, messages, and a registry left alone.

Each refused request is asserted with its status and its one-line
``detail``, and with the registry exactly as it was before (every row of
every table).
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from provisioning import pki
from tests.helpers import free_port
from tests.provisioning_fixtures import ApiServer, provisioning, registry_dump

pytestmark = pytest.mark.timeout(120)


class Api:
    def __init__(self, data: Path, server: ApiServer) -> None:
        self.data = data
        self.server = server

    def key(self, tenant: str = "acme", *options: str) -> str:
        return provisioning(self.data, "key", "create", tenant, *options).stdout.strip()

    def provision(self, key: str, csr: Any, name: str | None = None, **extra: Any) -> Any:
        body = {"key": key, "csr": csr if isinstance(csr, str) else pem(csr), **extra}
        if name is not None:
            body["name"] = name
        return self.server.post("/v1/provision", body)

    def refused(self, status: int, detail: str, request: Any) -> None:
        """``request()`` is refused with ``status`` and exactly ``detail``, and changes nothing."""
        before = registry_dump(self.data)
        response = request()
        assert (response.status_code, response.json()) == (status, {"detail": detail})
        assert registry_dump(self.data) == before


def pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def csr_for(name: str, key: Any = None) -> x509.CertificateSigningRequest:
    return pki.make_csr(key or pki.new_key(), name)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    data = tmp_path_factory.mktemp("api") / "data"
    provisioning(data, "tenant", "create", "acme", "--domain", "example.com")
    provisioning(data, "tenant", "create", "globex", "--domain", "example.com")
    server = ApiServer(data, "--max-failures", "1000", "--renew-from", "0").start()
    try:
        yield Api(data, server)
    finally:
        server.stop()


def test_openapi_document_lists_the_endpoints_and_their_errors(api: Api) -> None:
    import httpx

    doc = httpx.get(f"{api.server.url}/openapi.json", verify=api.server.context()).json()
    provision = doc["paths"]["/v1/provision"]["post"]
    assert set(provision["responses"]) >= {"201", "401", "403", "409", "413", "422", "429"}
    assert set(doc["paths"]["/v1/renew"]["post"]["responses"]) >= {"200", "401", "403", "422", "429"}
    assert (
        "/docs" not in doc["paths"]
        and httpx.get(f"{api.server.url}/docs", verify=api.server.context()).status_code == 404
    )


def test_provision_returns_certificate_ca_broker_url_and_topic_root(api: Api) -> None:
    key = pki.new_key()
    response = api.provision(api.key("acme", "--uses", "1"), csr_for("gw-ok", key))
    assert response.status_code == 201, response.text
    doc = response.json()
    cert = x509.load_pem_x509_certificate(doc["certificate"].encode())
    ca = x509.load_pem_x509_certificate(doc["ca"].encode())
    assert (doc["gateway"], doc["tenant"], doc["broker_url"], doc["topic_root"]) == (
        "gw-ok",
        "acme",
        "mqtts://mqtt.acme.example.com:8883",
        "gw/gw-ok/",
    )
    assert pki.common_name(cert) == "gw-ok" and pki.issued_by(cert, ca) and pki.same_key(cert, key.public_key())
    assert ca.subject == pki.load_cert(api.data / "tenants" / "acme" / "ca.pem").subject


def test_key_errors_401_403(api: Api) -> None:
    csr = csr_for("gw-k")
    api.refused(401, "unknown provisioning key (expected fek_<id>_<secret>)", lambda: api.provision("hunter2", csr))
    unknown = "fek_0123456789_" + "A" * 43
    api.refused(401, "unknown provisioning key", lambda: api.provision(unknown, csr))

    revoked = api.key()
    key_id = revoked.split("_")[1]
    provisioning(api.data, "key", "revoke", key_id)
    api.refused(
        403,
        f"provisioning key {key_id} was revoked at {_key(api, key_id)['revoked_at']}",
        lambda: api.provision(revoked, csr),
    )

    expiring = api.key("acme", "--expires", "1s")
    expiring_id = expiring.split("_")[1]
    time.sleep(1.2)
    api.refused(
        403,
        f"provisioning key {expiring_id} expired at {_key(api, expiring_id)['expires_at']}",
        lambda: api.provision(expiring, csr),
    )


def _key(api: Api, key_id: str) -> dict[str, Any]:
    return next(k for k in json.loads(provisioning(api.data, "key", "list", "--json").stdout) if k["id"] == key_id)


def test_replayed_one_use_key_is_refused(api: Api) -> None:
    key = api.key("acme", "--uses", "1")
    request = {"key": key, "csr": pem(csr_for("gw-once")), "name": "gw-once"}
    assert api.server.post("/v1/provision", request).status_code == 201
    key_id = key.split("_")[1]
    api.refused(
        403, f"provisioning key {key_id} is used up (1 of 1 uses)", lambda: api.server.post("/v1/provision", request)
    )
    api.refused(
        403, f"provisioning key {key_id} is used up (1 of 1 uses)", lambda: api.provision(key, csr_for("gw-other"))
    )


def test_one_use_key_serves_one_of_many_concurrent_requests(api: Api) -> None:
    key = api.key("globex", "--uses", "1")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: api.provision(key, csr_for(f"gw-race-{i}")).status_code, range(6)))
    assert sorted(results) == [201] + [403] * 5
    devices = provisioning(api.data, "device", "list", "globex").stdout
    assert devices.count("gw-race-") == 1


@pytest.mark.parametrize(
    ("make_csr", "name", "detail"),
    [
        (lambda: "not a CSR", None, "CSR is not a PEM or DER certificate signing request"),
        (
            lambda: pem(
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "gw-ed")]))
                .sign(ed25519.Ed25519PrivateKey.generate(), None)
            ),
            None,
            "CSR key is Ed25519; need RSA 2048-4096 with e=65537 or EC P-256/P-384",
        ),
        (
            lambda: pem(csr_for("gw-rsa", rsa.generate_private_key(65537, 1024))),
            None,
            "CSR key is RSA 1024 bits; need RSA 2048-4096 with e=65537 or EC P-256/P-384",
        ),
        (lambda: pem(csr_for("bridge")), None, "CSR common name 'bridge' is reserved for the bridge or technicians"),
        (
            lambda: pem(csr_for("tech-eve")),
            None,
            "CSR common name 'tech-eve' is reserved for the bridge or technicians",
        ),
        (
            lambda: pem(csr_for("provisioning")),
            None,
            "CSR common name 'provisioning' is reserved for the provisioning service",
        ),
        (
            lambda: pem(csr_for("gw/../x")),
            None,
            "CSR common name 'gw/../x' is not a valid id: 1-64 letters, digits, "
            "'_', '.' or '-', starting with a letter or digit",
        ),
        (lambda: pem(csr_for("gw-a")), "gw-b", "CSR common name 'gw-a' does not match the expected 'gw-b'"),
        (
            lambda: pem(csr_for("gw-a")),
            "gw a",
            "gateway name 'gw a' is not a valid id: 1-64 letters, digits, '_', '.' "
            "or '-', starting with a letter or digit",
        ),
    ],
    ids=["garbage", "ed25519", "rsa1024", "bridge", "technician", "service", "bad-cn", "name-mismatch", "bad-name"],
)
def test_bad_csr_or_name_is_422(api: Api, make_csr: Any, name: str | None, detail: str) -> None:
    key = api.key("acme", "--uses", "1")
    api.refused(422, detail, lambda: api.provision(key, make_csr(), name))


def test_tampered_csr_is_422(api: Api) -> None:
    der = bytearray(csr_for("gw-t").public_bytes(serialization.Encoding.DER))
    der[-1] ^= 1
    tampered = x509.load_der_x509_csr(bytes(der))
    key = api.key()
    api.refused(
        422,
        "CSR signature is invalid: the request was altered or not signed by its key",
        lambda: api.provision(key, tampered),
    )


def test_bad_request_bodies_are_422(api: Api) -> None:
    key = api.key()
    api.refused(422, "csr: Field required", lambda: api.server.post("/v1/provision", {"key": key}))
    api.refused(
        422, "password: Extra inputs are not permitted", lambda: api.provision(key, csr_for("gw-x"), password="x")
    )
    api.refused(
        422,
        "request body is not valid JSON",
        lambda: api.server.post(
            "/v1/provision", None, content=b"{not json", headers={"content-type": "application/json"}
        ),
    )
    big = api.server.post("/v1/provision", None, content=b"x" * 100_000, headers={"content-type": "application/json"})
    assert (big.status_code, big.json()) == (413, {"detail": "request body is 100000 bytes; the limit is 65536"})


def test_name_taken_by_another_device_is_409(api: Api) -> None:
    assert api.provision(api.key(), csr_for("gw-taken")).status_code == 201
    key = api.key()
    api.refused(
        409,
        "gateway name 'gw-taken' is already taken in tenant acme by a device provisioned at "
        f"{_device(api, 'gw-taken')['provisioned_at']}; revoke it first (provisioning device revoke acme "
        "gw-taken) or choose another name",
        lambda: api.provision(key, csr_for("gw-taken")),
    )
    # Another tenant has its own names.
    assert api.provision(api.key("globex"), csr_for("gw-taken")).status_code == 201


def _device(api: Api, name: str, tenant: str = "acme") -> dict[str, Any]:
    return json.loads(provisioning(api.data, "device", "list", tenant, name, "--json").stdout)[0]


def test_registry_stores_no_key_or_secret_in_clear(api: Api) -> None:
    key = api.key()
    assert api.provision(key, csr_for("gw-secret")).status_code == 201
    secret = key.split("_", 2)[2].encode()
    digest = hashlib.sha256(key.encode()).hexdigest()
    dump = repr(registry_dump(api.data))
    assert digest in dump and key not in dump
    for path in api.data.glob("registry.db*"):  # the database, its WAL and shared memory
        raw = path.read_bytes()
        assert secret not in raw and b"PRIVATE KEY" not in raw, path


def test_renewal(api: Api) -> None:
    old_key = pki.new_key()
    issued = api.provision(api.key(), csr_for("gw-renew", old_key)).json()
    cert_pem = issued["certificate"]
    new_key = pki.new_key()
    csr = csr_for("gw-renew", new_key)
    signature = base64.b64encode(pki.sign_possession(old_key, csr.public_bytes(serialization.Encoding.DER))).decode()
    body = {"certificate": cert_pem, "csr": pem(csr), "signature": signature}

    forged = base64.b64encode(pki.sign_possession(pki.new_key(), csr.public_bytes(serialization.Encoding.DER))).decode()
    api.refused(
        401,
        "signature over the CSR does not match the certificate's key",
        lambda: api.server.post("/v1/renew", {**body, "signature": forged}),
    )
    _, stranger = pki.issue_client_cert(*pki.create_ca("elsewhere"), "gw-renew")
    api.refused(
        401,
        "certificate was not issued to a gateway by this service",
        lambda: api.server.post(
            "/v1/renew", {**body, "certificate": stranger.public_bytes(serialization.Encoding.PEM).decode()}
        ),
    )
    api.refused(422, "signature is not base64", lambda: api.server.post("/v1/renew", {**body, "signature": "%%"}))
    wrong_cn = csr_for("gw-other", new_key)
    api.refused(
        422,
        "CSR common name 'gw-other' does not match the expected 'gw-renew'",
        lambda: api.server.post(
            "/v1/renew",
            {
                **body,
                "csr": pem(wrong_cn),
                "signature": base64.b64encode(
                    pki.sign_possession(old_key, wrong_cn.public_bytes(serialization.Encoding.DER))
                ).decode(),
            },
        ),
    )

    renewed = api.server.post("/v1/renew", body)
    assert renewed.status_code == 200, renewed.text
    new = x509.load_pem_x509_certificate(renewed.json()["certificate"].encode())
    old = x509.load_pem_x509_certificate(cert_pem.encode())
    assert pki.common_name(new) == "gw-renew" and pki.same_key(new, new_key.public_key())
    assert new.serial_number != old.serial_number
    # The answer was lost and the gateway asks again: the same certificate.
    assert api.server.post("/v1/renew", body).json()["certificate"] == renewed.json()["certificate"]
    # The old certificate cannot renew again, for another key: two holders of one identity, flagged.
    other = csr_for("gw-renew")
    cloned = api.server.post(
        "/v1/renew",
        {
            **body,
            "csr": pem(other),
            "signature": base64.b64encode(
                pki.sign_possession(old_key, other.public_bytes(serialization.Encoding.DER))
            ).decode(),
        },
    )
    assert (cloned.status_code, cloned.json()) == (
        403,
        {
            "detail": f"certificate of gw-renew was already renewed (serial {new.serial_number:x}) for another key; "
            "the gateway is flagged possibly cloned"
        },
    )
    assert _device(api, "gw-renew")["possibly_cloned"] is True
    assert _device(api, "gw-renew")["renewals"] == 1

    provisioning(api.data, "device", "revoke", "acme", "gw-renew")
    again = csr_for("gw-renew")
    revoked_at = _device(api, "gw-renew")["revoked_at"]
    api.refused(
        403,
        f"certificate of gw-renew was revoked at {revoked_at}",
        lambda: api.server.post(
            "/v1/renew",
            {
                "certificate": renewed.json()["certificate"],
                "csr": pem(again),
                "signature": base64.b64encode(
                    pki.sign_possession(new_key, again.public_bytes(serialization.Encoding.DER))
                ).decode(),
            },
        ),
    )


def test_too_many_failures_from_one_client_get_429(api: Api) -> None:
    strict = ApiServer(api.data, "--max-failures", "3", "--failure-window", "1m").start()
    try:
        for _ in range(3):
            assert strict.post("/v1/provision", {"key": "nope", "csr": "nope"}).status_code == 401
        good = api.key("acme", "--uses", "1")
        before = registry_dump(api.data)
        blocked = strict.post("/v1/provision", {"key": good, "csr": pem(csr_for("gw-429"))})
        assert blocked.status_code == 429
        assert blocked.json() == {
            "detail": f"too many failed attempts from 127.0.0.1; retry in {blocked.headers['retry-after']} s"
        }
        assert 0 < int(blocked.headers["retry-after"]) <= 60
        assert registry_dump(api.data) == before  # the good key was not even looked at
        # Other clients (here: the other server's limiter) are not affected.
        assert api.provision(good, csr_for("gw-429")).status_code == 201
    finally:
        strict.stop()


def test_api_is_https_only_with_its_own_ca(api: Api) -> None:
    import socket
    import ssl

    import httpx

    context = api.server.context()
    with socket.create_connection(("127.0.0.1", api.server.port)) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    untrusting = ssl.create_default_context()  # the system store does not know the service's own CA
    with pytest.raises(ssl.SSLCertVerificationError), socket.create_connection(("127.0.0.1", api.server.port)) as raw:
        untrusting.wrap_socket(raw, server_hostname="127.0.0.1")
    with pytest.raises(httpx.HTTPError):  # a key never crosses the wire in clear
        httpx.post(f"http://127.0.0.1:{api.server.port}/v1/provision", json={"key": "x", "csr": "y"}, timeout=5)


def test_agent_provision_explains_what_went_wrong(api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main as agent

    def provision(*args: str) -> tuple[int, str]:
        code = agent(["provision", "--name", "gw-err", "--state-dir", str(tmp_path / "state"), *args])
        return code, capsys.readouterr().err

    key = api.key()
    code, err = provision("--url", api.server.url, "--key", key)  # the service's own CA is not in the system store
    assert code == 1 and err.startswith(f"Error: TLS: the provisioning API at {api.server.url} is not trusted (")
    assert err.endswith("pass --ca-file with the service's CA (provisioning data dir: api/ca.pem)\n")
    assert provision("--url", f"http://127.0.0.1:{api.server.port}", "--key", key) == (
        1,
        f"Error: --url 'http://127.0.0.1:{api.server.port}': the provisioning API is https://host:port (keys never "
        "go over plain HTTP)\n",
    )
    closed = f"https://127.0.0.1:{free_port()}"
    code, err = provision("--url", closed, "--key", key, "--ca-file", str(api.server.ca))
    assert code == 1 and err.startswith(f"Error: cannot reach the provisioning API at {closed}: ")
    unknown = "fek_0123456789_" + "B" * 43
    assert provision("--url", api.server.url, "--key", unknown, "--ca-file", str(api.server.ca)) == (
        1,
        "Error: the provisioning API refused (HTTP 401): unknown provisioning key\n",
    )
    assert provision("--url", api.server.url, "--key", key, "--name", "bridge", "--ca-file", str(api.server.ca)) == (
        1,
        "Error: gateway name 'bridge' is reserved for the bridge, technicians or the service\n",
    )
    assert not any((tmp_path / "state").iterdir())  # nothing kept from the failed attempts, no key left behind
    assert _key(api, key.split("_")[1])["uses"] == 0
