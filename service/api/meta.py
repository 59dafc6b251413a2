"""Zoo, agents and health."""

from __future__ import annotations

from fastapi import APIRouter, Request

from prunepilot import __version__
from prunepilot.agents import describe_agents
from prunepilot.compression.sources import available_models

from ..db import repo
from ..schemas import AgentPublic, ArchPublic, Health
from .deps import PrincipalDep
from .errors import responses

router = APIRouter(tags=["meta"])


@router.get("/v1/models", response_model=list[ArchPublic], responses=responses(401, 403, 503), summary="Model sources",
            description="Built-in architectures, installed plugins (`plugin:<name>`) and, where timm is installed, `timm:<name>`; "
                        "an ONNX file is sent with a job instead (spec.arch 'onnx').")
def list_models(principal: PrincipalDep) -> list[ArchPublic]:
    return [ArchPublic(**a.__dict__) for a in available_models()]


@router.get("/v1/agents", response_model=list[AgentPublic], responses=responses(401, 403, 503), summary="Search agents")
def list_agents(principal: PrincipalDep) -> list[AgentPublic]:
    return [AgentPublic(**a) for a in describe_agents()]


@router.get("/healthz", response_model=Health, responses=responses(503), summary="Liveness: database and Ray reachable")
def health(request: Request) -> Health:
    with request.app.state.jobs.store.read() as s:
        database = repo.ping(s)
    return Health(status="ok", database=database, ray=request.app.state.ray_mode, version=__version__)
