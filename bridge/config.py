"""The bridge's config file: storage, tenants, ingest window, mappings and alerts.

Parsed once into frozen models (``factory_edge.configfile``); every error is
one line naming the file, the path inside it and the problem. Relative file
paths (certificates, the SQLite directory) are taken from the config file's
directory, so a config and its certificates can travel together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

import pydantic
from pydantic import Field, PrivateAttr, field_validator, model_validator

from factory_edge import names
from factory_edge.configfile import config_errors, load_yaml, validate
from factory_edge.configmodel import Duration, Model
from factory_edge.errors import ConfigError
from factory_edge.units import parse_size

from .alerts.rules import AlertRule, WebhookConfig
from .mapping import MappingRule

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # tenant names: as provisioning names them
INSTANCE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,56}$"  # identity bridge.<instance> stays within 64
GROUP_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a topic level: no '/', '+', '#'
DEFAULT_STORAGE_PATH = "/var/lib/factory-edge/bridge"
DEFAULT_GROUP = "bridge"


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_N = TypeVar("_N", bound=_Named)


def _named_once(items: list[_N], what: str) -> list[_N]:
    """``items`` when no two share a name; else the ValueError pydantic reports."""
    seen: set[str] = set()
    for item in items:
        if item.name in seen:
            raise ValueError(f"{what} name {item.name!r} is used twice")
        seen.add(item.name)
    return items


class StorageConfig(Model):
    """Where each tenant's data goes: a SQLite file per tenant, or a PostgreSQL schema per tenant."""

    backend: Literal["sqlite", "postgres"] = "sqlite"
    path: str = DEFAULT_STORAGE_PATH
    dsn: str | None = None
    fsync: bool = Field(default=True, description="sqlite: flush every commit to the disk before acknowledging")
    retention_days: int | None = Field(
        default=None, ge=1, description="readings older than this are removed, for tenants whose plan sets none"
    )

    @model_validator(mode="after")
    def _dsn(self) -> StorageConfig:
        if self.backend == "postgres" and not self.dsn:
            raise ValueError("dsn: required when backend is postgres (postgresql://user@host/db)")
        return self


class IngestConfig(Model):
    """The commit window: what is received while one commit runs goes into the next one."""

    max_messages: int = Field(default=1000, ge=1, le=65535)
    receive_maximum: int | None = Field(default=None, ge=1, le=65535)
    session_expiry: Duration = 7 * 24 * 3600.0
    shared_session_expiry: Duration = Field(
        default=300.0,
        description="session expiry of an instance's session in a shared group: how long a vanished instance "
        "keeps being handed its share of the messages",
    )

    @property
    def window(self) -> int:
        """MQTT v5 Receive Maximum: a full commit window in flight plus the next one arriving."""
        return self.receive_maximum or min(65535, 2 * self.max_messages)


class AlertsConfig(Model):
    webhooks: dict[str, WebhookConfig] = Field(default_factory=dict)
    rules: list[AlertRule] = Field(default_factory=list)
    max_series_per_gateway: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="series (device and tag) one gateway may have evaluated; more are stored, not evaluated",
    )
    forget_resolved: Duration = Field(default=7 * 86400.0, description="resolved alerts are forgotten after this")

    @field_validator("rules")
    @classmethod
    def _unique(cls, rules: list[AlertRule]) -> list[AlertRule]:
        return _named_once(rules, "rule")


class IdentityFiles(Model):
    """One bridge identity: a client certificate (CN ``bridge.<instance>``) and its key."""

    cert_file: str
    key_file: str


class TenantLimits(Model):
    """A tenant's plan as the bridge applies it (set by the operator: ``provisioning tenant plan``)."""

    points_per_s: int | None = Field(default=None, ge=1, description="ingest rate above which points are delayed")
    retention_days: int | None = Field(default=None, ge=1, description="data older than this is removed")


class TenantConfig(Model):
    """One tenant broker, reached with the bridge's certificate from that tenant's CA.

    The broker binds the MQTT client id to the certificate (``use_username_as_clientid``),
    so two processes, or two sessions of one process, must never share a
    certificate: ``identities`` gives each instance its own (``bridge.<instance>``),
    and the alert role, held by one process at a time, uses ``alerts_cert_file``
    (``bridge-alerts``). ``cert_file``/``key_file`` serve an instance not listed.
    """

    name: str = Field(pattern=ID_PATTERN)
    url: str = Field(pattern=r"^mqtts?://", description="mqtts://mqtt.acme.example.com:8883")
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    connect_host: str | None = None
    keepalive: Duration = 30.0
    shared_group: str | None = Field(default=None, pattern=GROUP_PATTERN)
    identities: dict[str, IdentityFiles] = Field(default_factory=dict)
    alerts_cert_file: str | None = None
    alerts_key_file: str | None = None
    alerts: AlertsConfig | None = None
    storage: StorageConfig | None = Field(
        default=None, description="the storage server the tenant is placed on; the bridge's own storage if absent"
    )
    limits: TenantLimits = TenantLimits()
    storage_previous: StorageConfig | None = Field(
        default=None,
        description="the server the tenant's data is being moved from (written by provisioning tenant move); "
        "the bridge copies it to storage once, then resumes there",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise ValueError(f"not a broker URL: {exc}") from None
        if not parts.hostname:
            raise ValueError("expected mqtts://host:port")
        return value

    @model_validator(mode="after")
    def _pairs(self) -> TenantConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if (self.alerts_cert_file is None) != (self.alerts_key_file is None):
            raise ValueError("alerts_cert_file and alerts_key_file go together")
        for instance in self.identities:
            if not names.is_id(instance) or not names.is_id(f"{names.BRIDGE_PREFIX}{instance}"):
                raise ValueError(
                    f"identities: instance {instance!r} is not valid: 1-57 letters, digits, '_', '.' "
                    "or '-', starting with a letter or digit"
                )
        if self.password is not None and self.username is None:
            raise ValueError("password: given without username:")
        if self.storage_previous is not None and self.storage is None:
            raise ValueError("storage_previous: given without storage: (the server the tenant moves to)")
        return self

    def for_instance(self, instance: str) -> TenantConfig:
        """This tenant as bridge process ``instance`` connects to it: with that instance's own certificate."""
        own = self.identities.get(instance)
        if own is not None:
            return self.model_copy(update={"cert_file": own.cert_file, "key_file": own.key_file})
        if self.identities and self.cert_file is None:
            raise ConfigError(
                f"tenant {self.name} has no bridge identity for instance {instance!r} (it has "
                f"{', '.join(sorted(self.identities))}): run 'provisioning bridge add {instance}' "
                "on the provisioning host, or start the bridge with --instance NAME"
            )
        return self


class SparkplugConfig(Model):
    """The bridge as a Sparkplug B host application on every tenant broker (docs/sparkplug.md)."""

    host_id: str = Field(
        default="factory-edge",
        pattern=GROUP_PATTERN,
        description="published as spBv1.0/STATE/<host_id>; edge nodes name it as their primary host",
    )


USAGE_METRICS = ("bytes_per_day", "points_per_day", "messages_per_s", "points_per_s", "delayed_points_per_day")


class ThresholdRule(Model):
    """A level of a tenant's usage that calls for a change (``bridge usage --thresholds``, the exporter)."""

    name: str = Field(pattern=GROUP_PATTERN, description="e.g. shared-database")
    metric: Literal["bytes_per_day", "points_per_day", "messages_per_s", "points_per_s", "delayed_points_per_day"]
    above: float = Field(ge=0, description="a number; bytes_per_day also takes a size such as 100GB")
    calls_for: str = Field(min_length=1, max_length=200, description="what crossing it calls for")

    @field_validator("above", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return parse_size(value)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        return value


DEFAULT_THRESHOLDS = (
    ThresholdRule(name="shared-database", metric="bytes_per_day", above=100e9, calls_for="a dedicated database server"),
    ThresholdRule(
        name="shared-database-writes",
        metric="messages_per_s",
        above=50,
        calls_for="a dedicated database server (each message is a write)",
    ),
    ThresholdRule(name="shared-broker-host", metric="messages_per_s", above=1000, calls_for="a broker host of its own"),
    ThresholdRule(
        name="plan-rate",
        metric="delayed_points_per_day",
        above=0,
        calls_for="a higher points_per_s in its plan (its ingest is being delayed)",
    ),
)


class UsageConfig(Model):
    """Metering: the threshold rules ``bridge usage --thresholds`` and the usage exporter report."""

    thresholds: list[ThresholdRule] = Field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    window: Duration = Field(default=7 * 86400.0, description="the days and hours the rules look at")

    @field_validator("thresholds")
    @classmethod
    def _unique(cls, rules: list[ThresholdRule]) -> list[ThresholdRule]:
        return _named_once(rules, "threshold")


class BridgeConfig(Model):
    """The whole bridge config file."""

    instance: str | None = Field(default=None, pattern=INSTANCE_PATTERN)
    storage: StorageConfig = StorageConfig()
    tenants: list[TenantConfig] = Field(default_factory=list)
    tenants_from: str | None = None
    shared_group: str | None = Field(
        default=DEFAULT_GROUP,
        pattern=GROUP_PATTERN,
        description="the shared subscription group of the tenants from tenants_from stored in PostgreSQL",
    )
    ingest: IngestConfig = IngestConfig()
    mappings: list[MappingRule] = Field(default_factory=list)
    alerts: AlertsConfig = AlertsConfig()
    sparkplug: SparkplugConfig = SparkplugConfig()
    usage: UsageConfig = UsageConfig()
    _provisioned: frozenset[str] = PrivateAttr(default=frozenset())

    @property
    def listed_names(self) -> set[str]:
        """The tenants of the config file's own ``tenants:`` (the others came from ``tenants_from``)."""
        return {t.name for t in self.tenants} - self._provisioned

    @field_validator("tenants")
    @classmethod
    def _tenants_unique(cls, tenants: list[TenantConfig]) -> list[TenantConfig]:
        seen: set[str] = set()
        for tenant in tenants:
            if tenant.name.lower() in seen:
                raise ValueError(f"tenant {tenant.name!r} is listed twice")
            seen.add(tenant.name.lower())
        return tenants

    @field_validator("mappings")
    @classmethod
    def _tables_unique(cls, mappings: list[MappingRule]) -> list[MappingRule]:
        tables: dict[str, MappingRule] = {}
        for rule in mappings:
            other = tables.setdefault(rule.table, rule)
            if other is not rule and other.columns != rule.columns:
                raise ValueError(
                    f"table {rule.table!r} is mapped twice with different columns "
                    f"({', '.join(other.columns)} / {', '.join(rule.columns)})"
                )
        return mappings

    @model_validator(mode="after")
    def _sources(self) -> BridgeConfig:
        if not self.tenants and self.tenants_from is None:
            raise ValueError(
                "tenants: list at least one tenant broker (or tenants_from: the provisioning data directory)"
            )
        _check_notify(self.alerts, "alerts")
        for tenant in self.tenants:
            _check_notify(self.tenant_alerts(tenant), f"tenants[{tenant.name}].alerts")
        return self

    def with_tenants(self, provisioned: list[TenantConfig]) -> BridgeConfig:
        """The config with the provisioning service's tenants added (a tenant listed here wins)."""
        listed = {t.name for t in self.tenants}
        added = [self.from_provisioning(t) for t in provisioned if t.name not in listed]
        merged = self.model_copy(update={"tenants": [*self.tenants, *added]})
        merged._provisioned = self._provisioned | {t.name for t in added}
        return merged

    def from_provisioning(self, tenant: TenantConfig) -> TenantConfig:
        """A tenant from ``tenants_from`` as this bridge runs it: in the shared group when stored in PostgreSQL.

        Every instance, on any host, subscribes through ``$share/<group>/``, so
        an instance added or removed changes nothing for the others. SQLite is
        one file per host: a group across hosts would split the tenant's data
        between them, so a SQLite tenant takes the default group only as a
        listed tenant (``tenants:``, processes of one host), and an explicit
        top-level group is refused for it (ConfigError).
        """
        if tenant.shared_group is not None or self.shared_group is None:
            return tenant
        if self.tenant_storage(tenant).backend != "postgres":
            if "shared_group" in self.model_fields_set:
                raise ConfigError(
                    f"tenants_from: tenant {tenant.name}: shared_group {self.shared_group!r} with sqlite storage "
                    "would split the tenant's data between the files of the bridge hosts: store it in PostgreSQL "
                    "(storage: backend postgres), or set shared_group: null"
                )
            return tenant
        return tenant.model_copy(update={"shared_group": self.shared_group})

    def tenant_alerts(self, tenant: TenantConfig) -> AlertsConfig:
        """The rules and webhooks of one tenant: the top-level ones plus the tenant's own."""
        if tenant.alerts is None:
            return self.alerts
        names = {r.name for r in self.alerts.rules}
        clash = next((r.name for r in tenant.alerts.rules if r.name in names), None)
        if clash:
            raise ValueError(f"tenants[{tenant.name}]: alerts.rules: rule {clash!r} is also a top-level rule")
        return AlertsConfig(
            webhooks={**self.alerts.webhooks, **tenant.alerts.webhooks},
            rules=[*self.alerts.rules, *tenant.alerts.rules],
            max_series_per_gateway=tenant.alerts.max_series_per_gateway,
            forget_resolved=tenant.alerts.forget_resolved,
        )

    def tenant_storage(self, tenant: TenantConfig) -> StorageConfig:
        """Where one tenant's data goes: the server it is placed on, else the bridge's storage."""
        return tenant.storage or self.storage

    def tenant_retention(self, tenant: TenantConfig) -> int | None:
        """Days of readings kept: the tenant's plan, else its storage's default, else the bridge's; None keeps all."""
        return tenant.limits.retention_days or self.tenant_storage(tenant).retention_days or self.storage.retention_days

    def tenant(self, name: str) -> TenantConfig:
        for tenant in self.tenants:
            if tenant.name == name:
                return tenant
        raise ConfigError(f"no tenant named {name!r} (tenants: {', '.join(t.name for t in self.tenants)})")


def _check_notify(alerts: AlertsConfig, where: str) -> None:
    for rule in alerts.rules:
        missing = [name for name in rule.notify if name not in alerts.webhooks]
        if missing:
            raise ValueError(
                f"{where}: rule {rule.name!r}: notify: no webhook named {missing[0]!r} "
                f"(webhooks: {', '.join(alerts.webhooks) or 'none'})"
            )


TENANTS_INDEX = "tenants.json"  # written by provisioning (docs/provisioning.md, "For the bridge")


def provisioned_tenants(directory: str | Path) -> list[TenantConfig]:
    """The tenants the provisioning service lists in ``<data dir>/tenants.json``; ConfigError says what is wrong."""
    path = Path(directory) / TENANTS_INDEX
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"tenants_from: {path}: no such file (is {directory} the provisioning data directory, "
            "with a tenant created?)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"tenants_from: {path}: cannot read: {exc}") from None
    return parse_tenants(text, path)


def parse_tenants(text: bytes, path: Path) -> list[TenantConfig]:
    """The entries of a ``tenants.json`` already read (``path`` names it in errors)."""
    try:
        doc = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"tenants_from: {path}: cannot read: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"tenants_from: {path}: not JSON: {exc}") from None
    entries = doc.get("tenants") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f'tenants_from: {path}: expected {{"tenants": [...]}}')
    tenants: list[TenantConfig] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        try:
            tenant = TenantConfig.model_validate(entry)
        except pydantic.ValidationError as exc:
            source = f"{path}: tenants[{i}]"
            lines = []
            for line in config_errors(exc, source):
                rest = line[len(source) + 2 :]  # "url: problem", or "(top level): problem"
                top = "(top level): "
                lines.append(f"{source}: {rest[len(top) :]}" if rest.startswith(top) else f"{source}.{rest}")
            raise ConfigError("\n".join(lines)) from None
        if tenant.name.lower() in seen:
            raise ConfigError(f"{path}: tenants[{i}]: tenant {tenant.name!r} is listed twice")
        seen.add(tenant.name.lower())
        tenants.append(tenant)
    return tenants


_PATH_KEYS = ("ca_file", "cert_file", "key_file")


def _resolve_paths(data: Any, base: Path) -> Any:
    """Relative certificate and storage paths are relative to the config file's directory."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    if isinstance(data.get("tenants_from"), str):
        data["tenants_from"] = str(base / data["tenants_from"])
    storage = data.get("storage")
    if isinstance(storage, dict) and isinstance(storage.get("path"), str):
        storage = dict(storage)
        storage["path"] = str(base / storage["path"])
        data["storage"] = storage
    tenants = data.get("tenants")
    if isinstance(tenants, list):
        resolved = []
        for tenant in tenants:
            if isinstance(tenant, dict):
                tenant = dict(tenant)
                for key in _PATH_KEYS:
                    if isinstance(tenant.get(key), str):
                        tenant[key] = str(base / tenant[key])
            resolved.append(tenant)
        data["tenants"] = resolved
    return data


def load_config(path: str | Path) -> BridgeConfig:
    """Read and validate a bridge config file (and ``tenants_from``); ConfigError lists every problem."""
    path = Path(path)
    data = _resolve_paths(load_yaml(path), path.resolve().parent)
    config = validate(BridgeConfig, data, str(path))
    if config.tenants_from is not None:
        # No tenant yet is fine: the bridge follows tenants.json and starts them as they are created.
        config = config.with_tenants(provisioned_tenants(config.tenants_from))
    return config


def client_id(instance: str, *, role: str = "ingest") -> str:
    """The MQTT client id of one bridge process on a tenant broker (stable across restarts)."""
    return f"bridge.{instance}" if role == "ingest" else f"bridge.{role}"


def default_instance() -> str:
    """``main``: the bridge identity ``provisioning tenant create`` issues (``bridge.main``)."""
    return names.DEFAULT_BRIDGE_INSTANCE


def validate_config(data: Any, source: str = "config") -> BridgeConfig:
    """Validate an already parsed config (tests, benchmarks, tools that build one)."""
    return validate(BridgeConfig, data, source)
