"""Bearer-token API keys: shown once at creation, stored as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from prunepilot.compression import PrunePilotError

from .db import repo
from .db.engine import read_scope, session_scope
from .settings import Settings

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


class _VerifiedKeys:
    """Keys verified in the last ``ttl`` seconds. A client polling a job sends the same key many
    times a second; looking it up once per ``ttl`` instead of per request takes a database round
    trip off the hot path. Only successes are kept, so a new key works at once; a revoked key (the
    CLI writes the database from another process) is refused once its entry expires."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], tuple[float, Principal]] = {}

    def get(self, url: str, digest: str, ttl: float) -> Principal | None:
        with self._lock:
            hit = self._seen.get((url, digest))
        if hit is None or time.monotonic() - hit[0] > ttl:
            return None
        return hit[1]

    def put(self, url: str, digest: str, principal: Principal) -> None:
        with self._lock:
            if len(self._seen) > 10_000:  # bounded: forget everything rather than grow without limit
                self._seen.clear()
            self._seen[(url, digest)] = (time.monotonic(), principal)


_VERIFIED = _VerifiedKeys()


def authenticate(url: str, secret: str, cache_s: float = 0.0) -> Principal | None:
    if not secret.startswith(KEY_PREFIX):
        return None
    digest = hash_key(secret)
    if cache_s > 0 and (hit := _VERIFIED.get(url, digest, cache_s)) is not None:
        return hit
    with read_scope(url) as s:
        key = repo.key_by_hash(s, key_hash=digest)
        principal = Principal(key.id, key.name) if key is not None else None
    if principal is not None and cache_s > 0:
        _VERIFIED.put(url, digest, principal)
    return principal


class Unauthorized(PrunePilotError):
    """No valid API key (HTTP 401)."""


def principal_for(settings: Settings, authorization: str | None) -> Principal | None:
    """The caller behind an ``Authorization`` header: None when auth is disabled; raises Unauthorized.

    The one check for every route and for the middleware, which runs it before a request's body is
    read so that an unauthenticated upload costs the server nothing."""
    if settings.auth_disabled:
        return None
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    principal = authenticate(settings.db_url, secret.strip(), settings.auth_cache_s)
    if principal is None:
        raise Unauthorized("invalid or revoked API key")
    return principal
