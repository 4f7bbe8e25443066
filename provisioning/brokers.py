"""Acting on the running brokers and proxy: reload them, and end a revoked gateway's session.

The processes are found by their command line (``mosquitto -c <conf>``,
``haproxy … -f <cfg>``), however they were started: a systemd unit, a test
fixture, a shell. Signals need the same user (or root), which is why the
rendered ``mosquitto.conf`` keeps the provisioning user (``user``).

- Mosquitto, SIGHUP: re-reads its config, ACL and CRL (new handshakes only).
- HAProxy in master-worker mode (``-W``/``-Ws``), SIGUSR2 to the master: a
  new worker takes the listeners, the old one keeps every established
  connection until it ends, so other tenants are never cut off.
- A revoked gateway's live session: the tenant's Mosquitto loads the
  dynamic-security plugin, and this service (client certificate CN
  ``provisioning``, allowed only this by the ACL) sends it ``createClient``,
  ``disableClient`` and ``deleteClient`` for the gateway's name in one
  message. ``disableClient`` makes the broker kick every session of that
  username at once; the client is deleted again in the same breath, so the
  plugin never decides anything else (see ``render.mosquitto_conf``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import ssl
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory_edge.errors import ProvisioningError
from factory_edge.logs import fields

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
DYNSEC_PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)


def find_dynsec_plugin() -> str | None:
    """Mosquitto's dynamic-security plugin, where Debian, Alpine or a source build put it."""
    return next((path for path in DYNSEC_PLUGIN_PATHS if os.path.exists(path)), None)


# -- processes ---------------------------------------------------------------


def _processes() -> list[tuple[int, int, list[str]]]:
    """``(pid, ppid, argv)`` of every process we can see."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        found.append((int(entry.name), ppid, [a.decode(errors="replace") for a in argv if a]))
    return found


def _option(argv: list[str], flags: tuple[str, ...]) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg in flags:
            return argv[i + 1]
    return None


def find_process(program: str, flags: tuple[str, ...], path: Path) -> list[int]:
    """PIDs of ``program`` started with ``<flag> path`` (the topmost one when it forks workers)."""
    target = str(path.resolve())
    matches: dict[int, int] = {}
    for pid, ppid, argv in _processes():
        if not argv or os.path.basename(argv[0]) != program:
            continue
        value = _option(argv, flags)
        if value is None:
            continue
        try:  # a relative path is relative to the process's working directory
            base = Path("/") if os.path.isabs(value) else Path(f"/proc/{pid}/cwd").readlink()
            resolved = str((base / value).resolve())
        except OSError:
            resolved = value
        if resolved == target:
            matches[pid] = ppid
    return sorted(pid for pid, ppid in matches.items() if ppid not in matches)


@dataclass(frozen=True)
class Signalled:
    what: str
    pids: list[int]

    def __str__(self) -> str:
        return (
            f"{self.what} reloaded (pid {', '.join(map(str, self.pids))})" if self.pids else f"{self.what} not running"
        )


def _signal(pids: list[int], sig: signal.Signals, what: str) -> Signalled:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue
        except PermissionError as exc:
            raise ProvisioningError(
                f"cannot signal {what} (pid {pid}): permission denied; run provisioning as the user the brokers run as"
            ) from exc
    return Signalled(what, pids)


def reload_broker(conf: Path, tenant: str) -> Signalled:
    """SIGHUP the tenant's Mosquitto (config, ACL, CRL); not running is not an error."""
    return _signal(find_process("mosquitto", ("-c", "--config-file"), conf), signal.SIGHUP, f"broker {tenant}")


def reload_proxy(cfg: Path) -> Signalled:
    """Reload HAProxy without dropping a connection: SIGUSR2 to its master (``-W``)."""
    pids = find_process("haproxy", ("-f",), cfg)
    for pid in pids:
        argv = next((a for p, _, a in _processes() if p == pid), [])
        if not any(arg in ("-W", "-Ws") for arg in argv):
            raise ProvisioningError(
                f"haproxy (pid {pid}) runs without -W (master-worker), so it cannot reload "
                f"seamlessly: restart it as 'haproxy -W -f {cfg}'"
            )
    return _signal(pids, signal.SIGUSR2, "proxy")


# -- ending a session ------------------------------------------------------------


class _SniContext(ssl.SSLContext):
    """Dial 127.0.0.1 while presenting (and checking) the broker's own name."""

    sni_host = ""

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["server_hostname"] = self.sni_host
        return super().wrap_socket(sock, *args, **kwargs)


@dataclass(frozen=True)
class AdminLink:
    """How this service reaches one tenant's broker directly (not through the proxy)."""

    host: str  # mqtt.<tenant>.<domain>: SNI and certificate check
    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    dial: str = "127.0.0.1"


# dynamic-security answers that mean "already as wanted" for create/delete commands
ALREADY = ("already exists", "not found")


def sni_context(link: AdminLink) -> ssl.SSLContext:
    """TLS for dialling ``link.dial`` while presenting and checking the broker's name, with the service's certificate."""
    context = _SniContext(ssl.PROTOCOL_TLS_CLIENT)
    context.sni_host = link.host
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(link.ca_file))
        context.load_cert_chain(str(link.cert_file), str(link.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ProvisioningError(f"cannot load the service's broker credentials: {exc}") from exc
    return context


def send_commands(
    link: AdminLink,
    commands: list[dict[str, Any]],
    *,
    timeout_s: float = 5.0,
    tolerate: tuple[str, ...] = (),
    publish: Sequence[tuple[str, bytes, bool]] = (),
) -> list[dict[str, Any]]:
    """Send dynamic-security commands in one message and wait for the answers; ProvisioningError says why not.

    An answer whose error contains one of ``tolerate`` (``ALREADY``) is not
    a failure. ``publish``: ``(topic, payload, retain)`` messages to send on
    the same session afterwards (a revoked gateway's retained status).
    """
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    context = sni_context(link)
    response_topic = f"{CONTROL_TOPIC}/response"
    done = threading.Event()
    subscribed = threading.Event()
    answer: dict[str, Any] = {}
    # The broker replaces the client id by the certificate's CN (use_username_as_clientid).
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"provisioning-{uuid.uuid4().hex[:12]}", protocol=paho.MQTTv5
    )
    client.tls_set_context(context)
    client.on_connect = lambda c, u, f, reason, p: None if reason.is_failure else c.subscribe(response_topic, qos=1)
    client.on_subscribe = lambda *a: subscribed.set()

    def on_message(c: Any, u: Any, message: Any) -> None:
        try:
            answer.update(json.loads(message.payload))
        except ValueError:
            answer["error"] = "unreadable answer"
        done.set()

    client.on_message = on_message
    try:
        client.connect(link.dial, link.port, keepalive=10)
    except (OSError, ssl.SSLError) as exc:
        raise ProvisioningError(f"cannot reach the broker at {link.dial}:{link.port}: {exc}") from exc
    client.loop_start()
    try:
        if not subscribed.wait(timeout_s):
            raise ProvisioningError(f"broker {link.host} did not accept the service's session within {timeout_s:g}s")
        if commands:
            client.publish(CONTROL_TOPIC, json.dumps({"commands": commands}), qos=1)
            if not done.wait(timeout_s):
                raise ProvisioningError(
                    f"broker {link.host} did not answer within {timeout_s:g}s (is the dynamic-security plugin loaded?)"
                )
        responses = list(answer.get("responses", []))
        errors = [
            f"{r.get('command')}: {r['error']}"
            for r in responses
            if r.get("error") and not any(t in str(r["error"]).lower() for t in tolerate)
        ]
        if errors or "error" in answer:
            raise ProvisioningError(f"broker {link.host} refused: {'; '.join(errors) or answer.get('error')}")
        for topic, payload, retain in publish:
            client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
    return responses


def disconnect_gateway(
    link: AdminLink, gateway: str, *, timeout_s: float = 5.0, offline: bytes | None = None, role: str | None = None
) -> None:
    """End every session of ``gateway`` (any identity) on its broker now; ProvisioningError says why not.

    ``disableClient`` kicks every session of the username; the client (and
    ``role``, the identity's own dynamic-security role) is then deleted, so
    the name is forgotten by the plugin. ``offline``: a retained
    ``gw/<gateway>/status`` to publish afterwards (the kicked session leaves
    no will message).
    """
    started = time.monotonic()
    commands: list[dict[str, Any]] = [
        {"command": "createClient", "username": gateway},
        {"command": "disableClient", "username": gateway},
        {"command": "deleteClient", "username": gateway},
    ]
    if role is not None:
        commands.append({"command": "deleteRole", "rolename": role})
    publish = [(f"gw/{gateway}/status", offline, True)] if offline is not None else []
    send_commands(link, commands, timeout_s=timeout_s, tolerate=ALREADY, publish=publish)
    log.info(
        "session ended", extra=fields(broker=link.host, identity=gateway, ms=round((time.monotonic() - started) * 1000))
    )


__all__ = [
    "ALREADY",
    "AdminLink",
    "Signalled",
    "disconnect_gateway",
    "find_dynsec_plugin",
    "find_process",
    "reload_broker",
    "reload_proxy",
    "send_commands",
    "sni_context",
]
