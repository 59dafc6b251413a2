"""Request size limit and one structured log line per request, as plain ASGI middleware.

Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs every
request through an extra task group and memory streams, which under many concurrent polls costs
more than the route itself."""

from __future__ import annotations

import json
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("prunepilot.api")


class LimitsAndLogs:
    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            await _reject(send, 413, f"request body exceeds the upload limit of {self.max_body} bytes")
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            log.info("request", extra={"method": scope["method"], "path": scope["path"], "status": status,
                                       "duration_ms": round((time.perf_counter() - started) * 1000, 2)})


async def _reject(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
