"""Provisioning keys: what an installer types into ``agent provision --key``.

A key reads ``fek_<id>_<secret>``: ``id`` (10 hex digits) names the key in
``provisioning key list`` and ``key revoke`` and is not secret; ``secret``
is 32 random bytes (URL-safe base64). Only ``sha256(key)`` is stored.

Why SHA-256 and not a slow password hash (bcrypt, scrypt, Argon2): a slow
hash protects *guessable* secrets from offline guessing; a 256-bit random
secret cannot be guessed however fast the hash, and a slow hash would let
anyone make the API burn a CPU-second per request. Lookup is by the hash
itself (an index), so no stored secret is ever compared byte by byte.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass

PREFIX = "fek"
_KEY_RE = re.compile(r"^fek_([0-9a-f]{10})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class NewKey:
    """A freshly made key: ``text`` is shown once, ``digest`` is stored."""

    key_id: str
    text: str

    @property
    def digest(self) -> str:
        return digest(self.text)


def new_key() -> NewKey:
    key_id = secrets.token_hex(5)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return NewKey(key_id=key_id, text=f"{PREFIX}_{key_id}_{secret}")


def digest(text: str) -> str:
    """What the registry stores for a key: lowercase hex SHA-256 of its text."""
    return hashlib.sha256(text.encode()).hexdigest()


def looks_like_key(text: str) -> bool:
    """True for text of the right shape (it may still be unknown)."""
    return bool(_KEY_RE.match(text))


__all__ = ["NewKey", "digest", "looks_like_key", "new_key"]
