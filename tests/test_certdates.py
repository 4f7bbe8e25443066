"""TLS files on a gateway without cryptography: certificate dates read from the DER, files loaded by ssl."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from factory_edge.certdates import read_cert_dates
from factory_edge.errors import ConfigError
from factory_edge.mqtt import BrokerSettings, tls_context
from provisioning import pki as provisioning_pki
from tests.infra import TenantPki

UTC = dt.UTC


def self_signed(not_before: dt.datetime, not_after: dt.datetime, *, serial: int, key_kind: str = "ec") -> bytes:
    key = ec.generate_private_key(ec.SECP256R1()) if key_kind == "ec" else rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "gw-01")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("not_before", "not_after", "serial", "key_kind"),
    [
        (dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), dt.datetime(2027, 1, 2, 3, 4, 5, tzinfo=UTC), 1, "ec"),
        # UTCTime up to 2049 (two-digit years 50-99 are 19xx), GeneralizedTime from 2050 on
        (dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC), dt.datetime(2050, 1, 1, tzinfo=UTC), 2**159 - 1, "rsa"),
        (dt.datetime(1950, 1, 1, tzinfo=UTC), dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC), 127, "ec"),
    ],
)
def test_dates_and_serial_match_cryptography(
    not_before: dt.datetime, not_after: dt.datetime, serial: int, key_kind: str
) -> None:
    pem = self_signed(not_before, not_after, serial=serial, key_kind=key_kind)
    dates = read_cert_dates(pem)
    cert = x509.load_pem_x509_certificate(pem)
    assert dates is not None
    assert (dates.serial_number, dates.not_valid_before_utc, dates.not_valid_after_utc) == (
        cert.serial_number,
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
    )


def test_an_issued_gateway_certificate_with_its_ca_after_it() -> None:
    ca_key, ca_cert = provisioning_pki.create_ca("acme CA")
    _, cert = provisioning_pki.issue_client_cert(ca_key, ca_cert, "gw-01", days=90)
    pem = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    dates = read_cert_dates(b"subject=CN = gw-01\n" + pem)  # text before the PEM block, as openssl writes
    assert dates is not None
    assert (dates.serial_number, dates.not_valid_after_utc) == (cert.serial_number, cert.not_valid_after_utc)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a certificate",
        b"-----BEGIN PRIVATE KEY-----\nMIGHAgEA\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",  # cut short
        b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\né\n-----END CERTIFICATE-----\n".encode(),
    ],
)
def test_anything_else_is_left_to_cryptography(data: bytes) -> None:
    assert read_cert_dates(data) is None


def test_tls_context_loads_good_files_and_names_a_wrong_one(tmp_path: Path) -> None:
    """The files are loaded by ssl; when it refuses one, the error still names the file and what is wrong."""
    pki = TenantPki(tmp_path / "pki", "acme")
    cert, key = pki.client("gw-1")
    _, other_key = pki.client("gw-2")

    def settings(key_file: Path) -> BrokerSettings:
        return BrokerSettings.from_url(
            "mqtts://mqtt.acme.test:8883", ca_file=str(pki.ca_file), cert_file=str(cert), key_file=str(key_file)
        )

    assert tls_context(settings(key)).verify_mode is ssl.CERT_REQUIRED
    with pytest.raises(ConfigError, match=f"mqtt.key_file: {other_key}: not the key of the certificate {cert}"):
        tls_context(settings(other_key))
    encrypted = tmp_path / "encrypted.key"
    loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match="the key is encrypted; the agent needs an unencrypted key"):
        tls_context(settings(encrypted))  # refused at once, never a password prompt
