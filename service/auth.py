"""Bearer-token API keys: shown once at creation, stored as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from dataclasses import dataclass

from prunepilot.compression import PrunePilotError

from .db import repo
from .db.engine import read_scope, session_scope
from .settings import Settings

KEY_PREFIX = "pp_"


# A device agent's routes: /v1/devices/{name}/ followed by one of these. A device key reaches these
# for its own device and nothing else; a user's key never reaches them (check_scope).
AGENT_ROUTES = ("register", "lease", "heartbeat", "tasks")
_AGENT_PATH = re.compile(r"^/v1/devices/(?P<device>[^/]+)/(?:" + "|".join(AGENT_ROUTES) + r")(?:/|$)")
DEVICE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


@dataclass(frozen=True)
class Principal:
    key_id: int
    name: str
    scope: str = "user"  # 'user' | 'device'
    device: str | None = None  # the device a 'device' key answers for


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(url: str, name: str, device: str | None = None) -> tuple[int, str]:
    """Create a key; returns (id, secret). The secret is not stored and cannot be shown again.

    With ``device``, a device key: it can only register that device's agent and fetch and answer
    its measurement tasks. The device is declared with its first key."""
    if device is not None and not re.match(DEVICE_NAME, device):
        raise PrunePilotError(f"device name {device!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    with session_scope(url) as s:
        if device is not None:
            repo.ensure_device(s, name=device)
        key = repo.add_api_key(s, name=name, prefix=secret[:10], key_hash=hash_key(secret),
                               scope="device" if device is not None else "user", device=device)
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
        principal = Principal(key.id, key.name, key.scope, key.device) if key is not None else None
    if principal is not None and cache_s > 0:
        _VERIFIED.put(url, digest, principal)
    return principal


class Unauthorized(PrunePilotError):
    """No valid API key (HTTP 401)."""


class Forbidden(PrunePilotError):
    """A valid key whose scope does not cover the route (HTTP 403)."""


def check_scope(principal: Principal, path: str) -> None:
    """The one rule of key scopes, by the request's path (so it also holds for any route added later):
    a device key reaches only its own device's agent routes; a user's key never reaches an agent route
    (measurements come from the device's own agent, never from a user)."""
    agent = _AGENT_PATH.match(path)
    if principal.scope == "device":
        if agent is None or agent["device"] != principal.device:
            raise Forbidden(f"this is a device key for {principal.device!r}: it can only register that device and fetch "
                            "and answer its measurement tasks")
    elif agent is not None:
        raise Forbidden("only the device's own key (prunepilot keys create --device NAME) can register a device agent "
                        "or fetch and answer its measurement tasks")


def principal_for(settings: Settings, authorization: str | None, path: str) -> Principal | None:
    """The caller behind an ``Authorization`` header, allowed on ``path``: None when auth is disabled;
    raises Unauthorized (no valid key) or Forbidden (the key's scope does not cover ``path``).

    The one check for every route and for the middleware, which runs it before a request's body is
    read so that an unauthenticated (or out-of-scope) upload costs the server nothing."""
    if settings.auth_disabled:
        return None
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    principal = authenticate(settings.db_url, secret.strip(), settings.auth_cache_s)
    if principal is None:
        raise Unauthorized("invalid or revoked API key")
    check_scope(principal, path)
    return principal
