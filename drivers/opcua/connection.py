"""One OPC UA session with a device, and the one place asyncua errors are converted.

``open_session`` builds an asyncua ``Client`` for a configured device
(endpoint, timeout, security, user), connects, and resolves every tag to a
NodeId once for this connection. The client's own reconnect machinery is
left off: the driver decides when to retry, and a new session always starts
from a fresh client after the old one was closed.

Every asyncua, socket and crypto failure becomes a ``DriverError`` here
whose message is a short reason fit for a point's ``err``: ``timeout``,
``connection refused``, ``connection lost`` or an OPC UA status name such
as ``BadUserAccessDenied``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState
from asyncua.crypto import security_policies
from cryptography.exceptions import InvalidSignature

from factory_edge.errors import DriverError
from factory_edge.logs import fields

from ..configtypes import OpcuaDevice
from .security import CertificateFiles, application_uri, certificate_application_uri, ensure_certificate

log = logging.getLogger(__name__)

DEFAULT_PORT = 4840
SESSION_TIMEOUT_MS = 60_000
"""Long enough to ride out a blip; short enough that a session orphaned by a dead link expires soon."""
WATCHDOG_S = 1.0
"""How often asyncua probes the server's state, so a silent server is noticed within seconds."""

FAULTS = (ua.UaError, OSError, InvalidSignature)
"""What a machine, a network or a server can raise at us (TimeoutError and ConnectionError are OSErrors)."""

_MODES = {"Sign": ua.MessageSecurityMode.Sign, "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}


def describe(exc: BaseException) -> str:
    """A short reason for a failure, as a bad point's ``err`` shows it."""
    if isinstance(exc, DriverError):
        return str(exc)
    if isinstance(exc, ua.UaStatusCodeError):
        return ua.StatusCode(exc.code).name
    code = getattr(exc, "code", None)
    if isinstance(exc, ua.UaError) and isinstance(code, int):
        return ua.StatusCode(ua.UInt32(code)).name  # asyncua's ServiceError
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionError):
        return "connection lost"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, InvalidSignature):
        return "invalid signature from server"
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def converted() -> Iterator[None]:
    """Turn asyncua, socket and crypto failures into ``DriverError(reason)``."""
    try:
        yield
    except FAULTS as exc:
        raise DriverError(describe(exc)) from exc


@dataclass(eq=False)
class Session:
    """A connected client and this connection's view of the device's tags."""

    client: Client
    nodes: dict[str, ua.NodeId]
    """Tag name -> NodeId, for every tag that resolved."""
    unresolved: dict[str, str] = field(default_factory=dict)
    """Tag name -> why it has no NodeId (unknown browse path, invalid NodeId)."""
    read_all: ua.ReadParameters | None = None
    """The driver's Read request for every resolved tag, built once per session."""

    @property
    def alive(self) -> bool:
        return self.client.state is UaClientState.CONNECTED

    def read_parameters(self, tags: list[str]) -> ua.ReadParameters:
        """One Read request for the Value of ``tags``, asking for both timestamps."""
        params = ua.ReadParameters()
        params.MaxAge = 0
        params.TimestampsToReturn = ua.TimestampsToReturn.Both
        for tag in tags:
            item = ua.ReadValueId()
            item.NodeId = self.nodes[tag]
            item.AttributeId = ua.AttributeIds.Value
            params.NodesToRead.append(item)
        return params

    async def read(self, params: ua.ReadParameters) -> list[ua.DataValue]:
        """Send one Read request; failures raise ``DriverError``."""
        with converted():
            return await self.client.uaclient.read(params)

    async def write(self, tag: str, variant: ua.Variant) -> ua.StatusCode:
        """Write a tag's Value; returns the node's status for the write."""
        with converted():
            results = await self.client.uaclient.write_attributes(
                [self.nodes[tag]], [ua.DataValue(variant)], ua.AttributeIds.Value
            )
        return results[0]

    async def variant_type(self, tag: str) -> ua.VariantType | None:
        """The type of the value the node holds now (None when it holds none)."""
        params = self.read_parameters([tag])
        params.TimestampsToReturn = ua.TimestampsToReturn.Neither
        (value,) = await self.read(params)
        if (
            value.StatusCode is None
            or not value.StatusCode.is_good()
            or value.Value is None
            or value.Value.VariantType is ua.VariantType.Null
        ):
            return None
        return value.Value.VariantType


def endpoint_url(endpoint: str) -> str:
    """The endpoint with OPC UA's registered port 4840 when it names none."""
    parsed = urlsplit(endpoint)
    try:
        port = parsed.port
    except ValueError:
        raise DriverError(f"invalid port in endpoint {endpoint}") from None
    if port is None:
        return parsed._replace(netloc=f"{parsed.netloc}:{DEFAULT_PORT}").geturl()
    return endpoint


def client_certificate(device: OpcuaDevice, state_dir: Path) -> CertificateFiles:
    """The device's configured client certificate, or this host's generated one. Blocking."""
    security = device.security
    if security.cert_file and security.key_file:
        uri = certificate_application_uri(security.cert_file) or application_uri()
        return CertificateFiles(Path(security.cert_file), Path(security.key_file), uri)
    return ensure_certificate(
        state_dir, application_uri=application_uri(), common_name=f"factory-edge agent@{socket.gethostname()}"
    )


async def open_session(device: OpcuaDevice, certificate: CertificateFiles | None) -> Session:
    """Connect to the device and resolve its tags; raises ``DriverError`` with the reason."""
    client = Client(endpoint_url(device.endpoint), timeout=device.timeout, watchdog_intervall=WATCHDOG_S)
    client.name = "factory-edge agent"
    client.description = f"factory-edge {device.name}"
    client.product_uri = "urn:factory-edge"
    client.application_uri = certificate.application_uri if certificate else application_uri()
    client.session_timeout = SESSION_TIMEOUT_MS
    if device.username is not None:
        client.set_user(device.username)
    if device.password is not None:
        client.set_password(device.password)
    try:
        with converted():
            if device.security.policy != "None":
                if certificate is None:
                    raise DriverError(f"{device.security.policy} needs a client certificate")
                await _set_security(client, device, certificate)
            await client.connect()
    except BaseException:
        # A failed or cancelled connect leaves no socket open behind us.
        _close_transport(client)
        raise
    session = Session(client, {})
    try:
        await _resolve_tags(session, device)
    except BaseException:
        await close_session(session, timeout_s=device.timeout)
        raise
    return session


async def close_session(session: Session, *, timeout_s: float) -> None:
    """Close the session (and its subscriptions) on the server if it is still reachable, then the socket.

    ``timeout_s`` is the request timeout; the whole close takes at most
    about twice that. Never raises for a dead server: there is nothing left
    to tell it.
    """
    client = session.client
    try:
        # A margin over the request timeout, so asyncua's own CloseSession timeout fires first.
        async with asyncio.timeout(2 * timeout_s + 0.5):
            # disconnect() also stops asyncua's watchdog, renew and publish tasks.
            await client.disconnect()
    except TimeoutError:
        log.debug("session close timed out", extra=fields(endpoint=client.server_url.geturl()))
    finally:
        _close_transport(client)


async def _set_security(client: Client, device: OpcuaDevice, certificate: CertificateFiles) -> None:
    security = device.security
    try:
        await client.set_security(
            security_policies.SecurityPolicyBasic256Sha256,
            certificate=str(certificate.cert_file),
            private_key=str(certificate.key_file),
            server_certificate=security.server_cert_file,
            mode=_MODES[security.mode],
        )
    except ua.UaError as exc:
        if str(exc).startswith("No matching endpoints"):
            raise DriverError(f"server offers no {security.policy} {security.mode} endpoint") from exc
        raise
    except (ValueError, TypeError) as exc:  # cryptography: not a certificate, or an encrypted key
        raise DriverError(
            f"cannot load client certificate {certificate.cert_file} with key {certificate.key_file}: {exc}"
        ) from exc


async def _resolve_tags(session: Session, device: OpcuaDevice) -> None:
    """NodeIds for every tag: parsed from ``node:``, or translated from ``path:`` in one request."""
    paths: list[tuple[str, ua.RelativePath]] = []
    for tag in device.tags:
        if tag.node is not None:
            try:
                session.nodes[tag.name] = ua.NodeId.from_string(tag.node)
            except ua.UaError:
                session.unresolved[tag.name] = "invalid NodeId"
            continue
        try:
            paths.append((tag.name, ua.RelativePath.from_string(tag.path or "")))
        except ValueError:
            session.unresolved[tag.name] = "invalid browse path"
    if paths:
        with converted():
            results = await session.client.translate_browsepaths(
                ua.NodeId(ua.Int32(ua.ObjectIds.ObjectsFolder)), [path for _, path in paths]
            )
        for (name, _), result in zip(paths, results, strict=True):
            if result.StatusCode.is_good() and result.Targets:
                target = result.Targets[0].TargetId
                session.nodes[name] = ua.NodeId(target.Identifier, target.NamespaceIndex, target.NodeIdType)
            else:
                session.unresolved[name] = result.StatusCode.name if not result.StatusCode.is_good() else "BadNoMatch"
    for name, reason in session.unresolved.items():
        log.warning("tag not resolved", extra=fields(device=device.name, tag=name, err=reason))


def _close_transport(client: Client) -> None:
    # asyncua leaves the socket open when its watchdog has already marked
    # the client disconnected (a hung server); close it ourselves.
    client.disconnect_socket()
    protocol = client.uaclient.protocol
    if protocol is not None and not protocol.is_closed:
        protocol.disconnect_socket()
