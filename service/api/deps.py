"""Typed dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..auth import Forbidden, Principal, Unauthorized, principal_for
from ..jobs import JobService
from ..middleware import PRINCIPAL_STATE
from ..settings import Settings

bearer = HTTPBearer(auto_error=False, description="API key from `prunepilot keys create`")


def get_jobs(request: Request) -> JobService:
    return request.app.state.jobs


def get_principal(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal | None:
    # ``creds`` declares the bearer scheme in the OpenAPI document; the header is checked by principal_for.
    settings: Settings = request.app.state.settings
    verified = request.scope.get("state", {})
    if PRINCIPAL_STATE in verified:  # POSTs: the middleware checked the key before reading the body
        return cast(Principal | None, verified[PRINCIPAL_STATE])
    try:
        return principal_for(settings, request.headers.get("authorization"), request.scope["path"])
    except Unauthorized as exc:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
    except Forbidden as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from None


def owner_of(principal: Principal | None) -> int | None:
    return principal.key_id if principal is not None else None


JobsDep = Annotated[JobService, Depends(get_jobs)]
PrincipalDep = Annotated[Principal | None, Depends(get_principal)]
