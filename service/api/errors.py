"""One error model for every error the API answers: ``{"detail": "<message>"}`` (ErrorBody), and the
statuses each route can answer, documented in the OpenAPI schema from one table."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..schemas import ErrorBody

DESCRIPTIONS = {
    400: "The request could not be read (e.g. a malformed multipart body)",
    401: "No API key, or an invalid or revoked one",
    403: "The key's scope does not cover this route (a device key reaches only its device's measurement tasks)",
    404: "No such job, device or task (another user's job is reported as missing too)",
    409: "Not possible in the job's current state",
    413: "The request body is larger than the upload limit",
    422: "Invalid input; the message names the field",
    429: "The API key has as many active jobs as it may (PRUNEPILOT_MAX_ACTIVE_JOBS_PER_KEY); nothing was stored",
    503: "The database is unavailable or busy",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the given error statuses, all with the one error model."""
    return {code: {"model": ErrorBody, "description": DESCRIPTIONS[code]} for code in codes}


AUTHED = (401, 403, 422, 503)  # every authenticated route: bad key, key out of scope, bad parameter, database down


def validation_message(exc: RequestValidationError) -> str:
    """FastAPI's list of validation errors as one line naming each field."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        parts.append(f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def handle_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": validation_message(exc)}, status_code=422)
