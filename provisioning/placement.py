"""Placement: the broker hosts and storage servers tenants run on, and where a new tenant goes.

Provisioning knows two kinds of places (registry tables ``broker_hosts``
and ``storage_servers``):

- a **broker host** runs tenant Mosquittos: its ``address`` is what they
  listen on and what every SNI proxy dials (``server <address>:<port>``);
  the host ``local`` (127.0.0.1) exists from the start, so a deployment
  that never adds a host works as before;
- a **storage server** is a PostgreSQL server a tenant's data goes to:
  its ``dsn`` is written in the tenant's ``tenants.json`` entry (``storage``)
  for the bridge. A tenant on no storage server uses the bridge's own
  storage.

A new tenant goes where the operator says (``--host``, ``--storage``),
else to the least loaded place: the fewest tenants per unit of capacity
(ties: the name first in order); a place with capacity 0 takes tenants
only by name. The choice comes with its reason, which the CLI prints.

Moving a tenant is ``provisioning.moves``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from factory_edge import names
from factory_edge.errors import ProvisioningError
from provisioning.layout import LOCAL_HOST
from provisioning.registry import BrokerHost, Registry, StorageServer, iso, now

DEFAULT_CAPACITY = 100
STORAGE_CONNECT_TIMEOUT_S = 5  # a storage server being added answers within this, or is taken as unreachable
MAX_CAPACITY = 1_000_000


@dataclass(frozen=True)
class Choice:
    """Where a tenant goes and why (``name`` None: no storage server, the bridge's own storage)."""

    name: str | None
    reason: str


def check_place_name(name: str, what: str) -> str:
    """Host and storage names are DNS labels, like tenant names (they name directories and config lines)."""
    return names.check_tenant(name, what=what)


def check_capacity(capacity: int) -> int:
    if not 0 <= capacity <= MAX_CAPACITY:
        raise ProvisioningError(f"--capacity {capacity} is not in 0..{MAX_CAPACITY}")
    return capacity


def check_address(address: str) -> str:
    """An IPv4 address or a DNS name: it goes into Mosquitto's ``listener`` and HAProxy's ``server`` lines."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        if names.is_host(address):
            return address
        raise ProvisioningError(f"--address {address!r} is not an IPv4 address or a lowercase DNS name") from None
    if ip.version != 4:
        raise ProvisioningError(f"--address {address}: give an IPv6 host by its DNS name")
    if ip.is_unspecified:
        raise ProvisioningError(f"--address {address}: brokers need the host's own address, not 0.0.0.0")
    return address


def _masked(dsn: str) -> str:
    """``dsn`` fit to print: a password in it (key=value or URL form) replaced by ***."""
    dsn = re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", dsn, flags=re.IGNORECASE)
    dsn = re.sub(r"([?&]password=)[^&]*", r"\1***", dsn, flags=re.IGNORECASE)
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)


def check_dsn(dsn: str) -> str:
    """A PostgreSQL connection string the bridge can use, without a password (it is written to tenants.json)."""
    from psycopg import conninfo

    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except Exception as exc:  # psycopg.ProgrammingError: the one place this library is called
        reason = _masked(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise ProvisioningError(f"--dsn {_masked(dsn)!r} is not a PostgreSQL connection string: {reason}") from None
    if parts.get("password"):
        raise ProvisioningError(
            "--dsn carries a password, which would be written to tenants.json: give the bridge's user "
            "a ~/.pgpass (or PGPASSFILE) entry instead"
        )
    if not parts.get("dbname"):
        raise ProvisioningError(f"--dsn {_masked(dsn)!r} names no database (postgresql://user@host:5432/DBNAME)")
    return dsn


def add_host(registry: Registry, name: str, address: str, capacity: int = DEFAULT_CAPACITY) -> BrokerHost:
    check_place_name(name, "host name")
    check_address(address)
    check_capacity(capacity)
    with registry.transaction():
        existing = registry.host(name)
        if existing is not None:
            raise ProvisioningError(f"host {name} already exists (address {existing.address})")
        taken = next((h for h in registry.hosts() if h.address == address), None)
        if taken is not None:
            raise ProvisioningError(f"address {address} is already host {taken.name}'s")
        host = BrokerHost(name=name, address=address, capacity=capacity, created_at=iso(now()) or "")
        registry.add_host(host)
    return host


def _identity(dsn: str) -> tuple[str | None, str]:
    """``(the PostgreSQL system identifier and database behind dsn, "")``: two DSNs of one database give the same;
    ``(None, why)`` if it cannot be reached within ``STORAGE_CONNECT_TIMEOUT_S``."""
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=STORAGE_CONNECT_TIMEOUT_S, autocommit=True) as conn:
            row = conn.execute("SELECT system_identifier::text, current_database() FROM pg_control_system()").fetchone()
    except psycopg.Error as exc:
        text = str(exc).strip()
        return None, _masked(" ".join(text.splitlines()[0].split()) if text else type(exc).__name__)
    assert row is not None
    return f"{row[0]}/{row[1]}", ""


def add_storage(
    registry: Registry, name: str, dsn: str, capacity: int = DEFAULT_CAPACITY, *, check: bool = True
) -> StorageServer:
    """Register a storage server. ``check``: connect to it first (refused if it cannot be reached, or if it is
    a database already registered under another name, as a host alias or another spelling of one DSN)."""
    check_place_name(name, "storage name")
    check_dsn(dsn)
    check_capacity(capacity)
    if check:
        identity, reason = _identity(dsn)
        if identity is None:
            raise ProvisioningError(
                f"storage server {name}: cannot connect with --dsn {_masked(dsn)!r}: {reason} (the bridges must "
                "reach it; --no-check registers it all the same)"
            )
        for other in registry.storage_servers():
            if other.name != name and _identity(other.dsn)[0] == identity:
                raise ProvisioningError(
                    f"--dsn {_masked(dsn)!r} is the database of storage server {other.name} "
                    "(the same PostgreSQL system and database)"
                )
    with registry.transaction():
        existing = registry.storage_server(name)
        if existing is not None:
            raise ProvisioningError(f"storage server {name} already exists")
        server = StorageServer(name=name, dsn=dsn, capacity=capacity, created_at=iso(now()) or "")
        registry.add_storage_server(server)
    return server


def get_host(registry: Registry, name: str) -> BrokerHost:
    host = registry.host(name)
    if host is None:
        known = ", ".join(h.name for h in registry.hosts())
        raise ProvisioningError(f"no broker host {name!r} (hosts: {known}; add one with 'provisioning host add')")
    return host


def get_storage(registry: Registry, name: str) -> StorageServer:
    server = registry.storage_server(name)
    if server is None:
        known = ", ".join(s.name for s in registry.storage_servers()) or "none yet"
        raise ProvisioningError(
            f"no storage server {name!r} (storage servers: {known}; add one with 'provisioning storage add')"
        )
    return server


def set_host_capacity(registry: Registry, name: str, capacity: int) -> BrokerHost:
    check_capacity(capacity)
    with registry.transaction():
        get_host(registry, name)
        registry.set_host_capacity(name, capacity)
    return get_host(registry, name)


def set_storage_capacity(registry: Registry, name: str, capacity: int) -> StorageServer:
    check_capacity(capacity)
    with registry.transaction():
        get_storage(registry, name)
        registry.set_storage_capacity(name, capacity)
    return get_storage(registry, name)


def host_load(registry: Registry) -> dict[str, int]:
    """Tenants per broker host (every host listed, 0 included)."""
    load = {h.name: 0 for h in registry.hosts()}
    for tenant in registry.tenants():
        load[tenant.broker_host] = load.get(tenant.broker_host, 0) + 1
    return load


def storage_load(registry: Registry) -> dict[str, int]:
    """Tenants per storage server (every server listed, 0 included)."""
    load = {s.name: 0 for s in registry.storage_servers()}
    for tenant in registry.tenants():
        if tenant.storage is not None:
            load[tenant.storage] = load.get(tenant.storage, 0) + 1
    return load


def _least_loaded(places: Sequence[tuple[str, int]], load: dict[str, int], what: str) -> Choice | None:
    """The place with the fewest tenants per unit of capacity; the reason lists every candidate's figure."""
    candidates = [(name, capacity) for name, capacity in places if capacity > 0]
    if not candidates:
        return None
    ranked = sorted(candidates, key=lambda c: (load.get(c[0], 0) / c[1], c[0]))
    best = ranked[0][0]
    figures = ", ".join(f"{name} {load.get(name, 0)}/{capacity}" for name, capacity in ranked)
    return Choice(best, f"least loaded {what} (tenants/capacity: {figures})")


def choose_host(registry: Registry, requested: str | None) -> Choice:
    """The broker host a new tenant goes on: ``requested``, else the least loaded."""
    if requested is not None:
        host = get_host(registry, requested)
        return Choice(host.name, f"host {host.name} as requested ({host.address})")
    choice = _least_loaded([(h.name, h.capacity) for h in registry.hosts()], host_load(registry), "host")
    if choice is None:
        raise ProvisioningError("every broker host has capacity 0: name one with --host, or raise a capacity")
    return choice


def choose_storage(registry: Registry, requested: str | None) -> Choice:
    """The storage server a new tenant goes on: ``requested``, else the least loaded, else none."""
    if requested is not None:
        server = get_storage(registry, requested)
        return Choice(server.name, f"storage {server.name} as requested")
    servers = registry.storage_servers()
    choice = _least_loaded([(s.name, s.capacity) for s in servers], storage_load(registry), "storage server")
    if choice is None:
        why = "no storage server registered" if not servers else "every storage server has capacity 0"
        return Choice(None, f"the bridge's own storage ({why})")
    return choice


def storage_entry(server: StorageServer | None) -> dict[str, str] | None:
    """A tenant's ``storage`` in tenants.json: what the bridge's StorageConfig reads."""
    return None if server is None else {"backend": "postgres", "dsn": server.dsn}


__all__ = [
    "DEFAULT_CAPACITY",
    "LOCAL_HOST",
    "Choice",
    "add_host",
    "add_storage",
    "check_address",
    "check_dsn",
    "choose_host",
    "choose_storage",
    "get_host",
    "get_storage",
    "host_load",
    "set_host_capacity",
    "set_storage_capacity",
    "storage_entry",
    "storage_load",
]
