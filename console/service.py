"""What the console does, below HTTP: which tenants exist, their data, trends, and provisioning actions.

Tenants come from the bridge config (its ``tenants`` or ``tenants_from``,
re-read every few seconds so a tenant created meanwhile appears) and, when
the console runs beside the provisioning service (``--provisioning-dir``),
from its registry. Provisioning actions call the same functions as the
``provisioning`` CLI (``provisioning.admin``): the same checks, the same
broker reloads, the same log lines. The console reads a tenant CA key only
through those functions, as the provisioning service does.

Who may do what is checked one layer up (``console.api``); everything here
trusts its caller and takes the tenant as a plain name.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from bridge.config import BridgeConfig, StorageConfig, load_config
from factory_edge.errors import ConfigError, FactoryEdgeError, ProvisioningError
from factory_edge.logs import fields
from provisioning import admin
from provisioning.layout import DataDir
from provisioning.registry import Registry, now, parse_iso

from .accounts import Accounts
from .rollup import MINUTE_MS, Rollup
from .tenantdata import PostgresData, Series, SqliteData, TenantData, empty_row

log = logging.getLogger(__name__)

TENANTS_TTL_S = 5.0
CERT_WARN_DAYS = 30
MAX_BUCKETS = 4000
RAW_MAX_RANGE_MS = 8 * 3600_000  # longer trends read the per-minute rollup whatever the number of buckets


class NotConfigured(FactoryEdgeError):
    """The console runs without the part this needs (the provisioning data directory)."""


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    bridge_config: Path
    provisioning_dir: Path | None = None
    login_max_failures: int = 5
    login_window_s: float = 600.0
    hasher: PasswordHasher | None = None  # None: argon2-cffi's defaults (Argon2id)


class Console:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.accounts = Accounts(settings.state_dir, hasher=settings.hasher)
        self.provisioning = DataDir(settings.provisioning_dir) if settings.provisioning_dir else None
        self._config: BridgeConfig = load_config(settings.bridge_config)
        self._tenants: tuple[float, list[str]] = (0.0, [])
        self._rollups: dict[str, Rollup] = {}
        self._shared: dict[tuple[str, ...], tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        for rollup in self._rollups.values():
            rollup.close()
        self.accounts.close()

    @property
    def storage(self) -> StorageConfig:
        return self._config.storage

    def storage_of(self, tenant: str) -> StorageConfig:
        """Where one tenant's data is: the server it is placed on (``tenants.json``), else the bridge's storage."""
        placed = next((t for t in self._config.tenants if t.name == tenant), None)
        return self._config.tenant_storage(placed) if placed is not None else self._config.storage

    # ---------------------------------------------------------------- tenants

    def tenants(self) -> list[str]:
        """Every tenant: the bridge's and the registry's (cached a few seconds)."""
        at, names = self._tenants
        if time.monotonic() - at < TENANTS_TTL_S:
            return names
        found = set()
        try:
            self._config = load_config(self.settings.bridge_config)
        except ConfigError as exc:  # keep serving the last good list; say why once per refresh
            log.warning("bridge config not re-read", extra=fields(err=str(exc)))
        found |= {t.name for t in self._config.tenants}
        if self.provisioning is not None and self.provisioning.registry.exists():
            with Registry(self.provisioning.registry) as registry:
                found |= {t.name for t in registry.tenants()}
        names = sorted(found)
        self._tenants = (time.monotonic(), names)
        return names

    def data(self, tenant: str) -> TenantData:
        storage = self.storage_of(tenant)
        if storage.backend == "postgres":
            assert storage.dsn is not None
            return PostgresData(storage.dsn, tenant)
        return SqliteData(storage.path, tenant)

    def rollup(self, tenant: str) -> Rollup | None:
        storage = self.storage_of(tenant)
        if storage.backend != "sqlite":
            return None
        with self._lock:
            if tenant not in self._rollups:
                self._rollups[tenant] = Rollup(self.settings.state_dir, Path(storage.path) / f"{tenant}.db", tenant)
            return self._rollups[tenant]

    def refresh_rollups(self) -> None:
        """Fold new points into every tenant's rollup (``serve``'s ``rollup`` task, every few seconds)."""
        for tenant in self.tenants():
            rollup = self.rollup(tenant)
            if rollup is not None:
                rollup.refresh()

    # ---------------------------------------------------------------- reading

    def shared(self, key: tuple[str, ...], max_age_s: float, read: Callable[[], Any]) -> Any:
        """``read()``, or its result from less than ``max_age_s`` ago: live streams of one tenant share it."""
        with self._lock:
            cached = self._shared.get(key)
        if cached is not None and time.monotonic() - cached[0] < max_age_s:
            return cached[1]
        value = read()
        with self._lock:
            self._shared[key] = (time.monotonic(), value)
        return value

    def fleet(self, tenant: str) -> list[dict[str, Any]]:
        at = int(time.time() * 1000)
        with self.data(tenant) as data:
            rows = data.fleet(at)
        by_name = {r["gateway"]: r for r in rows}
        for view in self._devices(tenant):
            row = by_name.get(view["gateway"])
            if row is None:  # provisioned, never heard from
                row = by_name[view["gateway"]] = empty_row(view["gateway"], "never seen")
            row["provisioning"] = view["state"]
            row["cert_not_after"] = view["not_after"]
            expiry = parse_iso(view["not_after"])
            days = (expiry - now()).total_seconds() / 86400 if expiry else None
            row["cert_days_left"] = None if days is None else round(days, 1)
            row["cert_warning"] = days is not None and days < CERT_WARN_DAYS and view["state"] == "active"
            if view["state"] == "revoked":
                row["state"] = "revoked" if row["state"] != "online" else row["state"]
        return [by_name[name] for name in sorted(by_name)]

    def _devices(self, tenant: str) -> list[dict[str, Any]]:
        if self.provisioning is None or not self.provisioning.registry.exists():
            return []
        try:
            views = admin.list_devices(self.provisioning, tenant)
        except ProvisioningError:  # a tenant the bridge has, the registry not
            return []
        latest: dict[str, dict[str, Any]] = {}
        for view in views:  # a name provisioned again after a revocation: the newest device counts
            latest[view.device.name] = {"gateway": view.device.name, "state": view.state, "not_after": view.not_after}
        return list(latest.values())

    def gateway(self, tenant: str, gw: str) -> dict[str, Any] | None:
        with self.data(tenant) as data:
            if not data.known(gw) and gw not in {d["gateway"] for d in self._devices(tenant)}:
                return None
            values = data.values(gw)
            meta = data.tag_meta(gw)
            events = data.events(gw, limit=20)
        devices: dict[str, list[dict[str, Any]]] = {}
        for value in values:
            value.update(meta.get((value["device"], value["tag"]), {"unit": None, "description": None}))
            devices.setdefault(value.pop("device"), []).append(value)
        status = next((r for r in self.fleet(tenant) if r["gateway"] == gw), None)
        return {
            "gateway": gw,
            "status": status,
            "devices": [{"device": name, "tags": tags} for name, tags in devices.items()],
            "events": events,
        }

    def trend(self, tenant: str, series: list[Series], start_ms: int, end_ms: int, buckets: int) -> dict[str, Any]:
        """Each series downsampled to at most ``buckets`` groups; ``source`` says raw points or the rollup."""
        buckets = max(1, min(buckets, MAX_BUCKETS))
        width = -(-(end_ms - start_ms) // buckets)
        # Long ranges read per-minute figures: buckets of two minutes and more, and any range past a shift
        # (so many buckets over days do not read millions of raw points; the rollup's minutes are fine enough).
        long = width >= 2 * MINUTE_MS or end_ms - start_ms > RAW_MAX_RANGE_MS
        rollup = self.rollup(tenant) if long else None
        if rollup is not None:
            rollup.refresh()  # what arrived since the last pass; a first build in progress means raw
            if rollup.behind:
                rollup = None
        out = []
        source = "rollup" if rollup else "points"
        with self.data(tenant) as data:
            metas = {gw: data.tag_meta(gw) for gw in {one.gw for one in series}}
            for one in series:
                if rollup:
                    rows = rollup.trend(one, start_ms, end_ms, buckets)
                else:  # PostgreSQL: the bridge's own per-minute table, when the range is long enough
                    minutes = data.minute_trend(one, start_ms, end_ms, buckets) if long else None
                    if minutes is not None:
                        rows, source = minutes, "rollup"
                    else:
                        rows = data.trend(one, start_ms, end_ms, buckets)
                unit = metas[one.gw].get((one.device, one.tag), {}).get("unit")
                out.append({"series": one.key, "unit": unit, "points": rows})
        return {"start": start_ms, "end": end_ms, "source": source, "series": out}

    def points(self, tenant: str, series: Series, start_ms: int, end_ms: int) -> Iterator[tuple[Any, ...]]:
        with self.data(tenant) as data:
            yield from data.points(series, start_ms, end_ms)

    def alerts(self, tenant: str, gw: str | None = None) -> dict[str, Any]:
        with self.data(tenant) as data:
            active = data.active_alerts()
            history = data.alert_history(gw=gw)
        acks = self.accounts.acks(tenant)
        latest_ack: dict[tuple[str, str, str], dict[str, Any]] = {}
        for ack in acks:
            latest_ack[(ack["gw"], ack["device"], ack["rule"])] = ack
        for alert in active:
            found = latest_ack.get((alert["gw"], alert["device"], alert["rule"]))
            alert["ack"] = found if found and found["since"] == alert["since"] else None
        if gw:
            active = [a for a in active if a["gw"] == gw]
            acks = [a for a in acks if a["gw"] == gw]
        return {"active": active, "history": history, "acks": acks[::-1]}

    def alert_state(self, tenant: str, gw: str, device: str, rule: str) -> tuple[str, int | None] | None:
        with self.data(tenant) as data:
            return data.alert_since(gw, device, rule)

    # ---------------------------------------------------------------- provisioning (the CLI's own functions)

    def _prov(self, tenant: str | None = None) -> DataDir:
        """The provisioning data directory; with ``tenant``, only if that tenant is one of its own.

        A tenant the bridge has and this provisioning service not gets one line about itself here, never
        the provisioning CLI's "no tenant …" that lists every tenant the service has.
        """
        if self.provisioning is None:
            raise NotConfigured("provisioning is not part of this console (start it with --provisioning-dir)")
        if tenant is not None:
            found = False
            if self.provisioning.registry.exists():
                with Registry(self.provisioning.registry) as registry:
                    found = registry.tenant(tenant) is not None
            if not found:
                raise NotConfigured(f"tenant {tenant} is not provisioned by this console's provisioning service")
        return self.provisioning

    def require_provisioning(self, tenant: str) -> None:
        self._prov(tenant)

    def keys(self, tenant: str) -> list[dict[str, Any]]:
        at = now()
        return [
            {
                "id": k.id,
                "state": k.state(at),
                "uses": k.uses,
                "max_uses": k.max_uses,
                "expires_at": k.expires_at,
                "created_at": k.created_at,
                "last_used_at": k.last_used_at,
                "revoked_at": k.revoked_at,
            }
            for k in admin.list_keys(self._prov(tenant), tenant)
        ]

    def create_key(self, tenant: str, *, uses: int | None, expires_s: float | None) -> dict[str, Any]:
        new, record = admin.create_key(self._prov(tenant), tenant, uses=uses, expires_s=expires_s)
        return {"id": record.id, "key": new.text, "max_uses": record.max_uses, "expires_at": record.expires_at}

    def key_tenant(self, key_id: str) -> str | None:
        with Registry(self._prov().registry) as registry:
            found = registry.key(key_id)
        return found.tenant if found else None

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        record = admin.revoke_key(self._prov(), key_id)
        return {"id": record.id, "revoked_at": record.revoked_at}

    def devices(self, tenant: str) -> list[dict[str, Any]]:
        return [v.as_json() for v in admin.list_devices(self._prov(tenant), tenant)]

    def revoke_gateway(self, tenant: str, gw: str) -> dict[str, Any]:
        result = admin.revoke_device(self._prov(tenant), tenant, gw)
        return {"gateway": gw, "certificates": result.serials, "steps": result.steps}

    def technicians(self, tenant: str) -> list[dict[str, Any]]:
        return [t.as_json() for t in admin.list_technicians(self._prov(tenant), tenant)]

    def technician_cert(self, tenant: str, name: str, hours: float) -> dict[str, Any]:
        """Issue the certificate; its key, certificate and CA come back once, in the answer, and are not kept."""
        out = Path(tempfile.mkdtemp(prefix="console-tech-"))
        try:
            issued = admin.technician_cert(self._prov(tenant), tenant, name, hours=hours, out_dir=out)
            return {
                "technician": issued.identity,
                "not_after": issued.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "files": {
                    issued.cert_file.name: issued.cert_file.read_text(),
                    issued.key_file.name: issued.key_file.read_text(),
                    issued.ca_file.name: issued.ca_file.read_text(),
                },
                "command": issued.command.replace(f"{out.resolve()}/", ""),
                "broker": issued.broker,
            }
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def revoke_technician(self, tenant: str, name: str) -> dict[str, Any]:
        result = admin.revoke_technician(self._prov(tenant), tenant, name)
        return {"technician": result.gateway, "certificates": result.serials, "steps": result.steps}


__all__ = ["Console", "NotConfigured", "Series", "Settings"]
