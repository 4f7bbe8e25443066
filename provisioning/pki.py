"""Keys, CAs, certificates, CSRs and CRLs: pure functions over ``cryptography`` objects.

Each tenant has its own CA. A gateway makes its key pair on site and sends
only a CSR; ``sign_csr`` checks it and issues a client certificate whose CN
is the gateway id, which Mosquitto then uses as the MQTT username
(``use_identity_as_username``), so the ACL patterns ``gw/%u/...`` bind a
gateway to its own topics. The bridge (CN ``bridge``), technicians (CN
``tech-<name>``) and the provisioning service itself (CN ``provisioning``)
get certificates from ``issue_client_cert``; those names are reserved and a
gateway CSR may not claim them.

The gateway's own side (its key, CSR, proof of possession, PEM files) is
``factory_edge.pki``, shared with the agent; it is re-exported here so the
service reads as one module. Every check raises ``ProvisioningError`` with a
one-line reason.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from factory_edge import names
from factory_edge.errors import ProvisioningError
from factory_edge.pki import (
    ID_RE,
    PrivateKey,
    check_id,
    cn_name,
    common_name,
    is_reserved,
    issued_by,
    load_cert,
    load_private_key,
    make_csr,
    new_key,
    read_file,
    same_key,
    sign_possession,
    write_bytes,
    write_pem,
    write_private_key,
)

BRIDGE_ID = names.BRIDGE_ID
TECHNICIAN_PREFIX = names.TECHNICIAN_PREFIX
SERVICE_ID = names.SERVICE_ID  # the provisioning service's own client: ends revoked gateways' sessions
ACCEPTED_KEYS = "RSA 2048-4096 with e=65537 or EC P-256/P-384"
RSA_BITS = (2048, 4096)
RSA_EXPONENT = 65537
MAX_CN = 64  # X.509 ub-common-name
CLOCK_SKEW = dt.timedelta(minutes=5)  # certificates start a little in the past

_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}


def create_ca(name: str, *, days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (key, certificate) whose subject CN is ``name``."""
    key = new_key()
    subject = cn_name(name[:MAX_CN])
    start = _now() - CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_server_cert(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    public_key: object,
    hostname: str,
    *,
    days: int = 825,
    alt_names: Iterable[str] = (),
) -> x509.Certificate:
    """A TLS server certificate for ``hostname`` (SAN DNS and CN), serverAuth only.

    ``alt_names``: more names for the SAN, DNS names or IP addresses.
    """
    start = _now() - CLOCK_SKEW
    if not names.is_host(hostname):
        raise ProvisioningError(f"server name {hostname!r} is not a lowercase DNS name")
    san: list[x509.GeneralName] = [x509.DNSName(hostname)]
    for name in alt_names:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            san.append(x509.DNSName(name))
    # The CN is informative only (clients check the SAN) and X.509 caps it at 64 characters.
    cn = hostname if len(hostname) <= MAX_CN else hostname.split(".", 2)[1][:MAX_CN]
    return _leaf(
        ca_key,
        ca_cert,
        public_key,
        cn,
        ExtendedKeyUsageOID.SERVER_AUTH,
        start,
        start + dt.timedelta(days=days),
        san=list(dict.fromkeys(san)),
    )


def load_csr(data: bytes | str) -> x509.CertificateSigningRequest:
    """Parse a PEM (or DER) CSR; anything else is a ProvisioningError."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(raw)
        return x509.load_der_x509_csr(raw)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ProvisioningError("CSR is not a PEM or DER certificate signing request") from exc


def sign_csr(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    csr: x509.CertificateSigningRequest | bytes | str,
    *,
    common_name: str | None = None,
    days: int = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    allow_reserved: bool = False,
) -> x509.Certificate:
    """Check a gateway's CSR and issue its client certificate (clientAuth, CN = gateway id).

    Checked, in order: the key type and size, the self-signature, one CN
    that is a valid id, equal to ``common_name`` when given, and not a
    reserved identity (``bridge``, ``tech-*``) unless ``allow_reserved``.
    Only the CN and public key are taken from the CSR; its other subject
    fields and extensions are ignored.
    """
    if not isinstance(csr, x509.CertificateSigningRequest):
        csr = load_csr(csr)
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ProvisioningError(f"CSR key is not supported; need {ACCEPTED_KEYS}") from exc
    check_key(public_key, what="CSR key")
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm, InvalidSignature) as exc:
        raise ProvisioningError("CSR signature cannot be checked") from exc
    if not valid:
        raise ProvisioningError("CSR signature is invalid: the request was altered or not signed by its key")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise ProvisioningError(f"CSR has {len(cns)} common names; need exactly one, the gateway id")
    cn = cns[0].value
    cn = cn.decode("utf-8", "replace") if isinstance(cn, bytes) else cn
    check_id(cn, what="CSR common name")
    if common_name is not None and cn != common_name:
        raise ProvisioningError(f"CSR common name {cn!r} does not match the expected {common_name!r}")
    if not allow_reserved and is_reserved(cn):
        owner = "the provisioning service" if cn.lower().startswith(SERVICE_ID) else "the bridge or technicians"
        raise ProvisioningError(f"CSR common name {cn!r} is reserved for {owner}")
    _check_san(csr)
    start, end = _validity(days=days, hours=None, not_before=not_before, not_after=not_after)
    return _leaf(ca_key, ca_cert, public_key, cn, ExtendedKeyUsageOID.CLIENT_AUTH, start, end)


def issue_client_cert(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    *,
    days: int = 365,
    hours: float | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new key and client certificate for ``common_name`` (bridge, technicians, tests).

    ``hours`` (short-lived technician certificates) wins over ``days``;
    explicit ``not_before``/``not_after`` win over both, so a test can make
    a certificate that has already expired.
    """
    check_id(common_name, what="common name")
    key = new_key()
    start, end = _validity(days=days, hours=hours, not_before=not_before, not_after=not_after)
    return key, _leaf(ca_key, ca_cert, key.public_key(), common_name, ExtendedKeyUsageOID.CLIENT_AUTH, start, end)


def create_crl(
    ca_key: PrivateKey, ca_cert: x509.Certificate, revoked: list[tuple[int, dt.datetime]], *, days: int = 7
) -> x509.CertificateRevocationList:
    """A CRL listing ``(serial, revoked_at)`` pairs, valid for ``days``.

    Mosquitto (OpenSSL) refuses every client once the CRL's next update has
    passed, so it must be re-issued (and the broker sent SIGHUP) well
    within ``days``.
    """
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_aware(when)).build()
        )
    return builder.sign(ca_key, hashes.SHA256())


def check_key(public_key: object, *, what: str = "key") -> None:
    """Refuse keys other than EC P-256/P-384 or RSA of 2048-4096 bits with public exponent 65537.

    A small exponent (3) invites the classic low-exponent attacks on careless
    padding, and more than 4096 bits only costs the verifier CPU.
    """
    if isinstance(public_key, rsa.RSAPublicKey):
        if not RSA_BITS[0] <= public_key.key_size <= RSA_BITS[1]:
            raise ProvisioningError(f"{what} is RSA {public_key.key_size} bits; need {ACCEPTED_KEYS}")
        exponent = public_key.public_numbers().e
        if exponent != RSA_EXPONENT:
            raise ProvisioningError(f"{what} is RSA with public exponent {exponent}; need {ACCEPTED_KEYS}")
        return
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in _CURVES:
            raise ProvisioningError(f"{what} is EC {public_key.curve.name}; need {ACCEPTED_KEYS}")
        return
    kind = {ed25519.Ed25519PublicKey: "Ed25519", ed448.Ed448PublicKey: "Ed448"}
    label = next((name for cls, name in kind.items() if isinstance(public_key, cls)), type(public_key).__name__)
    raise ProvisioningError(f"{what} is {label}; need {ACCEPTED_KEYS}")


def _check_san(csr: x509.CertificateSigningRequest) -> None:
    """A SAN in a CSR is never copied, but it must not smuggle anything either: DNS names of the id grammar only."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    except ValueError as exc:
        raise ProvisioningError(f"CSR extensions cannot be read: {exc}") from exc
    for entry in san:
        if not isinstance(entry, x509.DNSName):
            raise ProvisioningError(
                f"CSR subject alternative name {entry.value!r} is not allowed: only DNS names "
                "of the gateway-id grammar (they are not copied)"
            )
        check_id(entry.value, what="CSR subject alternative name")


def verify_possession(cert: x509.Certificate, data: bytes, signature: bytes) -> None:
    """Check a ``sign_possession`` signature against the certificate's public key."""
    public_key = cert.public_key()
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise ProvisioningError(f"certificate key is {type(public_key).__name__}; need {ACCEPTED_KEYS}")
    except InvalidSignature as exc:
        raise ProvisioningError("signature does not match the certificate's key") from exc


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def load_crl(path: str | os.PathLike[str]) -> x509.CertificateRevocationList:
    """Read a PEM CRL."""
    data = read_file(path, "CRL")
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise ProvisioningError(f"{path}: not a PEM CRL") from exc


# -- building blocks -------------------------------------------------------


def _leaf(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    public_key: object,
    cn: str,
    usage: x509.ObjectIdentifier,
    start: dt.datetime,
    end: dt.datetime,
    *,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(cn_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(rsa_key=isinstance(public_key, rsa.RSAPublicKey)), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)  # type: ignore[arg-type]
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _key_usage(*, cert_sign: bool = False, rsa_key: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=rsa_key and not cert_sign,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _validity(
    *, days: int, hours: float | None, not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    start = _aware(not_before) if not_before is not None else _now() - CLOCK_SKEW
    if not_after is not None:
        end = _aware(not_after)
    elif hours is not None:
        end = _now() + dt.timedelta(hours=hours)
    else:
        end = _now() + dt.timedelta(days=days)
    if end <= start:
        raise ProvisioningError(
            f"certificate would end ({end:%Y-%m-%dT%H:%M:%SZ}) before it starts ({start:%Y-%m-%dT%H:%M:%SZ})"
        )
    return start, end


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _aware(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


__all__ = [
    "ACCEPTED_KEYS",
    "BRIDGE_ID",
    "ID_RE",
    "SERVICE_ID",
    "TECHNICIAN_PREFIX",
    "PrivateKey",
    "check_id",
    "check_key",
    "common_name",
    "create_ca",
    "create_crl",
    "fingerprint",
    "is_reserved",
    "issue_client_cert",
    "issue_server_cert",
    "issued_by",
    "load_cert",
    "load_crl",
    "load_csr",
    "load_private_key",
    "make_csr",
    "new_key",
    "same_key",
    "sign_csr",
    "sign_possession",
    "verify_possession",
    "write_bytes",
    "write_pem",
    "write_private_key",
]
