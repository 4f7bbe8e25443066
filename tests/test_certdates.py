"""Certificate dates read without cryptography agree with cryptography's reading, or give up."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from factory_edge.certdates import read_cert_dates
from provisioning import pki as provisioning_pki

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
