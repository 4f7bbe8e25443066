"""``agent provision --url URL --key KEY [--name GW] [--ca-file F] [--state-dir D] [--force]``.

Run once on a new gateway. The key pair is made here and the private key
never leaves the box (mode 0600 from its first byte); only a CSR goes to
the provisioning API, over HTTPS verified against ``--ca-file`` or the
system's trust store. The answer (certificate, tenant CA, broker URL) is
checked, stored in the state directory as ``identity.json`` (what ``agent
run`` reads), and proven: the agent connects once to its broker and
publishes a ``provisioned`` event on ``gw/<gw>/events``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import threading
import time
from pathlib import Path
from typing import Any

from factory_edge import __version__
from factory_edge.errors import ConfigError, ProvisioningError
from factory_edge.mqtt import BrokerSettings, explain_connect_error, no_delay, tls_context

from .configtypes import DEFAULT_STATE_DIR
from .identity import IDENTITY_FILE, load_identity
from .renew import HTTP_TIMEOUT_S, ApiSettings, answer, api_context, check_issued, explain_http_error, renew_at

API_CA_FILE = "api-ca.pem"
CHECK_TIMEOUT_S = 10.0


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "provision",
        help="get this gateway's certificate with a provisioning key (run once)",
        description="Provision this gateway: make its key pair here (0600, never sent), send a CSR with the "
        "provisioning key to the HTTPS provisioning API, store the certificate, tenant CA and broker "
        "address in the state directory, connect once to the broker to prove it, and print a summary. "
        "A provisioned gateway is left alone unless --force.",
    )
    p.add_argument("--url", required=True, help="the provisioning API, https://host:port")
    p.add_argument("--key", required=True, help="the provisioning key (fek_…) from provisioning key create")
    p.add_argument("--name", metavar="GW", help="gateway id (default: this host's name)")
    p.add_argument("--ca-file", metavar="FILE", help="CA to verify the API's certificate (default: the system's)")
    p.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR, help=f"default {DEFAULT_STATE_DIR}")
    p.add_argument("--force", action="store_true", help="provision again, replacing the stored identity")
    p.set_defaults(handler=run)


def default_name() -> str:
    """This host's short name as a gateway id."""
    from factory_edge import pki

    host = socket.gethostname().split(".")[0].lower()
    name = re.sub(r"[^a-z0-9_.-]+", "-", host).strip("-_.")[:64]
    if not name or not pki.ID_RE.match(name) or pki.is_reserved(name):
        raise ProvisioningError(f"cannot make a gateway id of this host's name {host!r}: pass --name")
    return name


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: the agent's CLI loads this module for every command, and cryptography weighs 10 MB.
    from cryptography.hazmat.primitives import serialization

    from factory_edge import pki

    started = time.monotonic()
    state_dir = Path(args.state_dir).resolve()
    try:
        existing = load_identity(state_dir)
    except ConfigError:
        if not args.force:
            raise ProvisioningError(
                f"{state_dir / IDENTITY_FILE} is unreadable; use --force to provision again"
            ) from None
        existing = None
    if existing is not None and not args.force:
        raise ProvisioningError(
            f"already provisioned as {existing.gateway} for {existing.broker_url} "
            f"({state_dir / IDENTITY_FILE}); nothing changed: use --force to provision again"
        )
    if not args.url.startswith("https://"):
        raise ProvisioningError(
            f"--url {args.url!r}: the provisioning API is https://host:port (keys never go over plain HTTP)"
        )
    name = args.name or default_name()
    pki.check_id(name, what="gateway name")
    if pki.is_reserved(name):
        raise ProvisioningError(f"gateway name {name!r} is reserved for the bridge, technicians or the service")
    context = api_context(args.ca_file)
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)  # an existing directory too, whatever the umask made it: it holds the key
    except OSError as exc:
        raise ProvisioningError(f"cannot create the state directory {state_dir}: {exc.strerror}") from exc

    key = pki.new_key()
    key_file, cert_file, ca_file = state_dir / f"{name}.key", state_dir / f"{name}.pem", state_dir / "ca.pem"
    staged = state_dir / f".{name}.key.provisioning"
    pki.write_private_key(staged, key)  # on disk (0600) before anything is sent
    try:
        csr = pki.make_csr(key, name).public_bytes(serialization.Encoding.PEM).decode()
        url = args.url.rstrip("/") + "/v1/provision"
        import httpx  # here, not at the top: the agent's CLI loads this module for every command

        try:
            with httpx.Client(verify=context, timeout=HTTP_TIMEOUT_S) as client:
                response = client.post(url, json={"key": args.key, "csr": csr, "name": name})
        except httpx.HTTPError as exc:
            raise ProvisioningError(explain_http_error(exc, args.url)) from exc
        doc = answer(response)
        cert, ca = check_issued(doc, key, name)
        broker_url = str(doc.get("broker_url", ""))
        BrokerSettings.from_url(broker_url)  # refuse an answer we could not use
        pki.write_pem(ca_file, ca)
        pki.write_pem(cert_file, cert)
        staged.replace(key_file)
    finally:
        staged.unlink(missing_ok=True)
    api_ca = None
    if args.ca_file:
        api_ca = state_dir / API_CA_FILE
        pki.write_pem(api_ca, pki.load_cert(args.ca_file))
    ApiSettings(args.url.rstrip("/"), str(api_ca) if api_ca else None).save(state_dir)
    identity = {
        "gateway": name,
        "tenant": doc.get("tenant"),
        "broker_url": broker_url,
        "ca_file": ca_file.name,
        "cert_file": cert_file.name,
        "key_file": key_file.name,
    }
    pki.write_bytes(state_dir / IDENTITY_FILE, (json.dumps(identity, indent=2) + "\n").encode())
    if existing is not None:  # --force: the previous identity's files go, the new ones stay
        for old in (existing.cert_file, existing.key_file, existing.cert_file + ".new", existing.key_file + ".new"):
            if Path(old) not in (cert_file, key_file, ca_file):
                Path(old).unlink(missing_ok=True)
    provisioned_s = time.monotonic() - started

    settings = BrokerSettings.from_url(
        broker_url, ca_file=str(ca_file), cert_file=str(cert_file), key_file=str(key_file)
    )
    try:
        publish_ms = prove(settings, name)
    except ProvisioningError as exc:
        print_summary(args, state_dir, doc, cert, settings, None, provisioned_s)
        raise ProvisioningError(f"provisioned, but the broker check failed: {exc}") from exc
    print_summary(args, state_dir, doc, cert, settings, publish_ms, time.monotonic() - started)
    return 0


def prove(settings: BrokerSettings, gateway: str) -> float:
    """Connect with the new identity and publish a ``provisioned`` event at QoS 1; milliseconds to its PUBACK."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    started = time.monotonic()
    connack: dict[str, Any] = {}
    connected, acked = threading.Event(), threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{gateway}-provision", protocol=paho.MQTTv5)
    client.tls_set_context(tls_context(settings))
    client.connect_timeout = CHECK_TIMEOUT_S

    def on_connect(c: Any, u: Any, flags: Any, reason: Any, properties: Any) -> None:
        connack["reason"] = reason
        connected.set()

    def on_publish(c: Any, u: Any, mid: int, reason: Any, properties: Any) -> None:
        connack["puback"] = reason
        acked.set()

    client.on_connect, client.on_publish = on_connect, on_publish
    client.on_disconnect = lambda *a: connected.set()
    try:
        client.connect(settings.dial_host, settings.port, keepalive=30, clean_start=True)
    except Exception as exc:
        raise ProvisioningError(explain_connect_error(exc, settings)) from exc
    no_delay(client)
    client.loop_start()
    try:
        if not connected.wait(CHECK_TIMEOUT_S):
            raise ProvisioningError(f"no answer from {settings.describe()} within {CHECK_TIMEOUT_S:g}s")
        reason = connack.get("reason")
        if reason is None:
            raise ProvisioningError(
                f"{settings.describe()} closed the connection: the broker may have refused our "
                "certificate (revoked, or issued by a CA it does not trust)"
            )
        if reason.is_failure:
            raise ProvisioningError(f"the broker refused the connection: {reason}")
        event = {"type": "provisioned", "ts": int(time.time() * 1000), "version": __version__}
        client.publish(f"gw/{gateway}/events", json.dumps(event).encode(), qos=1)
        if not acked.wait(CHECK_TIMEOUT_S):
            raise ProvisioningError(f"the broker did not acknowledge a publish within {CHECK_TIMEOUT_S:g}s")
        if connack["puback"].is_failure:
            raise ProvisioningError(f"the broker refused a publish on gw/{gateway}/events: {connack['puback']}")
    finally:
        client.disconnect()
        client.loop_stop()
    return (time.monotonic() - started) * 1000


def print_summary(
    args: argparse.Namespace,
    state_dir: Path,
    doc: dict[str, Any],
    cert: Any,
    settings: BrokerSettings,
    publish_ms: float | None,
    elapsed_s: float,
) -> None:
    from factory_edge import pki

    gw = pki.common_name(cert)
    check = f"connected, published gw/{gw}/events in {publish_ms:.0f} ms" if publish_ms is not None else "NOT checked"
    own = shlex.join(
        [
            "mosquitto_sub",
            "-h",
            settings.host,
            "-p",
            str(settings.port),
            "--cafile",
            str(state_dir / "ca.pem"),
            "--cert",
            str(state_dir / f"{gw}.pem"),
            "--key",
            str(state_dir / f"{gw}.key"),
            "-V",
            "mqttv5",
            "-v",
            "-t",
            f"gw/{gw}/cmd/#",
        ]
    )
    tech = shlex.join(
        [
            "mosquitto_sub",
            "-h",
            settings.host,
            "-p",
            str(settings.port),
            "--cafile",
            "ca.pem",
            "--cert",
            "tech-NAME.pem",
            "--key",
            "tech-NAME.key",
            "-V",
            "mqttv5",
            "-v",
            "-t",
            f"gw/{gw}/#",
        ]
    )
    lines = [
        f"Provisioned {gw} in tenant {doc.get('tenant', '?')} ({elapsed_s:.2f} s)",
        f"  broker       {doc['broker_url']}  {check}",
        f"  certificate  {state_dir / (gw + '.pem')}  valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, "
        f"renewed by the agent from {renew_at(cert):%Y-%m-%d %H:%M} UTC",
        f"  private key  {state_dir / (gw + '.key')}  (0600, made here, never sent)",
        f"  tenant CA    {state_dir / 'ca.pem'}",
        f"  topic root   gw/{gw}/",
        f"  identity     {state_dir / IDENTITY_FILE}",
        "",
        f"Start it:  agent run --config FILE --state-dir {state_dir}",
        "Commands sent to this gateway (paste here, as root):",
        f"  {own}",
        f"Its data, with a technician certificate (provisioning technician-cert {doc.get('tenant', 'TENANT')} NAME):",
        f"  {tech}",
    ]
    print("\n".join(lines))
