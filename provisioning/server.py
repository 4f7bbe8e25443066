"""``provisioning serve``: the API on uvicorn over HTTPS, and the hourly CRL upkeep.

Without ``--tls-cert``/``--tls-key`` the service makes its own small CA
(``<data>/api/ca.pem``) and a server certificate for ``--tls-name`` (the
host's names by default); gateways then trust it with ``agent provision
--ca-file``. The server certificate is re-issued when the names change or
it nears expiry; the CA stays, so gateways keep trusting it.

Tasks: ``api`` (uvicorn); ``crl-refresh``, which re-issues every CRL
with fewer than four of its seven days left (or that must list more) and
reloads that broker, and re-applies every broker's subscription rules;
and ``retained[<tenant>]`` per tenant, the retained-message guard
(``provisioning.retained``), started for new tenants within seconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from factory_edge.errors import FactoryEdgeError, ProvisioningError
from factory_edge.logs import fields
from factory_edge.systemd import follow_server
from factory_edge.tasks import cancel_and_wait
from provisioning import pki, retained
from provisioning.admin import enforce_subscriptions, refresh_crls
from provisioning.layout import DataDir
from provisioning.ratelimit import FailureLimiter
from provisioning.registry import Registry, now
from provisioning.tenants import admin_link

log = logging.getLogger(__name__)

RENEW_SERVER_CERT_BELOW = dt.timedelta(days=30)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8443
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_names: tuple[str, ...] = ()
    cert_lifetime_s: float = 365 * 86400
    renew_from: float = 0.5
    max_failures: int = 10
    max_key_failures: int = 10
    max_tenant_failures: int = 100
    failure_window_s: float = 600.0
    crl_check_s: float = 3600.0
    api_per_source: int = 20
    api_max_connections: int = 512
    api_handshake_timeout_s: float = 5.0
    api_request_timeout_s: float = 10.0


def default_names(host: str) -> list[str]:
    names = [socket.getfqdn(), "localhost", "127.0.0.1", "::1"]
    if host not in ("0.0.0.0", "::", ""):
        names.insert(0, host)
    return list(dict.fromkeys(n for n in names if n))


def ensure_api_tls(data: DataDir, names: list[str]) -> tuple[Path, Path, Path]:
    """``(cert, key, ca)`` of the API's own TLS, made or refreshed under ``<data>/api``."""
    ca_file, ca_key_file = data.api / "ca.pem", data.api / "ca.key"
    cert_file, key_file = data.api / "server.pem", data.api / "server.key"
    if not ca_file.exists():
        new_ca_key, new_ca_cert = pki.create_ca("factory-edge provisioning API CA")
        pki.write_private_key(ca_key_file, new_ca_key)
        pki.write_pem(ca_file, new_ca_cert)
    ca_key, ca_cert = pki.load_private_key(ca_key_file), pki.load_cert(ca_file)
    if not cert_file.exists() or not key_file.exists() or _stale(pki.load_cert(cert_file), names):
        dns = [n for n in names if not _is_ip(n)]
        key = pki.new_key()
        cert = pki.issue_server_cert(
            ca_key, ca_cert, key.public_key(), dns[0] if dns else "localhost", days=397, alt_names=names
        )
        pki.write_private_key(key_file, key)
        pki.write_pem(cert_file, cert)
        log.info("API certificate issued", extra=fields(names=",".join(names), ca=str(ca_file)))
    return cert_file, key_file, ca_file


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _stale(cert: x509.Certificate, names: list[str]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    have = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    wanted = {str(ipaddress.ip_address(n)) if _is_ip(n) else n for n in names}
    return not wanted <= have or cert.not_valid_after_utc - now() < RENEW_SERVER_CERT_BELOW


async def crl_upkeep(data: DataDir, interval_s: float) -> None:
    """Re-issue CRLs before they expire or when they must list more, and re-apply subscription rules, forever.

    Task ``crl-refresh``. The subscription rules (``dynsec.sync``) are
    re-applied too, so a broker that was down or restored from a backup
    converges on the registry within one interval.
    """
    while True:
        try:
            for status in await asyncio.to_thread(refresh_crls, data):
                if status.reissued:
                    log.info(
                        "CRL refreshed",
                        extra=fields(
                            tenant=status.tenant, broker=status.broker, next_update=status.next_update.isoformat()
                        ),
                    )
            await asyncio.to_thread(enforce_subscriptions, data)
        except FactoryEdgeError as exc:
            log.error("CRL refresh failed", extra=fields(err=str(exc), retry_in_s=interval_s))
        await asyncio.sleep(interval_s)


async def guards(
    data: DataDir, group: asyncio.TaskGroup, tasks: list[asyncio.Task[None]], every_s: float = 5.0
) -> None:
    """Task ``retained``: a retained-message guard for every tenant, including ones created while serving."""
    started: set[str] = set()
    while True:
        try:
            with Registry(data.registry) as registry:
                found = registry.tenants()
        except FactoryEdgeError as exc:
            log.error("cannot list tenants for the retained-message guard", extra=fields(err=str(exc)))
            found = []
        for tenant in found:
            if tenant.name not in started and data.tenant(tenant.name, tenant.broker_host).guard[0].exists():
                started.add(tenant.name)
                tasks.append(
                    group.create_task(
                        retained.guard(tenant.name, admin_link(data, tenant, guard=True)),
                        name=f"retained[{tenant.name}]",
                    )
                )
        await asyncio.sleep(every_s)


async def serve(data: DataDir, options: ServeOptions) -> None:
    import uvicorn

    from provisioning.api import create_app
    from provisioning.gate import ApiLimits, GatedServer
    from provisioning.service import Service

    data.require()
    if (options.tls_cert is None) != (options.tls_key is None):
        raise ProvisioningError("--tls-cert and --tls-key go together")
    if options.tls_cert is not None and options.tls_key is not None:
        cert_file, key_file, ca_hint = options.tls_cert, options.tls_key, None
        for path in (cert_file, key_file):
            if not path.exists():
                raise ProvisioningError(f"{path}: no such file")
    else:
        cert_file, key_file, ca_hint = ensure_api_tls(data, list(options.tls_names) or default_names(options.host))
    try:  # refuse unusable TLS files with one line, before uvicorn would print a traceback
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ProvisioningError(f"cannot use {cert_file} and {key_file} for TLS: {exc}") from exc
    listener = _listen(options.host, options.port)
    window = options.failure_window_s
    service = Service(
        data,
        cert_lifetime_s=options.cert_lifetime_s,
        renew_from=options.renew_from,
        per_key=FailureLimiter(max_failures=options.max_key_failures, window_s=window),
        per_tenant=FailureLimiter(max_failures=options.max_tenant_failures, window_s=window),
    )
    limiter = FailureLimiter(max_failures=options.max_failures, window_s=window)
    config = uvicorn.Config(
        create_app(service, limiter),
        host=options.host,
        port=options.port,
        ssl_certfile=str(cert_file),
        ssl_keyfile=str(key_file),
        log_config=None,
        proxy_headers=False,
        server_header=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
        http="h11",  # the gate's request deadline reads h11's state
    )
    limits = ApiLimits(
        per_source=options.api_per_source,
        max_connections=options.api_max_connections,
        handshake_timeout_s=options.api_handshake_timeout_s,
        request_timeout_s=options.api_request_timeout_s,
    )
    server = GatedServer(config, listener, limits)
    log.info(
        "provisioning API starting",
        extra=fields(
            url=f"https://{options.host}:{options.port}", ca_file=str(ca_hint or cert_file), data_dir=str(data.root)
        ),
    )
    async with asyncio.TaskGroup() as group:
        upkeep = group.create_task(crl_upkeep(data, options.crl_check_s), name="crl-refresh")
        api = group.create_task(_run(server, listener), name="api")
        notify = group.create_task(
            follow_server(server, f"API on https://{options.host}:{options.port}"), name="systemd"
        )
        guarding: list[asyncio.Task[None]] = []
        watcher = group.create_task(guards(data, group, guarding), name="retained")
        try:
            await api
        finally:
            await cancel_and_wait(watcher)
            for task in guarding:
                await cancel_and_wait(task)
            await cancel_and_wait(notify)
            await cancel_and_wait(upkeep)


async def _run(server: Any, listener: socket.socket) -> None:
    try:
        await server.serve()  # GatedServer accepts on the listener itself
    except SystemExit as exc:  # uvicorn's way of saying it could not start
        raise ProvisioningError(f"the API could not start (exit {exc.code}); see the log above") from None
    finally:
        listener.close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ProvisioningError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


__all__ = ["ServeOptions", "default_names", "ensure_api_tls", "serve"]
