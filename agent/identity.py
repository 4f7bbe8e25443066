"""The gateway's provisioned identity: who it is and which broker it talks to.

``agent provision`` writes ``identity.json`` in the state directory::

    {"gateway": "gw-01", "tenant": "acme", "broker_url": "mqtts://mqtt.acme.example.com:8883",
     "ca_file": "ca.pem", "cert_file": "gw-01.pem", "key_file": "gw-01.key"}

(file names relative to the state directory). A config's ``mqtt:`` section,
for sites with their own broker, takes precedence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from factory_edge.errors import ConfigError
from factory_edge.mqtt import BrokerSettings

from .configtypes import AgentConfig

IDENTITY_FILE = "identity.json"


@dataclass(frozen=True)
class Identity:
    gateway: str
    broker_url: str
    ca_file: str
    cert_file: str
    key_file: str
    tenant: str | None = None  # identities written before 0.1 have none


def load_identity(state_dir: Path) -> Identity | None:
    path = state_dir / IDENTITY_FILE
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        return Identity(
            gateway=doc["gateway"],
            broker_url=doc["broker_url"],
            ca_file=str(state_dir / doc["ca_file"]),
            cert_file=str(state_dir / doc["cert_file"]),
            key_file=str(state_dir / doc["key_file"]),
            tenant=str(doc["tenant"]) if doc.get("tenant") else None,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable identity ({exc}); provision again with agent provision --force") from exc


def broker_from_config(
    config: AgentConfig, *, base_dir: Path | None = None, source: str | None = None
) -> BrokerSettings | None:
    """The broker of the config's ``mqtt:`` section (None without ``mqtt.url``).

    Relative file names are relative to ``base_dir`` (the config file's
    directory), not to wherever the agent was started; errors about them
    name ``source`` (the config file).
    """
    m = config.mqtt
    if m is None or m.url is None:
        return None

    def local(name: str | None) -> str | None:
        if name is None or base_dir is None or Path(name).is_absolute():
            return name
        return str(base_dir / name)

    return BrokerSettings.from_url(
        m.url,
        connect_host=m.connect_host,
        ca_file=local(m.ca_file),
        cert_file=local(m.cert_file),
        key_file=local(m.key_file),
        username=m.username,
        password=m.password,
        keepalive_s=m.keepalive,
        connect_timeout_s=m.connect_timeout,
        origin=f"{source}: mqtt." if source else "mqtt.",
    )


def sparkplug_group(config: AgentConfig, state_dir: Path) -> str:
    """The Sparkplug group: ``sparkplug.group_id``, else the provisioned tenant's name (what the broker's ACL allows)."""
    if config.sparkplug is not None and config.sparkplug.group_id:
        return config.sparkplug.group_id
    identity = load_identity(state_dir)
    if identity is None or identity.tenant is None:
        raise ConfigError(
            "sparkplug.group_id: required unless the gateway was provisioned (its tenant is the default group)"
        )
    return identity.tenant


def resolve(
    config: AgentConfig, state_dir: Path, *, base_dir: Path | None = None, source: str | None = None
) -> tuple[str, BrokerSettings]:
    """The gateway id and broker settings this agent runs with: the ``mqtt:`` section, else the identity."""
    broker = broker_from_config(config, base_dir=base_dir, source=source)
    if broker is not None:
        if config.gateway:
            return config.gateway, broker
        identity = load_identity(state_dir)
        if identity is None:
            raise ConfigError("gateway: required when the broker comes from the mqtt: section")
        return identity.gateway, broker
    identity = load_identity(state_dir)
    if identity is None:
        raise ConfigError(
            f"mqtt: no broker configured and {state_dir} holds no identity: "
            "run 'agent provision --url … --key …' or add an mqtt: section"
        )
    if config.gateway and config.gateway != identity.gateway:
        raise ConfigError(f"gateway: {config.gateway!r} differs from the provisioned identity {identity.gateway!r}")
    tuning = {}
    if config.mqtt is not None:
        tuning = {"keepalive_s": config.mqtt.keepalive, "connect_timeout_s": config.mqtt.connect_timeout}
    return identity.gateway, BrokerSettings.from_url(
        identity.broker_url,
        ca_file=identity.ca_file,
        cert_file=identity.cert_file,
        key_file=identity.key_file,
        origin=f"{state_dir / IDENTITY_FILE}: ",
        **tuning,
    )
