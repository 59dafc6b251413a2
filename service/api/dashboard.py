"""The dashboard page and its data. The page itself holds no data; every call it makes carries the
same bearer key as the API (taken from ``#key=...`` or typed in once, kept in the tab's sessionStorage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import plotly
from fastapi import APIRouter, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, Response

from ..dashboard import compare, export_csv
from .deps import PrincipalDep, owner_of
from .errors import AUTHED, responses

# Checked before it reaches SQL (PostgreSQL refuses NUL in text with an error); keys are 16 hex digits.
ProblemKey = Annotated[str, PathParam(pattern=r"^[0-9a-f]{16}$", description="the problem key of a job (GET /v1/jobs/{id})")]

router = APIRouter(tags=["dashboard"])
STATIC = Path(__file__).resolve().parents[1] / "static"
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"  # offline: no CDN
# Job names, errors and layer names are users' strings shown to other sessions: should one ever reach
# markup, the page still runs only its own files (plotly is served from here). Plotly injects <style>
# elements, hence inline styles (styles run no code); its PNG export makes data: images.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
def dashboard_page() -> HTMLResponse:
    return HTMLResponse((STATIC / "dashboard.html").read_text(), headers=SECURITY_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> FileResponse:
    if name == "plotly.min.js":
        return FileResponse(PLOTLY_JS, media_type="text/javascript", headers=SECURITY_HEADERS)
    path = (STATIC / name).resolve()
    if path.parent != STATIC.resolve() or not path.is_file():
        raise HTTPException(404, "not found")
    media = {".js": "text/javascript", ".css": "text/css"}.get(path.suffix, "application/octet-stream")
    return FileResponse(path, media_type=media, headers=SECURITY_HEADERS)


@router.get("/v1/problems/{problem_key}/compare", responses=responses(*AUTHED, 404),
            summary="Every job and trial of one problem, for comparing agents")
def problem_compare(problem_key: ProblemKey, request: Request, principal: PrincipalDep) -> dict:
    return compare(request.app.state.jobs.store, owner_of(principal), problem_key)


@router.get("/v1/problems/{problem_key}/export", responses=responses(*AUTHED, 404), summary="The compared data as CSV or JSON")
def problem_export(problem_key: ProblemKey, request: Request, principal: PrincipalDep, format: Literal["csv", "json"] = "csv") -> Response:  # noqa: A002
    data = compare(request.app.state.jobs.store, owner_of(principal), problem_key)
    if format == "json":
        import json

        return Response(json.dumps(data), media_type="application/json",
                        headers={"Content-Disposition": f'attachment; filename="prunepilot-{problem_key}.json"'})
    return Response(export_csv(data), media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="prunepilot-{problem_key}.csv"'})
