"""Data-access functions (keyword-only), the only place that writes SQL queries."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import ColumnElement, CursorResult, Insert, and_, delete, func, not_, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from .lifecycle import ACTIVE, IN_WORKER, JobStatus, sources
from .models import ApiKey, Artifact, Device, DeviceTask, Job, LatencyCalibration, LatencyEntry, Trial, Upload, utcnow

if TYPE_CHECKING:  # the agents package imports torch; `prunepilot keys` and `db` need none of it
    from prunepilot.agents import TrialRecord

# ------------------------------------------------------------------ jobs


def create_job(session: Session, *, job_id: str, agent: str, arch: str, dataset: str, problem: dict[str, Any],
               problem_key: str, owner_id: int | None = None) -> Job:
    job = Job(id=job_id, owner_id=owner_id, agent=agent, arch=arch, dataset=dataset, problem=problem, problem_key=problem_key,
              status=str(JobStatus.QUEUED), created_at=utcnow(), updated_at=utcnow())
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, *, job_id: str, owner_id: int | None = None, for_update: bool = False) -> Job | None:
    stmt = select(Job).where(Job.id == job_id)
    if owner_id is not None:
        stmt = stmt.where(Job.owner_id == owner_id)
    if for_update:
        stmt = stmt.with_for_update()
    return session.scalars(stmt).first()


def list_jobs(session: Session, *, owner_id: int | None = None, status: str | None = None, agent: str | None = None,
              problem_key: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[Job], int]:
    stmt = select(Job)
    if owner_id is not None:
        stmt = stmt.where(Job.owner_id == owner_id)
    if status:
        stmt = stmt.where(Job.status == status)
    if agent:
        stmt = stmt.where(Job.agent == agent)
    if problem_key:
        stmt = stmt.where(Job.problem_key == problem_key)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = session.scalars(stmt.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    return list(rows), int(total)


def update_job_progress(session: Session, *, job_id: str, **values: Any) -> None:
    """Progress, heartbeat and other fields that are not the status (the status moves by move_job)."""
    if "status" in values:
        raise ValueError("a job's status changes only through move_job")
    values.setdefault("updated_at", utcnow())
    session.execute(update(Job).where(Job.id == job_id).values(**values))


def move_job(session: Session, *, job_id: str, to: JobStatus, allowed_from: frozenset[JobStatus] | None = None,
             extra_where: Sequence[Any] = (), **values: Any) -> bool:
    """The one place a job's status changes: a conditional UPDATE from the states the move is legal
    from (narrowed by ``allowed_from``); False when the job was not in one of them (someone else
    moved it first)."""
    stmt = (update(Job).where(Job.id == job_id, Job.status.in_([str(s) for s in sources(to, allowed_from)]), *extra_where)
            .values(status=str(to), updated_at=utcnow(), **values))
    return cast(CursorResult[Any], session.execute(stmt)).rowcount == 1  # DML: a cursor result


def claim_job(session: Session, *, job_id: str, worker_id: str) -> bool:
    """Atomically move a queued job to running for one worker; False if someone else got it first."""
    return move_job(session, job_id=job_id, to=JobStatus.RUNNING, allowed_from=frozenset({JobStatus.QUEUED}), worker_id=worker_id, heartbeat_at=utcnow(),
                    attempts=Job.attempts + 1, started_at=func.coalesce(Job.started_at, utcnow()))


def finish_job(session: Session, *, job_id: str, status: JobStatus, worker_id: str | None = None, **values: Any) -> bool:
    """A worker ends its job (succeeded, failed, cancelled). With ``worker_id``, only the worker that
    holds the job may: a worker the dispatcher gave up on cannot overwrite its successor's result."""
    where = [Job.worker_id == worker_id] if worker_id is not None else []
    return move_job(session, job_id=job_id, to=status, allowed_from=IN_WORKER, extra_where=where, finished_at=utcnow(), **values)


def request_cancel(session: Session, *, job_id: str) -> JobStatus | None:
    """Cancel a queued job at once, or flag an active one for its worker; None if it had already ended."""
    if move_job(session, job_id=job_id, to=JobStatus.CANCELLED, allowed_from=frozenset({JobStatus.QUEUED}),
                cancel_requested=True, finished_at=utcnow(), error="cancelled before it started"):
        return JobStatus.CANCELLED
    res = cast(CursorResult[Any], session.execute(update(Job).where(Job.id == job_id, Job.status.in_([str(s) for s in IN_WORKER]))
                                                  .values(cancel_requested=True, updated_at=utcnow())))
    if res.rowcount == 1:
        return JobStatus.RUNNING
    return None


def requeue_or_fail(session: Session, *, job_id: str, reason: str, max_attempts: int, refund: bool = False) -> JobStatus | None:
    """A job whose worker is gone: cancelled if that was asked for, re-queued while attempts remain,
    else failed. ``refund``: the run was interrupted by a shutdown, not lost, so it does not count as
    an attempt. Each branch is one conditional update; None if the job was no longer in a worker."""
    if move_job(session, job_id=job_id, to=JobStatus.CANCELLED, allowed_from=IN_WORKER,
                extra_where=[Job.cancel_requested.is_(True)], finished_at=utcnow(), error="cancelled", worker_id=None):
        return JobStatus.CANCELLED
    attempts = Job.attempts - 1 if refund else Job.attempts
    if move_job(session, job_id=job_id, to=JobStatus.QUEUED, allowed_from=IN_WORKER,
                extra_where=[attempts < max_attempts], worker_id=None, attempts=attempts):
        return JobStatus.QUEUED
    job = session.get(Job, job_id)
    n = job.attempts if job is not None else max_attempts
    if move_job(session, job_id=job_id, to=JobStatus.FAILED, allowed_from=IN_WORKER, finished_at=utcnow(), worker_id=None,
                error=f"{reason}; gave up after {n} attempts"):
        return JobStatus.FAILED
    return None


def cancel_requested(session: Session, *, job_id: str) -> bool:
    """True if the job's cancellation was asked for, or the job is gone."""
    flag = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return flag is None or bool(flag)


def active_jobs(session: Session) -> list[tuple[str, JobStatus, datetime | None, bool]]:
    """(id, status, heartbeat, cancel requested) of every job not yet ended, oldest first."""
    rows = session.execute(select(Job.id, Job.status, Job.heartbeat_at, Job.cancel_requested)
                           .where(Job.status.in_([str(s) for s in ACTIVE])).order_by(Job.created_at)).all()
    return [(r[0], JobStatus(r[1]), r[2], bool(r[3])) for r in rows]


def count_active_jobs(session: Session, *, owner_id: int | None) -> int:
    """Jobs of one API key (None: the keyless user of a server with auth disabled) not yet ended."""
    owner = Job.owner_id.is_(None) if owner_id is None else Job.owner_id == owner_id
    stmt = select(func.count()).select_from(Job).where(owner, Job.status.in_([str(s) for s in ACTIVE]))
    return int(session.scalar(stmt) or 0)


# The retention sweep (service/retention.py): failed and cancelled jobs that ended before a cutoff.
_SWEPT = (JobStatus.FAILED, JobStatus.CANCELLED)


def _expired(before: datetime) -> ColumnElement[bool]:
    # finished_at is set by every move to failed or cancelled; updated_at only guards a row written otherwise
    return and_(Job.status.in_([str(s) for s in _SWEPT]), func.coalesce(Job.finished_at, Job.updated_at) < before)


def _upload_paths() -> tuple[ColumnElement[str], ColumnElement[str]]:
    return Job.problem["weights_path"].as_string(), Job.problem["dataset_path"].as_string()


def expired_jobs(session: Session, *, before: datetime) -> list[tuple[str, str | None, str | None]]:
    """(id, weights path, data set path) of every failed or cancelled job that ended before ``before``."""
    weights, data = _upload_paths()
    rows = session.execute(select(Job.id, weights, data).where(_expired(before)).order_by(Job.id)).all()
    return [(r[0], r[1], r[2]) for r in rows]


def upload_paths_in_use(session: Session, *, paths: Iterable[str], before: datetime) -> set[str]:
    """Those of ``paths`` that a job not expired at ``before`` names as its weights or data set: an
    active or succeeded job, or a failed or cancelled one that ended at or after ``before``."""
    weights, data = _upload_paths()
    wanted = set(paths)
    ordered = sorted(wanted)
    used: set[str] = set()
    for i in range(0, len(ordered), 500):  # bounded IN lists
        chunk = ordered[i:i + 500]
        rows = session.execute(select(weights, data).where(not_(_expired(before)), or_(weights.in_(chunk), data.in_(chunk)))).all()
        used.update(p for row in rows for p in row if p in wanted)
    return used


# ------------------------------------------------------------------ trials


def _trial_row(job_id: str, t: TrialRecord) -> dict[str, Any]:
    m = t.metrics
    return {
        "job_id": job_id, "step": t.step, "agent": t.agent, "kind": t.kind, "strategy": t.strategy, "metrics": m,
        "accuracy": float(m["accuracy"]), "macs_ratio": float(m["macs_ratio"]), "params_ratio": float(m["params_ratio"]),
        "size_ratio": float(m["size_ratio"]), "latency_ms": m.get("latency_ms"), "reward": t.reward, "feasible": t.feasible,
        "wall_time_s": t.wall_time_s, "extra": t.extra, "created_at": t.created_at,
    }


def record_trial(session: Session, *, job_id: str, trial: TrialRecord) -> bool:
    """Insert a trial; a step recorded before is kept as it was (idempotent retry). True if inserted."""
    row = _trial_row(job_id, trial)
    dialect = session.get_bind().dialect.name
    stmt: Insert
    if dialect == "sqlite":
        stmt = sqlite_insert(Trial).values(**row).on_conflict_do_nothing(index_elements=["job_id", "step"])
    elif dialect == "postgresql":
        stmt = pg_insert(Trial).values(**row).on_conflict_do_nothing(constraint="uq_trials_job_step")
    else:  # pragma: no cover - other dialects: plain insert, a duplicate raises
        session.add(Trial(**row))
        return True
    return session.execute(stmt.returning(Trial.id)).scalar() is not None


def note_trial(session: Session, *, job_id: str, trial: TrialRecord, max_evaluations: int | None) -> None:
    """The job row follows a recorded trial: its evaluation count, progress and heartbeat, and its
    best. Both are conditional updates, so writers racing on one job (a retried worker beside a
    late one) can only move the count forward and raise the best."""
    count = trial.step + 1
    values: dict[str, Any] = {"evaluations": count, "heartbeat_at": utcnow(), "updated_at": utcnow()}
    if max_evaluations:
        values["progress"] = min(1.0, count / max_evaluations)
    session.execute(update(Job).where(Job.id == job_id, Job.evaluations < count).values(**values))
    if trial.feasible and trial.kind != "sensitivity":
        session.execute(update(Job).where(Job.id == job_id, or_(Job.best_accuracy.is_(None), Job.best_accuracy < trial.accuracy))
                        .values(best_accuracy=trial.accuracy, best_step=trial.step, best_metrics=trial.metrics))


def list_trials(session: Session, *, job_id: str, kind: str | None = None, limit: int | None = None, offset: int = 0) -> tuple[list[Trial], int]:
    stmt = select(Trial).where(Trial.job_id == job_id)
    if kind:
        stmt = stmt.where(Trial.kind == kind)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    stmt = stmt.order_by(Trial.step).offset(offset)
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(session.scalars(stmt).all()), int(total)


def trial_records(session: Session, *, job_id: str) -> list[TrialRecord]:
    rows, _ = list_trials(session, job_id=job_id)
    return [to_record(r) for r in rows]


def to_record(r: Trial) -> TrialRecord:
    from prunepilot.agents import TrialRecord

    return TrialRecord(step=r.step, agent=r.agent, strategy=dict(r.strategy), metrics=dict(r.metrics), reward=r.reward,
                       feasible=r.feasible, kind=r.kind, wall_time_s=r.wall_time_s, created_at=r.created_at, extra=dict(r.extra or {}))


def trials_for_jobs(session: Session, *, job_ids: Iterable[str]) -> list[Trial]:
    ids = list(job_ids)
    if not ids:
        return []
    return list(session.scalars(select(Trial).where(Trial.job_id.in_(ids)).order_by(Trial.job_id, Trial.step)).all())


# ------------------------------------------------------------------ artifacts and uploads


def add_artifact(session: Session, *, job_id: str, kind: str, path: str, size_bytes: int, sha256: str) -> Artifact:
    art = Artifact(job_id=job_id, kind=kind, path=path, size_bytes=size_bytes, sha256=sha256, created_at=utcnow())
    session.add(art)
    session.flush()
    return art


def latest_artifact(session: Session, *, job_id: str, kind: str) -> Artifact | None:
    return session.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == kind)
                           .order_by(Artifact.id.desc())).first()


def get_upload(session: Session, *, sha256: str) -> Upload | None:
    return session.get(Upload, sha256)


def add_upload(session: Session, *, sha256: str, kind: str, path: str, size_bytes: int, filename: str) -> Upload:
    existing = session.get(Upload, sha256)
    if existing is not None:
        return existing
    up = Upload(sha256=sha256, kind=kind, path=path, size_bytes=size_bytes, filename=filename, created_at=utcnow())
    session.add(up)
    session.flush()
    return up


# ------------------------------------------------------------------ health


def ping(session: Session) -> str:
    """A round trip to the database; its dialect's name."""
    session.execute(select(1))
    return session.get_bind().dialect.name


# ------------------------------------------------------------------ latency table


def latency_entries(session: Session, *, device: str) -> dict[str, float]:
    rows = session.execute(select(LatencyEntry.signature, LatencyEntry.latency_ms).where(LatencyEntry.device == device)).all()
    return {sig: ms for sig, ms in rows}


def put_latency_entries(session: Session, *, device: str, entries: dict[str, tuple[float, int]]) -> int:
    """Insert measured entries; ones already present (another worker measured them) are kept."""
    if not entries:
        return 0
    rows = [{"device": device, "signature": sig, "latency_ms": ms, "repeats": n, "created_at": utcnow()} for sig, (ms, n) in entries.items()]
    dialect = session.get_bind().dialect.name
    ins = sqlite_insert if dialect == "sqlite" else pg_insert
    stmt = ins(LatencyEntry).values(rows).on_conflict_do_nothing(index_elements=["device", "signature"])
    return cast(CursorResult[Any], session.execute(stmt)).rowcount or 0


def latency_calibration(session: Session, *, device: str, model_key: str) -> dict[str, Any] | None:
    stmt = select(LatencyCalibration.calibration).where(LatencyCalibration.device == device, LatencyCalibration.model_key == model_key)
    return session.scalar(stmt)


def put_latency_calibration(session: Session, *, device: str, model_key: str, calibration: dict[str, Any]) -> None:
    """Store a calibration, replacing the one before (a recalibration is the newer measurement; of
    two jobs calibrating at once, the later write stays)."""
    ins = sqlite_insert if session.get_bind().dialect.name == "sqlite" else pg_insert
    stmt = ins(LatencyCalibration).values(device=device, model_key=model_key, calibration=calibration, created_at=utcnow())
    session.execute(stmt.on_conflict_do_update(index_elements=["device", "model_key"],
                                               set_={"calibration": stmt.excluded.calibration, "created_at": stmt.excluded.created_at}))


# ------------------------------------------------------------------ API keys


def add_api_key(session: Session, *, name: str, prefix: str, key_hash: str, scope: str = "user", device: str | None = None) -> ApiKey:
    key = ApiKey(name=name, prefix=prefix, key_hash=key_hash, created_at=utcnow(), scope=scope, device=device)
    session.add(key)
    session.flush()
    return key


def key_by_hash(session: Session, *, key_hash: str) -> ApiKey | None:
    return session.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))).first()


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)).all())


def revoke_api_key(session: Session, *, key_id: int, when: datetime | None = None) -> bool:
    res = cast(CursorResult[Any], session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                                                  .values(revoked_at=when or utcnow())))
    return res.rowcount == 1



# ------------------------------------------------------------------ devices and their measurement tasks


def ensure_device(session: Session, *, name: str) -> Device:
    """The device of this name, declared now if it was not yet."""
    dialect = session.get_bind().dialect.name
    ins = sqlite_insert if dialect == "sqlite" else pg_insert
    session.execute(ins(Device).values(name=name, info={}, created_at=utcnow()).on_conflict_do_nothing(index_elements=["name"]))
    device = session.scalars(select(Device).where(Device.name == name)).one()
    return device


def get_device(session: Session, *, name: str) -> Device | None:
    return session.scalars(select(Device).where(Device.name == name)).first()


def list_devices(session: Session) -> list[Device]:
    return list(session.scalars(select(Device).order_by(Device.name)).all())


def register_device(session: Session, *, name: str, backend: str, fingerprint: str, info: dict[str, Any], key_id: int | None) -> bool:
    """An agent says what it is; False if no such device was declared."""
    now = utcnow()
    res = cast(CursorResult[Any], session.execute(
        update(Device).where(Device.name == name)
        .values(backend=backend, fingerprint=fingerprint, info=info, registered_by=key_id, registered_at=now, last_seen=now)))
    return res.rowcount == 1


def touch_device(session: Session, *, device_id: int) -> None:
    session.execute(update(Device).where(Device.id == device_id).values(last_seen=utcnow()))


def add_device_tasks(session: Session, *, device_id: int, tasks: Sequence[dict[str, Any]]) -> None:
    """Insert tasks (``kind``, ``key``, ``fingerprint``, ``job_id``, ``spec``, ``payload``); a task whose
    key the device already has is kept as it is (measured or on its way), never duplicated."""
    if not tasks:
        return
    now = utcnow()
    rows = [{**t, "device_id": device_id, "payload_bytes": len(t["payload"]), "leases": 0, "created_at": now} for t in tasks]
    dialect = session.get_bind().dialect.name
    ins = sqlite_insert if dialect == "sqlite" else pg_insert
    session.execute(ins(DeviceTask).values(rows).on_conflict_do_nothing(index_elements=["device_id", "key"]))


def device_task_results(session: Session, *, device_id: int, keys: Sequence[str]) -> dict[str, dict[str, Any] | None]:
    """Result (None while not measured) of each of ``keys`` the device has a task for."""
    if not keys:
        return {}
    rows = session.execute(select(DeviceTask.key, DeviceTask.result)
                           .where(DeviceTask.device_id == device_id, DeviceTask.key.in_(list(keys)))).all()
    return {k: r for k, r in rows}


def lease_device_tasks(session: Session, *, device_id: int, fingerprint: str, owner: str, lease_s: float, limit: int) -> list[DeviceTask]:
    """Hand up to ``limit`` open tasks of the device (never leased, or whose lease expired) to ``owner``.

    Each task is taken by one conditional UPDATE that names the state it leaves, so of two agents
    polling at once each task goes to exactly one. Only tasks for the device's current fingerprint:
    an entry measured on other hardware or another runtime would be stored under the wrong key."""
    now = utcnow()
    free = and_(DeviceTask.device_id == device_id, DeviceTask.finished_at.is_(None), DeviceTask.fingerprint == fingerprint,
                or_(DeviceTask.lease_expires_at.is_(None), DeviceTask.lease_expires_at < now))
    ids = session.scalars(select(DeviceTask.id).where(free).order_by(DeviceTask.id).limit(limit)).all()
    won = []
    until = now + timedelta(seconds=lease_s)
    for task_id in ids:
        res = cast(CursorResult[Any], session.execute(
            update(DeviceTask).where(DeviceTask.id == task_id, free)
            .values(lease_owner=owner, lease_expires_at=until, leases=DeviceTask.leases + 1)))
        if res.rowcount == 1:
            won.append(task_id)
    if not won:
        return []
    return list(session.scalars(select(DeviceTask).where(DeviceTask.id.in_(won)).order_by(DeviceTask.id)).all())


def extend_device_leases(session: Session, *, device_id: int, owner: str, lease_s: float) -> int:
    """An agent still at work: its unfinished leases run another ``lease_s`` seconds."""
    res = cast(CursorResult[Any], session.execute(
        update(DeviceTask).where(DeviceTask.device_id == device_id, DeviceTask.lease_owner == owner, DeviceTask.finished_at.is_(None))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))))
    return res.rowcount or 0


def release_device_leases(session: Session, *, device_id: int, owner: str) -> int:
    """An agent stopping hands its unfinished tasks back: open to the next lease at once."""
    res = cast(CursorResult[Any], session.execute(
        update(DeviceTask).where(DeviceTask.device_id == device_id, DeviceTask.lease_owner == owner, DeviceTask.finished_at.is_(None))
        .values(lease_owner=None, lease_expires_at=None)))
    return res.rowcount or 0


def drop_open_network_tasks(session: Session, *, device_id: int, keys: Sequence[str]) -> int:
    """Network tasks nobody waits for any more (their job was cancelled or failed): not measured,
    their payloads not kept. Entry tasks stay: another job, or this one retried, will want them."""
    stmt = delete(DeviceTask).where(DeviceTask.device_id == device_id, DeviceTask.kind == "network", DeviceTask.key.in_(list(keys)),
                                    DeviceTask.finished_at.is_(None))
    return cast(CursorResult[Any], session.execute(stmt)).rowcount or 0


def device_task_payload(session: Session, *, device_id: int, task_id: int) -> bytes | None:
    """The ONNX models of a task not yet measured; None once it is (or if it is another device's)."""
    return session.scalar(select(DeviceTask.payload).where(DeviceTask.id == task_id, DeviceTask.device_id == device_id,
                                                           DeviceTask.finished_at.is_(None)))


def get_device_task(session: Session, *, device_id: int, task_id: int) -> DeviceTask | None:
    return session.scalars(select(DeviceTask).where(DeviceTask.id == task_id, DeviceTask.device_id == device_id)).first()


def record_device_result(session: Session, *, device_id: int, task_id: int, owner: str, result: dict[str, Any]) -> bool:
    """The one write of a task's result: only by the agent holding its lease, only once. False
    otherwise (measured already, or leased again to another agent after this one went quiet)."""
    res = cast(CursorResult[Any], session.execute(
        update(DeviceTask).where(DeviceTask.id == task_id, DeviceTask.device_id == device_id, DeviceTask.finished_at.is_(None),
                                 DeviceTask.lease_owner == owner)
        .values(result=result, measured_by=owner, finished_at=utcnow(), payload=None, lease_expires_at=None)))
    return res.rowcount == 1


def device_task_counts(session: Session, *, device_id: int) -> dict[str, int]:
    """Tasks of the device by state: open (waiting or leased) and done."""
    rows = session.execute(select(DeviceTask.finished_at.is_(None), func.count()).where(DeviceTask.device_id == device_id)
                           .group_by(DeviceTask.finished_at.is_(None))).all()
    counts = {"open": 0, "done": 0}
    for is_open, n in rows:
        counts["open" if is_open else "done"] += int(n)
    return counts


def latency_entry_count(session: Session, *, device_prefix: str) -> int:
    """Latency-table entries stored under any table key that starts with ``device_prefix``."""
    stmt = select(func.count()).select_from(LatencyEntry).where(LatencyEntry.device.startswith(device_prefix, autoescape=True))
    return int(session.scalar(stmt) or 0)


def latency_calibration_count(session: Session, *, device_prefix: str) -> int:
    """Stored calibrations (one per model) under any table key that starts with ``device_prefix``."""
    stmt = select(func.count()).select_from(LatencyCalibration).where(LatencyCalibration.device.startswith(device_prefix, autoescape=True))
    return int(session.scalar(stmt) or 0)


def delete_latency_calibrations(session: Session, *, device_prefix: str) -> int:
    """Delete the calibrations under any table key that starts with ``device_prefix``; how many went."""
    stmt = delete(LatencyCalibration).where(LatencyCalibration.device.startswith(device_prefix, autoescape=True))
    return cast(CursorResult[Any], session.execute(stmt)).rowcount or 0


def _targets(device: str) -> ColumnElement[bool]:
    return Job.problem[("spec", "target", "device")].as_string() == device


def active_jobs_on_device(session: Session, *, device: str) -> list[str]:
    """Ids of the jobs not finished yet whose latency target is ``device``."""
    return list(session.scalars(select(Job.id).where(_targets(device), Job.status.in_([str(s) for s in ACTIVE]))).all())


def delete_device(session: Session, *, device_id: int, name: str, entry_prefix: str | None) -> dict[str, int]:
    """A device's row, its measurement tasks, its keys (revoked) and, with ``entry_prefix``, the
    latency-table entries and calibrations whose key starts with it; the count of each."""
    tasks = cast(CursorResult[Any], session.execute(delete(DeviceTask).where(DeviceTask.device_id == device_id))).rowcount or 0
    keys = cast(CursorResult[Any], session.execute(
        update(ApiKey).where(ApiKey.scope == "device", ApiKey.device == name, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow()))).rowcount or 0
    entries = calibrations = 0
    if entry_prefix is not None:
        entries = cast(CursorResult[Any], session.execute(
            delete(LatencyEntry).where(LatencyEntry.device.startswith(entry_prefix, autoescape=True)))).rowcount or 0
        calibrations = delete_latency_calibrations(session, device_prefix=entry_prefix)
    session.execute(delete(Device).where(Device.id == device_id))
    return {"tasks": tasks, "keys_revoked": keys, "entries": entries, "calibrations": calibrations}


def delete_network_tasks_finished_before(session: Session, *, before: datetime) -> int:
    """Network tasks (whole networks timed for one job's calibration or check) measured before
    ``before``: their job has read them, and network timings are compared only within one run."""
    stmt = delete(DeviceTask).where(DeviceTask.kind == "network", DeviceTask.finished_at.is_not(None), DeviceTask.finished_at < before)
    return cast(CursorResult[Any], session.execute(stmt)).rowcount or 0


def jobs_on_device(session: Session, *, device: str, owner_id: int | None, limit: int = 20) -> list[Job]:
    """The jobs (of ``owner_id``, when given) whose latency target is ``device``, newest first."""
    stmt = select(Job).where(_targets(device))
    if owner_id is not None:
        stmt = stmt.where(Job.owner_id == owner_id)
    return list(session.scalars(stmt.order_by(Job.created_at.desc()).limit(limit)).all())
