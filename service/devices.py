"""Devices and their agents, the API's side: registration, leasing measurement tasks (a long poll),
payloads, results, and the device list the dashboard shows.

A device is declared by its first key (``prunepilot keys create --device NAME``); its agent
registers a fingerprint; jobs whose latency target names the device add measurement tasks
(:mod:`.remote_backend`), which agents lease, time and answer. Which key may call what is decided
once, by path, in :func:`prunepilot.service.auth.check_scope`.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

import anyio

from prunepilot.compression import PrunePilotError

from .db import repo
from .db.engine import as_utc, read_scope, session_scope
from .db.lifecycle import JobStatus
from .db.models import Device, DeviceTask, utcnow
from .jobs import NotFound, NotReady
from .schemas import DeviceJob, DevicePublic, DeviceRegister, Lease, LeaseRequest, TaskPublic, TaskResult, TaskSpec
from .settings import Settings

POLL_EVERY_S = 0.25  # a long poll looks for open tasks this often


class TaskRefused(NotReady):
    """A result the service will not record (measured already, or the lease went to another agent): 409."""


class InvalidResult(PrunePilotError):
    """A result that does not fit its task (HTTP 422)."""


def table_prefix(name: str, fingerprint: str | None = None) -> str:
    """The start of every latency-table key of a device: its name and its agent's fingerprint (the
    batch size follows); without ``fingerprint``, of every key the device ever had. The name is part
    of it: two boards of one model may still run differently."""
    return f"device={name}|" if fingerprint is None else f"device={name}|{fingerprint}|"


class DeviceInUse(PrunePilotError):
    """A device that unfinished jobs still measure on."""


def connected(device: Device, lease_s: float, now: datetime | None = None) -> bool:
    """Whether an agent of the device was seen within the lease time (an agent polls at least every
    half of it, and heartbeats while it measures)."""
    if device.last_seen is None:
        return False
    return (now or utcnow()) - as_utc(device.last_seen) <= timedelta(seconds=lease_s)


def _task_public(device: str, t: DeviceTask) -> TaskPublic:
    return TaskPublic(id=t.id, kind=t.kind, spec=TaskSpec(**t.spec), payload=f"/v1/devices/{device}/tasks/{t.id}/payload",  # type: ignore[arg-type]
                      payload_bytes=t.payload_bytes, lease_expires_at=t.lease_expires_at)


class DeviceService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.db_url

    def _device(self, s: Any, name: str) -> Device:
        device = repo.get_device(s, name=name)
        if device is None:
            raise NotFound(f"no device {name!r}: declare it with `prunepilot keys create --device {name}`")
        return device

    # ---------------------------------------------------------------- the operator's side

    def remove(self, name: str, keep_table: bool = False) -> dict[str, int]:
        """Remove a declared device: its measurement tasks, its keys (revoked: its agent can no longer
        connect) and, unless ``keep_table``, its latency-table entries. Refused while a job not finished
        yet targets it (that job would wait for the device for ever). Counts of what went."""
        with session_scope(self.url) as s:
            device = self._device(s, name)
            active = repo.active_jobs_on_device(s, device=name)
            if active:
                raise DeviceInUse(f"device {name!r} is the latency target of {len(active)} unfinished job(s) "
                                  f"({', '.join(active[:5])}): cancel them or let them finish first")
            return repo.delete_device(s, device_id=device.id, name=name, entry_prefix=None if keep_table else table_prefix(name))

    def reset_calibrations(self, name: str) -> int:
        """Delete the device's stored calibrations (every model, every fingerprint it had), keeping its
        table entries: the next job or inspection of a model on it times that model whole again (a
        calibration measured while the board was busy, say). A job already past its calibration
        keeps the one it loaded. How many went."""
        with session_scope(self.url) as s:
            self._device(s, name)
            return repo.delete_latency_calibrations(s, device_prefix=table_prefix(name))

    # ---------------------------------------------------------------- the agent's side

    def register(self, name: str, body: DeviceRegister, key_id: int | None) -> DevicePublic:
        with session_scope(self.url) as s:
            if key_id is None:  # auth disabled (one local user): an agent declares its device itself
                repo.ensure_device(s, name=name)
            self._device(s, name)
            repo.register_device(s, name=name, backend=body.backend, fingerprint=body.fingerprint, info=dict(body.info), key_id=key_id)
        return self.get(name, owner_id=key_id)

    async def lease(self, name: str, body: LeaseRequest) -> Lease:
        """Open tasks for this agent, waiting up to ``wait_s`` (at most half the lease time, so a polling
        agent is never taken for gone) for one to appear. Async: a waiting agent holds no thread."""
        lease_s = self.settings.device_lease_s
        deadline = time.monotonic() + min(body.wait_s, lease_s / 2)
        device_id, fingerprint = await anyio.to_thread.run_sync(self._seen, name)
        while True:
            tasks = await anyio.to_thread.run_sync(self._take, name, device_id, fingerprint, body)
            if tasks or time.monotonic() >= deadline:
                return Lease(tasks=tasks, lease_s=lease_s)
            await anyio.sleep(min(POLL_EVERY_S, max(0.0, deadline - time.monotonic())))

    def _seen(self, name: str) -> tuple[int, str]:
        with session_scope(self.url) as s:
            device = self._device(s, name)
            if device.fingerprint is None:
                raise NotReady(f"device {name!r} has not registered: POST /v1/devices/{name}/register first")
            repo.touch_device(s, device_id=device.id)
            return device.id, device.fingerprint

    def _take(self, name: str, device_id: int, fingerprint: str, body: LeaseRequest) -> list[TaskPublic]:
        with session_scope(self.url) as s:
            won = repo.lease_device_tasks(s, device_id=device_id, fingerprint=fingerprint, owner=body.agent_id,
                                          lease_s=self.settings.device_lease_s, limit=body.max_tasks)
            return [_task_public(name, t) for t in won]

    def heartbeat(self, name: str, agent_id: str, release: bool = False) -> int:
        """An agent at work: its leases extended (or handed back, ``release``) and the device seen."""
        with session_scope(self.url) as s:
            device = self._device(s, name)
            repo.touch_device(s, device_id=device.id)
            if release:
                return repo.release_device_leases(s, device_id=device.id, owner=agent_id)
            return repo.extend_device_leases(s, device_id=device.id, owner=agent_id, lease_s=self.settings.device_lease_s)

    def payload(self, name: str, task_id: int) -> bytes:
        with read_scope(self.url) as s:
            device = self._device(s, name)
            blob = repo.device_task_payload(s, device_id=device.id, task_id=task_id)
        if blob is None:
            raise NotFound(f"device {name!r} has no task {task_id} waiting to be measured")
        return blob

    def record(self, name: str, task_id: int, body: TaskResult) -> bool:
        """Check the result against its task, then record it once (only the lease holder may)."""
        with session_scope(self.url) as s:
            device = self._device(s, name)
            task = repo.get_device_task(s, device_id=device.id, task_id=task_id)
            if task is None:
                raise NotFound(f"device {name!r} has no task {task_id}")
            result = _checked(task, body)
            repo.touch_device(s, device_id=device.id)
            if repo.record_device_result(s, device_id=device.id, task_id=task_id, owner=body.agent_id, result=result):
                return True
            s.refresh(task)  # who got there first: read again after the refused update
            if task.finished_at is not None:
                raise TaskRefused(f"task {task_id} was measured already; a result is recorded once")
            raise TaskRefused(f"task {task_id} is not leased to agent {body.agent_id} (its lease expired and it went to "
                              "another agent, or was handed back)")

    # ---------------------------------------------------------------- the users' side

    def get(self, name: str, owner_id: int | None) -> DevicePublic:
        with read_scope(self.url) as s:
            return self._public(s, self._device(s, name), owner_id)

    def list_devices(self, owner_id: int | None) -> list[DevicePublic]:
        with read_scope(self.url) as s:
            return [self._public(s, d, owner_id) for d in repo.list_devices(s)]

    def _public(self, s: Any, d: Device, owner_id: int | None) -> DevicePublic:
        prefix = table_prefix(d.name, d.fingerprint) if d.fingerprint else None
        entries = repo.latency_entry_count(s, device_prefix=prefix) if prefix else 0
        calibrations = repo.latency_calibration_count(s, device_prefix=prefix) if prefix else 0
        jobs = [DeviceJob(id=j.id, name=j.name, status=JobStatus(j.status))
                for j in repo.jobs_on_device(s, device=d.name, owner_id=owner_id)]
        return DevicePublic(name=d.name, backend=d.backend, fingerprint=d.fingerprint, info=dict(d.info or {}),
                            registered_at=d.registered_at, last_seen=d.last_seen, connected=connected(d, self.settings.device_lease_s),
                            entries=entries, calibrations=calibrations, tasks=repo.device_task_counts(s, device_id=d.id), jobs=jobs)


def _checked(task: DeviceTask, body: TaskResult) -> dict[str, Any]:
    """The result as stored, or InvalidResult naming the field that does not fit the task."""
    given = [f for f in ("ms", "runs_ms", "error") if getattr(body, f) is not None]
    if len(given) != 1:
        raise InvalidResult(f"send exactly one of ms, runs_ms or error (got {', '.join(given) or 'none'})")
    if body.error is not None:
        return {"error": body.error}
    models = len(task.spec["inputs"])
    if task.kind == "entry":
        if body.ms is None or len(body.ms) != models:
            raise InvalidResult(f"ms: an entry task's result is its median, one number per model ({models})")
        return {"ms": body.ms}
    if body.runs_ms is None or len(body.runs_ms) != models:
        raise InvalidResult(f"runs_ms: a network task's result is every run of each of its {models} models")
    repeats = int(task.spec["repeats"])
    if any(len(runs) != repeats for runs in body.runs_ms):
        raise InvalidResult(f"runs_ms: {repeats} runs per model expected")
    return {"runs_ms": body.runs_ms}
