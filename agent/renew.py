"""Certificate renewal by the running agent, when two thirds of the certificate's lifetime have passed.

The agent makes a new key, sends a CSR for it to ``POST /v1/renew`` with
its current certificate and a signature of the CSR by its current key, and
swaps the new key and certificate in. The connection in progress keeps
going (TLS checks certificates at the handshake only); the next connection
uses the new pair.

The swap survives a crash at any point: the new key is kept as
``<key>.new`` (0600) from before the request, so a retry asks for the same
key (the service answers a retried renewal with the same certificate); the
new certificate is written as ``<cert>.new``; then key and certificate are
renamed into place with nothing in between that could open a connection,
and ``complete_pending`` finishes a half-done swap at the next start.

Where the API is comes from ``provisioning.json`` in the state directory,
written by ``agent provision`` next to ``identity.json``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory_edge.certdates import CertDates, read_cert_dates
from factory_edge.errors import ConfigError, FactoryEdgeError, ProvisioningError
from factory_edge.logs import fields

from .configtypes import AgentConfig
from .identity import Identity, load_identity

if TYPE_CHECKING:
    # Imported where they are used: an agent renews once in months, and together they weigh some 13 MB.
    import httpx
    from cryptography import x509

    from factory_edge.pki import PrivateKey

log = logging.getLogger(__name__)

PROVISIONING_FILE = "provisioning.json"
RENEW_AT = 2 / 3
RETRY_FIRST_S = 60.0
RETRY_MAX_S = 3600.0
HTTP_TIMEOUT_S = 15.0


# -- the provisioning API, as a client --------------------------------------------


@dataclass(frozen=True)
class ApiSettings:
    url: str  # https://host:port
    ca_file: str | None  # None: the system's trust store

    def save(self, state_dir: Path) -> None:
        from factory_edge import pki

        ca = os.path.relpath(self.ca_file, state_dir) if self.ca_file else None
        pki.write_bytes(state_dir / PROVISIONING_FILE, json.dumps({"url": self.url, "ca_file": ca}, indent=2).encode())

    @classmethod
    def load(cls, state_dir: Path) -> ApiSettings | None:
        path = state_dir / PROVISIONING_FILE
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            return cls(str(doc["url"]), str(state_dir / doc["ca_file"]) if doc.get("ca_file") else None)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: unreadable ({exc}); provision again with agent provision --force") from exc


def api_context(ca_file: str | None) -> ssl.SSLContext:
    """Verify the API's certificate: against ``ca_file``, or the system's trust store."""
    try:
        return ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    except FileNotFoundError as exc:
        raise ProvisioningError(f"--ca-file {ca_file}: no such file") from exc
    except ssl.SSLError as exc:
        raise ProvisioningError(f"--ca-file {ca_file}: not a PEM CA certificate ({exc.reason})") from exc


def explain_http_error(exc: httpx.HTTPError, url: str) -> str:
    """A one-line reason an HTTPS request to the API failed."""
    import httpx

    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        reason = getattr(cause, "verify_message", None) or "certificate verify failed"
        return (
            f"TLS: the provisioning API at {url} is not trusted ({reason}); "
            "pass --ca-file with the service's CA (provisioning data dir: api/ca.pem)"
        )
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer from the provisioning API at {url} within {HTTP_TIMEOUT_S:g}s"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot reach the provisioning API at {url}: {text or 'connection failed'}"
    return f"provisioning API at {url}: {text or type(exc).__name__}"


def answer(response: httpx.Response) -> dict[str, Any]:
    """The JSON document of a successful answer; ProvisioningError with the API's reason otherwise."""
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if response.is_success and isinstance(doc, dict):
        return doc
    detail = doc.get("detail") if isinstance(doc, dict) else None
    if not isinstance(detail, str):
        detail = response.text.strip()[:200] or response.reason_phrase
    raise ProvisioningError(f"the provisioning API refused (HTTP {response.status_code}): {detail}")


def check_issued(doc: dict[str, Any], key: PrivateKey, gateway: str) -> tuple[x509.Certificate, x509.Certificate]:
    """The certificate and CA of an answer, checked: our key, our name, signed by that CA."""
    from cryptography import x509

    from factory_edge import pki

    try:
        cert = x509.load_pem_x509_certificate(str(doc["certificate"]).encode())
        ca = x509.load_pem_x509_certificate(str(doc["ca"]).encode())
    except (KeyError, ValueError) as exc:
        raise ProvisioningError("the provisioning API's answer holds no valid certificate and CA") from exc
    if not pki.same_key(cert, key.public_key()):
        raise ProvisioningError("the provisioning API returned a certificate for another key")
    if pki.common_name(cert) != gateway:
        raise ProvisioningError(f"the provisioning API named this gateway {pki.common_name(cert)!r}, not {gateway!r}")
    if not pki.issued_by(cert, ca):
        raise ProvisioningError("the provisioning API's certificate is not signed by the CA it sent")
    return cert, ca


# -- files ----------------------------------------------------------------------


def _pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def pending_key(identity: Identity) -> Path:
    return Path(identity.key_file + ".new")


def pending_cert(identity: Identity) -> Path:
    return Path(identity.cert_file + ".new")


def complete_pending(identity: Identity) -> bool:
    """Finish a renewal a crash interrupted; True if files were moved."""
    cert_new, key_new = pending_cert(identity), pending_key(identity)
    if not cert_new.exists():
        return False
    from factory_edge import pki

    try:
        cert = pki.load_cert(cert_new)
        key_file = key_new if key_new.exists() else Path(identity.key_file)
        if not pki.same_key(cert, pki.load_private_key(key_file).public_key()):
            cert_new.unlink()
            return False
    except ProvisioningError:
        cert_new.unlink(missing_ok=True)
        return False
    if key_new.exists():
        os.replace(key_new, identity.key_file)
    os.replace(cert_new, identity.cert_file)
    log.info("finished an interrupted certificate renewal", extra=fields(cert=identity.cert_file))
    return True


def renew_at(cert: x509.Certificate | CertDates) -> dt.datetime:
    """When two thirds of the certificate's lifetime have passed."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * RENEW_AT


# -- the task ---------------------------------------------------------------------


class Renewer:
    """Task ``renew``: sleeps until the certificate's renewal time, renews, repeats."""

    def __init__(self, *, state_dir: Path, identity: Identity, api: ApiSettings) -> None:
        self.state_dir = state_dir
        self.identity = identity
        self.api = api

    @classmethod
    def for_agent(cls, config: AgentConfig, state_dir: Path) -> Renewer | None:
        """A renewer when the agent runs from its provisioned identity (no ``mqtt.url``), else None."""
        if config.mqtt is not None and config.mqtt.url is not None:
            return None
        identity = load_identity(state_dir)
        if identity is None:
            return None
        complete_pending(identity)
        try:
            api = ApiSettings.load(state_dir)
        except ConfigError as exc:
            log.error("certificate will not be renewed automatically", extra=fields(err=str(exc)))
            return None
        if api is None:
            log.warning(
                "no provisioning API recorded: the certificate will not be renewed automatically",
                extra=fields(state_dir=str(state_dir)),
            )
            return None
        return cls(state_dir=state_dir, identity=identity, api=api)

    def current(self) -> x509.Certificate | CertDates:
        """The certificate's serial and dates (read without cryptography when the file allows)."""
        try:
            dates = read_cert_dates(Path(self.identity.cert_file).read_bytes())
        except OSError:
            dates = None
        if dates is not None:
            return dates
        from factory_edge import pki

        return pki.load_cert(self.identity.cert_file)  # says what is wrong with the file

    async def run(self) -> None:
        retry_s = RETRY_FIRST_S
        while True:
            try:
                cert = self.current()
            except ProvisioningError as exc:  # never take the agent down: it can publish without renewing
                log.error(
                    "cannot read the certificate: renewal paused", extra=fields(err=str(exc), retry_in_s=RETRY_MAX_S)
                )
                await asyncio.sleep(RETRY_MAX_S)
                continue
            lifetime_s = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()
            wait_s = (renew_at(cert) - dt.datetime.now(dt.UTC)).total_seconds()
            log.info(
                "certificate renewal scheduled",
                extra=fields(
                    serial=f"{cert.serial_number:x}",
                    renew_at=renew_at(cert).isoformat(timespec="seconds"),
                    not_after=cert.not_valid_after_utc.isoformat(timespec="seconds"),
                ),
            )
            # Re-check at least hourly: suspend/resume and clock steps do not move a sleeping timer.
            while wait_s > 0:
                await asyncio.sleep(min(wait_s, 3600.0))
                wait_s = (renew_at(cert) - dt.datetime.now(dt.UTC)).total_seconds()
            try:
                new = await self.renew_once()
            except (FactoryEdgeError, OSError) as exc:
                left_s = (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()
                delay = min(retry_s, max(lifetime_s / 10, 1.0))
                log.warning(
                    "certificate renewal failed",
                    extra=fields(err=str(exc), retry_in_s=round(delay, 1), expires_in_s=round(left_s)),
                )
                await asyncio.sleep(delay)
                retry_s = min(retry_s * 2, RETRY_MAX_S)
                continue
            retry_s = RETRY_FIRST_S
            if renew_at(new) <= dt.datetime.now(dt.UTC):
                # The new certificate is already due: the service's lifetime is
                # shorter than our clock thinks; do not hammer the service.
                await asyncio.sleep(min(60.0, lifetime_s / 3))

    async def renew_once(self) -> x509.Certificate:
        """One renewal: CSR for the pending (or a new) key, signed by the current key; swap in the answer."""
        from cryptography.hazmat.primitives import serialization

        from factory_edge import pki

        identity = self.identity
        current = pki.load_cert(identity.cert_file)  # the whole certificate: it goes to the API
        current_key = pki.load_private_key(identity.key_file)
        key_new = pending_key(identity)
        if key_new.exists():
            new_key = pki.load_private_key(key_new)
        else:
            new_key = pki.new_key()
            pki.write_private_key(key_new, new_key)
        csr = pki.make_csr(new_key, identity.gateway)
        body = {
            "certificate": _pem(current).decode(),
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "signature": base64.b64encode(
                pki.sign_possession(current_key, csr.public_bytes(serialization.Encoding.DER))
            ).decode(),
        }
        url = self.api.url.rstrip("/") + "/v1/renew"
        import httpx

        try:
            async with httpx.AsyncClient(verify=api_context(self.api.ca_file), timeout=HTTP_TIMEOUT_S) as client:
                response = await client.post(url, json=body)
        except httpx.HTTPError as exc:
            raise ProvisioningError(explain_http_error(exc, self.api.url)) from exc
        cert, _ = check_issued(answer(response), new_key, identity.gateway)
        pki.write_pem(pending_cert(identity), cert)
        # Key and certificate change together: no await between the renames,
        # so no connection of this agent can load one without the other.
        os.replace(key_new, identity.key_file)
        os.replace(pending_cert(identity), identity.cert_file)
        log.info(
            "certificate renewed",
            extra=fields(
                old=f"{current.serial_number:x}",
                serial=f"{cert.serial_number:x}",
                not_after=cert.not_valid_after_utc.isoformat(timespec="seconds"),
            ),
        )
        return cert


__all__ = [
    "PROVISIONING_FILE",
    "ApiSettings",
    "Renewer",
    "answer",
    "api_context",
    "check_issued",
    "complete_pending",
    "explain_http_error",
    "renew_at",
]
