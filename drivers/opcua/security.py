"""Application instance certificates for OPC UA secure channels.

OPC UA signs and encrypts with the certificate of each *application*: the
agent presents one to every server it connects to with Sign or
SignAndEncrypt, and the server's operator trusts it once. So the agent
generates a self-signed certificate on first use, keeps it (key file mode
0600) and presents the same one ever after. The certificate's
subjectAltName carries the application URI, which must match the URI the
client announces in its session (OPC UA Part 4, 6.1.3).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from factory_edge.errors import DriverError
from factory_edge.files import write_atomic

VALIDITY_DAYS = 5 * 365
RENEW_BEFORE = dt.timedelta(days=30)
"""A certificate this close to expiry is replaced rather than reused."""


def default_state_dir() -> Path:
    """Where the agent keeps its OPC UA client certificate (``$XDG_STATE_HOME/factory-edge/opcua``)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "factory-edge" / "opcua"


def application_uri(role: str = "agent", hostname: str | None = None) -> str:
    """The application URI of this installation, unique per host: ``urn:<host>:factory-edge:<role>``."""
    return f"urn:{hostname or socket.gethostname()}:factory-edge:{role}"


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    """A certificate and its private key on disk, and the application URI the certificate names."""

    cert_file: Path
    key_file: Path
    application_uri: str


def generate_certificate(
    *, application_uri: str, common_name: str, hostnames: list[str], server: bool = False, days: int = VALIDITY_DAYS
) -> tuple[bytes, bytes]:
    """A self-signed RSA-2048 / SHA-256 application certificate: ``(cert_pem, key_pem)``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "factory-edge"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    alt_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    alt_names += [x509.DNSName(host) for host in dict.fromkeys(hostnames)]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Backdated a little: a server whose clock runs behind must not see a certificate from the future.
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_certificate(
    directory: Path, *, application_uri: str, common_name: str, stem: str = "opcua-client", server: bool = False
) -> CertificateFiles:
    """The certificate under ``directory``, generated on first use and reused while it stays valid.

    Files are ``<stem>-cert.pem`` and ``<stem>-key.pem`` (mode 0600). A pair
    that no longer fits (expiring, other application URI, key mismatch) is
    replaced. Blocking (key generation): call it in a thread.
    """
    files = CertificateFiles(directory / f"{stem}-cert.pem", directory / f"{stem}-key.pem", application_uri)
    try:
        if _reusable(files):
            _restrict(files.key_file)
            return files
        cert_pem, key_pem = generate_certificate(
            application_uri=application_uri,
            common_name=common_name,
            hostnames=[socket.gethostname(), "localhost"],
            server=server,
        )
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(files.key_file, key_pem, 0o600)
        write_atomic(files.cert_file, cert_pem, 0o644)
    except OSError as exc:
        raise DriverError(f"cannot store the OPC UA certificate in {directory}: {exc.strerror or exc}") from exc
    return files


def certificate_application_uri(path: str | Path) -> str | None:
    """The application URI in a certificate's subjectAltName (PEM or DER file), or None."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DriverError(f"cannot read certificate {path}: {exc.strerror or exc}") from exc
    try:
        cert = _load_certificate(data)
    except ValueError as exc:
        raise DriverError(f"{path} is not a PEM or DER certificate") from exc
    uris = _san_uris(cert)
    return uris[0] if uris else None


def _reusable(files: CertificateFiles) -> bool:
    if not (files.cert_file.is_file() and files.key_file.is_file()):
        return False
    try:
        cert = _load_certificate(files.cert_file.read_bytes())
        key = serialization.load_pem_private_key(files.key_file.read_bytes(), password=None)
    except ValueError:
        return False
    now = dt.datetime.now(dt.UTC)
    return (
        cert.not_valid_after_utc - RENEW_BEFORE > now
        and files.application_uri in _san_uris(cert)
        and cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    )


def _load_certificate(data: bytes) -> x509.Certificate:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def _san_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)


def _restrict(path: Path) -> None:
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
