"""Tenants: their CA and certificates on disk, and the broker and proxy configuration rendered from them.

``create_tenant`` makes the tenant's CA (EC P-256), the broker's server
certificate for ``mqtt.<tenant>.<domain>``, client certificates for the
bridge (``bridge`` for operators' tools, ``bridge.<instance>`` for each
bridge process, ``bridge-alerts`` for the alert role) and for this service,
an empty CRL, and renders the tenant's ``mosquitto.conf``, ACL and
dynamic-security state; then it re-renders the proxy config.

All or nothing: names are checked first, everything is made in a staging
directory, the rendered broker and proxy configs are tried by the real
programs (``checks``), and only then is the tenant recorded and the files
moved into place. A refused or failed attempt leaves the registry and every
rendered file byte for byte as they were.

``render_tenant`` and ``write_crl`` are what every later change
(technician, revocation, CRL refresh) calls before reloading that tenant's
broker; they too try a new config before it replaces the old one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import pwd
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from factory_edge import names
from factory_edge.errors import ProvisioningError
from provisioning import checks, dynsec, pki, placement, render
from provisioning.brokers import AdminLink, find_dynsec_plugin, reload_proxy
from provisioning.layout import LOCAL_HOST, DataDir, TenantFiles, private_dir, write_text
from provisioning.registry import CertRecord, Registry, Tenant, iso, now

CRL_DAYS = 7
IDENTITY_DAYS = 825  # bridge and service certificates
RENEW_OVERLAP_S = 3600  # a certificate superseded by a renewal is revoked this long after (init --renew-overlap)

DEFAULTS = {
    "proxy_bind": "0.0.0.0",
    "proxy_port": "8883",
    "public_port": "8883",
    "first_broker_port": "18831",
    "proxy_maxconn": str(render.PROXY_MAXCONN),
    "proxy_per_source": str(render.PROXY_PER_SOURCE),
    "proxy_per_tenant": str(render.PROXY_PER_TENANT),
    "proxy_hello_timeout": render.PROXY_HELLO_TIMEOUT,
    "proxy_idle_timeout": render.PROXY_IDLE_TIMEOUT,
    "renew_overlap_s": str(RENEW_OVERLAP_S),
    "proxy_connect": "",
}
FIXED = ("proxy_bind", "proxy_port", "public_port", "first_broker_port")  # in every tenant's URL or port


@dataclass(frozen=True)
class Settings:
    """Deployment-wide settings, chosen at ``provisioning init``."""

    proxy_bind: str
    proxy_port: int
    public_port: int
    first_broker_port: int
    limits: render.ProxyLimits = dataclasses.field(default_factory=render.ProxyLimits)
    proxy_connect: str = ""  # the proxy address bridges dial ("": tenants on local directly, others 127.0.0.1)

    def bridge_route(self, tenant: Tenant) -> tuple[str, int] | None:
        """``(address, port)`` a bridge dials for ``tenant`` through a proxy; None: straight to its local broker.

        Through the proxy, a broker move changes nothing for the bridge: the
        proxy's map follows the tenant. A tenant on host ``local`` is dialled
        directly unless ``proxy_connect`` is set (as before placement existed).
        """
        if self.proxy_connect:
            return self.proxy_connect, self.proxy_port
        if tenant.broker_host == LOCAL_HOST:
            return None
        wildcard = self.proxy_bind in ("0.0.0.0", "::", "*")
        return ("127.0.0.1" if wildcard else self.proxy_bind), self.proxy_port

    @classmethod
    def load(cls, registry: Registry) -> Settings:
        value = {k: registry.setting(k) or v for k, v in DEFAULTS.items()}
        limits = render.ProxyLimits(
            maxconn=int(value["proxy_maxconn"]),
            per_source=int(value["proxy_per_source"]),
            per_tenant=int(value["proxy_per_tenant"]),
            hello_timeout=value["proxy_hello_timeout"],
            idle_timeout=value["proxy_idle_timeout"],
        )
        return cls(
            value["proxy_bind"],
            int(value["proxy_port"]),
            int(value["public_port"]),
            int(value["first_broker_port"]),
            limits,
            proxy_connect=value["proxy_connect"],
        )


def check_tenant_name(name: str) -> None:
    """A tenant name becomes a DNS label (``mqtt.<tenant>.<domain>``): RFC 1123 label rules, lowercase."""
    names.check_tenant(name)


def check_domain(domain: str, tenant: str | None = None) -> None:
    names.check_domain(domain, tenant=tenant)


def init(
    data: DataDir,
    *,
    proxy_bind: str | None = None,
    proxy_port: int | None = None,
    public_port: int | None = None,
    first_broker_port: int | None = None,
    limits: dict[str, str | int] | None = None,
    renew_overlap_s: float | None = None,
    proxy_connect: str | None = None,
) -> tuple[Settings, bool]:
    """Create the data directory and registry with these settings; returns ``(settings, created)``.

    The addresses and ports are fixed once tenants exist (their URLs carry
    the public port); the proxy's limits (``limits``: ProxyLimits field ->
    value) may change at any time and take effect when the proxy reloads.
    """
    for what, port in (
        ("proxy port", proxy_port),
        ("public port", public_port),
        ("first broker port", first_broker_port),
    ):
        if port is not None and not 0 < port < 65536:
            raise ProvisioningError(f"{what} {port} is not in 1..65535")
    if proxy_bind is not None and (not proxy_bind or any(c.isspace() for c in proxy_bind)):
        raise ProvisioningError(f"proxy bind address {proxy_bind!r} is empty or contains whitespace")
    given: dict[str, str] = {
        k: str(v)
        for k, v in {
            "proxy_bind": proxy_bind,
            "proxy_port": proxy_port,
            "first_broker_port": first_broker_port,
            "public_port": public_port if public_port is not None else proxy_port,
        }.items()
        if v is not None
    }
    for field, value in (limits or {}).items():
        given[f"proxy_{field}"] = str(value)
    if proxy_connect is not None:
        if proxy_connect:
            placement.check_address(proxy_connect)
        given["proxy_connect"] = proxy_connect
    if renew_overlap_s is not None:
        if not 0 <= renew_overlap_s <= 30 * 86400:
            raise ProvisioningError(f"--renew-overlap {renew_overlap_s:g}s is not within 0..30d")
        given["renew_overlap_s"] = str(renew_overlap_s)
    render.ProxyLimits(**{**vars(render.ProxyLimits()), **(limits or {})}).check()
    created = not data.exists()
    data.make()
    with Registry(data.registry) as registry:
        if given and registry.tenants():
            current = Settings.load(registry)
            changed = [k for k, v in given.items() if k in FIXED and str(getattr(current, k)) != v]
            if changed:
                raise ProvisioningError(f"{data.root} already has tenants; {', '.join(changed)} cannot change now")
        with registry.transaction():
            for key, value in given.items():
                registry.set_setting(key, value)
            settings = Settings.load(registry)
            render_proxy(data, registry)  # checked first: a refused config rolls the settings back
    return settings, created


@dataclass(frozen=True)
class Created:
    """A new tenant and where it was placed, with the reasons (``placement.Choice``)."""

    tenant: Tenant
    host: placement.Choice
    storage: placement.Choice
    placed: bool = False  # there was a choice: several hosts, a storage server, or --host/--storage given


def create_tenant(data: DataDir, name: str, domain: str, *, broker_port: int | None = None) -> Tenant:
    """Make a new tenant on the least loaded places (see ``place_tenant``)."""
    return place_tenant(data, name, domain, broker_port=broker_port).tenant


def place_tenant(
    data: DataDir,
    name: str,
    domain: str,
    *,
    broker_port: int | None = None,
    host: str | None = None,
    storage: str | None = None,
) -> Created:
    """Make a new tenant's PKI and broker config on its broker host, register it, re-render the proxy: all or nothing.

    ``host``/``storage``: where it goes; None: the least loaded (``placement``).
    """
    check_tenant_name(name)
    check_domain(domain, name)
    if broker_port is not None and not 0 < broker_port < 65536:
        raise ProvisioningError(f"broker port {broker_port} is not in 1..65535")
    if not data.exists():
        init(data)
    with Registry(data.registry) as registry:
        host_choice = placement.choose_host(registry, host)
        storage_choice = placement.choose_storage(registry, storage)
        broker_host = placement.get_host(registry, host_choice.name or LOCAL_HOST)
        placed = bool(host or storage or len(registry.hosts()) > 1 or registry.storage_servers())
        files = data.tenant(name, broker_host.name)
        existing = registry.tenant(name)
        if existing is not None:
            raise ProvisioningError(
                f"tenant {name} already exists (created {existing.created_at}, broker {existing.url})"
            )
        if files.dir.exists():
            raise ProvisioningError(
                f"{files.dir} exists but the registry has no tenant {name}: "
                "remove the directory or restore the registry"
            )
        if files.broker_dir is not None and files.broker_dir.exists():
            raise ProvisioningError(
                f"{files.broker_dir} exists but the registry has no tenant {name}: "
                "remove the directory or restore the registry"
            )
        settings = Settings.load(registry)
        used = {t.broker_port: t.name for t in registry.tenants()}
        if broker_port is None:
            broker_port = next(p for p in range(settings.first_broker_port, 65536) if p not in used)
        elif broker_port in used:
            raise ProvisioningError(f"broker port {broker_port} is already used by tenant {used[broker_port]}")
        tenant = Tenant(
            name=name,
            domain=domain,
            broker_port=broker_port,
            public_port=settings.public_port,
            created_at=iso(now()) or "",
            broker_host=broker_host.name,
            storage=storage_choice.name,
            broker_address=broker_host.address,
        )
        staging = TenantFiles(files.dir.with_name(f".{name}.new"))
        shutil.rmtree(staging.dir, ignore_errors=True)
        try:
            records = _make_pki(staging, tenant, registry.bridge_instances())
            bridges = sorted(r.subject for r in records if r.kind == "bridge")
            _write_broker_files(
                staging,
                tenant,
                final=files,
                bridges=bridges,
                technicians=[],
                target=dynsec.wanted(gateways=[], technicians=[]),
            )
            with registry.transaction():
                registry.add_tenant(tenant)
                for cert in records:
                    registry.add_certificate(cert)
                with _proxy_files(data, registry) as install:  # rendered and checked with the new tenant
                    os.replace(staging.dir, files.dir)
                    try:
                        if files.broker_dir is not None:  # conf and persistence go to the host's directory
                            private_dir(files.broker_dir.parent)
                            private_dir(files.broker_dir)
                            os.replace(files.dir / "mosquitto.conf", files.conf)
                            os.replace(files.dir / "data", files.persistence)
                        install()
                    except BaseException:
                        if files.broker_dir is not None:
                            shutil.rmtree(files.broker_dir, ignore_errors=True)
                        os.replace(files.dir, staging.dir)
                        raise
        except OSError as exc:
            raise ProvisioningError(f"cannot create {files.dir}: {exc.strerror or exc}") from exc
        finally:
            shutil.rmtree(staging.dir, ignore_errors=True)
    return Created(tenant, host_choice, storage_choice, placed)


def _make_pki(files: TenantFiles, tenant: Tenant, instances: list[str]) -> list[CertRecord]:
    private_dir(files.dir)
    private_dir(files.persistence)
    private_dir(files.technicians)
    private_dir(files.bridges)
    ca_key, ca_cert = pki.create_ca(f"factory-edge {tenant.name} CA")
    pki.write_private_key(files.ca_key, ca_key)
    pki.write_pem(files.ca_cert, ca_cert)
    broker_key = pki.new_key()
    broker_cert = pki.issue_server_cert(ca_key, ca_cert, broker_key.public_key(), tenant.host)
    pki.write_private_key(files.broker_key, broker_key)
    pki.write_pem(files.broker_cert, broker_cert)
    records = [record(tenant.name, broker_cert, "broker")]
    identities = [
        (pki.BRIDGE_ID, files.bridge_cert, files.bridge_key, "bridge"),
        (pki.SERVICE_ID, files.service_cert, files.service_key, "service"),
        (names.GUARD_ID, *files.guard, "service"),
    ]
    for identity in (
        names.BRIDGE_ALERTS_ID,
        *(names.bridge_identity(i) for i in sorted({names.DEFAULT_BRIDGE_INSTANCE, *instances})),
    ):
        identities.append((identity, *files.identity(identity), "bridge"))
    for identity, cert_file, key_file, kind in identities:
        key, cert = pki.issue_client_cert(ca_key, ca_cert, identity, days=IDENTITY_DAYS)
        pki.write_private_key(key_file, key)
        pki.write_pem(cert_file, cert)
        records.append(record(tenant.name, cert, kind))
    pki.write_pem(files.crl, pki.create_crl(ca_key, ca_cert, [], days=CRL_DAYS))
    return records


def issue_bridge_identity(data: DataDir, registry: Registry, tenant: Tenant, identity: str) -> CertRecord:
    """A certificate for one more bridge identity of ``tenant`` (``bridge.<instance>``), written under bridges/."""
    files = data.tenant(tenant.name, tenant.broker_host)
    private_dir(files.bridges)
    key, cert = pki.issue_client_cert(*load_ca(files), identity, days=IDENTITY_DAYS)
    cert_file, key_file = files.identity(identity)
    pki.write_private_key(key_file, key)
    pki.write_pem(cert_file, cert)
    return record(tenant.name, cert, "bridge")


def record(tenant: str, cert: x509.Certificate, kind: str, *, device_id: int | None = None) -> CertRecord:
    """The registry row of an issued certificate."""
    return CertRecord(
        serial=f"{cert.serial_number:x}",
        tenant=tenant,
        subject=pki.common_name(cert),
        kind=kind,
        device_id=device_id,
        not_before=iso(cert.not_valid_before_utc) or "",
        not_after=iso(cert.not_valid_after_utc) or "",
        fingerprint=pki.fingerprint(cert),
        issued_at=iso(now()) or "",
        pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
    )


def load_ca(files: TenantFiles) -> tuple[pki.PrivateKey, x509.Certificate]:
    return pki.load_private_key(files.ca_key), pki.load_cert(files.ca_cert)


def broker_conf(
    files: TenantFiles, tenant: Tenant, *, acl: Path | None = None, max_packet_size: int | None = None
) -> str:
    """The tenant's ``mosquitto.conf`` naming the files of ``files`` (``acl``: another ACL file).

    ``max_packet_size``: the plan's message size (None: ``render.MAX_PACKET_SIZE``).
    """
    plugin = find_dynsec_plugin()
    return render.mosquitto_conf(
        port=tenant.broker_port,
        bind=tenant.broker_address,
        cafile=str(files.ca_cert),
        certfile=str(files.broker_cert),
        keyfile=str(files.broker_key),
        crlfile=str(files.crl),
        aclfile=str(acl or files.acl),
        persistence_dir=str(files.persistence),
        user=pwd.getpwuid(os.geteuid()).pw_name,
        dynsec_plugin=plugin,
        dynsec_config=str(files.dynsec) if plugin else None,
        max_packet_size=max_packet_size or render.MAX_PACKET_SIZE,
    )


def _write_broker_files(
    staging: TenantFiles,
    tenant: Tenant,
    *,
    final: TenantFiles,
    bridges: list[str],
    technicians: list[str],
    target: dict[str, object],
) -> None:
    """A new tenant's conf, ACL and dynamic-security state in ``staging``, tried by a real Mosquitto there."""
    write_text(
        staging.acl,
        render.mosquitto_acl(
            technicians=technicians,
            bridges=bridges,
            service=pki.SERVICE_ID,
            guard=names.GUARD_ID,
            sparkplug_group=tenant.name,
        ),
    )
    write_text(staging.dynsec, json.dumps(target, indent=2) + "\n", 0o600)
    checks.check_mosquitto(broker_conf(staging, tenant))
    write_text(staging.conf, broker_conf(final, tenant))


def render_tenant(data: DataDir, registry: Registry, tenant: Tenant) -> None:
    """Re-render the tenant's mosquitto.conf and ACL (current bridges, technicians) and CRL; checked before use."""
    files = data.tenant(tenant.name, tenant.broker_host)
    at = now()
    acl = render.mosquitto_acl(
        technicians=registry.technicians(tenant.name, at),
        bridges=bridge_identities(registry, tenant),
        service=pki.SERVICE_ID,
        guard=names.GUARD_ID,
        sparkplug_group=tenant.name,
    )
    packet = plan_limit(registry, tenant.name, "message_size")
    candidate = files.dir / ".acl.new"
    try:
        write_text(candidate, acl)
        checks.check_mosquitto(broker_conf(files, tenant, acl=candidate, max_packet_size=packet))
        os.replace(candidate, files.acl)
    finally:
        candidate.unlink(missing_ok=True)
    conf = broker_conf(files, tenant, max_packet_size=packet)
    if not files.conf.exists() or files.conf.read_text() != conf:
        write_text(files.conf, conf)
    write_crl(data, registry, tenant)


def plan_limit(registry: Registry, tenant: str, field: str) -> int | None:
    """One limit of the tenant's plan (``provisioning/plans.py``); None: no limit."""
    row = registry.plan_row(tenant)
    return None if row is None else row[field]


def bridge_identities(registry: Registry, tenant: Tenant) -> list[str]:
    """Every bridge identity of the tenant holding a valid certificate (the ACL's user blocks)."""
    return sorted(
        {c.subject for c in registry.active_certificates(tenant.name, "bridge", now()) if names.is_bridge(c.subject)}
    )


def wanted_dynsec(registry: Registry, tenant: Tenant) -> dict[str, Any]:
    """The dynamic-security state the registry calls for: every active gateway and technician."""
    gateways = [d.name for d in registry.devices(tenant.name) if d.revoked_at is None]
    return dynsec.wanted(gateways=gateways, technicians=registry.technicians(tenant.name, now()))


def write_crl(data: DataDir, registry: Registry, tenant: Tenant) -> x509.CertificateRevocationList:
    """Re-issue the tenant's CRL from the registry (valid CRL_DAYS; the service re-issues it daily)."""
    files = data.tenant(tenant.name, tenant.broker_host)
    crl = pki.create_crl(*load_ca(files), crl_entries(registry, tenant), days=CRL_DAYS)
    pki.write_pem(files.crl, crl)
    return crl


def renew_overlap(registry: Registry) -> dt.timedelta:
    """How long a certificate superseded by a renewal keeps working (``init --renew-overlap``, default 1 h)."""
    return dt.timedelta(seconds=float(registry.setting("renew_overlap_s") or RENEW_OVERLAP_S))


def crl_entries(registry: Registry, tenant: Tenant) -> list[tuple[int, dt.datetime]]:
    """What the tenant's CRL must list now: revoked certificates, and superseded ones past the overlap."""
    return registry.revoked(tenant.name, now(), overlap=renew_overlap(registry))


def crl_expires(files: TenantFiles) -> dt.datetime:
    return pki.load_crl(files.crl).next_update_utc or now()


def crl_serials(files: TenantFiles) -> set[int]:
    """Serials the tenant's current CRL file lists."""
    return {entry.serial_number for entry in pki.load_crl(files.crl)}


def render_proxy(data: DataDir, registry: Registry) -> None:
    """Write haproxy.cfg, its SNI map and tenants.json (what the bridge reads) for every tenant; checked first."""
    with _proxy_files(data, registry) as install:
        install()


@contextmanager
def _proxy_files(data: DataDir, registry: Registry) -> Iterator[Callable[[], None]]:
    """Render and check the proxy files; yields ``install()``, which writes all three or none."""
    settings = Settings.load(registry)
    tenants = registry.tenants()
    routes = [
        render.TenantRoute(name=t.name, sni_host=t.host, backend_addr=f"{t.broker_address}:{t.broker_port}")
        for t in tenants
    ]
    map_text = render.haproxy_map(render.haproxy_routes(routes))

    def cfg(map_file: Path, socket: Path | str | None) -> str:
        return render.haproxy_cfg(
            bind=settings.proxy_bind,
            port=settings.proxy_port,
            map_file=str(map_file),
            tenants=routes,
            stats_socket=str(socket) if socket else None,
            limits=settings.limits,
        )

    with tempfile.TemporaryDirectory(prefix=".check-", dir=data.haproxy) as tmp:
        trial_map, trial_cfg = Path(tmp) / "tenants.map", Path(tmp) / "haproxy.cfg"
        trial_map.write_text(map_text)
        trial_cfg.write_text(cfg(trial_map, None))  # the admin socket's path may be too long in a temp dir
        checks.check_haproxy(trial_cfg)
    index = {"tenants": [_index_entry(data, registry, t, settings) for t in tenants]}
    wanted_files = {
        data.haproxy_map: map_text,
        data.haproxy_cfg: cfg(data.haproxy_map, data.haproxy_socket_template),
        data.tenants_index: json.dumps(index, indent=2) + "\n",
    }

    def install() -> None:
        before = {path: path.read_bytes() if path.exists() else None for path in wanted_files}
        try:
            for path, text in wanted_files.items():
                write_text(path, text)
        except BaseException:
            for path, old in before.items():
                if old is None:
                    path.unlink(missing_ok=True)
                else:
                    write_text(path, old.decode())
            raise

    yield install


def _index_entry(data: DataDir, registry: Registry, tenant: Tenant, settings: Settings) -> dict[str, object]:
    files = data.tenant(tenant.name, tenant.broker_host)
    identities = {}
    for identity in bridge_identities(registry, tenant):
        if identity.startswith(names.BRIDGE_PREFIX):
            cert, key = files.identity(identity)
            identities[identity[len(names.BRIDGE_PREFIX) :]] = {"cert_file": str(cert), "key_file": str(key)}
    alerts_cert, alerts_key = files.identity(names.BRIDGE_ALERTS_ID)
    route = settings.bridge_route(tenant)
    connect_host, port = route or ("127.0.0.1", tenant.broker_port)
    entry: dict[str, object] = {
        "name": tenant.name,
        "url": f"mqtts://{tenant.host}:{port}",
        "connect_host": connect_host,
        "ca_file": str(files.ca_cert),
        "identities": identities,
        "alerts_cert_file": str(alerts_cert),
        "alerts_key_file": str(alerts_key),
        "limits": {field: plan_limit(registry, tenant.name, field) for field in ("points_per_s", "retention_days")},
    }
    # Only tenants placed on a storage server carry these, so a bridge that predates placement reads the rest.
    for field, server in (("storage", tenant.storage), ("storage_previous", tenant.storage_previous)):
        if server is not None:
            entry[field] = placement.storage_entry(placement.get_storage(registry, server))
    return entry


def apply_proxy(data: DataDir) -> str:
    """Reload a running HAProxy on the rendered config, or say how to start it (never fails: the files are written)."""
    try:
        result = reload_proxy(data.haproxy_cfg)
    except ProvisioningError as exc:
        return f"NOT reloaded: {exc}"
    return str(result) if result.pids else f"proxy not running: start it with 'haproxy -W -f {data.haproxy_cfg}'"


def admin_link(data: DataDir, tenant: Tenant, *, guard: bool = False) -> AdminLink:
    """How this service reaches the tenant's broker directly: as ``provisioning``, or as its retained-message guard."""
    files = data.tenant(tenant.name, tenant.broker_host)
    cert, key = files.guard if guard else (files.service_cert, files.service_key)
    return AdminLink(
        host=tenant.host,
        port=tenant.broker_port,
        ca_file=files.ca_cert,
        cert_file=cert,
        key_file=key,
        dial=tenant.broker_address,
    )


def get_tenant(registry: Registry, name: str) -> Tenant:
    tenant = registry.tenant(name)
    if tenant is None:
        known = ", ".join(t.name for t in registry.tenants()) or "none yet"
        raise ProvisioningError(f"no tenant {name!r} (tenants: {known})")
    return tenant


__all__ = [
    "CRL_DAYS",
    "RENEW_OVERLAP_S",
    "Created",
    "Settings",
    "admin_link",
    "apply_proxy",
    "bridge_identities",
    "broker_conf",
    "check_domain",
    "check_tenant_name",
    "create_tenant",
    "crl_entries",
    "crl_expires",
    "crl_serials",
    "get_tenant",
    "init",
    "issue_bridge_identity",
    "load_ca",
    "place_tenant",
    "plan_limit",
    "record",
    "render_proxy",
    "render_tenant",
    "renew_overlap",
    "wanted_dynsec",
    "write_crl",
]
