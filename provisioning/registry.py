"""The registry: tenants, provisioning keys, devices and certificates in one SQLite file.

Written for the operator who opens it with ``sqlite3 registry.db``: plain
tables, ISO 8601 UTC timestamps (``2026-01-31T12:00:00Z``), serial numbers
in lowercase hex as ``openssl x509 -serial`` shows them. No secret is
stored here: provisioning keys only as SHA-256 (``provisioning.keys``),
private keys only as files (mode 0600) next to their certificates.

The schema changes by named migrations (``MIGRATIONS``), applied in order,
each in its own transaction and recorded in ``migrations``; a registry
written by a newer version (a migration this one does not know) is refused
rather than misread. Every change a request makes happens in one
``transaction()`` (``BEGIN IMMEDIATE``), so a refused request changes
nothing and two concurrent requests cannot both spend a one-use key.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from factory_edge.errors import ProvisioningError

REGISTRY_FILE = "registry.db"


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def iso(when: dt.datetime | None) -> str | None:
    return None if when is None else when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str | None) -> dt.datetime | None:
    return None if text is None else dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


# -- rows --------------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    name: str
    domain: str
    broker_port: int  # the tenant's Mosquitto, on the provisioning host
    public_port: int  # what gateways dial: the SNI proxy
    created_at: str
    broker_host: str = "local"  # the broker host its Mosquitto runs on (broker_hosts)
    storage: str | None = None  # the storage server its data goes to (storage_servers); None: the bridge's own
    storage_previous: str | None = None  # where its data was before the last storage move (the bridge copies it)
    broker_address: str = "127.0.0.1"  # the host's address: where its Mosquitto listens (read from broker_hosts)

    @property
    def host(self) -> str:
        """The broker's name: SNI, certificate and MQTT URL host."""
        return f"mqtt.{self.name}.{self.domain}"

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.public_port}"


@dataclass(frozen=True)
class BrokerHost:
    """A machine tenant brokers run on; ``address`` is what they listen on and the proxies dial."""

    name: str
    address: str
    capacity: int  # tenants it is meant to hold; 0: only tenants placed on it by name
    created_at: str


@dataclass(frozen=True)
class StorageServer:
    """A PostgreSQL server tenant data is placed on; ``dsn`` is what the bridge connects with."""

    name: str
    dsn: str
    capacity: int
    created_at: str


@dataclass(frozen=True)
class KeyRecord:
    id: str
    tenant: str
    max_uses: int | None
    uses: int
    expires_at: str | None
    revoked_at: str | None
    created_at: str
    last_used_at: str | None

    def refusal(self, at: dt.datetime) -> str | None:
        """Why this key cannot be used now (None: it can)."""
        if self.revoked_at is not None:
            return f"provisioning key {self.id} was revoked at {self.revoked_at}"
        if self.expires_at is not None and (parse_iso(self.expires_at) or at) <= at:
            return f"provisioning key {self.id} expired at {self.expires_at}"
        if self.max_uses is not None and self.uses >= self.max_uses:
            return f"provisioning key {self.id} is used up ({self.uses} of {self.max_uses} uses)"
        return None

    def state(self, at: dt.datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and (parse_iso(self.expires_at) or at) <= at:
            return "expired"
        if self.max_uses is not None and self.uses >= self.max_uses:
            return "used up"
        return "active"


@dataclass(frozen=True)
class Device:
    id: int
    tenant: str
    name: str
    key_id: str | None
    created_at: str
    revoked_at: str | None
    cloned_at: str | None = None  # when two keys renewed this gateway: a copy of its key is in use


@dataclass(frozen=True)
class CertRecord:
    serial: str  # lowercase hex
    tenant: str
    subject: str  # the CN
    kind: str  # gateway | technician | bridge | service | broker
    device_id: int | None
    not_before: str
    not_after: str
    fingerprint: str
    issued_at: str
    pem: str = ""
    revoked_at: str | None = None
    superseded_by: str | None = None
    superseded_at: str | None = None


# -- migrations --------------------------------------------------------------


def _m0001_initial(db: sqlite_utils.Database) -> None:
    for sql in (
        """CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL)""",
        """CREATE TABLE tenants (
            name TEXT PRIMARY KEY,
            domain TEXT NOT NULL,
            broker_port INTEGER NOT NULL UNIQUE,
            public_port INTEGER NOT NULL,
            created_at TEXT NOT NULL)""",
        """CREATE TABLE provisioning_keys (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL REFERENCES tenants(name),
            digest TEXT NOT NULL UNIQUE,          -- sha256 of the key; the key itself is never stored
            max_uses INTEGER,                     -- NULL: unlimited
            uses INTEGER NOT NULL DEFAULT 0,
            expires_at TEXT,                      -- NULL: never
            revoked_at TEXT,
            created_at TEXT NOT NULL,
            last_used_at TEXT)""",
        """CREATE TABLE devices (
            id INTEGER PRIMARY KEY,
            tenant TEXT NOT NULL REFERENCES tenants(name),
            name TEXT NOT NULL,
            key_id TEXT REFERENCES provisioning_keys(id),
            created_at TEXT NOT NULL,
            revoked_at TEXT)""",
        # One active device per name; a revoked name may be provisioned again.
        "CREATE UNIQUE INDEX devices_active_name ON devices(tenant, name) WHERE revoked_at IS NULL",
        """CREATE TABLE certificates (
            serial TEXT PRIMARY KEY,
            tenant TEXT NOT NULL REFERENCES tenants(name),
            subject TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('gateway', 'technician', 'bridge', 'service', 'broker')),
            device_id INTEGER REFERENCES devices(id),
            not_before TEXT NOT NULL,
            not_after TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            issued_at TEXT NOT NULL,
            revoked_at TEXT,
            superseded_by TEXT REFERENCES certificates(serial),
            pem TEXT NOT NULL)                    -- the certificate itself (public)""",
        "CREATE INDEX certificates_subject ON certificates(tenant, subject)",
    ):
        db.execute(sql)


def _m0002_isolation(db: sqlite_utils.Database) -> None:
    for sql in (
        # When a renewal superseded the certificate: it is revoked once the overlap has passed.
        "ALTER TABLE certificates ADD COLUMN superseded_at TEXT",
        # Bridge processes, each with an identity bridge.<instance> on every tenant's broker.
        """CREATE TABLE bridge_instances (
            name TEXT PRIMARY KEY,
            created_at TEXT NOT NULL)""",
    ):
        db.execute(sql)


def _m0003_clones(db: sqlite_utils.Database) -> None:
    # A renewal by a certificate that was already renewed, for another key: two holders of one identity.
    db.execute("ALTER TABLE devices ADD COLUMN cloned_at TEXT")


def _m0004_fleet_configs(db: sqlite_utils.Database) -> None:
    # Each gateway's desired agent configuration, every version kept (provisioning/fleet.py).
    db.execute(
        """CREATE TABLE gateway_configs (
            tenant TEXT NOT NULL REFERENCES tenants(name),
            gateway TEXT NOT NULL,
            version INTEGER NOT NULL,             -- 1, 2, …: what the agent reports as config_version
            hash TEXT NOT NULL,                   -- sha256 of yaml, 12 hex digits: the agent's config_hash
            yaml TEXT NOT NULL,
            note TEXT,
            created_at TEXT NOT NULL,
            pushed_at TEXT,                       -- last published on gw/<gateway>/cmd/config
            PRIMARY KEY (tenant, gateway, version))"""
    )
    # Who may use the API's configuration endpoints (provisioning/operators.py); only the SHA-256 is kept.
    db.execute(
        """CREATE TABLE operator_tokens (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            tenant TEXT REFERENCES tenants(name),  -- NULL: every tenant
            digest TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL,
            revoked_at TEXT,
            last_used_at TEXT)"""
    )


def _m0005_plans(db: sqlite_utils.Database) -> None:
    # Each tenant's plan (provisioning/plans.py): what the operator allows it; a NULL column is no limit.
    db.execute(
        """CREATE TABLE tenant_plans (
            tenant TEXT PRIMARY KEY REFERENCES tenants(name),
            gateways INTEGER,                     -- active (not revoked) gateways
            technicians INTEGER,                  -- technicians holding a valid certificate
            points_per_s INTEGER,                 -- the bridge delays the tenant's ingest above this
            retention_days INTEGER,               -- data older than this is removed
            message_size INTEGER,                 -- bytes: the broker's max_packet_size (NULL: the default)
            updated_at TEXT NOT NULL)"""
    )


def _m0006_placement(db: sqlite_utils.Database) -> None:
    # Where tenants run (provisioning/placement.py): broker hosts, storage servers, and each tenant's place.
    for sql in (
        """CREATE TABLE broker_hosts (
            name TEXT PRIMARY KEY,
            address TEXT NOT NULL,                -- what the tenant brokers listen on, the proxies' backends
            capacity INTEGER NOT NULL,            -- tenants it is meant to hold: the weight of least-load placement
            created_at TEXT NOT NULL)""",
        """CREATE TABLE storage_servers (
            name TEXT PRIMARY KEY,
            dsn TEXT NOT NULL,                    -- PostgreSQL connection string, as the bridge uses it
            capacity INTEGER NOT NULL,
            created_at TEXT NOT NULL)""",
        # Everything that exists stays where it runs: host "local", on 127.0.0.1.
        "INSERT INTO broker_hosts (name, address, capacity, created_at) "
        "VALUES ('local', '127.0.0.1', 100, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))",
        # SQLite cannot add a REFERENCES column with a default: the host is checked by provisioning.
        "ALTER TABLE tenants ADD COLUMN broker_host TEXT NOT NULL DEFAULT 'local'",
        "ALTER TABLE tenants ADD COLUMN storage TEXT REFERENCES storage_servers(name)",
        "ALTER TABLE tenants ADD COLUMN storage_previous TEXT REFERENCES storage_servers(name)",
    ):
        db.execute(sql)


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("0001_initial", _m0001_initial),
    ("0002_isolation", _m0002_isolation),
    ("0003_clones", _m0003_clones),
    ("0004_fleet_configs", _m0004_fleet_configs),
    ("0005_plans", _m0005_plans),
    ("0006_placement", _m0006_placement),
]


# -- the registry --------------------------------------------------------------


class Registry:
    """One connection to the registry file; cheap to open, one per request or command."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.exists():  # created private: it lists every device and key of every tenant
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            except OSError as exc:
                raise ProvisioningError(f"cannot create the registry {self.path}: {exc.strerror}") from exc
        try:
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise ProvisioningError(f"cannot open the registry {self.path}: {exc}") from exc
        self.db = sqlite_utils.Database(conn)
        self._migrate()

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing; taken with the write lock, so read-check-write inside is race-free."""
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _migrate(self) -> None:
        known = {name for name, _ in MIGRATIONS}
        if self.db["migrations"].exists():
            done = {row["name"] for row in self.db.query("SELECT name FROM migrations")}
            if done == known:
                return  # the usual case: no write lock taken just to open the registry
        with self.transaction():
            self.db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
            done = {row["name"] for row in self.db.query("SELECT name FROM migrations")}
        if done - known:
            raise ProvisioningError(
                f"registry {self.path} was written by a newer factory-edge "
                f"(migrations {', '.join(sorted(done - known))}); upgrade this one"
            )
        for name, migrate in MIGRATIONS:
            if name in done:
                continue
            with self.transaction():
                migrate(self.db)
                self.db.execute("INSERT INTO migrations (name, applied_at) VALUES (?, ?)", [name, iso(now())])

    def migrations(self) -> list[str]:
        return [row["name"] for row in self.db.query("SELECT name FROM migrations ORDER BY name")]

    def _rows(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        return list(self.db.query(sql, params or []))

    # settings ---------------------------------------------------------------

    def setting(self, key: str) -> str | None:
        rows = self._rows("SELECT value FROM settings WHERE key = ?", [key])
        return rows[0]["value"] if rows else None

    def set_setting(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [key, value],
        )

    # tenants ----------------------------------------------------------------

    _TENANTS = (
        "SELECT t.*, h.address AS broker_address FROM tenants t LEFT JOIN broker_hosts h ON h.name = t.broker_host"
    )

    def tenant(self, name: str) -> Tenant | None:
        rows = self._rows(f"{self._TENANTS} WHERE t.name = ?", [name])
        return _tenant(rows[0]) if rows else None

    def tenants(self, *, host: str | None = None) -> list[Tenant]:
        if host is not None:
            return [
                _tenant(row) for row in self._rows(f"{self._TENANTS} WHERE t.broker_host = ? ORDER BY t.name", [host])
            ]
        return [_tenant(row) for row in self._rows(f"{self._TENANTS} ORDER BY t.name")]

    def add_tenant(self, tenant: Tenant) -> None:
        self.db.execute(
            "INSERT INTO tenants (name, domain, broker_port, public_port, created_at, broker_host, storage) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                tenant.name,
                tenant.domain,
                tenant.broker_port,
                tenant.public_port,
                tenant.created_at,
                tenant.broker_host,
                tenant.storage,
            ],
        )

    def place_tenant(self, name: str, *, host: str) -> None:
        self.db.execute("UPDATE tenants SET broker_host = ? WHERE name = ?", [host, name])

    def place_tenant_storage(self, name: str, *, storage: str | None, previous: str | None) -> None:
        self.db.execute(
            "UPDATE tenants SET storage = ?, storage_previous = ? WHERE name = ?", [storage, previous, name]
        )

    # broker hosts and storage servers ---------------------------------------------

    def hosts(self) -> list[BrokerHost]:
        return [BrokerHost(**row) for row in self._rows("SELECT * FROM broker_hosts ORDER BY name")]

    def host(self, name: str) -> BrokerHost | None:
        rows = self._rows("SELECT * FROM broker_hosts WHERE name = ?", [name])
        return BrokerHost(**rows[0]) if rows else None

    def add_host(self, host: BrokerHost) -> None:
        self.db.execute(
            "INSERT INTO broker_hosts (name, address, capacity, created_at) VALUES (?, ?, ?, ?)",
            [host.name, host.address, host.capacity, host.created_at],
        )

    def set_host_capacity(self, name: str, capacity: int) -> None:
        self.db.execute("UPDATE broker_hosts SET capacity = ? WHERE name = ?", [capacity, name])

    def storage_servers(self) -> list[StorageServer]:
        return [StorageServer(**row) for row in self._rows("SELECT * FROM storage_servers ORDER BY name")]

    def storage_server(self, name: str) -> StorageServer | None:
        rows = self._rows("SELECT * FROM storage_servers WHERE name = ?", [name])
        return StorageServer(**rows[0]) if rows else None

    def add_storage_server(self, server: StorageServer) -> None:
        self.db.execute(
            "INSERT INTO storage_servers (name, dsn, capacity, created_at) VALUES (?, ?, ?, ?)",
            [server.name, server.dsn, server.capacity, server.created_at],
        )

    def set_storage_capacity(self, name: str, capacity: int) -> None:
        self.db.execute("UPDATE storage_servers SET capacity = ? WHERE name = ?", [capacity, name])

    # provisioning keys ----------------------------------------------------------

    def add_key(self, *, key_id: str, tenant: str, digest: str, max_uses: int | None, expires_at: str | None) -> None:
        self.db.execute(
            "INSERT INTO provisioning_keys (id, tenant, digest, max_uses, expires_at, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [key_id, tenant, digest, max_uses, expires_at, iso(now())],
        )

    def key_by_digest(self, digest: str) -> KeyRecord | None:
        rows = self._rows("SELECT * FROM provisioning_keys WHERE digest = ?", [digest])
        return _key(rows[0]) if rows else None

    def key(self, key_id: str) -> KeyRecord | None:
        rows = self._rows("SELECT * FROM provisioning_keys WHERE id = ?", [key_id])
        return _key(rows[0]) if rows else None

    def keys(self, tenant: str | None = None) -> list[KeyRecord]:
        if tenant is None:
            return [_key(r) for r in self._rows("SELECT * FROM provisioning_keys ORDER BY created_at, id")]
        return [
            _key(r)
            for r in self._rows("SELECT * FROM provisioning_keys WHERE tenant = ? ORDER BY created_at, id", [tenant])
        ]

    def use_key(self, key_id: str, at: dt.datetime) -> bool:
        """Count one use, only if the key is still usable; False if it is not (checked and counted at once)."""
        cursor = self.db.execute(
            "UPDATE provisioning_keys SET uses = uses + 1, last_used_at = ? WHERE id = ? AND revoked_at IS NULL "
            "AND (max_uses IS NULL OR uses < max_uses) AND (expires_at IS NULL OR expires_at > ?)",
            [iso(at), key_id, iso(at)],
        )
        return cursor.rowcount == 1

    def revoke_key(self, key_id: str, at: dt.datetime) -> None:
        self.db.execute(
            "UPDATE provisioning_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", [iso(at), key_id]
        )

    # devices ------------------------------------------------------------------

    def active_device(self, tenant: str, name: str) -> Device | None:
        rows = self._rows("SELECT * FROM devices WHERE tenant = ? AND name = ? AND revoked_at IS NULL", [tenant, name])
        return Device(**rows[0]) if rows else None

    def device(self, device_id: int) -> Device | None:
        rows = self._rows("SELECT * FROM devices WHERE id = ?", [device_id])
        return Device(**rows[0]) if rows else None

    def devices(self, tenant: str) -> list[Device]:
        return [Device(**r) for r in self._rows("SELECT * FROM devices WHERE tenant = ? ORDER BY name, id", [tenant])]

    def add_device(self, *, tenant: str, name: str, key_id: str | None, at: dt.datetime) -> int:
        cursor = self.db.execute(
            "INSERT INTO devices (tenant, name, key_id, created_at) VALUES (?, ?, ?, ?)",
            [tenant, name, key_id, iso(at)],
        )
        return int(cursor.lastrowid or 0)

    def flag_cloned(self, device_id: int, at: dt.datetime) -> None:
        """Mark the device possibly cloned (the first time is kept)."""
        self.db.execute("UPDATE devices SET cloned_at = ? WHERE id = ? AND cloned_at IS NULL", [iso(at), device_id])

    def revoke_device(self, device_id: int, at: dt.datetime) -> None:
        self.db.execute("UPDATE devices SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", [iso(at), device_id])

    # certificates -------------------------------------------------------------

    def add_certificate(self, cert: CertRecord) -> None:
        self.db.execute(
            "INSERT INTO certificates (serial, tenant, subject, kind, device_id, not_before, not_after, fingerprint, "
            "issued_at, revoked_at, superseded_by, pem) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                cert.serial,
                cert.tenant,
                cert.subject,
                cert.kind,
                cert.device_id,
                cert.not_before,
                cert.not_after,
                cert.fingerprint,
                cert.issued_at,
                cert.revoked_at,
                cert.superseded_by,
                cert.pem,
            ],
        )

    def certificate(self, serial: str) -> CertRecord | None:
        rows = self._rows("SELECT * FROM certificates WHERE serial = ?", [serial])
        return CertRecord(**rows[0]) if rows else None

    def certificates(self, tenant: str, *, device_id: int | None = None, kind: str | None = None) -> list[CertRecord]:
        sql, params = "SELECT * FROM certificates WHERE tenant = ?", list[object]([tenant])
        if device_id is not None:
            sql, params = sql + " AND device_id = ?", [*params, device_id]
        if kind is not None:
            sql, params = sql + " AND kind = ?", [*params, kind]
        return [CertRecord(**r) for r in self._rows(sql + " ORDER BY issued_at, serial", params)]

    def supersede(self, serial: str, by: str, at: dt.datetime | None = None) -> None:
        self.db.execute(
            "UPDATE certificates SET superseded_by = ?, superseded_at = ? WHERE serial = ?",
            [by, iso(at or now()), serial],
        )

    def revoke_certificate(self, serial: str, at: dt.datetime) -> None:
        self.db.execute(
            "UPDATE certificates SET revoked_at = ? WHERE serial = ? AND revoked_at IS NULL", [iso(at), serial]
        )

    def revoked(
        self, tenant: str, at: dt.datetime, *, overlap: dt.timedelta = dt.timedelta(0)
    ) -> list[tuple[int, dt.datetime]]:
        """``(serial, revoked_at)`` of revoked certificates not yet expired: what the CRL lists.

        A certificate superseded by a renewal counts as revoked once ``overlap``
        has passed since the renewal (the gateway may still be using it until
        it reconnects with the new one).
        """
        rows = self._rows(
            "SELECT serial, revoked_at, superseded_at FROM certificates WHERE tenant = ? "
            "AND not_after > ? AND (revoked_at IS NOT NULL OR superseded_at <= ?) ORDER BY serial",
            [tenant, iso(at), iso(at - overlap)],
        )
        found = []
        for r in rows:
            superseded = parse_iso(r["superseded_at"])
            when = parse_iso(r["revoked_at"]) or (superseded + overlap if superseded else at)
            found.append((int(r["serial"], 16), when))
        return found

    def technicians(self, tenant: str, at: dt.datetime) -> list[str]:
        """Technician identities holding a certificate that is neither expired nor revoked."""
        rows = self._rows(
            "SELECT DISTINCT subject FROM certificates WHERE tenant = ? AND kind = 'technician' "
            "AND revoked_at IS NULL AND not_after > ? ORDER BY subject",
            [tenant, iso(at)],
        )
        return [r["subject"] for r in rows]

    def active_certificates(
        self, tenant: str, kind: str, at: dt.datetime, subject: str | None = None
    ) -> list[CertRecord]:
        """Certificates of ``kind`` neither expired nor revoked (``subject``: of that identity only)."""
        sql = "SELECT * FROM certificates WHERE tenant = ? AND kind = ? AND revoked_at IS NULL AND not_after > ?"
        params: list[Any] = [tenant, kind, iso(at)]
        if subject is not None:
            sql, params = sql + " AND subject = ?", [*params, subject]
        return [CertRecord(**r) for r in self._rows(sql + " ORDER BY subject, issued_at", params)]

    # plans --------------------------------------------------------------------

    def plan_row(self, tenant: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM tenant_plans WHERE tenant = ?", [tenant])
        return rows[0] if rows else None

    def set_plan_row(self, tenant: str, limits: dict[str, int | None], at: dt.datetime) -> None:
        columns = list(limits)
        self.db.execute(
            f"INSERT INTO tenant_plans (tenant, {', '.join(columns)}, updated_at) "
            f"VALUES (?, {', '.join('?' for _ in columns)}, ?) ON CONFLICT (tenant) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in [*columns, "updated_at"]),
            [tenant, *limits.values(), iso(at)],
        )

    def active_gateways(self, tenant: str) -> int:
        rows = self._rows("SELECT count(*) AS n FROM devices WHERE tenant = ? AND revoked_at IS NULL", [tenant])
        return int(rows[0]["n"])

    # bridge instances -----------------------------------------------------------

    def bridge_instances(self) -> list[str]:
        return [r["name"] for r in self._rows("SELECT name FROM bridge_instances ORDER BY name")]

    def add_bridge_instance(self, name: str, at: dt.datetime) -> None:
        self.db.execute("INSERT OR IGNORE INTO bridge_instances (name, created_at) VALUES (?, ?)", [name, iso(at)])


def _tenant(row: dict[str, Any]) -> Tenant:
    known = {k: v for k, v in row.items() if k in Tenant.__dataclass_fields__}
    if known.get("broker_address") is None:  # a host missing from broker_hosts: the tenant keeps the default
        known.pop("broker_address", None)
    return Tenant(**known)


def _key(row: dict[str, Any]) -> KeyRecord:
    return KeyRecord(**{k: v for k, v in row.items() if k != "digest"})


__all__ = [
    "MIGRATIONS",
    "REGISTRY_FILE",
    "BrokerHost",
    "CertRecord",
    "Device",
    "KeyRecord",
    "Registry",
    "StorageServer",
    "Tenant",
    "iso",
    "now",
    "parse_iso",
]
