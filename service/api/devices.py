"""/v1/devices: device agents register, lease measurement tasks, fetch their payloads and answer
them (device keys only, each for its own device); users list devices (their own jobs on each)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import Response

from ..auth import DEVICE_NAME
from ..devices import DeviceService
from ..schemas import AgentPing, DevicePublic, DeviceRegister, Lease, LeaseRequest, Recorded, TaskResult
from .deps import PrincipalDep, owner_of
from .errors import AUTHED, responses

router = APIRouter(prefix="/v1/devices", tags=["devices"])

DeviceName = Annotated[str, PathParam(pattern=DEVICE_NAME, description="the device's name (as its key was created for)")]
TaskId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="a task id from a lease")]
AGENT = ("Device keys only, for their own device (`prunepilot keys create --device NAME`); "
         "any other key is answered 403.")


def get_devices(request: Request) -> DeviceService:
    return request.app.state.devices


DevicesDep = Annotated[DeviceService, Depends(get_devices)]


@router.get("", response_model=list[DevicePublic], responses=responses(*AUTHED), summary="Devices (latency targets)",
            description="Every declared device: its agent's fingerprint and backend, when it was last seen, its "
                        "latency-table entries, its measurement tasks, and your jobs that target it.")
def list_devices(devices: DevicesDep, principal: PrincipalDep) -> list[DevicePublic]:
    return devices.list_devices(owner_of(principal))


@router.post("/{name}/register", response_model=DevicePublic, responses=responses(*AUTHED, 404),
             summary="A device agent registers its fingerprint", description=AGENT)
def register(name: DeviceName, body: DeviceRegister, devices: DevicesDep, principal: PrincipalDep) -> DevicePublic:
    return devices.register(name, body, owner_of(principal))


@router.post("/{name}/lease", response_model=Lease, responses=responses(*AUTHED, 404, 409),
             summary="Long poll: lease open measurement tasks",
             description=AGENT + " Waits up to `wait_s` (at most half of PRUNEPILOT_DEVICE_LEASE_S) for a task; an empty "
                                 "list when none came. A lease lasts PRUNEPILOT_DEVICE_LEASE_S seconds, renewed by heartbeats; "
                                 "409 until the device has registered.")
async def lease(name: DeviceName, body: LeaseRequest, devices: DevicesDep, principal: PrincipalDep) -> Lease:
    return await devices.lease(name, body)


@router.post("/{name}/heartbeat", response_model=Recorded, responses=responses(*AUTHED, 404),
             summary="An agent at work: extend (or hand back) its leases", description=AGENT)
def heartbeat(name: DeviceName, body: AgentPing, devices: DevicesDep, principal: PrincipalDep) -> Recorded:
    return Recorded(recorded=True, extended=devices.heartbeat(name, body.agent_id, body.release))


@router.get("/{name}/tasks/{task_id}/payload", responses={**responses(*AUTHED, 404), 200: {"content": {"application/zip": {}}}},
            summary="A task's ONNX models", description=AGENT + " A zip of model-0.onnx, model-1.onnx, ...; 404 once measured.")
def payload(name: DeviceName, task_id: TaskId, devices: DevicesDep, principal: PrincipalDep) -> Response:
    return Response(devices.payload(name, task_id), media_type="application/zip")


@router.post("/{name}/tasks/{task_id}/result", response_model=Recorded, responses=responses(*AUTHED, 404, 409),
             summary="Answer a measurement task",
             description=AGENT + " Recorded once, and only from the agent holding the task's lease: 409 for a task measured "
                                 "already or leased again after this agent went quiet.")
def result(name: DeviceName, task_id: TaskId, body: TaskResult, devices: DevicesDep, principal: PrincipalDep) -> Recorded:
    return Recorded(recorded=devices.record(name, task_id, body))
