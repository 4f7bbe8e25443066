"""Fleet configuration: each gateway's desired configuration, versioned, pushed over MQTT, compared with what runs.

The registry keeps every version of a gateway's agent configuration
(``gateway_configs``: tenant, gateway, version, hash, yaml, note, when
stored, when last pushed). ``push`` publishes the newest (or a chosen)
version on ``gw/<gw>/cmd/config`` of the tenant's broker as the operators'
identity (CN ``bridge``: the ACL lets only bridge identities write there)
and waits for the agent's answer on ``gw/<gw>/cmd/config/reply``.

What runs is what each agent says in its retained ``gw/<gw>/status``:
``config_hash``, ``config_version`` and ``config`` (source, the last
push's outcome). ``drift`` reads those (a subscription to
``gw/+/status``: the broker hands over every retained status at once) and
compares them with the desired configuration. The hash is the first 12
hex digits of SHA-256 over the YAML's bytes, computed the same way on both
sides, so a local edit on the gateway shows as drift even when it carries
no version.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import yaml

from factory_edge import names
from factory_edge.configfile import parse_yaml
from factory_edge.errors import ConfigError, FactoryEdgeError, ProvisioningError
from factory_edge.mqtt import PACKET_HEADROOM
from provisioning.brokers import AdminLink, sni_context
from provisioning.errors import Invalid, NotFound
from provisioning.layout import DataDir
from provisioning.registry import Registry, Tenant, iso, now
from provisioning.render import MAX_PACKET_SIZE
from provisioning.tenants import get_tenant

MAX_CONFIG_BYTES = 4 * 1024 * 1024  # what the agent takes (agent/remote.py)
SETTLE_S = 0.5  # retained statuses arrive together right after SUBACK; this long without a new one ends the read
READ_MAX_S = 5.0  # and this long at most: a gateway republishing its status endlessly must not hold the read


def config_hash(text: str) -> str:
    """The agent's config hash: SHA-256 of the YAML's bytes, first 12 hex digits."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class StoredConfig:
    tenant: str
    gateway: str
    version: int
    hash: str
    yaml: str
    note: str | None
    created_at: str
    pushed_at: str | None

    def as_json(self, *, with_yaml: bool = False) -> dict[str, Any]:
        doc = {
            "tenant": self.tenant,
            "gateway": self.gateway,
            "version": self.version,
            "hash": self.hash,
            "note": self.note,
            "created_at": self.created_at,
            "pushed_at": self.pushed_at,
        }
        if with_yaml:
            doc["yaml"] = self.yaml
        return doc


def push_size(text: str) -> int:
    """Bytes of the push's payload (``fleet.push``) for this text, the largest version number included."""
    return len(json.dumps({"version": 2**63, "config": text}).encode())


def check_config_text(text: str, source: str) -> None:
    """What the cloud side can check without the gateway's drivers: size, YAML, a mapping with devices."""
    try:
        size = len(text.encode())
    except UnicodeEncodeError as exc:  # JSON carries lone surrogates ("\ud800"), which no agent can read
        raise Invalid(f"{source}: not UTF-8 text ({exc.reason} at character {exc.start})") from None
    if size > MAX_CONFIG_BYTES:
        raise Invalid(f"{source}: larger than the {MAX_CONFIG_BYTES} bytes an agent takes")
    pushed = push_size(text)
    if pushed > MAX_PACKET_SIZE - PACKET_HEADROOM:
        raise Invalid(
            f"{source}: {pushed} bytes once pushed (as JSON), more than the broker's max_packet_size of "
            f"{MAX_PACKET_SIZE} bytes allows: write repeated tags as profiles and ranges (docs/config.md)"
        )
    try:
        data = parse_yaml(text, source, yaml.SafeLoader)
    except ConfigError as exc:
        raise Invalid(str(exc)) from None
    if not isinstance(data, dict):
        raise Invalid(f"{source}: an agent config is a mapping of keys (docs/config.md)")
    if not data.get("devices"):
        raise Invalid(f"{source}: devices: none configured, so the agent would poll nothing")


def _row(row: dict[str, Any]) -> StoredConfig:
    return StoredConfig(**row)


def store(
    data: DataDir, tenant_name: str, gateway: str, text: str, *, source: str, note: str | None = None
) -> StoredConfig:
    """A new version of the gateway's desired configuration (or the newest, if it is the same text)."""
    try:
        names.check_gateway(gateway)
    except FactoryEdgeError as exc:
        raise Invalid(str(exc)) from None
    check_config_text(text, source)
    digest = config_hash(text)
    with Registry(data.registry) as registry, registry.transaction():
        get_tenant(registry, tenant_name)
        latest = _latest(registry, tenant_name, gateway)
        if latest is not None and latest.hash == digest:
            return latest
        version = (latest.version if latest else 0) + 1
        registry.db.execute(
            "INSERT INTO gateway_configs (tenant, gateway, version, hash, yaml, note, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [tenant_name, gateway, version, digest, text, note, iso(now())],
        )
        found = get(registry, tenant_name, gateway, version)
    assert found is not None
    return found


def _latest(registry: Registry, tenant: str, gateway: str) -> StoredConfig | None:
    rows = list(
        registry.db.query(
            "SELECT * FROM gateway_configs WHERE tenant = ? AND gateway = ? ORDER BY version DESC LIMIT 1",
            [tenant, gateway],
        )
    )
    return _row(rows[0]) if rows else None


def get(registry: Registry, tenant: str, gateway: str, version: int | None = None) -> StoredConfig | None:
    if version is None:
        return _latest(registry, tenant, gateway)
    rows = list(
        registry.db.query(
            "SELECT * FROM gateway_configs WHERE tenant = ? AND gateway = ? AND version = ?", [tenant, gateway, version]
        )
    )
    return _row(rows[0]) if rows else None


def show(data: DataDir, tenant_name: str, gateway: str, version: int | None = None) -> StoredConfig:
    with Registry(data.registry) as registry:
        get_tenant(registry, tenant_name)
        found = get(registry, tenant_name, gateway, version)
    if found is None:
        which = f"version {version}" if version is not None else "configuration"
        raise NotFound(f"no {which} stored for gateway {gateway!r} of tenant {tenant_name!r}")
    return found


def desired(registry: Registry, tenant: str) -> dict[str, StoredConfig]:
    """The newest stored configuration of every gateway of the tenant."""
    rows = registry.db.query(
        "SELECT c.* FROM gateway_configs c JOIN (SELECT gateway, MAX(version) AS version FROM gateway_configs "
        "WHERE tenant = ? GROUP BY gateway) m ON c.gateway = m.gateway AND c.version = m.version "
        "WHERE c.tenant = ? ORDER BY c.gateway",
        [tenant, tenant],
    )
    return {r["gateway"]: _row(r) for r in rows}


# -- the tenant's broker -----------------------------------------------------------


def operator_link(data: DataDir, tenant: Tenant) -> AdminLink:
    """The operators' identity (CN ``bridge``) on the tenant's broker, dialled directly."""
    files = data.tenant(tenant.name, tenant.broker_host)
    return AdminLink(
        host=tenant.host, port=tenant.broker_port, ca_file=files.ca_cert, cert_file=files.bridge_cert,
        key_file=files.bridge_key,
    )  # fmt: skip


class _Session:
    """A short paho session as the operator: subscribe, publish, collect; closed on exit."""

    def __init__(self, link: AdminLink, topics: list[str]) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.link = link
        self.messages: list[tuple[str, bytes, Any]] = []
        self.lock = threading.Lock()
        self.arrived = threading.Event()
        self.subscribed = threading.Event()
        self.refused: str | None = None
        # The broker binds the client id to the certificate's CN (use_identity_as_username, client id checks).
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=names.BRIDGE_ID, protocol=paho.MQTTv5)
        self.client.tls_set_context(sni_context(link))
        self.client.on_connect = lambda c, u, f, reason, p: (
            c.subscribe([(t, 1) for t in topics]) if not reason.is_failure else self._refuse(str(reason))
        )
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._message

    def _refuse(self, reason: str) -> None:
        self.refused = reason
        self.subscribed.set()

    def _message(self, client: Any, userdata: Any, message: Any) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload), getattr(message, "properties", None)))
        self.arrived.set()

    def __enter__(self) -> _Session:
        try:
            self.client.connect(self.link.dial, self.link.port, keepalive=10)
        except (OSError, ValueError) as exc:
            raise ProvisioningError(
                f"cannot reach the broker {self.link.host} at {self.link.dial}:{self.link.port}: {exc}"
            ) from exc
        self.client.loop_start()
        if not self.subscribed.wait(5) or self.refused:
            self.__exit__()
            raise ProvisioningError(
                f"broker {self.link.host} did not accept the operator's session: {self.refused or 'no answer'}"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def push(
    data: DataDir,
    tenant_name: str,
    gateway: str,
    *,
    version: int | None = None,
    timeout_s: float = 10.0,
    wait_s: float | None = None,
) -> dict[str, Any]:
    """Publish a stored version to the gateway and return its answer (``applying`` or ``rejected`` with reasons).

    ``wait_s``: after ``applying``, wait this long for the outcome the gateway's retained status reports
    (``applied`` or ``rolled_back`` with its reason), and return that instead.
    """
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    with Registry(data.registry) as registry:
        tenant = get_tenant(registry, tenant_name)
        stored = get(registry, tenant_name, gateway, version)
    if stored is None:
        raise NotFound(
            f"no {'version ' + str(version) if version else 'configuration'} stored for gateway {gateway!r}: "
            f"provisioning config set {tenant_name} {gateway} FILE"
        )
    reply_topic = f"gw/{gateway}/cmd/config/reply"
    status_topic = f"gw/{gateway}/status"
    correlation = uuid.uuid4().bytes
    with _Session(operator_link(data, tenant), [reply_topic, status_topic]) as session:
        properties = Properties(PacketTypes.PUBLISH)
        properties.CorrelationData = correlation
        properties.ResponseTopic = reply_topic
        payload = json.dumps({"version": stored.version, "config": stored.yaml})
        info = session.client.publish(f"gw/{gateway}/cmd/config", payload, qos=1, properties=properties)
        info.wait_for_publish(timeout_s)
        with Registry(data.registry) as registry:
            registry.db.execute(
                "UPDATE gateway_configs SET pushed_at = ? WHERE tenant = ? AND gateway = ? AND version = ?",
                [iso(now()), tenant_name, gateway, stored.version],
            )

        def answer() -> dict[str, Any] | None:
            for topic, body, props in session.messages:
                if topic == reply_topic and getattr(props, "CorrelationData", None) == correlation:
                    found: dict[str, Any] = json.loads(body)
                    return found
            return None

        def outcome() -> dict[str, Any] | None:
            for topic, body, _ in reversed(session.messages):
                if topic == status_topic:
                    try:
                        last = (json.loads(body).get("config") or {}).get("last") or {}
                    except (ValueError, AttributeError):
                        continue
                    if last.get("version") == stored.version and last.get("hash") == stored.hash:
                        if last.get("state") in ("applied", "rolled_back"):
                            return dict(last)
            return None

        reply = _until(session, answer, timeout_s)
        if reply is None:
            raise ProvisioningError(
                f"gateway {gateway} did not answer within {timeout_s:g}s (offline? the broker keeps the push for "
                "its session; 'provisioning config status' shows when it applied it)"
            )
        if wait_s is None or reply.get("state") != "applying":
            return reply
        final = _until(session, outcome, wait_s)
        if final is None:
            raise ProvisioningError(
                f"gateway {gateway} is still applying version {stored.version} after {wait_s:g}s "
                "('provisioning config status' shows how it ends)"
            )
        return {
            "ok": final["state"] == "applied",
            "state": final["state"],
            "version": stored.version,
            "hash": stored.hash,
            **({"error": final["reason"], "reasons": [final["reason"]]} if final.get("reason") else {}),
        }


def _until(session: _Session, find: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        with session.lock:
            found = find()
        if found is not None or time.monotonic() >= deadline:
            return found
        session.arrived.clear()
        session.arrived.wait(0.1)


def running(data: DataDir, tenant_name: str, *, settle_s: float = SETTLE_S) -> dict[str, dict[str, Any]]:
    """Every gateway's retained status on the tenant's broker."""
    with Registry(data.registry) as registry:
        tenant = get_tenant(registry, tenant_name)
    with _Session(operator_link(data, tenant), ["gw/+/status"]) as session:
        seen = 0
        until = time.monotonic() + max(settle_s, READ_MAX_S)
        while time.monotonic() < until:
            session.arrived.clear()
            if not session.arrived.wait(settle_s):
                with session.lock:
                    if len(session.messages) == seen:
                        break
            with session.lock:
                seen = len(session.messages)
        with session.lock:
            messages = list(session.messages)
    found: dict[str, dict[str, Any]] = {}
    for topic, body, _ in messages:
        try:
            doc = json.loads(body)
        except ValueError:
            continue
        if isinstance(doc, dict):  # a gateway writes its own status: keep only what has the documented shape
            given = doc.get("config")
            config: dict[str, Any] = given if isinstance(given, dict) else {}
            last = config.get("last")
            config = {**config, "last": last if isinstance(last, dict) else None}
            found[topic.split("/")[1]] = {
                **doc,
                "config": config,
                "config_hash": doc["config_hash"] if isinstance(doc.get("config_hash"), str) else None,
            }
    return found


def drift(data: DataDir, tenant_name: str, gateway: str | None = None) -> list[dict[str, Any]]:
    """Desired against running, per gateway: ``in sync``, ``drift``, ``not pushed`` or ``no status``."""
    statuses = running(data, tenant_name)
    with Registry(data.registry) as registry:
        wanted = desired(registry, tenant_name)
    rows = []
    for gw in sorted(set(wanted) | set(statuses)):
        if gateway is not None and gw != gateway:
            continue
        want, status = wanted.get(gw), statuses.get(gw)
        config = (status or {}).get("config") or {}
        row: dict[str, Any] = {
            "gateway": gw,
            "desired_version": want.version if want else None,
            "desired_hash": want.hash if want else None,
            "running_version": (status or {}).get("config_version"),
            "running_hash": (status or {}).get("config_hash"),
            "source": config.get("source"),
            "online": (status or {}).get("state") == "online",
            "last": config.get("last"),
        }
        if want is None:
            row["state"] = "not pushed"
        elif status is None:
            row["state"] = "no status"
        elif row["running_hash"] == want.hash:
            row["state"] = "in sync"
        else:
            row["state"] = "drift"
        rows.append(row)
    if gateway is not None and not rows:
        raise ProvisioningError(f"gateway {gateway!r} of tenant {tenant_name!r}: no configuration stored and no status")
    return rows


def drift_line(row: dict[str, Any]) -> str:
    want = f"v{row['desired_version']} {row['desired_hash']}" if row["desired_version"] else "-"
    if row["running_hash"] is None:
        run = "-"
    elif row["source"] == "pushed":
        run = f"v{row['running_version']} {row['running_hash']}"
    else:
        run = f"local {row['running_hash']}"
    last = row.get("last") or {}
    note = ""
    if last:
        note = f"last push v{last.get('version')} {str(last.get('state', '')).replace('_', ' ')}"
        if last.get("reason"):
            note += f": {last['reason']}"
    online = "online" if row["online"] else "offline"
    return f"{row['gateway']}  {row['state']}  desired {want}  running {run}  {online}  {note}".rstrip()
