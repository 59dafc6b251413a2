"""Typed dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..auth import Principal, authenticate
from ..jobs import JobService
from ..settings import Settings

bearer = HTTPBearer(auto_error=False, description="API key from `prunepilot keys create`")


def get_jobs(request: Request) -> JobService:
    return request.app.state.jobs


def get_principal(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal | None:
    settings: Settings = request.app.state.settings
    if settings.auth_disabled:
        return None
    if creds is None or creds.scheme.lower() != "bearer":
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing API key: send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})
    principal = authenticate(settings.db_url, creds.credentials, settings.auth_cache_s)
    if principal is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return principal


def owner_of(principal: Principal | None) -> int | None:
    return principal.key_id if principal is not None else None


JobsDep = Annotated[JobService, Depends(get_jobs)]
PrincipalDep = Annotated[Principal | None, Depends(get_principal)]
