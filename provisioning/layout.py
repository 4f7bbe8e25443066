"""Where everything lives in the provisioning data directory.

::

    <data>/                              mode 0700: it holds every tenant's CA key
      registry.db                        tenants, keys (hashed), devices, certificates
      tenants.json                       each tenant's broker, for the bridge (tenants_from)
      api/ca.pem ca.key server.pem server.key   the API's own TLS, when not given --tls-cert
      haproxy/haproxy.cfg tenants.map admin.sock
      tenants/<tenant>/
        ca.pem ca.key crl.pem            the tenant's CA and its revocation list
        broker.pem broker.key            Mosquitto's server certificate (mqtt.<tenant>.<domain>)
        bridge.pem bridge.key            operators' command-line identity (CN bridge: commands, alerts)
        bridges/bridge.<instance>.pem .key   each bridge process's own identity (bridge run --instance)
        bridges/bridge-alerts.pem .key   the bridge's alert role (held by one process at a time)
        provisioning.pem provisioning.key   this service's client (ends revoked sessions, subscription rules)
        provisioning-guard.pem .key      the service's retained-message guard
        mosquitto.conf acl dynsec.json   the broker's configuration
        data/                            the broker's persistence (tenant on host local)
        technicians/                     technician certificates issued (keys are handed out, not kept)
      hosts/<host>/<tenant>/             a tenant placed on broker host <host> (any host but local)
        mosquitto.conf                   listens on the host's address; names the files in tenants/<tenant>/
        data/                            the broker's persistence on that host

A tenant on the host ``local`` (127.0.0.1, every tenant made before
placement existed) keeps its ``mosquitto.conf`` and ``data/`` in
``tenants/<tenant>/``; a tenant on another host has them in
``hosts/<host>/<tenant>/``, the directory a broker host runs its brokers
from (docs/provisioning.md, "Broker hosts").

Private keys are mode 0600, everything else 0644; directories 0700.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from factory_edge.errors import ProvisioningError
from factory_edge.files import write_atomic

DEFAULT_DATA_DIR = "/var/lib/factory-edge/provisioning"
DATA_DIR_ENV = "FE_PROVISIONING_DIR"
UNIX_SOCKET_MAX = 107  # sun_path, including the final NUL on Linux
PROXY_NAME_MAX = 8  # room kept in the admin socket's path for $FE_PROXY_NAME


LOCAL_HOST = "local"  # the broker host every tenant is on unless placed elsewhere (127.0.0.1)


@dataclass(frozen=True)
class TenantFiles:
    """A tenant's files; ``broker_dir``: where its broker's config and persistence are, if not in ``dir``."""

    dir: Path
    broker_dir: Path | None = None

    @property
    def name(self) -> str:
        return self.dir.name

    ca_cert = property(lambda self: self.dir / "ca.pem")
    ca_key = property(lambda self: self.dir / "ca.key")
    crl = property(lambda self: self.dir / "crl.pem")
    broker_cert = property(lambda self: self.dir / "broker.pem")
    broker_key = property(lambda self: self.dir / "broker.key")
    bridge_cert = property(lambda self: self.dir / "bridge.pem")
    bridge_key = property(lambda self: self.dir / "bridge.key")
    service_cert = property(lambda self: self.dir / "provisioning.pem")
    service_key = property(lambda self: self.dir / "provisioning.key")
    conf = property(lambda self: (self.broker_dir or self.dir) / "mosquitto.conf")
    acl = property(lambda self: self.dir / "acl")
    dynsec = property(lambda self: self.dir / "dynsec.json")
    persistence = property(lambda self: (self.broker_dir or self.dir) / "data")
    technicians = property(lambda self: self.dir / "technicians")
    bridges = property(lambda self: self.dir / "bridges")
    guard = property(lambda self: (self.dir / "provisioning-guard.pem", self.dir / "provisioning-guard.key"))

    def identity(self, name: str) -> tuple[Path, Path]:
        """``(cert, key)`` of a bridge identity (``bridge.<instance>`` or ``bridge-alerts``) under ``bridges/``."""
        return self.bridges / f"{name}.pem", self.bridges / f"{name}.key"


@dataclass(frozen=True)
class DataDir:
    root: Path

    @classmethod
    def resolve(cls, path: str | None) -> DataDir:
        """``--data-dir``, else ``$FE_PROVISIONING_DIR``, else /var/lib/factory-edge/provisioning; made absolute."""
        chosen = path or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
        return cls(Path(chosen).expanduser().resolve())

    registry = property(lambda self: self.root / "registry.db")
    tenants_index = property(lambda self: self.root / "tenants.json")
    api = property(lambda self: self.root / "api")
    haproxy = property(lambda self: self.root / "haproxy")
    haproxy_cfg = property(lambda self: self.root / "haproxy" / "haproxy.cfg")
    haproxy_map = property(lambda self: self.root / "haproxy" / "tenants.map")
    haproxy_socket = property(lambda self: self.root / "haproxy" / "admin.sock")

    @property
    def haproxy_socket_template(self) -> str:
        """The admin socket as haproxy.cfg names it: ``admin$FE_PROXY_NAME.sock`` (``admin.sock`` when unset).

        Several proxies on one machine run from the same files, each with
        its own ``FE_PROXY_NAME`` (``-p2``): a reload hands a new worker the
        listeners of the socket's owner, so two proxies must never share it.
        """
        return '"' + str(self.root / "haproxy" / "admin") + '${FE_PROXY_NAME-}.sock"'

    hosts = property(lambda self: self.root / "hosts")

    def tenant(self, name: str, host: str = LOCAL_HOST) -> TenantFiles:
        """The tenant's files, its broker's as placed on ``host``."""
        return TenantFiles(self.root / "tenants" / name, None if host == LOCAL_HOST else self.host_dir(host) / name)

    def host_dir(self, host: str) -> Path:
        """What broker host ``host`` runs: one ``<tenant>/mosquitto.conf`` per tenant placed there."""
        return self.hosts / host

    def exists(self) -> bool:
        return self.registry.exists()

    def require(self) -> None:
        """Refuse to work on a directory that was never set up (a typo in --data-dir)."""
        if not self.exists():
            raise ProvisioningError(
                f"{self.root} holds no registry: run 'provisioning init' or "
                "'provisioning tenant create' first, or check --data-dir / $FE_PROVISIONING_DIR"
            )

    def make(self) -> None:
        """Create the directory tree, private to its owner."""
        for directory in (self.root, self.api, self.haproxy, self.root / "tenants"):
            private_dir(directory)
        if len(str(self.haproxy_socket)) > UNIX_SOCKET_MAX - 1 - PROXY_NAME_MAX:
            raise ProvisioningError(
                f"data directory path {self.root} is too long for HAProxy's admin socket "
                f"({len(str(self.haproxy_socket))} > {UNIX_SOCKET_MAX - 1 - PROXY_NAME_MAX} characters)"
            )


def private_dir(path: Path) -> None:
    """``mkdir -p`` with mode 0700 (and make an existing one 0700)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise ProvisioningError(f"cannot create {path}: {exc.strerror}") from exc


def write_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a text file atomically (readers see the old or the new one, never half)."""
    try:
        write_atomic(path, text.encode(), mode)
    except OSError as exc:
        raise ProvisioningError(f"cannot write {path}: {exc.strerror}") from exc


__all__ = ["DATA_DIR_ENV", "DEFAULT_DATA_DIR", "LOCAL_HOST", "DataDir", "TenantFiles", "private_dir", "write_text"]
