"""Operator tokens: what a script or the console sends to the API's configuration endpoints.

A token reads ``feo_<id>_<secret>`` (like a provisioning key, ``keys.py``
says why SHA-256 of a 256-bit random secret is the right hash): ``id``
names it in ``provisioning operator-token list`` and ``revoke``; only
``sha256(token)`` is stored, in ``operator_tokens``. A token made with
``--tenant T`` reaches only that tenant's gateways; without, every tenant's.
It is sent as ``Authorization: Bearer feo_…``.
"""

from __future__ import annotations

import base64
import re
import secrets
from dataclasses import dataclass
from typing import Any

from factory_edge import names
from factory_edge.errors import ProvisioningError
from provisioning.errors import Forbidden, Unauthorized
from provisioning.keys import digest
from provisioning.layout import DataDir
from provisioning.registry import Registry, iso, now
from provisioning.tenants import get_tenant

_TOKEN_RE = re.compile(r"^feo_([0-9a-f]{10})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class OperatorToken:
    id: str
    name: str
    tenant: str | None
    created_at: str
    revoked_at: str | None
    last_used_at: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "tenant": self.tenant,
            "state": "revoked" if self.revoked_at else "active",
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
            "last_used_at": self.last_used_at,
        }


def _row(row: dict[str, Any]) -> OperatorToken:
    return OperatorToken(**{k: row[k] for k in OperatorToken.__dataclass_fields__})


def create(data: DataDir, name: str, *, tenant: str | None) -> tuple[str, OperatorToken]:
    """A new token: its text (shown once) and its record."""
    names.check_id(name, what="token name")
    data.require()
    token_id = secrets.token_hex(5)
    text = f"feo_{token_id}_{base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b'=').decode()}"
    with Registry(data.registry) as registry, registry.transaction():
        if tenant is not None:
            get_tenant(registry, tenant)
        registry.db.execute(
            "INSERT INTO operator_tokens (id, name, tenant, digest, created_at) VALUES (?, ?, ?, ?, ?)",
            [token_id, name, tenant, digest(text), iso(now())],
        )
        row = next(iter(registry.db.query("SELECT * FROM operator_tokens WHERE id = ?", [token_id])))
    return text, _row(row)


def listed(data: DataDir) -> list[OperatorToken]:
    data.require()
    with Registry(data.registry) as registry:
        return [_row(r) for r in registry.db.query("SELECT * FROM operator_tokens ORDER BY created_at, id")]


def revoke(data: DataDir, token_id: str) -> OperatorToken:
    match = _TOKEN_RE.match(token_id)
    token_id = match.group(1) if match else token_id
    data.require()
    with Registry(data.registry) as registry, registry.transaction():
        registry.db.execute(
            "UPDATE operator_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", [iso(now()), token_id]
        )
        rows = list(registry.db.query("SELECT * FROM operator_tokens WHERE id = ?", [token_id]))
    if not rows:
        raise ProvisioningError(f"no operator token {token_id!r} (provisioning operator-token list)")
    return _row(rows[0])


def authorize(data: DataDir, header: str | None, tenant: str) -> OperatorToken:
    """The token of an ``Authorization: Bearer …`` header, allowed for ``tenant``; 401 or 403 otherwise."""
    scheme, _, text = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not _TOKEN_RE.match(text.strip()):
        raise Unauthorized("an operator token is required: Authorization: Bearer feo_…")
    with Registry(data.registry) as registry:
        rows = list(registry.db.query("SELECT * FROM operator_tokens WHERE digest = ?", [digest(text.strip())]))
        if not rows:
            raise Unauthorized("unknown operator token")
        token = _row(rows[0])
        if token.revoked_at is not None:
            raise Forbidden(f"operator token {token.id} was revoked at {token.revoked_at}")
        if token.tenant is not None and token.tenant != tenant:
            raise Forbidden(f"operator token {token.id} is for tenant {token.tenant}, not {tenant}")
        registry.db.execute("UPDATE operator_tokens SET last_used_at = ? WHERE id = ?", [iso(now()), token.id])
    return token


__all__ = ["OperatorToken", "authorize", "create", "listed", "revoke"]
