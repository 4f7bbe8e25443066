"""Who may use the console: accounts, sessions, the audit log and alert acknowledgements, in one SQLite file.

On disk, ``<state dir>/console.db`` (mode 0600, WAL):

- ``accounts(name, role, tenant, password_hash, …)``: ``role`` is
  ``operator`` (every tenant, provisioning), ``tenant-admin`` (one tenant:
  its gateways, keys, technicians, alerts) or ``viewer`` (one tenant,
  read-only). Passwords are stored only as Argon2id hashes
  (``argon2-cffi``, its default parameters), re-hashed on login when the
  parameters change.
- ``sessions(digest, account, csrf, …)``: a session cookie is 32 random
  bytes; only its SHA-256 is stored (a stolen database opens no session).
  Each session has its own CSRF token, which every change must send back
  in ``X-CSRF-Token``. Sessions end after ``IDLE_S`` without a request and
  ``MAX_AGE_S`` after login, and when the account is disabled, removed or
  its password changed.
- ``audit(ts, actor, tenant, action, target, detail, client)``: every
  change, through the console or this CLI, and every login attempt.
- ``acks``: an alert acknowledged, by whom, when, with the comment.

Every change is one transaction (``BEGIN IMMEDIATE``); the schema is
versioned (``PRAGMA user_version``) like the bridge's stores.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from factory_edge import names
from factory_edge.errors import FactoryEdgeError

DB_FILE = "console.db"
IDLE_S = 8 * 3600
MAX_AGE_S = 24 * 3600
MIN_PASSWORD = 10
SCHEMA_VERSION = 1
_SCHEMA = """
    CREATE TABLE accounts (
        name TEXT PRIMARY KEY, role TEXT NOT NULL, tenant TEXT, password_hash TEXT NOT NULL,
        created_at INTEGER NOT NULL, disabled_at INTEGER) STRICT;
    CREATE TABLE sessions (
        digest TEXT PRIMARY KEY, account TEXT NOT NULL REFERENCES accounts(name) ON DELETE CASCADE,
        csrf TEXT NOT NULL, created_at INTEGER NOT NULL, seen_at INTEGER NOT NULL, client TEXT) STRICT;
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY, ts INTEGER NOT NULL, actor TEXT NOT NULL, tenant TEXT, action TEXT NOT NULL,
        target TEXT, detail TEXT, client TEXT) STRICT;
    CREATE INDEX audit_tenant ON audit (tenant, id);
    CREATE TABLE acks (
        id INTEGER PRIMARY KEY, tenant TEXT NOT NULL, gw TEXT NOT NULL, device TEXT NOT NULL, rule TEXT NOT NULL,
        since INTEGER, account TEXT NOT NULL, comment TEXT NOT NULL, ts INTEGER NOT NULL) STRICT;
    CREATE INDEX acks_instance ON acks (tenant, gw, device, rule, id);
"""
_HASHER = PasswordHasher()


class AccountError(FactoryEdgeError):
    """An account could not be created, changed or found; the message says which and why."""


class Role(enum.StrEnum):
    OPERATOR = "operator"
    TENANT_ADMIN = "tenant-admin"
    VIEWER = "viewer"


@dataclass(frozen=True)
class Account:
    name: str
    role: Role
    tenant: str | None  # None for operators
    created_at: int
    disabled_at: int | None = None

    def sees(self, tenant: str) -> bool:
        return self.role is Role.OPERATOR or self.tenant == tenant

    def may_change(self, tenant: str) -> bool:
        """Keys, technicians, revocations, acknowledgements of ``tenant``."""
        return self.role is Role.OPERATOR or (self.role is Role.TENANT_ADMIN and self.tenant == tenant)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": str(self.role), "tenant": self.tenant, "disabled": bool(self.disabled_at)}


@dataclass(frozen=True)
class Session:
    account: Account
    csrf: str
    digest: str


def now_ms() -> int:
    return int(time.time() * 1000)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"password: at least {MIN_PASSWORD} characters (got {len(password)})")
    if len(password) > 1024:
        raise AccountError("password: at most 1024 characters")
    return password


class Accounts:
    """The console's own database. One connection per instance; safe to share between threads (a lock per call)."""

    def __init__(self, state_dir: str | Path, *, hasher: PasswordHasher | None = None) -> None:
        self.hasher = hasher or _HASHER  # tests pass cheaper parameters; production uses argon2-cffi's defaults
        self._dummy: str | None = None  # made on the first login of an unknown name
        self.dir = Path(state_dir)
        self.path = self.dir / DB_FILE
        try:
            if not self.dir.exists():
                self.dir.mkdir(mode=0o700, parents=True)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            raise AccountError(f"{self.path}: cannot create: {exc.strerror or exc}") from exc
        self._lock = threading.RLock()
        # Argon2id at argon2-cffi's defaults takes 64 MiB and a core for a fraction of a second: a flood of
        # logins (each address and name within its limits) hashes a core's worth at a time, the rest wait.
        self._hashing = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            raise AccountError(f"{self.path}: cannot open the console database: {exc}") from exc

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise AccountError(f"{self.path}: schema version {version} is newer than this console ({SCHEMA_VERSION})")
        if version < 1:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute("PRAGMA user_version=1")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self.db.execute(sql, params).fetchall()

    # ---------------------------------------------------------------- accounts

    def create(self, name: str, role: str, password: str, *, tenant: str | None = None, actor: str = "cli") -> Account:
        names.check_id(name, what="account name")
        try:
            kind = Role(role)
        except ValueError:
            raise AccountError(f"role: {role!r} is not one of {', '.join(r.value for r in Role)}") from None
        if kind is Role.OPERATOR and tenant is not None:
            raise AccountError("--tenant: an operator sees every tenant; give a tenant only to tenant-admin or viewer")
        if kind is not Role.OPERATOR:
            if tenant is None:
                raise AccountError(f"--tenant: a {kind} belongs to one tenant; name it")
            names.check_tenant(tenant)
        check_password(password)
        at = now_ms()
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone():
                raise AccountError(f"account {name!r} exists already")
            db.execute(
                "INSERT INTO accounts VALUES (?, ?, ?, ?, ?, NULL)",
                (name, str(kind), tenant, self.hasher.hash(password), at),
            )
            self._audit(db, actor, tenant, "account.create", name, {"role": str(kind)}, None)
        return Account(name, kind, tenant, at)

    def get(self, name: str) -> Account | None:
        rows = self._rows("SELECT name, role, tenant, created_at, disabled_at FROM accounts WHERE name = ?", (name,))
        return _account(rows[0]) if rows else None

    def all(self) -> list[Account]:
        return [
            _account(r)
            for r in self._rows("SELECT name, role, tenant, created_at, disabled_at FROM accounts ORDER BY name")
        ]

    def _need(self, db: sqlite3.Connection, name: str) -> None:
        if not db.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone():
            raise AccountError(f"no account {name!r} (see console account list)")

    def set_password(self, name: str, password: str, *, actor: str = "cli") -> None:
        check_password(password)
        with self.transaction() as db:
            self._need(db, name)
            db.execute("UPDATE accounts SET password_hash = ? WHERE name = ?", (self.hasher.hash(password), name))
            db.execute("DELETE FROM sessions WHERE account = ?", (name,))
            self._audit(db, actor, self._tenant(db, name), "account.password", name, None, None)

    def set_disabled(self, name: str, disabled: bool, *, actor: str = "cli") -> None:
        with self.transaction() as db:
            self._need(db, name)
            db.execute("UPDATE accounts SET disabled_at = ? WHERE name = ?", (now_ms() if disabled else None, name))
            db.execute("DELETE FROM sessions WHERE account = ?", (name,))
            action = "account.disable" if disabled else "account.enable"
            self._audit(db, actor, self._tenant(db, name), action, name, None, None)

    def remove(self, name: str, *, actor: str = "cli") -> None:
        with self.transaction() as db:
            self._need(db, name)
            tenant = self._tenant(db, name)
            db.execute("DELETE FROM accounts WHERE name = ?", (name,))
            self._audit(db, actor, tenant, "account.remove", name, None, None)

    @staticmethod
    def _tenant(db: sqlite3.Connection, name: str) -> str | None:
        row = db.execute("SELECT tenant FROM accounts WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    # ---------------------------------------------------------------- sessions

    def login(self, name: str, password: str, *, client: str) -> tuple[str, Session] | None:
        """``(cookie token, session)`` for the right password of an enabled account, else None (audited both ways)."""
        rows = self._rows("SELECT password_hash, disabled_at, tenant FROM accounts WHERE name = ?", (name,))
        stored = rows[0][0] if rows else None
        ok = False
        with self._hashing:
            if stored is None and self._dummy is None:
                self._dummy = self.hasher.hash(secrets.token_urlsafe(16))
            try:
                # An unknown name costs a hash too, so timing does not tell which names exist.
                ok = (
                    self.hasher.verify(stored or self._dummy or "", password)
                    and stored is not None
                    and rows[0][1] is None
                )
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                ok = False
            rehashed = self.hasher.hash(password) if ok and stored and self.hasher.check_needs_rehash(stored) else None
        with self.transaction() as db:
            if not ok:
                self._audit(db, name, rows[0][2] if rows else None, "login.failed", name, None, client)
                return None
            if rehashed is not None:
                db.execute("UPDATE accounts SET password_hash = ? WHERE name = ?", (rehashed, name))
            token = secrets.token_urlsafe(32)
            csrf = secrets.token_urlsafe(32)
            at = now_ms()
            db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)", (_digest(token), name, csrf, at, at, client))
            self._audit(db, name, rows[0][2], "login", name, None, client)
        account = self.get(name)
        assert account is not None
        return token, Session(account, csrf, _digest(token))

    def session(self, token: str) -> Session | None:
        """The live session of a cookie (its idle clock restarted), or None."""
        if not token or len(token) > 100:
            return None
        digest = _digest(token)
        at = now_ms()
        rows = self._rows(
            "SELECT s.csrf, s.created_at, s.seen_at, a.name, a.role, a.tenant, a.created_at, a.disabled_at "
            "FROM sessions s JOIN accounts a ON a.name = s.account WHERE s.digest = ?",
            (digest,),
        )
        if not rows:
            return None
        csrf, created, seen, *account = rows[0]
        if account[4] is not None or at - seen > IDLE_S * 1000 or at - created > MAX_AGE_S * 1000:
            with self.transaction() as db:
                db.execute("DELETE FROM sessions WHERE digest = ?", (digest,))
            return None
        if at - seen > 60_000:  # the idle clock, written at most once a minute
            with self.transaction() as db:
                db.execute("UPDATE sessions SET seen_at = ? WHERE digest = ?", (at, digest))
        return Session(_account(tuple(account)), csrf, digest)

    def logout(self, session: Session, *, client: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM sessions WHERE digest = ?", (session.digest,))
            self._audit(db, session.account.name, session.account.tenant, "logout", None, None, client)

    # ---------------------------------------------------------------- audit and acknowledgements

    def audit(
        self,
        actor: str,
        tenant: str | None,
        action: str,
        target: str | None = None,
        detail: dict[str, Any] | None = None,
        client: str | None = None,
    ) -> None:
        with self.transaction() as db:
            self._audit(db, actor, tenant, action, target, detail, client)

    @staticmethod
    def _audit(
        db: sqlite3.Connection,
        actor: str,
        tenant: str | None,
        action: str,
        target: str | None,
        detail: dict[str, Any] | None,
        client: str | None,
    ) -> None:
        db.execute(
            "INSERT INTO audit (ts, actor, tenant, action, target, detail, client) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now_ms(), actor, tenant, action, target, json.dumps(detail) if detail else None, client),
        )

    def audit_log(self, tenant: str | None = None, *, limit: int = 200) -> list[dict[str, Any]]:
        """Newest first; only ``tenant``'s entries when given (a tenant admin's view)."""
        where, params = ("WHERE tenant = ?", (tenant,)) if tenant else ("", ())
        rows = self._rows(
            f"SELECT id, ts, actor, tenant, action, target, detail, client FROM audit {where} ORDER BY id DESC LIMIT ?",
            (*params, limit),
        )
        keys = ("id", "ts", "actor", "tenant", "action", "target", "detail", "client")
        out = []
        for row in rows:
            doc = dict(zip(keys, row))
            doc["detail"] = json.loads(doc["detail"]) if doc["detail"] else None
            out.append(doc)
        return out

    def acknowledge(
        self,
        tenant: str,
        gw: str,
        device: str,
        rule: str,
        since: int | None,
        *,
        account: str,
        comment: str,
        client: str | None,
    ) -> dict[str, Any]:
        at = now_ms()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO acks (tenant, gw, device, rule, since, account, comment, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (tenant, gw, device, rule, since, account, comment, at),
            )
            self._audit(db, account, tenant, "alert.ack", f"{gw}/{device}/{rule}", {"comment": comment}, client)
        return {"gw": gw, "device": device, "rule": rule, "since": since, "by": account, "comment": comment, "ts": at}

    def acks(self, tenant: str) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT gw, device, rule, since, account, comment, ts FROM acks WHERE tenant = ? ORDER BY id", (tenant,)
        )
        keys = ("gw", "device", "rule", "since", "by", "comment", "ts")
        return [dict(zip(keys, r)) for r in rows]


def _account(row: tuple[Any, ...]) -> Account:
    name, role, tenant, created, disabled = row
    return Account(name, Role(role), tenant, created, disabled)


__all__ = ["Account", "AccountError", "Accounts", "Role", "Session", "check_password"]
