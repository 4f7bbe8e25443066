"""The agent's config file: gateway identity, MQTT, buffer, publishing and devices.

The models check a file and word its errors; each inherits from its plain twin
in ``agent/configtypes.py``, which is what ``agent run`` holds
(``agent/configproc.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from drivers.config import Device, ModbusDeviceBase
from factory_edge.configfile import load_yaml, parse_yaml, validate
from factory_edge.configmodel import NAME_PATTERN, Duration, Model
from factory_edge.errors import ConfigError
from factory_edge.extras import install_hint, missing
from factory_edge.units import parse_size

from . import configtypes as plain
from .configtypes import DEFAULT_STATE_DIR
from .expand import expand

Size = Annotated[int, BeforeValidator(parse_size)]

__all__ = ["DEFAULT_STATE_DIR"]  # re-exported


class MqttConfig(Model, plain.MqttConfig):
    """Broker settings for sites with their own broker (with ``url``), or tuning of the provisioned one (without)."""

    url: str | None = Field(
        default=None,
        pattern=r"^mqtts?://",
        description="mqtts://host:8883 (TLS) or mqtt://host:1883; without it, the provisioned broker",
    )
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    connect_host: str | None = Field(
        default=None, description="dial this address; SNI and certificate checks use the URL's host"
    )
    keepalive: Duration = 30.0
    connect_timeout: Duration = Field(
        default=5.0, gt=0, le=120, description="give up a connection attempt (TCP, TLS, CONNACK) after this"
    )
    retry_initial: Duration = Field(default=0.2, gt=0, le=60, description="first delay before connecting again")
    retry_max: Duration = Field(
        default=1.0, gt=0, le=3600, description="longest delay between attempts (each is jittered to 50-100%)"
    )

    @model_validator(mode="after")
    def _pairs(self) -> MqttConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.password is not None and self.username is None:
            raise ValueError("password: given without username:")
        if self.url is None:
            given = [
                k
                for k in ("ca_file", "cert_file", "key_file", "username", "connect_host")
                if getattr(self, k) is not None
            ]
            if given:
                raise ValueError(f"{given[0]}: given without url: (the provisioned identity brings its own)")
        elif self.url.startswith("mqtt://"):
            given = [k for k in ("ca_file", "cert_file", "key_file") if getattr(self, k) is not None]
            if given:
                raise ValueError(
                    f"{given[0]}: given with an mqtt:// url, which is plain TCP without TLS: "
                    "use mqtts:// (TLS), or remove it"
                )
        if self.retry_initial > self.retry_max:
            raise ValueError(f"retry_initial ({self.retry_initial:g}s) is longer than retry_max ({self.retry_max:g}s)")
        return self


class BufferConfig(Model, plain.BufferConfig):
    max_bytes: Size = Field(
        default=256 * 1024**2, ge=1024**2, description="the buffer's files on disk (database and WAL) stay below this"
    )
    max_age: Duration | None = None
    fsync: bool = Field(default=True, description="flush every commit to the disk (survives power loss)")
    confirm: Literal["storage", "broker"] = Field(
        default="storage",
        description="delete a batch when the tenant's storage confirms it (storage), "
        "or on the broker's PUBACK (broker: for consumers other than the bridge)",
    )
    confirm_timeout: Duration = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="storage: send an accepted batch again when it is unconfirmed "
        "this long while newer ones are confirmed",
    )
    replay: Duration = Field(
        default=10.0,
        ge=0,
        description="broker: after a reconnect, send again what the "
        "broker accepted this long before the connection was lost",
    )
    queue_points: int = Field(
        default=200_000,
        ge=1000,
        le=10_000_000,
        description="readings waiting for the disk; past it the oldest waiting are dropped",
    )
    min_free: Size = Field(
        default=16 * 1024**2,
        ge=0,
        description="stop writing readings while the filesystem has less free space than this",
    )


class PublishConfig(Model, plain.PublishConfig):
    max_points: int = Field(default=500, ge=1, le=100_000)
    max_bytes: Size = Field(default=256 * 1024, gt=0)
    inflight: int = Field(default=20, ge=1, le=1000)


SPARKPLUG_ID = r"^[^/+#\s]{1,64}$"  # a Sparkplug topic level: no '/', '+', '#', spaces


class SparkplugConfig(Model, plain.SparkplugConfig):
    """Sparkplug B 3.0 edge node (docs/sparkplug.md): data goes to spBv1.0/<group_id>/… instead of gw/<gw>/data."""

    group_id: str | None = Field(
        default=None,
        pattern=SPARKPLUG_ID,
        description="the Sparkplug group; default: the provisioned tenant's name (the broker's ACL allows only that)",
    )
    edge_node_id: str | None = Field(
        default=None, pattern=SPARKPLUG_ID, description="default: the gateway id (the broker's ACL allows only that)"
    )
    primary_host: str | None = Field(
        default=None, pattern=SPARKPLUG_ID, description="host application id: publish only while its STATE is online"
    )
    data_qos: Literal[0, 1] = Field(
        default=0,
        description="QoS of DDATA: 0 as the specification says; the storage confirmation makes either lossless",
    )


class RemoteConfig(Model, plain.RemoteConfig):
    """Configuration pushed from the cloud on ``gw/{gw}/cmd/config`` (docs/fleet.md)."""

    enabled: bool = Field(default=True, description="accept configurations pushed on gw/{gw}/cmd/config")
    deadline: Duration = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="after applying, the broker must be reached and the devices read within this, or roll back",
    )
    max_failed_share: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="roll back when more than this share of the devices that read fine before now fail",
    )


class AgentConfig(Model, plain.AgentConfig):
    """The whole agent config file."""

    gateway: str | None = Field(default=None, pattern=NAME_PATTERN, max_length=128)
    state_dir: str = DEFAULT_STATE_DIR
    mqtt: MqttConfig | None = None
    buffer: BufferConfig = BufferConfig()
    publish: PublishConfig = PublishConfig()
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    sparkplug: SparkplugConfig | None = None
    remote_config: RemoteConfig = RemoteConfig()
    profiles: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="device keys and tags shared by devices with profile: NAME"
    )
    devices: list[Device] = Field(default_factory=list)

    @field_validator("devices")
    @classmethod
    def _devices_unique(cls, devices: list[Any]) -> list[Any]:
        seen: set[str] = set()
        for device in devices:
            if device.name in seen:
                raise ValueError(f"device name {device.name!r} is used twice")
            seen.add(device.name)
            if isinstance(device, ModbusDeviceBase):
                for tag in device.tags:
                    limit = device.max_bits_per_read if tag.table.is_bits else device.max_registers_per_read
                    if tag.register_count > limit:
                        raise ValueError(
                            f"device {device.name!r}: tag {tag.name!r} needs {tag.register_count} registers "
                            f"but max_registers_per_read is {limit}"
                        )
        return devices


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate an agent config file; ConfigError lists every problem, one per line."""
    return parse_config(load_yaml(path), str(path))


def parse_config_text(text: str, source: str) -> AgentConfig:
    """A config given as YAML text (a pushed configuration), validated as a file is."""
    return parse_config(parse_yaml(text, source), source)


def parse_config(data: Any, source: str) -> AgentConfig:
    """Parsed YAML → profiles and ranges expanded (``expand.py``) → validated model."""
    expanded = expand(data, source)
    config = validate(AgentConfig, expanded, source)
    require_drivers(config, source)
    return config


def require_drivers(config: AgentConfig, source: str) -> None:
    """Every enabled device's driver is installed: an OPC UA device needs the [opcua] extra."""
    absent = missing("opcua")
    if not absent:
        return
    lines = [
        f"{source}: devices[{device.name}]: protocol opcua needs the [opcua] extra ({', '.join(absent)} "
        f"not installed): {install_hint('opcua')}"
        for device in config.devices
        if device.protocol == "opcua" and device.enabled
    ]
    if lines:
        raise ConfigError("\n".join(lines))
