"""Bearer-token API keys: shown once at creation, stored as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from .db import repo
from .db.engine import session_scope

KEY_PREFIX = "pp_"


@dataclass(frozen=True)
class Principal:
    key_id: int
    name: str


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(url: str, name: str) -> tuple[int, str]:
    """Create a key; returns (id, secret). The secret is not stored and cannot be shown again."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    with session_scope(url) as s:
        key = repo.add_api_key(s, name=name, prefix=secret[:10], key_hash=hash_key(secret))
        return key.id, secret


def authenticate(url: str, secret: str) -> Principal | None:
    if not secret.startswith(KEY_PREFIX):
        return None
    with session_scope(url) as s:
        key = repo.key_by_hash(s, key_hash=hash_key(secret))
        return Principal(key.id, key.name) if key is not None else None
