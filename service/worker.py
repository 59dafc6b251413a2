"""Running one job: search, fine-tune, measure, store. Executed as a Ray task (or in-process).

The database is the source of truth: the worker claims the job, writes every trial as it
happens, heartbeats, and polls the cancel flag. A retried job (its worker died) replays the
trials already recorded instead of evaluating them again, and agents with their own state
(AMC, NetAdapt, Optuna's RDB study) pick it up from the job's state directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import traceback
from typing import Any

import torch

from prunepilot.agents import SearchCancelled, SearchEnv, SearchResult
from prunepilot.agents.pipeline import PipelineHooks, run_pipeline
from prunepilot.compression import PrunePilotError, save_artifact
from prunepilot.compression.backends import LatencyBackend
from prunepilot.compression.compute_device import resolve_device

from .db import repo
from .db.engine import as_utc
from .db.lifecycle import JobStatus
from .db.models import utcnow
from .db.store import JobStore
from .latency_store import SqlLatencyStore
from .raymap import ray_map
from .recorder import SqlTrialRecorder
from .schemas import JobCreate
from .settings import Settings
from .storage import LocalArtifactStore
from .workspace import job_source, model_inputs, open_session

log = logging.getLogger("prunepilot.worker")
HEARTBEAT_S = 5.0


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Heartbeat(threading.Thread):
    def __init__(self, store: JobStore, job_id: str) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id[:8]}")
        self.store, self.job_id = store, job_id
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.store.heartbeat(self.job_id)
            except PrunePilotError:  # a busy database must not kill the job; the next beat retries
                log.warning("heartbeat for %s failed", self.job_id)


def run_job(job_id: str, settings_data: dict[str, Any]) -> str:
    """Run a job to a terminal state; returns that state. Raises only if the process itself breaks."""
    settings = Settings(**settings_data)
    store = JobStore(settings.db_url)
    me = worker_id()
    job = store.claim(job_id, me)
    if job is None:
        status = store.status(job_id)
        return str(status) if status is not None else "missing"
    problem = dict(job.problem)
    if job.cancel_requested:
        store.finish(job_id, me, JobStatus.CANCELLED, error="cancelled")
        return "cancelled"
    beat = _Heartbeat(store, job_id)
    beat.start()
    try:
        return _execute(job_id, me, problem, settings, store)
    except SearchCancelled:
        return _end(store, job_id, me, JobStatus.CANCELLED, "cancelled by request")
    except PrunePilotError as exc:
        return _end(store, job_id, me, JobStatus.FAILED, str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug must end the job with a message, not leave it running
        log.error("job %s crashed:\n%s", job_id, traceback.format_exc())
        return _end(store, job_id, me, JobStatus.FAILED, f"internal error: {type(exc).__name__}: {exc}")
    finally:
        beat.stop.set()


def _end(store: JobStore, job_id: str, me: str, status: JobStatus, error: str) -> str:
    """End the job this worker holds; if it no longer holds it (re-queued, handed to another
    worker), leave it alone and say what it is now."""
    if store.finish(job_id, me, status, error=error):
        return str(status)
    now = store.status(job_id)
    log.warning("job %s: not ending it as %s, it is %s and no longer this worker's", job_id, status, now)
    return str(now) if now is not None else "missing"


def _execute(job_id: str, me: str, problem: dict[str, Any], settings: Settings, store: JobStore) -> str:
    """The job through the one pipeline, wired to the database: SQL trials, Ray map, progress."""
    url = settings.db_url
    spec = JobCreate.model_validate(problem["spec"])
    config = spec.pipeline_config()
    torch.set_num_threads(settings.job_threads)
    device = resolve_device(settings.device)  # auto: CUDA when this task holds a GPU (Ray hides the others)
    source = job_source(spec, problem)
    session = open_session(source, None if source.carries_weights else problem["weights_path"], problem["dataset_path"], settings,
                           spec.constraints.to_engine(), spec.criterion, inputs=model_inputs(source, spec.image_size, spec.mean, spec.std))

    def search_done(_: SearchResult) -> None:
        if not store.start_finetune(job_id, me):
            raise SearchCancelled("the job is no longer this worker's")

    hooks = PipelineHooks(
        latency_backend=_device_backend(spec, settings, store, job_id),
        recorder=SqlTrialRecorder(store, job_id, config.search.max_evaluations),
        env=SearchEnv(map=ray_map(), optuna_storage=url, study_name=f"job-{job_id}"),
        state_dir=settings.data_dir / "jobs" / job_id / "state",
        latency_store=SqlLatencyStore(store),
        should_stop=lambda: store.cancel_requested(job_id),
        on_search_done=search_done,
        on_finetune_step=_FinetuneProgress(store, job_id),
        device=device,
        gpu_eval_batch=settings.gpu_eval_batch,
        calibration_repeats=settings.calibration_repeats,
    )
    result = run_pipeline(session.pruner, session.splits, config, hooks, spec.arch)
    final, report = result.final, result.report
    artifacts = LocalArtifactStore(settings.artifacts_dir)
    out = settings.artifacts_dir / job_id / "model"
    save_artifact(final.pruned.model, final.pruned.spec, out, report)
    location = artifacts.put(job_id, "model", out)
    weights_file = out / "model.safetensors"
    with store.write() as s:
        repo.add_artifact(s, job_id=job_id, kind="model", path=location, size_bytes=weights_file.stat().st_size,
                          sha256=hashlib.sha256(weights_file.read_bytes()).hexdigest())
        if not repo.finish_job(s, job_id=job_id, status=JobStatus.SUCCEEDED, worker_id=me, result=report, finetune_progress=1.0):
            raise SearchCancelled("the job is no longer this worker's")  # rolls the artifact row back
    return "succeeded"


def _device_backend(spec: JobCreate, settings: Settings, store: JobStore, job_id: str) -> LatencyBackend | None:
    """A job whose latency target names a device measures through the device's agent (its table,
    its measured check); the job's phase says when it waits for one. None: the target's local backend."""
    if spec.target.device is None:
        return None
    from .remote_backend import RemoteBackend

    return RemoteBackend(store, spec.target.device, settings.device_lease_s, job_id,
                         should_stop=lambda: store.cancel_requested(job_id), on_phase=lambda phase: store.progress(job_id, phase=phase))


class _FinetuneProgress:
    """Fine-tune step callback: progress to the job row every few seconds, and the cancel flag."""

    def __init__(self, store: JobStore, job_id: str, every_s: float = 2.0) -> None:
        import time

        self.store, self.job_id, self.every_s = store, job_id, every_s
        self._clock = time.monotonic
        self._last = 0.0

    def __call__(self, step: int, total: int, loss: float) -> bool:
        now = self._clock()
        if now - self._last < self.every_s and step < total:
            return False
        self._last = now
        self.store.progress(self.job_id, finetune_progress=step / max(1, total), heartbeat_at=utcnow())
        if self.store.cancel_requested(self.job_id):
            raise SearchCancelled("cancelled during fine-tuning")
        return False


def stale(heartbeat: Any, seconds: float) -> bool:
    if heartbeat is None:
        return True
    return (utcnow() - as_utc(heartbeat)).total_seconds() > seconds

