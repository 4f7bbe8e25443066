"""The gateway's side of PKI: its key pair, its CSR, proof of possession, and PEM files.

A gateway makes its key pair on site (``new_key``), writes it 0600 before
anything leaves the box (``write_private_key``), and sends only a CSR
(``make_csr``) whose CN is its id. Renewing, it signs the new CSR with its
current key (``sign_possession``). What comes back is checked here too: the
certificate holds our key (``same_key``), names us (``common_name``) and is
signed by the tenant CA (``issued_by``). The CA side (signing, CRLs) is
``provisioning.pki``, which the agent never imports.

Every check raises ``ProvisioningError`` with a one-line reason; files are
written atomically, private keys with mode 0600 from the first byte.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from . import names
from .errors import ProvisioningError
from .files import write_atomic

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PemObject = x509.Certificate | x509.CertificateRevocationList | x509.CertificateSigningRequest

ID_RE = names.ID_RE  # match with fullmatch (names.is_id): re.match with '$' lets a trailing newline through


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: PrivateKey, common_name: str) -> x509.CertificateSigningRequest:
    """A CSR with subject CN ``common_name``, signed by ``key`` (what a gateway sends)."""
    return x509.CertificateSigningRequestBuilder().subject_name(cn_name(common_name)).sign(key, hashes.SHA256())


def check_id(value: str, *, what: str = "id") -> None:
    """Refuse anything but 1-64 of ``A-Z a-z 0-9 _ . -``, starting with a letter or digit (in full)."""
    if not names.is_id(value):
        raise ProvisioningError(f"{what} {value!r} is not a valid id: {names.ID_RULE}")


def is_reserved(identity: str) -> bool:
    """True for identities that are not gateways: ``bridge*``, ``provisioning``, ``tech-*`` (any case)."""
    return names.is_reserved(identity)


def common_name(cert: x509.Certificate) -> str:
    """The certificate's subject CN (the gateway id for client certificates)."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else ""


def same_key(a: object, b: object) -> bool:
    """True when two public keys (or certificates, CSRs) hold the same public key."""

    def spki(obj: object) -> bytes:
        key: Any = obj.public_key() if hasattr(obj, "public_key") else obj
        return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))

    return spki(a) == spki(b)


def sign_possession(key: PrivateKey, data: bytes) -> bytes:
    """Sign ``data`` with ``key`` (ECDSA or RSA PKCS#1 v1.5, SHA-256): proof that we hold ``key``.

    A gateway renewing its certificate signs its new CSR with its current
    key, so the service knows the request comes from the holder of the
    certificate it presents.
    """
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True when ``cert`` names ``ca_cert`` as issuer and carries a valid signature from it."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# -- files -----------------------------------------------------------------


def write_private_key(path: str | os.PathLike[str], key: PrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, mode 0600, atomically (never readable by others)."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_atomic(Path(path), data, 0o600)


def write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` with ``mode``, atomically (identity files, anything else that must not be half-written)."""
    _write_atomic(Path(path), data, mode)


def write_pem(path: str | os.PathLike[str], obj: PemObject) -> None:
    """Write a certificate, CRL or CSR as PEM, mode 0644, atomically."""
    _write_atomic(Path(path), obj.public_bytes(serialization.Encoding.PEM), 0o644)


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """Read an unencrypted PEM private key."""
    data = read_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ProvisioningError(f"{path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ProvisioningError(f"{path}: private key is {type(key).__name__}; need RSA or EC")
    return key


def load_cert(path: str | os.PathLike[str]) -> x509.Certificate:
    """Read a PEM certificate (the first one in the file)."""
    data = read_file(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ProvisioningError(f"{path}: not a PEM certificate") from exc


def read_file(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ProvisioningError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    try:
        write_atomic(path, data, mode)
    except OSError as exc:
        raise ProvisioningError(f"cannot write {path}: {exc.strerror}") from exc


def cn_name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
