"""Certificates as the provisioning service hands them out: CSR checks with exact reasons, key files, CRLs."""

from __future__ import annotations

import datetime as dt
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from factory_edge.errors import ProvisioningError
from provisioning import pki

UTC = dt.UTC


@pytest.fixture(scope="module")
def ca() -> tuple[pki.PrivateKey, x509.Certificate]:
    return pki.create_ca("acme CA")


def refused(ca: tuple[pki.PrivateKey, x509.Certificate], csr: object, **kwargs: object) -> str:
    with pytest.raises(ProvisioningError) as info:
        pki.sign_csr(*ca, csr, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_ca_is_a_ca_with_key_identifiers(ca: tuple[pki.PrivateKey, x509.Certificate]) -> None:
    key, cert = ca
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    cert.verify_directly_issued_by(cert)


def test_server_cert_names_the_broker_host(ca: tuple[pki.PrivateKey, x509.Certificate]) -> None:
    key = pki.new_key()
    cert = pki.issue_server_cert(*ca, key.public_key(), "mqtt.acme.test")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.acme.test"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    cert.verify_directly_issued_by(ca[1])


def test_signed_csr_is_a_client_cert_for_the_gateway(ca: tuple[pki.PrivateKey, x509.Certificate]) -> None:
    key = pki.new_key()
    pem = pki.make_csr(key, "gw-01").public_bytes(serialization.Encoding.PEM)
    cert = pki.sign_csr(*ca, pem.decode(), common_name="gw-01", days=30)
    assert pki.common_name(cert) == "gw-01"
    assert cert.public_key() == key.public_key()
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert dt.timedelta(days=29) < cert.not_valid_after_utc - dt.datetime.now(UTC) <= dt.timedelta(days=30)
    cert.verify_directly_issued_by(ca[1])
    assert len(pki.fingerprint(cert)) == 64 and pki.fingerprint(cert) == cert.fingerprint(hashes.SHA256()).hex()


@pytest.mark.parametrize(
    "key", [rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP384R1())], ids=["rsa-2048", "ec-p384"]
)
def test_accepted_key_types(ca: tuple[pki.PrivateKey, x509.Certificate], key: pki.PrivateKey) -> None:
    assert pki.common_name(pki.sign_csr(*ca, pki.make_csr(key, "gw-07"))) == "gw-07"


def test_csr_with_rsa_1024_is_refused(ca: tuple[pki.PrivateKey, x509.Certificate]) -> None:
    csr = pki.make_csr(rsa.generate_private_key(65537, 1024), "gw-01")
    assert refused(ca, csr) == "CSR key is RSA 1024 bits; need RSA 2048-4096 with e=65537 or EC P-256/P-384"


def test_csr_with_other_curves_is_refused(ca: tuple[pki.PrivateKey, x509.Certificate]) -> None:
    csr = pki.make_csr(ec.generate_private_key(ec.SECP256K1()), "gw-01")
    assert refused(ca, csr) == "CSR key is EC secp256k1; need RSA 2048-4096 with e=65537 or EC P-256/P-384"
    ed = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-01")]))
        .sign(ed25519.Ed25519PrivateKey.generate(), None)
    )
    assert refused(ca, ed) == "CSR key is Ed25519; need RSA 2048-4096 with e=65537 or EC P-256/P-384"


def test_csr_for_another_gateway_is_refused(ca: tuple[pki.PrivateKey, x509.Certificate]) -> None:
    csr = pki.make_csr(pki.new_key(), "gw-02")
    assert refused(ca, csr, common_name="gw-01") == "CSR common name 'gw-02' does not match the expected 'gw-01'"


@pytest.mark.parametrize("cn", ["gw 01", "-gw", "gw/01", "gw+", "gw#", "ü-gw", ""])
def test_csr_with_invalid_id_is_refused(ca: tuple[pki.PrivateKey, x509.Certificate], cn: str) -> None:
    if cn:
        csr = pki.make_csr(pki.new_key(), cn)
        assert refused(ca, csr) == (
            f"CSR common name {cn!r} is not a valid id: 1-64 letters, digits, '_', '.'"
            " or '-', starting with a letter or digit"
        )
    else:
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(pki.new_key(), hashes.SHA256())
        assert refused(ca, csr) == "CSR has 0 common names; need exactly one, the gateway id"


@pytest.mark.parametrize("cn", ["bridge", "tech-alice"])
def test_csr_cannot_claim_the_bridge_or_a_technician(ca: tuple[pki.PrivateKey, x509.Certificate], cn: str) -> None:
    csr = pki.make_csr(pki.new_key(), cn)
    assert refused(ca, csr) == f"CSR common name {cn!r} is reserved for the bridge or technicians"
    assert pki.common_name(pki.sign_csr(*ca, csr, allow_reserved=True)) == cn


def test_csr_with_bad_signature_is_refused(ca: tuple[pki.PrivateKey, x509.Certificate]) -> None:
    der = bytearray(pki.make_csr(pki.new_key(), "gw-01").public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the signature
    assert refused(ca, bytes(der)) == "CSR signature is invalid: the request was altered or not signed by its key"


def test_csr_whose_key_was_swapped_is_refused(ca: tuple[pki.PrivateKey, x509.Certificate]) -> None:
    # Same CN and signature, another public key: what an attacker replaying a CSR would send.
    good = pki.make_csr(pki.new_key(), "gw-01").public_bytes(serialization.Encoding.DER)
    other = (
        pki.new_key()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    original = (
        pki.load_csr(good)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    swapped = good.replace(original, other)
    assert swapped != good
    assert refused(ca, swapped) == "CSR signature is invalid: the request was altered or not signed by its key"


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"hello",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        b"\x30\x03\x02\x01\x00",
    ],
)
def test_garbage_is_not_a_csr(ca: tuple[pki.PrivateKey, x509.Certificate], garbage: bytes | str) -> None:
    assert refused(ca, garbage) == "CSR is not a PEM or DER certificate signing request"


def test_client_cert_validity_can_be_hours_or_already_over(ca: tuple[pki.PrivateKey, x509.Certificate]) -> None:
    _, tech = pki.issue_client_cert(*ca, "tech-alice", hours=8)
    left = tech.not_valid_after_utc - dt.datetime.now(UTC)
    assert dt.timedelta(hours=7, minutes=59) < left <= dt.timedelta(hours=8)
    now = dt.datetime.now(UTC)
    _, old = pki.issue_client_cert(
        *ca, "gw-01", not_before=now - dt.timedelta(days=2), not_after=now - dt.timedelta(days=1)
    )
    assert old.not_valid_after_utc < now
    with pytest.raises(ProvisioningError, match=r"^certificate would end \(.*\) before it starts"):
        pki.issue_client_cert(*ca, "gw-01", not_before=now, not_after=now - dt.timedelta(seconds=1))


def test_crl_lists_revoked_serials(ca: tuple[pki.PrivateKey, x509.Certificate], tmp_path: Path) -> None:
    _, cert = pki.issue_client_cert(*ca, "gw-01")
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    pki.write_pem(tmp_path / "crl.pem", pki.create_crl(*ca, [(cert.serial_number, when)], days=7))
    crl = pki.load_crl(tmp_path / "crl.pem")
    assert crl.is_signature_valid(ca[1].public_key())  # type: ignore[arg-type]
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry is not None and entry.revocation_date_utc == when
    assert len(crl) == 1
    assert crl.next_update_utc is not None
    assert dt.timedelta(days=6, hours=23) < crl.next_update_utc - dt.datetime.now(UTC) <= dt.timedelta(days=7)


def test_key_files_are_0600_and_certs_0644(ca: tuple[pki.PrivateKey, x509.Certificate], tmp_path: Path) -> None:
    old_umask = os.umask(0)  # even a permissive umask must not widen a key file
    try:
        pki.write_private_key(tmp_path / "gw.key", ca[0])
        pki.write_pem(tmp_path / "ca.pem", ca[1])
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(tmp_path / "gw.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "ca.pem").st_mode) == 0o644
    assert pki.load_private_key(tmp_path / "gw.key").private_numbers() == ca[0].private_numbers()
    assert pki.load_cert(tmp_path / "ca.pem") == ca[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.pem", "gw.key"]  # no temporary files left


def test_key_file_is_never_visible_with_wider_mode(tmp_path: Path) -> None:
    # Watch the directory while keys are rewritten: every file that shows up, the
    # temporary one included, must already be 0600.
    path = tmp_path / "gw.key"
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for entry in os.scandir(tmp_path):
                try:
                    seen.add(stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode))
                except FileNotFoundError:
                    pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(50):
            pki.write_private_key(path, pki.new_key())
    finally:
        done.set()
        watcher.join()
    assert seen == {0o600}


def test_overwriting_a_key_replaces_it_atomically(tmp_path: Path) -> None:
    path = tmp_path / "gw.key"
    first, second = pki.new_key(), pki.new_key()
    pki.write_private_key(path, first)
    inode = os.stat(path).st_ino
    pki.write_private_key(path, second)
    assert os.stat(path).st_ino != inode  # a new file renamed into place, not rewritten in place
    assert pki.load_private_key(path).private_numbers() == second.private_numbers()


def test_loading_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(ProvisioningError, match=r"junk.pem: not an unencrypted PEM private key$"):
        pki.load_private_key(tmp_path / "junk.pem")
    with pytest.raises(ProvisioningError, match=r"junk.pem: not a PEM certificate$"):
        pki.load_cert(tmp_path / "junk.pem")
    with pytest.raises(ProvisioningError, match=r"^cannot read certificate .*missing.pem: No such file or directory$"):
        pki.load_cert(tmp_path / "missing.pem")


@pytest.mark.parametrize(
    ("exponent", "bits", "problem"),
    [(3, 2048, "RSA with public exponent 3"), (65537, 4160, "RSA 4160 bits")],
    ids=["e=3", "4160-bit"],
)
def test_rsa_keys_need_2048_to_4096_bits_and_exponent_65537(
    ca: tuple[pki.PrivateKey, x509.Certificate], exponent: int, bits: int, problem: str
) -> None:
    csr = pki.make_csr(rsa.generate_private_key(exponent, bits), "gw-01")
    assert refused(ca, csr) == f"CSR key is {problem}; need RSA 2048-4096 with e=65537 or EC P-256/P-384"
