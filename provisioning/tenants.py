"""Tenants: their CA and certificates on disk, and the broker and proxy configuration rendered from them.

``create_tenant`` makes the tenant's CA (EC P-256), the broker's server
certificate for ``mqtt.<tenant>.<domain>``, client certificates for the
bridge and for this service, an empty CRL, and renders the tenant's
``mosquitto.conf`` and ACL; then it re-renders the proxy config and reloads
HAProxy if it runs (other tenants keep their connections). ``render_tenant``
and ``write_crl`` are what every later change (technician, revocation,
CRL refresh) calls before reloading that tenant's broker.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pwd
import re
import shutil
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from factory_edge.errors import ProvisioningError
from provisioning import pki, render
from provisioning.brokers import find_dynsec_plugin, reload_proxy
from provisioning.layout import DataDir, TenantFiles, private_dir, write_text
from provisioning.registry import CertRecord, Registry, Tenant, iso, now

_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
CRL_DAYS = 7

DEFAULTS = {"proxy_bind": "0.0.0.0", "proxy_port": "8883", "public_port": "8883", "first_broker_port": "18831"}


@dataclass(frozen=True)
class Settings:
    """Deployment-wide settings, chosen at ``provisioning init``."""

    proxy_bind: str
    proxy_port: int
    public_port: int
    first_broker_port: int

    @classmethod
    def load(cls, registry: Registry) -> Settings:
        value = {k: registry.setting(k) or v for k, v in DEFAULTS.items()}
        return cls(value["proxy_bind"], int(value["proxy_port"]), int(value["public_port"]),
                   int(value["first_broker_port"]))


def check_tenant_name(name: str) -> None:
    """A tenant name becomes a DNS label (``mqtt.<tenant>.<domain>``): RFC 1123 label rules, lowercase."""
    if not _LABEL_RE.match(name):
        raise ProvisioningError(f"tenant name {name!r} is not a DNS label: 1-63 lowercase letters, digits or '-', "
                                "not starting or ending with '-'")


def check_domain(domain: str) -> None:
    labels = domain.split(".")
    if len(domain) > 240 or not all(_LABEL_RE.match(label) for label in labels):
        raise ProvisioningError(f"domain {domain!r} is not a lowercase DNS name (labels of letters, digits, '-')")


def init(data: DataDir, *, proxy_bind: str | None = None, proxy_port: int | None = None,
         public_port: int | None = None, first_broker_port: int | None = None) -> tuple[Settings, bool]:
    """Create the data directory and registry with these settings; returns ``(settings, created)``.

    Settings are fixed once tenants exist (their URLs carry the public port).
    """
    for what, port in (("proxy port", proxy_port), ("public port", public_port),
                       ("first broker port", first_broker_port)):
        if port is not None and not 0 < port < 65536:
            raise ProvisioningError(f"{what} {port} is not in 1..65535")
    created = not data.exists()
    data.make()
    with Registry(data.registry) as registry:
        given = {"proxy_bind": proxy_bind, "proxy_port": proxy_port, "first_broker_port": first_broker_port,
                 "public_port": public_port if public_port is not None else proxy_port}
        given = {k: str(v) for k, v in given.items() if v is not None}
        if given and registry.tenants():
            current = Settings.load(registry)
            changed = [k for k, v in given.items() if str(getattr(current, k)) != v]
            if changed:
                raise ProvisioningError(f"{data.root} already has tenants; {', '.join(changed)} cannot change now")
        with registry.transaction():
            for key, value in given.items():
                registry.set_setting(key, value)
        settings = Settings.load(registry)
        render_proxy(data, registry)
    return settings, created


def create_tenant(data: DataDir, name: str, domain: str, *, broker_port: int | None = None) -> Tenant:
    """Make a new tenant's PKI and broker config, register it, and re-render the proxy."""
    check_tenant_name(name)
    check_domain(domain)
    if not data.exists():
        init(data)
    files = data.tenant(name)
    with Registry(data.registry) as registry:
        existing = registry.tenant(name)
        if existing is not None:
            raise ProvisioningError(f"tenant {name} already exists (created {existing.created_at}, "
                                    f"broker {existing.url})")
        if files.dir.exists():
            raise ProvisioningError(f"{files.dir} exists but the registry has no tenant {name}: "
                                    "remove the directory or restore the registry")
        settings = Settings.load(registry)
        used = {t.broker_port: t.name for t in registry.tenants()}
        if broker_port is None:
            broker_port = next(p for p in range(settings.first_broker_port, 65536) if p not in used)
        elif broker_port in used:
            raise ProvisioningError(f"broker port {broker_port} is already used by tenant {used[broker_port]}")
        if not 0 < broker_port < 65536:
            raise ProvisioningError(f"broker port {broker_port} is not in 1..65535")
        tenant = Tenant(name=name, domain=domain, broker_port=broker_port, public_port=settings.public_port,
                        created_at=iso(now()) or "")
        staging = TenantFiles(files.dir.with_name(f".{name}.new"))
        shutil.rmtree(staging.dir, ignore_errors=True)
        try:
            records = _make_pki(staging, tenant)
            os.replace(staging.dir, files.dir)
        except OSError as exc:
            shutil.rmtree(staging.dir, ignore_errors=True)
            raise ProvisioningError(f"cannot create {files.dir}: {exc.strerror}") from exc
        except BaseException:
            shutil.rmtree(staging.dir, ignore_errors=True)
            raise
        try:
            with registry.transaction():
                registry.add_tenant(tenant)
                for record in records:
                    registry.add_certificate(record)
        except BaseException:
            shutil.rmtree(files.dir, ignore_errors=True)
            raise
        render_tenant(data, registry, tenant)
        render_proxy(data, registry)
    return tenant


def _make_pki(files: TenantFiles, tenant: Tenant) -> list[CertRecord]:
    private_dir(files.dir)
    private_dir(files.persistence)
    private_dir(files.technicians)
    ca_key, ca_cert = pki.create_ca(f"factory-edge {tenant.name} CA")
    pki.write_private_key(files.ca_key, ca_key)
    pki.write_pem(files.ca_cert, ca_cert)
    broker_key = pki.new_key()
    broker_cert = pki.issue_server_cert(ca_key, ca_cert, broker_key.public_key(), tenant.host)
    pki.write_private_key(files.broker_key, broker_key)
    pki.write_pem(files.broker_cert, broker_cert)
    records = [record(tenant.name, broker_cert, "broker")]
    for identity, cert_file, key_file, kind in ((pki.BRIDGE_ID, files.bridge_cert, files.bridge_key, "bridge"),
                                                (pki.SERVICE_ID, files.service_cert, files.service_key, "service")):
        key, cert = pki.issue_client_cert(ca_key, ca_cert, identity, days=825)
        pki.write_private_key(key_file, key)
        pki.write_pem(cert_file, cert)
        records.append(record(tenant.name, cert, kind))
    pki.write_pem(files.crl, pki.create_crl(ca_key, ca_cert, [], days=CRL_DAYS))
    # The dynamic-security plugin's own state: it knows no client (see brokers.disconnect_gateway).
    write_text(files.dynsec, json.dumps({
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": True},
        "clients": [], "groups": [], "roles": []}, indent=2) + "\n", 0o600)
    return records


def record(tenant: str, cert: x509.Certificate, kind: str, *, device_id: int | None = None) -> CertRecord:
    """The registry row of an issued certificate."""
    return CertRecord(serial=f"{cert.serial_number:x}", tenant=tenant, subject=pki.common_name(cert), kind=kind,
                      device_id=device_id, not_before=iso(cert.not_valid_before_utc) or "",
                      not_after=iso(cert.not_valid_after_utc) or "", fingerprint=pki.fingerprint(cert),
                      issued_at=iso(now()) or "", pem=cert.public_bytes(serialization.Encoding.PEM).decode())


def load_ca(files: TenantFiles) -> tuple[pki.PrivateKey, x509.Certificate]:
    return pki.load_private_key(files.ca_key), pki.load_cert(files.ca_cert)


def render_tenant(data: DataDir, registry: Registry, tenant: Tenant) -> None:
    """Write the tenant's mosquitto.conf, ACL (current technicians) and CRL."""
    files = data.tenant(tenant.name)
    plugin = find_dynsec_plugin()
    write_text(files.conf, render.mosquitto_conf(
        port=tenant.broker_port, bind="127.0.0.1", cafile=str(files.ca_cert), certfile=str(files.broker_cert),
        keyfile=str(files.broker_key), crlfile=str(files.crl), aclfile=str(files.acl),
        persistence_dir=str(files.persistence), user=pwd.getpwuid(os.geteuid()).pw_name,
        dynsec_plugin=plugin, dynsec_config=str(files.dynsec) if plugin else None))
    write_text(files.acl, render.mosquitto_acl(technicians=registry.technicians(tenant.name, now()),
                                               service=pki.SERVICE_ID))
    write_crl(data, registry, tenant)


def write_crl(data: DataDir, registry: Registry, tenant: Tenant) -> x509.CertificateRevocationList:
    """Re-issue the tenant's CRL from the registry (valid CRL_DAYS; the service re-issues it daily)."""
    files = data.tenant(tenant.name)
    crl = pki.create_crl(*load_ca(files), registry.revoked(tenant.name, now()), days=CRL_DAYS)
    pki.write_pem(files.crl, crl)
    return crl


def crl_expires(files: TenantFiles) -> dt.datetime:
    return pki.load_crl(files.crl).next_update_utc or now()


def render_proxy(data: DataDir, registry: Registry) -> None:
    """Write haproxy.cfg, its SNI map and tenants.json (what the bridge reads) for every tenant."""
    settings = Settings.load(registry)
    tenants = registry.tenants()
    routes = [render.TenantRoute(name=t.name, sni_host=t.host, backend_addr=f"127.0.0.1:{t.broker_port}")
              for t in tenants]
    write_text(data.haproxy_map, render.haproxy_map(render.haproxy_routes(routes)))
    write_text(data.haproxy_cfg, render.haproxy_cfg(bind=settings.proxy_bind, port=settings.proxy_port,
                                                    map_file=str(data.haproxy_map), tenants=routes,
                                                    stats_socket=str(data.haproxy_socket)))
    index = {"tenants": [
        {"name": t.name, "url": f"mqtts://{t.host}:{t.broker_port}", "connect_host": "127.0.0.1",
         "ca_file": str(data.tenant(t.name).ca_cert), "cert_file": str(data.tenant(t.name).bridge_cert),
         "key_file": str(data.tenant(t.name).bridge_key)} for t in tenants]}
    write_text(data.tenants_index, json.dumps(index, indent=2) + "\n")


def apply_proxy(data: DataDir) -> str:
    """Reload a running HAProxy on the rendered config, or say how to start it (never fails: the files are written)."""
    try:
        result = reload_proxy(data.haproxy_cfg)
    except ProvisioningError as exc:
        return f"NOT reloaded: {exc}"
    return str(result) if result.pids else f"proxy not running: start it with 'haproxy -W -f {data.haproxy_cfg}'"


def get_tenant(registry: Registry, name: str) -> Tenant:
    tenant = registry.tenant(name)
    if tenant is None:
        known = ", ".join(t.name for t in registry.tenants()) or "none yet"
        raise ProvisioningError(f"no tenant {name!r} (tenants: {known})")
    return tenant


__all__ = ["CRL_DAYS", "Settings", "apply_proxy", "check_domain", "check_tenant_name", "create_tenant", "crl_expires",
           "get_tenant", "init", "load_ca", "record", "render_proxy", "render_tenant", "write_crl"]
