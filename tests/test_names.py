"""Names against their grammar: refused with one line naming the field, before anything on disk changes.

The review's attacks: names ending in a newline passed ``re.match(...$)``
(CSR common names ``bridge\\n`` and ``gw-demo\\n`` were signed; a technician
``x\\n`` wrote an ACL line that stopped a fresh Mosquitto; a tenant ``nl\\n``
was committed before its files failed to render and blocked every later
``tenant create``), and a 63-character tenant with a 240-character domain
ended in a traceback. Then a property test over arbitrary strings, for
every name the command line and the API accept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factory_edge import names
from factory_edge.errors import FactoryEdgeError
from provisioning import admin, checks, pki, render, tenants
from provisioning.cli import main
from provisioning.errors import Invalid
from provisioning.layout import DataDir
from provisioning.registry import Registry
from provisioning.service import Service

pytestmark = pytest.mark.timeout(300)

LONG_DOMAIN = ("d" * 59 + ".") * 3 + "d" * 60  # 240 characters, with a 63-character tenant: the review's traceback


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` and its SHA-256: 'nothing on disk changed' is an equality of two of these."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def cli(capsys: pytest.CaptureFixture[str], data: Path, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--data-dir", str(data)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataDir]:
    root = DataDir(tmp_path_factory.mktemp("names") / "data")
    tenants.create_tenant(root, "acme", "example.com", broker_port=18990)
    yield root


def csr(cn: str) -> str:
    from cryptography.hazmat.primitives import serialization

    return pki.make_csr(pki.new_key(), cn).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ("tenant", "create", "nl\n", "--domain", "example.com"),
            "Error: tenant name 'nl\\n' is not a DNS label: 1-63 lowercase letters, digits or '-', not starting or ending "
            "with '-'",
        ),
        (
            ("tenant", "create", "nl", "--domain", "example.com\nevil.com"),
            "Error: domain 'example.com\\nevil.com' is not a lowercase DNS name: labels of 1-63 lowercase letters, digits "
            "or '-', not starting or ending with '-', joined by '.'",
        ),
        (
            ("tenant", "create", "t" * 63, "--domain", LONG_DOMAIN),
            f"Error: domain '{LONG_DOMAIN}' is too long: the broker's name mqtt.{'t' * 35}… would have 309 characters "
            "(at most 253)",
        ),
        (
            ("technician-cert", "acme", "x\n"),
            "Error: technician name 'x\\n' is not valid: 1-59 letters, digits, '_', '.' or '-', starting with a letter or "
            "digit",
        ),
        (
            ("technician", "revoke", "acme", "x\n"),
            "Error: technician name 'x\\n' is not valid: 1-59 letters, digits, '_', '.' or '-', starting with a letter or "
            "digit",
        ),
        (
            ("bridge", "add", "main\n"),
            "Error: bridge instance 'main\\n' is not valid: 1-57 letters, digits, '_', '.' or '-', starting with a letter or "
            "digit",
        ),
    ],
    ids=["tenant-newline", "domain-newline", "too-long", "technician-newline", "revoke-newline", "bridge-newline"],
)
def test_a_bad_name_is_one_line_and_changes_nothing(
    data: DataDir, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], error: str
) -> None:
    before = snapshot(data.root)
    code, out, err = cli(capsys, data.root, *args)
    assert (code, out, err) == (1, "", error + "\n")
    assert snapshot(data.root) == before


def test_after_a_refused_tenant_the_next_tenant_and_init_still_work(
    data: DataDir, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(capsys, data.root, "tenant", "create", "nl\n", "--domain", "example.com")[0] == 1
    assert cli(capsys, data.root, "tenant", "create", "nl", "--domain", "example.com")[0] == 0
    assert cli(capsys, data.root, "init")[0] == 0
    assert "mqtt.nl.example.com tenant_nl" in data.haproxy_map.read_text()


@pytest.mark.parametrize("cn", ["bridge\n", "gw-demo\n", "bridge.main", "Bridge", "provisioning-guard", "tech-x"])
def test_the_api_refuses_a_csr_claiming_a_bad_or_reserved_name(data: DataDir, cn: str) -> None:
    key = admin.create_key(data, "acme", uses=None, expires_s=None)[0].text
    before = snapshot(data.root)
    with pytest.raises(Invalid) as refused:
        Service(data).provision(key, csr(cn))
    assert "\n" not in str(refused.value) and "CSR common name" in str(refused.value)
    with pytest.raises(Invalid):
        Service(data).provision(key, csr("gw-ok"), name=cn)
    assert snapshot(data.root) == before


def test_a_san_other_than_an_id_is_refused() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = pki.new_key()
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-01")]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("gw-01\nuser bridge")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(
        FactoryEdgeError, match="CSR subject alternative name 'gw-01\\\\nuser bridge' is not a valid id"
    ):
        pki.sign_csr(*pki.create_ca("t"), request)


def test_a_config_mosquitto_refuses_never_replaces_the_running_one(
    data: DataDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rendered configs are tried by a real Mosquitto before they replace the ones the broker runs on."""
    real = render.mosquitto_acl
    monkeypatch.setattr(render, "mosquitto_acl", lambda **kw: real(**kw) + "topic sideways gw/#\n")
    before = snapshot(data.root)
    with pytest.raises(FactoryEdgeError, match="the rendered broker config does not load .trial mosquitto.: "):
        admin.technician_cert(data, "acme", "eve", hours=1, out_dir=tmp_path / "out")
    after = snapshot(data.root)
    assert {k: v for k, v in after.items() if "technicians/" not in k} == before  # ACL, conf, registry as they were
    with Registry(data.registry) as registry:
        assert registry.technicians("acme", tenants.now()) == []


# -- the property: any string, for every name -----------------------------------------------------------------

NAMES = st.one_of(
    st.text(max_size=80),
    st.from_regex(names.LABEL_RE, fullmatch=True),
    st.from_regex(names.ID_RE, fullmatch=True),
    st.sampled_from(["a\n", "bridge", "x y", "é", ""]),
)


def refused_cleanly(data: DataDir, field: str | tuple[str, ...], action: object) -> bool:
    """Run ``action``; True if it was refused with one line naming ``field`` and nothing on disk changed."""
    before = snapshot(data.root)
    fields = (field,) if isinstance(field, str) else field
    try:
        action()  # type: ignore[operator]
    except FactoryEdgeError as exc:
        message = str(exc)
        assert "\n" not in message and any(f in message for f in fields), message
        assert snapshot(data.root) == before
        return True
    return False


def configs_load(data: DataDir, tenant: str) -> None:
    """The rendered configs load in the real programs (the same check tenant create ran, made explicit)."""
    checks.check_haproxy(data.haproxy_cfg)
    checks.check_mosquitto(data.tenant(tenant).conf.read_text())


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=NAMES, domain=st.one_of(NAMES, st.just("example.com")))
def test_any_tenant_and_domain_either_load_or_are_refused_cleanly(data: DataDir, name: str, domain: str) -> None:
    with Registry(data.registry) as registry:
        exists = registry.tenant(name) is not None
    if exists or refused_cleanly(
        data,
        "tenant" if not names.LABEL_RE.fullmatch(name or "-") else "domain",
        lambda: tenants.create_tenant(data, name, domain),
    ):
        return
    configs_load(data, name)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=NAMES)
def test_any_gateway_technician_or_bridge_name_either_loads_or_is_refused_cleanly(
    data: DataDir, tmp_path_factory: pytest.TempPathFactory, name: str
) -> None:
    key = admin.create_key(data, "acme", uses=None, expires_s=None)[0].text
    service = Service(data)
    try:
        request = csr(name)
    except ValueError:
        request = None  # not even a CSR can carry it (X.509 limits); the API's name field still gets it
    if request is not None and not refused_cleanly(data, "CSR", lambda: service.provision(key, request)):
        assert names.is_id(name) and not names.is_reserved(name)
        admin.revoke_device(data, "acme", name)
    # A valid name that is not the CSR's CN is refused too, for that mismatch.
    if not refused_cleanly(
        data, ("gateway name", "does not match the expected"), lambda: service.provision(key, csr("gw-prop"), name=name)
    ):
        raise AssertionError(f"gateway name {name!r} accepted though the CSR says gw-prop")
    out = tmp_path_factory.mktemp("tech")
    if not refused_cleanly(
        data, "technician name", lambda: admin.technician_cert(data, "acme", name, hours=1, out_dir=out)
    ):
        configs_load(data, "acme")
    if not refused_cleanly(data, "bridge instance", lambda: admin.add_bridge(data, name)):
        configs_load(data, "acme")


def test_a_tenant_cannot_be_named_after_postgresqls_default_schema() -> None:
    """A tenant's PostgreSQL schema is its name: ``public`` would put its tables among whatever else the database
    holds there, and a storage move would fence and empty every table of it."""
    with pytest.raises(FactoryEdgeError, match="tenant name 'public' is PostgreSQL's default schema"):
        names.check_tenant("public")
    assert names.check_tenant("publicity") == "publicity"
