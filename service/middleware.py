"""Authentication (and the key's scope) before the body, a request size limit enforced while streaming, and one
structured log line per request, as plain ASGI middleware.

Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs every
request through an extra task group and memory streams, which under many concurrent polls costs
more than the route itself.

Why here and not in the routes: FastAPI parses (and spools to disk) a multipart body before any
dependency runs, so a route-level key check or size check comes after the whole upload has been
written. Here the key is checked on the headers alone, and the body is counted as it arrives, so
neither a missing key nor a ``Transfer-Encoding: chunked`` body without a length gets past them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import anyio.to_thread
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("prunepilot.api")

# Methods whose requests carry a body: the key is checked before any of it is read.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
PRINCIPAL_STATE = "principal"  # request.state key of the caller the middleware verified


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes the limit; FastAPI lets HTTPExceptions through
    its body parsing, so the client gets this 413 and the parser stops reading."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the upload limit of {limit} bytes")


class LimitsAndLogs:
    def __init__(self, app: ASGIApp, max_body: int, authenticate: Callable[[str | None, str], object] | None = None,
                 unauthorized: type[Exception] = PermissionError, unavailable: type[Exception] = ConnectionError,
                 forbidden: type[Exception] = PermissionError) -> None:
        """``authenticate(authorization_header, path)`` raises ``unauthorized`` for a missing or bad key,
        ``forbidden`` for a key whose scope does not cover the path (403), and ``unavailable`` when it
        cannot tell (the database is down: 503, as the routes answer it)."""
        self.app = app
        self.max_body = max_body
        self.authenticate = authenticate
        self.unauthorized = unauthorized
        self.unavailable = unavailable
        self.forbidden = forbidden

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        responded = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
            await send(message)

        try:
            rejected = await self._precheck(scope)
            if rejected is not None:
                status = rejected[0]
                await _reject(send, *rejected)
                return
            try:
                await self.app(scope, self._limited(receive), send_wrapper)
            except BodyTooLarge as exc:  # raised outside FastAPI's handlers (no response sent yet)
                if responded:
                    raise
                status = exc.status_code
                await _reject(send, exc.status_code, exc.detail)
        finally:
            log.info("request", extra={"method": scope["method"], "path": scope["path"], "status": status,
                                       "duration_ms": round((time.perf_counter() - started) * 1000, 2)})

    async def _precheck(self, scope: Scope) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        """A rejection decided on the headers alone: a declared length over the limit, or no valid key."""
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return 413, f"request body exceeds the upload limit of {self.max_body} bytes", []
        if self.authenticate is not None and scope["method"] in BODY_METHODS:
            raw = headers.get(b"authorization")
            try:
                principal = await anyio.to_thread.run_sync(self.authenticate, raw.decode("latin-1") if raw is not None else None,
                                                           scope["path"])
                # the route reads it from here instead of looking the key up a second time
                scope.setdefault("state", {})[PRINCIPAL_STATE] = principal
            except self.unauthorized as exc:
                return 401, str(exc), [(b"www-authenticate", b"Bearer")]
            except self.forbidden as exc:
                return 403, str(exc), []
            except self.unavailable as exc:  # the detail may quote SQL: logged, never sent
                log.error("key check failed on %s %s: %s", scope["method"], scope["path"], exc)
                return 503, "the database is unavailable or failed; try again later", []
        return None

    def _limited(self, receive: Receive) -> Receive:
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        return limited_receive


async def _reject(send: Send, status: int, detail: str, extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(extra_headers or [])]})
    await send({"type": "http.response.body", "body": body})
