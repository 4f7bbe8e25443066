"""MQTT v5 pieces the agent and the bridge share (paho-mqtt 2.x).

``BrokerSettings`` says where and how to connect; ``tls_context`` builds
the TLS context that presents the URL's host as SNI name whatever address
is dialled (``connect_host``); ``dial`` checks our certificate, connects and
turns every failure into a PublishError in a technician's words ("broker
certificate not trusted", "hostname mismatch", "is this a TLS port?");
``wait_connack`` and ``explain_disconnect`` do the same for the broker's
answer and for a lost connection. ``Connection`` holds one paho client
for one TCP connection and hands its callbacks to the event loop; each side
builds its own session on it: the agent's ``agent.mqtt.Link``, the bridge's
``bridge.mqtt.Session``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties

from .certdates import read_cert_dates
from .errors import ConfigError, PublishError
from .logs import fields

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to connect, resolved from the config or the provisioned identity."""

    host: str  # the URL's host: SNI name and certificate check
    port: int
    tls: bool
    connect_host: str | None = None  # dial this address instead of ``host``
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: float = 30.0
    connect_timeout_s: float = 10.0
    origin: str = "mqtt."  # where the file names came from, for errors: "plant.yaml: mqtt.", ".../identity.json: "

    @classmethod
    def from_url(cls, url: str, **options: Any) -> BrokerSettings:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(f"mqtt.url: expected mqtts://host:port, got {url!r}")
        tls = parts.scheme == "mqtts"
        return cls(host=parts.hostname, port=parts.port or (8883 if tls else 1883), tls=tls, **options)

    @property
    def dial_host(self) -> str:
        return self.connect_host or self.host

    def describe(self) -> str:
        via = f" via {self.connect_host}" if self.connect_host else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}{via}"


class _SniContext(ssl.SSLContext):
    """An SSL context that presents ``sni_host`` whatever address paho dialled.

    paho passes the host it connects to as ``server_hostname``; with
    ``connect_host`` that is an IP or a proxy address, while the SNI name
    and the certificate check must stay the broker URL's host.
    """

    sni_host: str = ""
    last_socket: ssl.SSLSocket | None = None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["server_hostname"] = self.sni_host
        # Kept so a failed handshake's socket can be closed: paho drops it.
        self.last_socket = super().wrap_socket(sock, *args, **kwargs)
        return self.last_socket


def tls_file_problems(settings: BrokerSettings) -> list[str]:
    """What is wrong with the CA, certificate and key files, one line each, naming the field and the file.

    Checked before dialling (and by ``agent check-config``), so a wrong path
    or a file of the wrong kind is a config error, not a failed connection.
    """
    # Here, not at the top: a gateway checks its files once, and cryptography weighs some 10 MB.
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    problems: list[str] = []

    def read(key: str, name: str) -> bytes | None:
        try:
            return Path(name).read_bytes()
        except FileNotFoundError:
            problems.append(f"{settings.origin}{key}: {name}: no such file")
        except IsADirectoryError:
            problems.append(f"{settings.origin}{key}: {name}: is a directory, not a file")
        except OSError as exc:
            problems.append(f"{settings.origin}{key}: {name}: cannot read: {exc.strerror}")
        return None

    if settings.ca_file and (data := read("ca_file", settings.ca_file)) is not None:
        try:
            x509.load_pem_x509_certificates(data)
        except ValueError:
            problems.append(
                f"{settings.origin}ca_file: {settings.ca_file}: not a PEM certificate "
                "(expected -----BEGIN CERTIFICATE-----)"
            )
    cert = key = None
    if settings.cert_file and (data := read("cert_file", settings.cert_file)) is not None:
        try:
            cert = x509.load_pem_x509_certificate(data)
        except ValueError:
            problems.append(
                f"{settings.origin}cert_file: {settings.cert_file}: not a PEM certificate "
                "(expected -----BEGIN CERTIFICATE-----)"
            )
    if settings.key_file and (data := read("key_file", settings.key_file)) is not None:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            problems.append(
                f"{settings.origin}key_file: {settings.key_file}: the key is encrypted; "
                "the agent needs an unencrypted key (mode 0600)"
            )
        except (ValueError, UnsupportedAlgorithm):
            problems.append(
                f"{settings.origin}key_file: {settings.key_file}: not a PEM private key "
                "(expected -----BEGIN PRIVATE KEY-----)"
            )
    if cert is not None and key is not None and not _same_public_key(cert, key):
        problems.append(
            f"{settings.origin}key_file: {settings.key_file}: not the key of the certificate {settings.cert_file}"
        )
    return problems


def _same_public_key(cert: Any, key: Any) -> bool:
    from cryptography.hazmat.primitives import serialization

    def spki(public: Any) -> bytes:
        return bytes(public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))

    return spki(cert.public_key()) == spki(key.public_key())


def _no_password() -> bytes:
    return b""


def tls_context(settings: BrokerSettings) -> ssl.SSLContext:
    """TLS >= 1.2, broker certificate verified against the CA and the URL's host; client cert if given.

    ConfigError, one line per problem, when a file is missing or not what its field says. The files
    are loaded by ``ssl`` first; only when it refuses one are they read again with ``cryptography``
    to say which and why (a gateway whose files are right never loads that package).
    """
    context = _SniContext(ssl.PROTOCOL_TLS_CLIENT)
    context.sni_host = settings.host
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        if settings.ca_file:
            context.load_verify_locations(cafile=settings.ca_file)
        else:
            context.load_default_certs()
        if settings.cert_file and settings.key_file:
            # An encrypted key fails here instead of OpenSSL asking for its password on a terminal.
            context.load_cert_chain(settings.cert_file, settings.key_file, password=_no_password)
    except (ssl.SSLError, OSError) as exc:
        problems = tls_file_problems(settings)
        if problems:
            raise ConfigError("\n".join(problems)) from None
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        raise ConfigError(
            f"{settings.origin.rstrip('.: ') or 'mqtt'}: cannot load TLS files "
            f"({settings.ca_file or 'system CAs'}, {settings.cert_file}): {reason}"
        ) from exc
    return context


def handshake_cut(exc: BaseException) -> bool:
    """True when the peer ended or garbled the TLS handshake: a plain listener, an SNI proxy without a route, or a refusal."""
    return (
        isinstance(exc, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError | EOFError)
        or "UNEXPECTED_EOF" in str(exc)
        or "WRONG_VERSION_NUMBER" in str(exc)
    )


# MQTT 3.1.1 CONNECT, clean session, empty client id: any MQTT broker answers it with a CONNACK (0x20).
_PLAIN_CONNECT = bytes.fromhex("100c00044d5154540402003c0000")


def answers_plain_mqtt(host: str, port: int, *, timeout_s: float = 2.0) -> bool:
    """True when ``host:port`` speaks MQTT without TLS (blocking: run it in a thread)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(_PLAIN_CONNECT)
            return sock.recv(1)[:1] == b"\x20"
    except OSError:
        return False


def explain_connect_error(exc: BaseException, settings: BrokerSettings, *, plain_mqtt: bool = False) -> str:
    """A one-line reason a TCP/TLS connection to the broker failed.

    ``plain_mqtt``: the port answered a plain MQTT CONNECT after the TLS handshake failed.
    """
    where = f"{settings.dial_host}:{settings.port}"
    if plain_mqtt:
        return (
            f"{where} is not a TLS port: it answered in plain MQTT; use the broker's TLS port "
            f"(usually 8883), or an mqtt:// URL for a plain listener"
        )
    if settings.tls and "WRONG_VERSION_NUMBER" in str(exc):
        return f"{where} did not answer in TLS: is it a TLS port? (mqtts:// needs a TLS listener, usually 8883)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        if "Hostname mismatch" in str(exc) or "IP address mismatch" in str(exc):
            return f"TLS: the broker's certificate is not valid for {settings.host} (hostname mismatch)"
        if "expired" in str(exc):
            return "TLS: the broker's certificate has expired"
        return f"TLS: broker certificate not trusted ({exc.verify_message}); check ca_file"
    if isinstance(exc, ssl.SSLEOFError) or "UNEXPECTED_EOF" in str(exc):
        return _closed_in_handshake(where, settings)
    if isinstance(exc, ssl.SSLError):
        text = str(exc)
        if "CERTIFICATE_EXPIRED" in text.upper() or "certificate expired" in text:
            return "TLS: the broker refused our certificate: it has expired"
        if "UNKNOWN_CA" in text.upper() or "unknown ca" in text:
            return "TLS: the broker refused our certificate: issued by a CA it does not trust"
        if "REVOKED" in text.upper():
            return "TLS: the broker refused our certificate: it has been revoked"
        if "HANDSHAKE_FAILURE" in text.upper() or "CERTIFICATE_REQUIRED" in text.upper():
            return f"TLS: handshake with {where} failed ({exc.reason}); a client certificate may be required"
        return f"TLS: handshake with {where} failed ({exc.reason or text})"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where}"
    if isinstance(exc, (TimeoutError, ssl.SSLZeroReturnError)):
        return f"no answer from {where} (timeout)"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | EOFError):
        return _closed_in_handshake(where, settings)
    if isinstance(exc, OSError):
        return f"cannot reach {where}: {exc.strerror or exc}"
    return f"cannot connect to {where}: {exc}"


def _closed_in_handshake(where: str, settings: BrokerSettings) -> str:
    return (
        f"{where} closed the connection during the TLS handshake (is it a TLS port? behind the SNI proxy: "
        f"unknown SNI name {settings.host}, or the broker refused our certificate)"
    )


# What a broker's DISCONNECT reason means to whoever reads the log (paho's own words are terse).
_SERVER_DISCONNECTS = {
    "Session taken over": "session taken over by another connection with our client id",
    "Server shutting down": "the broker is shutting down",
    "Keep alive timeout": "the broker heard nothing from us within the keepalive",
    "Not authorized": "the broker refused: not authorized",
    "Packet too large": "the broker refused a message larger than its max_packet_size",
    "Administrative action": "the broker ended our session (administrative action: revoked?)",
    "Quota exceeded": "the broker ended our session: quota exceeded",
    "Message rate too high": "the broker ended our session: message rate too high",
}


CLOSED_BY_BROKER = "the broker closed the connection"  # no DISCONNECT packet, no keepalive timeout: a bare close


def explain_disconnect(from_server: bool, reason: Any) -> str:
    """A lost connection in words: the broker's DISCONNECT reason, or what happened to the socket."""
    name = getattr(reason, "getName", lambda: str(reason))() if reason is not None else ""
    if from_server:
        return _SERVER_DISCONNECTS.get(name, f"the broker ended our session: {name.lower() or 'no reason given'}")
    if name == "Keep alive timeout":
        return "no answer from the broker within the keepalive (network down?)"
    if name == "Success":
        return "disconnected"
    return CLOSED_BY_BROKER


async def disconnect(client: paho.Client) -> None:
    """DISCONNECT, stop paho's network thread (in a worker thread: it joins) and close the client's sockets."""
    client.disconnect()
    await asyncio.get_running_loop().run_in_executor(None, client.loop_stop)
    # paho closes its wake-up socket pair only when the client is garbage
    # collected; a reconnecting process makes many clients, so close it now.
    reset = getattr(client, "_reset_sockets", None)
    if reset is not None:
        reset()


async def dial(
    client: paho.Client,
    settings: BrokerSettings,
    tls: ssl.SSLContext | None,
    properties: Properties,
    *,
    timeout_s: float,
) -> None:
    """Check our certificate, then TCP, TLS and CONNECT with a persistent session (blocking, so in a thread).

    PublishError says why not, in a technician's words; a socket left by a
    failed handshake is closed (paho drops it).
    """
    check_client_certificate(settings)
    client.connect_timeout = timeout_s
    try:
        await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: client.connect(
                settings.dial_host,
                settings.port,
                keepalive=int(settings.keepalive_s),
                clean_start=False,
                properties=properties,
            ),
        )
    except (OSError, ssl.SSLError, ValueError) as exc:
        failed = getattr(tls, "last_socket", None)
        if failed is not None:
            failed.close()
        plain = False
        if settings.tls and handshake_cut(exc):
            # A plain listener reads our ClientHello as a bad packet and hangs up: ask it in plain MQTT.
            plain = await asyncio.get_running_loop().run_in_executor(
                None, lambda: answers_plain_mqtt(settings.dial_host, settings.port, timeout_s=min(2.0, timeout_s))
            )
        raise PublishError(explain_connect_error(exc, settings, plain_mqtt=plain)) from exc
    no_delay(client)


def no_delay(client: paho.Client) -> None:
    """TCP_NODELAY on the client's socket.

    A batch is written as several TLS records; without it, Nagle's algorithm
    holds the last one until the broker's delayed ACK of the first (~40 ms),
    and small confirmations, commands and alerts wait likewise.
    """
    sock = client.socket()
    if isinstance(sock, socket.socket):  # an ssl.SSLSocket too
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def wait_connack(
    connack: asyncio.Future[str | None], settings: BrokerSettings, *, timeout_s: float
) -> str | None:
    """None once the broker accepted our CONNECT; otherwise why not, in a technician's words."""
    try:
        async with asyncio.timeout(timeout_s):
            refused = await asyncio.shield(connack)
    except TimeoutError:
        return f"no CONNACK from {settings.describe()} within {timeout_s:g}s"
    if refused and settings.tls and settings.cert_file and refused == "the broker closed the connection before CONNACK":
        # With TLS 1.3 the broker checks our certificate after the
        # handshake, so its refusal arrives as a closed connection.
        refused += ": it may have refused our certificate (revoked, or issued by a CA it does not trust)"
    return refused


def check_client_certificate(settings: BrokerSettings) -> None:
    """Refuse to dial with a client certificate that is expired or not yet valid: say so plainly."""
    if not (settings.tls and settings.cert_file):
        return
    try:
        data = Path(settings.cert_file).read_bytes()
        cert: Any = read_cert_dates(data)  # the dates alone, without loading cryptography on a gateway
        if cert is None:
            from cryptography import x509

            cert = x509.load_pem_x509_certificate(data)
    except (OSError, ValueError) as exc:
        raise PublishError(f"TLS: cannot read our certificate {settings.cert_file}: {exc}") from exc
    now = datetime.now(UTC)
    if cert.not_valid_after_utc < now:
        raise PublishError(
            f"TLS: our certificate {settings.cert_file} expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; renew it (agent provision --force)"
        )
    if cert.not_valid_before_utc > now:
        raise PublishError(
            f"TLS: our certificate {settings.cert_file} is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check the gateway's clock"
        )


PACKET_HEADROOM = 1024
"""Bytes of a PUBLISH that are not its payload's own, kept free below a broker's Maximum Packet Size: the fixed
header, the topic, the properties and a data batch's envelope (gateway, device, seq) around its points."""

# A clean close waits that long at most for its last word's acknowledgement: below the 1 s after which a stop
# cancels a task again (factory_edge.tasks), and far above a broker's answer on a working connection.
LAST_WORD_SETTLE_S = 0.5


def packet_size(topic: str, payload: bytes, properties: Properties | None = None) -> int:
    """Bytes of the PUBLISH packet for this message with a packet id (QoS 1), as a broker counts its maximum."""
    props = len(properties.pack()) if properties is not None else 1
    body = 2 + len(topic.encode("utf-8")) + 2 + props + len(payload)
    return 1 + (1 if body < 128 else 2 if body < 16_384 else 3 if body < 2_097_152 else 4) + body


class Connection:
    """One MQTT v5 connection; dies with its TCP connection (paho's own reconnect is off).

    paho's callbacks run on its network thread and are handed to the event
    loop; ``on_lost(reason)`` is called there once, with the reason in a
    technician's words. Subclasses add their callbacks and call ``_open``.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        inflight: int,
        on_lost: Callable[[str], None],
        will: tuple[str, bytes] | None = None,
        will_retain: bool = True,
        manual_ack: bool = False,
    ) -> None:
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.closed = asyncio.Event()
        self._connack: asyncio.Future[str | None] = self.loop.create_future()
        self._on_lost = on_lost
        self._last_sent: paho.MQTTMessageInfo | None = None  # the newest publish, for a settled close
        self._gone = False  # the TCP connection ended
        self.max_packet_size: int | None = None
        self._too_large: set[str] = set()  # topics of messages not sent for their size (logged once)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=False,
            manual_ack=manual_ack,
        )
        self.client.max_inflight_messages_set(inflight)
        self.client.max_queued_messages_set(0)
        self._tls: ssl.SSLContext | None = None
        if settings.tls:
            self._tls = tls_context(settings)
            self.client.tls_set_context(self._tls)
        if settings.username:
            self.client.username_pw_set(settings.username, settings.password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=will_retain)
        self.client.on_connect = self._paho_connect
        self.client.on_disconnect = self._paho_disconnect

    # paho thread -> event loop
    def _paho_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        # MQTT v5: the largest packet the broker accepts (absent: no limit); a larger one ends the connection.
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None)
        result = None if not reason.is_failure else f"the broker refused the connection: {reason}"
        self.loop.call_soon_threadsafe(self._connack_received, result)

    def _connack_received(self, result: str | None) -> None:
        if not self._connack.done():
            self._connack.set_result(result)

    def _paho_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        text = explain_disconnect(bool(getattr(flags, "is_disconnect_packet_from_server", False)), reason)
        self.loop.call_soon_threadsafe(self._lost, text)

    def _lost(self, reason: str) -> None:
        self._gone = True
        if not self._connack.done():
            self._connack.set_result(f"{reason} before CONNACK")
        self._abandon()
        if not self.closed.is_set():
            self.closed.set()
            self._on_lost(reason)

    def _abandon(self) -> None:
        """The connection is gone: answer whatever still waits on it (a subclass's pending requests)."""

    # event loop side
    async def _open(self, properties: Properties, *, timeout_s: float) -> None:
        """Dial, TLS, CONNECT and wait for CONNACK; PublishError says why not."""
        await dial(self.client, self.settings, self._tls, properties, timeout_s=timeout_s)  # sets TCP_NODELAY
        self.client.loop_start()
        refused = await wait_connack(self._connack, self.settings, timeout_s=timeout_s)
        if refused:
            await self.close()
            raise PublishError(refused)

    def fits(self, topic: str, payload: bytes, properties: Properties | None = None) -> bool:
        """Whether the broker takes this message (its Maximum Packet Size, said at CONNACK)."""
        limit = self.max_packet_size
        return limit is None or packet_size(topic, payload, properties) <= limit

    def _publish(
        self, topic: str, payload: bytes, *, qos: int, retain: bool, properties: Properties | None = None
    ) -> paho.MQTTMessageInfo | None:
        """Queue a publish (thread-safe in paho); None if the connection is gone or the message too large.

        A message larger than the broker's Maximum Packet Size is not sent (the broker would end the
        connection on it, and every other message with it): logged, once per topic and connection.
        """
        if not self.fits(topic, payload, properties):
            if topic not in self._too_large:
                self._too_large.add(topic)
                log.error(
                    "message larger than the broker accepts: not sent",
                    extra=fields(
                        topic=topic, bytes=packet_size(topic, payload, properties), max_packet_size=self.max_packet_size
                    ),
                )
            return None
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return None
        if qos > 0:  # acknowledged in order: the newest QoS 1 acknowledgement covers every earlier one
            self._last_sent = info
        return info

    async def close(self, *, settle_s: float = 0.0) -> None:
        """Disconnect cleanly (no will message; the broker keeps a persistent session) and stop paho's thread.

        ``settle_s``: first wait (that long at most) for the broker to acknowledge the newest QoS 1 publish, such as
        a last word (NDEATH, an offline status) just sent. paho closes its socket right after writing
        DISCONNECT; an acknowledgement still unread then makes that close a TCP reset, and a broker that had
        not yet read the DISCONNECT loses it with the reset and publishes our will as well: a second death.
        (A message the broker sends us in that last moment can still cause it; the bridge's will equals the
        STATE it says on leaving, the agent receives little.)
        """
        self.closed.set()
        sent = self._last_sent
        try:
            if settle_s > 0 and sent is not None and not self._gone:
                deadline = self.loop.time() + settle_s
                while not sent.is_published() and not self._gone and self.loop.time() < deadline:
                    await asyncio.sleep(0.01)
        finally:  # cancelled meanwhile (a stop insisting): DISCONNECT all the same
            await disconnect(self.client)
