"""Operator actions: provisioning keys, revoking devices and technicians, bridge identities, CRL upkeep.

Each action that changes what a broker must enforce (a revoked
certificate, a technician or bridge identity in the ACL, a fresh CRL)
re-renders the tenant's files and reloads its Mosquitto
(``brokers.reload_broker``) and brings its subscription rules up to date
(``dynsec.sync``); revoking a gateway or a technician also ends its live
session (``brokers.disconnect_gateway``), because Mosquitto checks the CRL
only when a connection starts.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shlex
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from factory_edge import __version__, names
from factory_edge.errors import ProvisioningError
from factory_edge.logs import fields
from provisioning import brokers, dynsec, keys, pki, plans
from provisioning.layout import DataDir, private_dir
from provisioning.registry import CertRecord, Device, KeyRecord, Registry, Tenant, iso, now, parse_iso
from provisioning.tenants import (
    admin_link,
    crl_entries,
    crl_expires,
    crl_serials,
    get_tenant,
    issue_bridge_identity,
    load_ca,
    record,
    render_proxy,
    render_tenant,
    wanted_dynsec,
    write_crl,
)

log = logging.getLogger(__name__)

MAX_TECHNICIAN_HOURS = 7 * 24
CRL_REFRESH_BELOW = dt.timedelta(days=4)  # a 7-day CRL is re-issued once fewer than 4 days remain


# -- keys ----------------------------------------------------------------------


def create_key(
    data: DataDir, tenant_name: str, *, uses: int | None, expires_s: float | None
) -> tuple[keys.NewKey, KeyRecord]:
    if uses is not None and uses < 1:
        raise ProvisioningError(f"--uses must be at least 1 (got {uses})")
    if expires_s is not None and expires_s <= 0:
        raise ProvisioningError("--expires must be a positive duration like 7d or 12h")
    data.require()
    with Registry(data.registry) as registry:
        tenant = get_tenant(registry, tenant_name)
        new = keys.new_key()
        expires = iso(now() + dt.timedelta(seconds=expires_s)) if expires_s is not None else None
        with registry.transaction():
            registry.add_key(
                key_id=new.key_id, tenant=tenant.name, digest=new.digest, max_uses=uses, expires_at=expires
            )
        found = registry.key(new.key_id)
    assert found is not None
    log.info("provisioning key created", extra=fields(tenant=tenant.name, key=new.key_id, uses=uses, expires=expires))
    return new, found


def list_keys(data: DataDir, tenant_name: str | None) -> list[KeyRecord]:
    data.require()
    with Registry(data.registry) as registry:
        if tenant_name is not None:
            get_tenant(registry, tenant_name)
        return registry.keys(tenant_name)


def revoke_key(data: DataDir, key_id: str) -> KeyRecord:
    data.require()
    with Registry(data.registry) as registry:
        found = registry.key(key_id)
        if found is None:
            raise ProvisioningError(f"no provisioning key {key_id!r} (see provisioning key list)")
        with registry.transaction():
            registry.revoke_key(key_id, now())
        return registry.key(key_id) or found


# -- devices -------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceView:
    device: Device
    serial: str | None
    not_after: str | None
    renewals: int

    @property
    def state(self) -> str:
        if self.device.revoked_at:
            return "revoked"
        expiry = parse_iso(self.not_after)
        return "expired" if expiry is not None and expiry <= now() else "active"

    def as_json(self) -> dict[str, object]:
        return {
            "gateway": self.device.name,
            "state": self.state,
            "serial": self.serial,
            "not_after": self.not_after,
            "provisioned_at": self.device.created_at,
            "key": self.device.key_id,
            "revoked_at": self.device.revoked_at,
            "renewals": self.renewals,
            "possibly_cloned": self.device.cloned_at is not None,
            "cloned_at": self.device.cloned_at,
        }


def list_devices(data: DataDir, tenant_name: str, gateway: str | None = None) -> list[DeviceView]:
    data.require()
    with Registry(data.registry) as registry:
        tenant = get_tenant(registry, tenant_name)
        views = []
        for device in registry.devices(tenant.name):
            if gateway is not None and device.name != gateway:
                continue
            certs = registry.certificates(tenant.name, device_id=device.id)
            current = next((c for c in reversed(certs) if c.superseded_by is None), None)
            views.append(
                DeviceView(
                    device,
                    current.serial if current else None,
                    current.not_after if current else None,
                    max(0, len(certs) - 1),
                )
            )
        return views


@dataclass
class Revocation:
    tenant: Tenant
    gateway: str
    serials: list[str]
    already_revoked_at: str | None = None
    steps: list[str] = field(default_factory=list)


def revoke_device(data: DataDir, tenant_name: str, gateway: str) -> Revocation:
    """Revoke the gateway and every certificate it holds; publish the CRL; end its live session.

    Running it again for a revoked gateway redoes the CRL, reload and
    disconnect (for when the broker was unreachable the first time).
    """
    data.require()
    at = now()
    with Registry(data.registry) as registry:
        tenant = get_tenant(registry, tenant_name)
        device = registry.active_device(tenant.name, gateway)
        already = None
        if device is None:
            previous = [d for d in registry.devices(tenant.name) if d.name == gateway]
            if not previous:
                raise ProvisioningError(
                    f"no gateway {gateway!r} in tenant {tenant.name} (see provisioning device list {tenant.name})"
                )
            device, already = previous[-1], previous[-1].revoked_at
        certs = registry.certificates(tenant.name, device_id=device.id)
        with registry.transaction():
            registry.revoke_device(device.id, at)
            for cert in certs:
                registry.revoke_certificate(cert.serial, at)
        result = Revocation(tenant, gateway, [c.serial for c in certs], already)
        write_crl(data, registry, tenant)
    log.info("gateway revoked", extra=fields(tenant=tenant.name, gateway=gateway, certificates=len(certs)))
    files = data.tenant(tenant.name, tenant.broker_host)
    result.steps.append(f"CRL {files.crl} lists {len(certs)} certificate(s) of {gateway}")
    try:
        reloaded = brokers.reload_broker(files.conf, tenant.name)
        result.steps.append(str(reloaded))
        if not reloaded.pids:
            result.steps.append(f"{gateway} is refused from the broker's next start ('mosquitto -c {files.conf}')")
            with Registry(data.registry) as registry:
                result.steps.append(
                    dynsec.sync(
                        files, admin_link(data, tenant), partial(wanted_dynsec, registry, tenant), tenant=tenant.name
                    )
                )
            return result
        offline = json.dumps(
            {"state": "offline", "ts": int(at.timestamp() * 1000), "version": __version__, "reason": "revoked"}
        ).encode()
        link = admin_link(data, tenant)
        with dynsec.locked(files), Registry(data.registry) as registry:
            brokers.disconnect_gateway(link, gateway, offline=offline, role=dynsec.gateway_role(gateway))
            result.steps.append(dynsec.sync(files, link, partial(wanted_dynsec, registry, tenant), tenant=tenant.name))
    except ProvisioningError as exc:
        raise ProvisioningError(
            f"{gateway} is revoked and the CRL re-issued, but not yet enforced: {exc}; "
            "run the command again once that is fixed"
        ) from exc
    result.steps.append(f"{gateway}'s sessions ended; reconnecting is refused (certificate revoked)")
    return result


# -- technicians ---------------------------------------------------------------


@dataclass(frozen=True)
class TechnicianCert:
    identity: str
    cert_file: Path
    key_file: Path
    ca_file: Path
    not_after: dt.datetime
    command: str
    broker: str


def technician_cert(data: DataDir, tenant_name: str, name: str, *, hours: float, out_dir: Path) -> TechnicianCert:
    """A read-only certificate for ``tech-<name>``: key, certificate and CA written to ``out_dir``."""
    if not 0 < hours <= MAX_TECHNICIAN_HOURS:
        raise ProvisioningError(
            f"--hours must be in (0, {MAX_TECHNICIAN_HOURS}] (got {hours:g}): technician certificates are short-lived"
        )
    identity = names.technician_identity(name)
    data.require()
    with Registry(data.registry) as registry:
        tenant = get_tenant(registry, tenant_name)
        plans.check_technician_room(registry, tenant.name, identity, now())  # before any file is written
        files = data.tenant(tenant.name, tenant.broker_host)
        ca_key, ca_cert = load_ca(files)
        key, cert = pki.issue_client_cert(ca_key, ca_cert, identity, hours=hours)
        out_dir = out_dir.resolve()
        if not out_dir.exists():
            private_dir(out_dir)
        cert_file, key_file, ca_file = (
            out_dir / f"{identity}.pem",
            out_dir / f"{identity}.key",
            out_dir / f"{tenant.name}-ca.pem",
        )
        pki.write_private_key(key_file, key)
        pki.write_pem(cert_file, cert)
        pki.write_pem(ca_file, ca_cert)
        pki.write_pem(files.technicians / f"{identity}-{cert.serial_number:x}.pem", cert)
        with registry.transaction():
            try:
                plans.check_technician_room(registry, tenant.name, identity, now())  # again, under the write lock
            except plans.PlanLimit:  # another technician took the last place meanwhile: leave no usable key
                key_file.unlink(missing_ok=True)
                (files.technicians / f"{identity}-{cert.serial_number:x}.pem").unlink(missing_ok=True)
                raise
            registry.add_certificate(record(tenant.name, cert, "technician"))
            render_tenant(data, registry, tenant)  # checked first: a refused config rolls the certificate back
    try:
        signalled = brokers.reload_broker(files.conf, tenant.name)
        with Registry(data.registry) as registry:
            synced = dynsec.sync(
                files, admin_link(data, tenant), partial(wanted_dynsec, registry, tenant), tenant=tenant.name
            )
        reloaded = f"{signalled}; {synced}" if signalled.pids else str(signalled)
    except ProvisioningError as exc:
        reloaded = f"broker {tenant.name} NOT reloaded, the certificate works once it is: {exc}"
    command = shlex.join(
        [
            "mosquitto_sub",
            "-h",
            tenant.host,
            "-p",
            str(tenant.public_port),
            "--cafile",
            str(ca_file),
            "--cert",
            str(cert_file),
            "--key",
            str(key_file),
            "-V",
            "mqttv5",
            "-t",
            "gw/#",
            "-t",
            "alerts/#",
            "-v",
        ]
    )
    log.info(
        "technician certificate issued",
        extra=fields(tenant=tenant.name, technician=identity, not_after=iso(cert.not_valid_after_utc)),
    )
    return TechnicianCert(identity, cert_file, key_file, ca_file, cert.not_valid_after_utc, command, reloaded)


@dataclass(frozen=True)
class TechnicianView:
    identity: str
    serial: str
    not_after: str
    issued_at: str
    revoked_at: str | None

    @property
    def state(self) -> str:
        if self.revoked_at:
            return "revoked"
        expiry = parse_iso(self.not_after)
        return "expired" if expiry is not None and expiry <= now() else "active"

    def as_json(self) -> dict[str, object]:
        return {
            "technician": self.identity,
            "state": self.state,
            "serial": self.serial,
            "not_after": self.not_after,
            "issued_at": self.issued_at,
            "revoked_at": self.revoked_at,
        }


def list_technicians(data: DataDir, tenant_name: str) -> list[TechnicianView]:
    """Every technician certificate issued for the tenant, newest last."""
    data.require()
    with Registry(data.registry) as registry:
        tenant = get_tenant(registry, tenant_name)
        return [
            TechnicianView(c.subject, c.serial, c.not_after, c.issued_at, c.revoked_at)
            for c in registry.certificates(tenant.name, kind="technician")
        ]


def revoke_technician(data: DataDir, tenant_name: str, name: str) -> Revocation:
    """Revoke every certificate of ``tech-<name>``, drop it from the ACL and end its live sessions now."""
    identity = names.technician_identity(name)
    data.require()
    at = now()
    with Registry(data.registry) as registry:
        tenant = get_tenant(registry, tenant_name)
        certs = [c for c in registry.certificates(tenant.name, kind="technician") if c.subject == identity]
        if not certs:
            raise ProvisioningError(
                f"no technician {identity!r} in tenant {tenant.name} (see provisioning technician list {tenant.name})"
            )
        live = [c for c in certs if c.revoked_at is None]
        with registry.transaction():
            for cert in live:
                registry.revoke_certificate(cert.serial, at)
            render_tenant(data, registry, tenant)  # without its user block; checked before it replaces the ACL
    already = None if live else certs[-1].revoked_at
    result = Revocation(tenant, identity, [c.serial for c in certs], already)
    files = data.tenant(tenant.name, tenant.broker_host)
    result.steps.append(f"CRL {files.crl} lists {len(certs)} certificate(s) of {identity}; removed from the ACL")
    log.info("technician revoked", extra=fields(tenant=tenant.name, technician=identity, certificates=len(live)))
    try:
        reloaded = brokers.reload_broker(files.conf, tenant.name)
        result.steps.append(str(reloaded))
        link = admin_link(data, tenant)
        with dynsec.locked(files), Registry(data.registry) as registry:
            if reloaded.pids:
                brokers.disconnect_gateway(link, identity)
                result.steps.append(f"{identity}'s sessions ended; reconnecting is refused (certificate revoked)")
            result.steps.append(dynsec.sync(files, link, partial(wanted_dynsec, registry, tenant), tenant=tenant.name))
    except ProvisioningError as exc:
        raise ProvisioningError(
            f"{identity} is revoked and the CRL re-issued, but not yet enforced: {exc}; "
            "run the command again once that is fixed"
        ) from exc
    return result


# -- bridge identities -------------------------------------------------------------


@dataclass(frozen=True)
class BridgeIdentity:
    instance: str
    identity: str
    tenants: list[str]


def add_bridge(data: DataDir, instance: str) -> BridgeIdentity:
    """Issue ``bridge.<instance>`` on every tenant (and every tenant created later), list it in each ACL."""
    identity = names.bridge_identity(instance)
    data.require()
    issued: list[str] = []
    with Registry(data.registry) as registry:
        with registry.transaction():
            registry.add_bridge_instance(instance, now())
            for tenant in registry.tenants():
                if registry.active_certificates(tenant.name, "bridge", now(), subject=identity):
                    continue
                registry.add_certificate(issue_bridge_identity(data, registry, tenant, identity))
                render_tenant(data, registry, tenant)
                issued.append(tenant.name)
            render_proxy(data, registry)  # tenants.json: the bridge finds its certificate by instance
        tenants = registry.tenants()
    for tenant in tenants:
        if tenant.name in issued:
            brokers.reload_broker(data.tenant(tenant.name, tenant.broker_host).conf, tenant.name)
    log.info("bridge identity added", extra=fields(identity=identity, tenants=",".join(issued)))
    return BridgeIdentity(instance, identity, issued)


def list_bridges(data: DataDir) -> list[tuple[str, list[CertRecord]]]:
    """Each bridge identity with its valid certificates, across tenants."""
    data.require()
    found: dict[str, list[CertRecord]] = {}
    with Registry(data.registry) as registry:
        for tenant in registry.tenants():
            for cert in registry.active_certificates(tenant.name, "bridge", now()):
                found.setdefault(cert.subject, []).append(cert)
    return sorted(found.items())


def enforce_subscriptions(data: DataDir, only: str | None = None) -> list[str]:
    """Bring every tenant broker's subscription rules in line with the registry (``serve``'s upkeep)."""
    data.require()
    done = []
    with Registry(data.registry) as registry:
        for tenant in [get_tenant(registry, only)] if only else registry.tenants():
            done.append(
                f"{tenant.name}: "
                + dynsec.sync(
                    data.tenant(tenant.name, tenant.broker_host),
                    admin_link(data, tenant),
                    partial(wanted_dynsec, registry, tenant),
                    tenant=tenant.name,
                )
            )
    return done


# -- CRL upkeep ------------------------------------------------------------------


@dataclass(frozen=True)
class CrlStatus:
    tenant: str
    next_update: dt.datetime
    reissued: bool
    broker: str


def refresh_crls(
    data: DataDir, *, below: dt.timedelta = CRL_REFRESH_BELOW, force: bool = False, only: str | None = None
) -> list[CrlStatus]:
    """Re-issue each tenant's CRL that expires within ``below`` (or all with ``force``) and reload its broker.

    Mosquitto refuses *every* client once its CRL's next update has passed,
    so this must run at least daily: ``provisioning serve`` does it hourly,
    and ``provisioning crl refresh`` from a timer does it without the API.
    A CRL is also re-issued when what it must list changed (a certificate
    superseded by a renewal whose overlap has passed).
    """
    data.require()
    statuses = []
    with Registry(data.registry) as registry:
        tenants = [get_tenant(registry, only)] if only else registry.tenants()
        for tenant in tenants:
            files = data.tenant(tenant.name, tenant.broker_host)
            expires = crl_expires(files)
            listed = crl_serials(files)
            added = {serial for serial, _ in crl_entries(registry, tenant)} - listed
            changed = bool(added) or {serial for serial, _ in crl_entries(registry, tenant)} != listed
            if force or changed or expires - now() < below:
                expires = write_crl(data, registry, tenant).next_update_utc or expires
                signalled = brokers.reload_broker(files.conf, tenant.name)
                reloaded = str(signalled)
                if signalled.pids:
                    _end_superseded_sessions(data, registry, tenant, added)
                statuses.append(CrlStatus(tenant.name, expires, True, reloaded))
                log.info("CRL re-issued", extra=fields(tenant=tenant.name, next_update=iso(expires)))
            else:
                statuses.append(CrlStatus(tenant.name, expires, False, "unchanged"))
    return statuses


def _end_superseded_sessions(data: DataDir, registry: Registry, tenant: Tenant, serials: set[int]) -> None:
    """Kick the live sessions of gateways whose superseded certificate the CRL lists from now on.

    The broker checks the CRL only at handshakes, so a session opened with
    the old certificate during the overlap (a thief's) would go on. The
    broker cannot tell which certificate a session used, so every session
    of the name ends (``disableClient`` then ``enableClient``: the rules
    stay); the real gateway reconnects at once with its new certificate.
    """
    gateways = sorted(
        {
            cert.subject
            for cert in (registry.certificate(f"{serial:x}") for serial in serials)
            if cert is not None and cert.kind == "gateway" and cert.revoked_at is None and cert.superseded_by
        }
    )
    if not gateways:
        return
    files = data.tenant(tenant.name, tenant.broker_host)
    commands = [
        {"command": verb, "username": gateway} for gateway in gateways for verb in ("disableClient", "enableClient")
    ]
    try:
        with dynsec.locked(files):
            brokers.send_commands(admin_link(data, tenant), commands, tolerate=brokers.ALREADY)
    except ProvisioningError as exc:
        log.warning(
            "sessions of superseded certificates not ended",
            extra=fields(tenant=tenant.name, gateways=",".join(gateways), err=str(exc)),
        )
        return
    log.info("sessions of superseded certificates ended", extra=fields(tenant=tenant.name, gateways=",".join(gateways)))


__all__ = [
    "BridgeIdentity",
    "CrlStatus",
    "DeviceView",
    "Revocation",
    "TechnicianCert",
    "TechnicianView",
    "add_bridge",
    "admin_link",
    "create_key",
    "enforce_subscriptions",
    "list_bridges",
    "list_devices",
    "list_keys",
    "list_technicians",
    "refresh_crls",
    "revoke_device",
    "revoke_key",
    "revoke_technician",
    "technician_cert",
]
