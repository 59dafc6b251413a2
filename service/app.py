"""The FastAPI application: routes, error mapping, lifespan (migrations check, Ray, dispatcher)."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from prunepilot import __version__
from prunepilot.compression import PrunePilotError, UnknownArchitectureError

from . import logs
from .api import devices as devices_api
from .api import inspect as inspect_api
from .api import jobs as jobs_api
from .api import meta as meta_api
from .api.errors import handle_validation
from .auth import Forbidden, Unauthorized, principal_for
from .db.engine import StoreError
from .db.migrate import ensure_current
from .devices import DeviceService
from .jobs import InvalidJob, JobService, NotFound, NotReady, QuotaExceeded
from .middleware import LimitsAndLogs
from .settings import Settings, get_settings
from .uploads import UploadTooLarge

log = logging.getLogger("prunepilot.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    dispatch = settings.run_dispatcher

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logs.configure()
        ensure_current(settings.db_url)  # refuse to serve an unmigrated database
        app.state.ray_mode = "off"
        dispatcher = None
        if dispatch:
            from .dispatcher import Dispatcher, init_ray

            app.state.ray_mode = init_ray(settings)
            dispatcher = Dispatcher(settings)
            dispatcher.start()
        # torch, Ray and the app leave a large heap of long-lived objects; a full collection walking
        # them stalled every in-flight request by 0.3-0.4 s (seen with gc.callbacks under 50 pollers).
        # Frozen, they are skipped by the collector for the life of the process.
        gc.collect()
        gc.freeze()
        log.info("prunepilot %s serving (database %s, ray %s)", __version__, settings.db_url.split("://")[0], app.state.ray_mode)
        try:
            yield
        finally:
            if dispatcher is not None:
                dispatcher.stop()
                import ray

                ray.shutdown()

    app = FastAPI(title="prunepilot", version=__version__, lifespan=lifespan,
                  description="Find per-layer pruning ratios under a FLOPs / latency / size budget. "
                              "Authenticate with `Authorization: Bearer <key>` (`prunepilot keys create`).")
    app.state.settings = settings
    app.state.jobs = JobService(settings)
    app.state.devices = DeviceService(settings)
    app.state.ray_mode = "off"

    app.add_middleware(LimitsAndLogs, max_body=2 * settings.max_upload_bytes + (1 << 20),
                       authenticate=partial(principal_for, settings), unauthorized=Unauthorized, unavailable=StoreError,
                       forbidden=Forbidden)

    def handler(code: int):
        async def handle(_: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=code)
        return handle

    app.add_exception_handler(NotFound, handler(404))
    app.add_exception_handler(NotReady, handler(409))
    app.add_exception_handler(UploadTooLarge, handler(413))
    app.add_exception_handler(QuotaExceeded, handler(429))
    async def store_failed(request: Request, exc: Exception) -> JSONResponse:
        # The message may quote SQL and its parameters (other users' values, the schema): log it, never send it.
        log.error("database error on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": "the database is unavailable or failed; try again later"}, status_code=503)

    app.add_exception_handler(StoreError, store_failed)
    app.add_exception_handler(RequestValidationError, handle_validation)
    app.add_exception_handler(InvalidJob, handler(422))
    app.add_exception_handler(UnknownArchitectureError, handler(422))
    app.add_exception_handler(PrunePilotError, handler(422))

    app.include_router(jobs_api.router)
    app.include_router(meta_api.router)
    app.include_router(inspect_api.router)
    app.include_router(devices_api.router)
    from .api import dashboard as dashboard_api

    app.include_router(dashboard_api.router)
    return app
