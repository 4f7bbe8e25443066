"""What the API does: provision a gateway with a key and a CSR, renew a gateway's certificate.

Checks come first, in the order the statuses are documented (401 unknown,
403 not usable, 422 bad CSR, 409 name taken); the registry is written only
after all of them passed, in one transaction that re-checks what another
request could have changed meanwhile (the key's uses, the name), so a
refused request leaves no trace and a one-use key serves exactly one
gateway however many try at once.

Renewal is authenticated by the gateway's current certificate and a
signature, by its current key, over the new CSR (``pki.sign_possession``).
Replaying a captured renewal gains nothing: the certificate it yields is
for a key the replayer does not hold. A retried renewal (same new key,
answer lost on the way) gets the same certificate again.

A stolen certificate must not be a fountain of fresh ones: renewal is
refused before ``renew_from`` of the current certificate's lifetime has
passed (half by default; the agent renews at two thirds), every refusal
counts against the gateway (not just the certificate, so a chain of
renewals shares one count), and a renewal by a certificate that was
already renewed, for a different key, means two holders of one identity:
it is refused and the gateway is flagged "possibly cloned" (``device
list``), for an operator to revoke it and re-provision the real box.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from factory_edge import names
from factory_edge.errors import ProvisioningError
from factory_edge.logs import fields
from provisioning import dynsec, keys, pki, plans
from provisioning.errors import Conflict, Forbidden, Invalid, Refused, TooManyAttempts, Unauthorized
from provisioning.layout import DataDir
from provisioning.ratelimit import FailureLimiter
from provisioning.registry import Registry, Tenant, iso, now, parse_iso
from provisioning.tenants import admin_link, get_tenant, load_ca, record, renew_overlap

log = logging.getLogger(__name__)

DEFAULT_CERT_LIFETIME_S = 365 * 86400
DEFAULT_RENEW_FROM = 0.5  # of a certificate's lifetime, before which renewal is refused


@dataclass(frozen=True)
class Issued:
    """A gateway certificate and everything the gateway needs to use it."""

    tenant: Tenant
    certificate: x509.Certificate
    ca: x509.Certificate

    @property
    def gateway(self) -> str:
        return pki.common_name(self.certificate)

    def as_json(self) -> dict[str, Any]:
        lifetime = self.certificate.not_valid_after_utc - self.certificate.not_valid_before_utc
        return {
            "gateway": self.gateway,
            "tenant": self.tenant.name,
            "certificate": self.certificate.public_bytes(serialization.Encoding.PEM).decode(),
            "ca": self.ca.public_bytes(serialization.Encoding.PEM).decode(),
            "broker_url": self.tenant.url,
            "topic_root": f"gw/{self.gateway}/",
            "serial": f"{self.certificate.serial_number:x}",
            "not_after": iso(self.certificate.not_valid_after_utc),
            "renew_after": iso(self.certificate.not_valid_before_utc + lifetime * 2 / 3),
        }


class Service:
    """The provisioning operations over one data directory (a registry connection per call)."""

    def __init__(
        self,
        data: DataDir,
        *,
        cert_lifetime_s: float = DEFAULT_CERT_LIFETIME_S,
        per_key: FailureLimiter | None = None,
        per_tenant: FailureLimiter | None = None,
        renew_from: float = DEFAULT_RENEW_FROM,
    ) -> None:
        if cert_lifetime_s <= 0:
            raise ProvisioningError("certificate lifetime must be positive")
        if not 0 <= renew_from < 1:
            raise ProvisioningError(f"renew-from {renew_from!r} is not a fraction in [0, 1)")
        self.data = data
        self.cert_lifetime_s = cert_lifetime_s
        self.renew_from = renew_from
        self.per_key = per_key
        self.per_tenant = per_tenant

    @contextmanager
    def _counted(self, *, key: str, tenant: str) -> Iterator[None]:
        """Refuse (429) a key or tenant with too many recent failures; count this request's failure against both.

        The address limit (the API's Guard) stops one client; these stop many
        addresses working on one leaked key, or on one tenant.
        """
        pairs = [
            (limiter, subject)
            for limiter, subject in ((self.per_key, key), (self.per_tenant, f"tenant {tenant}"))
            if limiter
        ]
        for limiter, subject in pairs:
            wait = limiter.blocked_for(subject)
            if wait:
                raise TooManyAttempts(f"too many failed attempts for {subject}; retry in {wait} s", retry_after_s=wait)
        try:
            yield
        except Refused as exc:
            if not exc.counts_as_failure:
                raise
            for limiter, subject in pairs:
                limiter.failed(subject)
            exc.subjects = tuple(subject for _, subject in pairs)
            raise

    def _validity(self, at: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
        # Start a little in the past for gateways whose clock is behind, but
        # never more than a tenth of the lifetime (short test lifetimes).
        skew = min(pki.CLOCK_SKEW, dt.timedelta(seconds=self.cert_lifetime_s / 10))
        return at - skew, at + dt.timedelta(seconds=self.cert_lifetime_s)

    def provision(self, key: str, csr: str, name: str | None = None) -> Issued:
        """Spend one use of ``key`` on a certificate for the CSR's key; CN = ``name`` or the CSR's CN."""
        at = now()
        if not keys.looks_like_key(key):
            raise Unauthorized("unknown provisioning key (expected fek_<id>_<secret>)")
        with Registry(self.data.registry) as registry:
            found = registry.key_by_digest(keys.digest(key))
            if found is None:
                raise Unauthorized("unknown provisioning key")
            with self._counted(key=f"key {found.id}", tenant=found.tenant):
                return self._provision(registry, found, csr, name, at)

    def _provision(self, registry: Registry, found: Any, csr: str, name: str | None, at: dt.datetime) -> Issued:
        refusal = found.refusal(at)
        if refusal:
            raise Forbidden(refusal)
        tenant = get_tenant(registry, found.tenant)
        if name is not None:
            _invalid(names.check_gateway, name, what="gateway name")
        ca_key, ca_cert = load_ca(self.data.tenant(tenant.name, tenant.broker_host))
        start, end = self._validity(at)
        cert = _invalid(pki.sign_csr, ca_key, ca_cert, csr, common_name=name, not_before=start, not_after=end)
        gateway = pki.common_name(cert)
        plans.check_gateway_room(registry, tenant.name, gateway)  # early: before the broker hears of it
        # Held from the broker's rules to the device row: another writer of the rules sees both or neither.
        with dynsec.locked(self.data.tenant(tenant.name, tenant.broker_host)):
            if registry.active_device(tenant.name, gateway) is None:
                # Before the certificate exists for anyone: the broker refuses its subscriptions beyond its own.
                self._register(registry, tenant, gateway)
            self._record(registry, tenant, found, gateway, cert, at)
        log.info(
            "gateway provisioned",
            extra=fields(
                tenant=tenant.name, gateway=gateway, key=found.id, serial=f"{cert.serial_number:x}", not_after=iso(end)
            ),
        )
        return Issued(tenant, cert, ca_cert)

    def _record(
        self, registry: Registry, tenant: Tenant, found: Any, gateway: str, cert: x509.Certificate, at: dt.datetime
    ) -> None:
        with registry.transaction():
            taken = registry.active_device(tenant.name, gateway)
            if taken is not None:
                raise Conflict(
                    f"gateway name {gateway!r} is already taken in tenant {tenant.name} by a device "
                    f"provisioned at {taken.created_at}; revoke it first "
                    f"(provisioning device revoke {tenant.name} {gateway}) or choose another name"
                )
            plans.check_gateway_room(registry, tenant.name, gateway)  # again, under the write lock
            if not registry.use_key(found.id, at):
                raise Forbidden((registry.key(found.id) or found).refusal(at) or "provisioning key cannot be used")
            device_id = registry.add_device(tenant=tenant.name, name=gateway, key_id=found.id, at=at)
            registry.add_certificate(record(tenant.name, cert, "gateway", device_id=device_id))

    def _register(self, registry: Registry, tenant: Tenant, gateway: str) -> None:
        """Make the tenant broker refuse the gateway's subscriptions beyond its own topics (dynsec), add-only."""

        def target() -> dict[str, Any]:
            gateways = [d.name for d in registry.devices(tenant.name) if d.revoked_at is None]
            return dynsec.wanted(gateways=[*gateways, gateway], technicians=registry.technicians(tenant.name, now()))

        dynsec.sync(
            self.data.tenant(tenant.name, tenant.broker_host),
            admin_link(self.data, tenant),
            target,
            tenant=tenant.name,
            prune=False,
        )

    def renew(self, certificate: str, csr: str, signature: str) -> Issued:
        """A new certificate for a gateway that proves it holds its current, valid one."""
        at = now()
        try:
            current = x509.load_pem_x509_certificate(certificate.encode())
        except ValueError as exc:
            raise Invalid("certificate is not a PEM certificate") from exc
        try:
            proof = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Invalid("signature is not base64") from exc
        request = _invalid(pki.load_csr, csr)
        with Registry(self.data.registry) as registry:
            issued = registry.certificate(f"{current.serial_number:x}")
            if issued is None or issued.kind != "gateway" or issued.fingerprint != pki.fingerprint(current):
                raise Unauthorized("certificate was not issued to a gateway by this service")
            tenant = get_tenant(registry, issued.tenant)
            with self._counted(key=f"gateway {tenant.name}/{issued.subject}", tenant=tenant.name):
                return self._renew(registry, tenant, issued, current, request, proof, at)

    def _renew(
        self,
        registry: Registry,
        tenant: Tenant,
        issued: Any,
        current: x509.Certificate,
        request: x509.CertificateSigningRequest,
        proof: bytes,
        at: dt.datetime,
    ) -> Issued:
        ca_key, ca_cert = load_ca(self.data.tenant(tenant.name, tenant.broker_host))
        if not pki.issued_by(current, ca_cert):
            raise Unauthorized(f"certificate is not signed by tenant {tenant.name}'s CA")
        try:
            pki.verify_possession(current, request.public_bytes(serialization.Encoding.DER), proof)
        except ProvisioningError as exc:
            raise Unauthorized("signature over the CSR does not match the certificate's key") from exc
        device = registry.device(issued.device_id or 0)
        revoked_at = issued.revoked_at or (device.revoked_at if device else "unknown")
        if revoked_at:
            raise Forbidden(f"certificate of {issued.subject} was revoked at {revoked_at}")
        if current.not_valid_after_utc <= at:
            raise Forbidden(
                f"certificate of {issued.subject} expired at {iso(current.not_valid_after_utc)}; "
                "provision the gateway again with a new key"
            )
        if issued.superseded_by:
            overlap = renew_overlap(registry)
            superseded = parse_iso(issued.superseded_at)
            if superseded is not None and superseded + overlap <= at:
                raise Forbidden(
                    f"certificate of {issued.subject} was superseded at {issued.superseded_at} and is "
                    f"revoked since the renewal overlap ({overlap}) ended; renew with the newest one"
                )
            return self._retried(registry, tenant, ca_cert, issued, request, at)
        lifetime = current.not_valid_after_utc - current.not_valid_before_utc
        earliest = current.not_valid_before_utc + lifetime * self.renew_from
        if at < earliest:
            raise Forbidden(
                f"renewal of {issued.subject} too early: its certificate can be renewed from {iso(earliest)} "
                f"(after {self.renew_from:.0%} of its lifetime)"
            )
        start, end = self._validity(at)
        cert = _invalid(
            pki.sign_csr, ca_key, ca_cert, request, common_name=issued.subject, not_before=start, not_after=end
        )
        with registry.transaction():
            again = registry.certificate(issued.serial)
            if again is None or again.superseded_by or again.revoked_at:
                raise Forbidden(f"certificate of {issued.subject} changed meanwhile; retry")
            registry.add_certificate(record(tenant.name, cert, "gateway", device_id=issued.device_id))
            registry.supersede(issued.serial, f"{cert.serial_number:x}", at)
        log.info(
            "certificate renewed",
            extra=fields(
                tenant=tenant.name,
                gateway=issued.subject,
                old=issued.serial,
                serial=f"{cert.serial_number:x}",
                not_after=iso(end),
            ),
        )
        return Issued(tenant, cert, ca_cert)

    def _retried(
        self,
        registry: Registry,
        tenant: Tenant,
        ca_cert: x509.Certificate,
        issued: Any,
        request: x509.CertificateSigningRequest,
        at: dt.datetime,
    ) -> Issued:
        gateway, newer = issued.subject, issued.superseded_by
        successor = registry.certificate(newer)
        if successor is not None and successor.revoked_at is None and successor.superseded_by is None:
            cert = x509.load_pem_x509_certificate(successor.pem.encode())
            if pki.same_key(cert, request):
                log.info("renewal answered again", extra=fields(tenant=tenant.name, gateway=gateway, serial=newer))
                return Issued(tenant, cert, ca_cert)
        # The same certificate renewed for two different keys: two holders of one identity.
        if issued.device_id is not None:
            registry.flag_cloned(issued.device_id, at)
        log.warning(
            "gateway possibly cloned: a superseded certificate asked to renew for another key",
            extra=fields(tenant=tenant.name, gateway=gateway, serial=issued.serial, newer=newer),
        )
        raise Forbidden(
            f"certificate of {gateway} was already renewed (serial {newer}) for another key; the gateway is flagged "
            "possibly cloned"
        )


def _invalid(check: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a pki or name check; its ProvisioningError or InvalidName becomes a 422."""
    try:
        return check(*args, **kwargs)
    except (ProvisioningError, names.InvalidName) as exc:
        raise Invalid(str(exc)) from exc


__all__ = ["DEFAULT_CERT_LIFETIME_S", "DEFAULT_RENEW_FROM", "Issued", "Service"]
