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
from collections.abc import Callable, Sequence
from typing import Any

import torch

from prunepilot.agents import (
    Mapper,
    SearchCancelled,
    SearchContext,
    SearchEnv,
    SearchLimits,
    check_measured_latency,
    create_agent,
)
from prunepilot.compression import (
    Budget,
    Evaluator,
    Fidelity,
    FinetuneConfig,
    PrunePilotError,
    PruningConstraints,
    finalize,
    save_artifact,
)
from prunepilot.compression.latency import LatencyTable

from .db import repo
from .db.engine import as_utc, session_scope
from .db.models import utcnow
from .latency_store import SqlLatencyStore
from .recorder import SqlTrialRecorder
from .settings import Settings
from .storage import LocalArtifactStore
from .workspace import open_session

log = logging.getLogger("prunepilot.worker")
HEARTBEAT_S = 5.0


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Heartbeat(threading.Thread):
    def __init__(self, url: str, job_id: str) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id[:8]}")
        self.url, self.job_id = url, job_id
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                with session_scope(self.url) as s:
                    repo.update_job(s, job_id=self.job_id, heartbeat_at=utcnow())
            except PrunePilotError:  # a busy database must not kill the job; the next beat retries
                log.warning("heartbeat for %s failed", self.job_id)


def _finish(url: str, job_id: str, **values: Any) -> None:
    with session_scope(url) as s:
        repo.update_job(s, job_id=job_id, finished_at=utcnow(), **values)


def run_job(job_id: str, settings_data: dict[str, Any]) -> str:
    """Run a job to a terminal state; returns that state. Raises only if the process itself breaks."""
    settings = Settings(**settings_data)
    url = settings.db_url
    me = worker_id()
    with session_scope(url) as s:
        if not repo.claim_job(s, job_id=job_id, worker_id=me, from_states=("queued",)):
            job = repo.get_job(s, job_id=job_id)
            return job.status if job else "missing"
        job = repo.get_job(s, job_id=job_id)
        problem = dict(job.problem)
        cancel_requested = job.cancel_requested
    if cancel_requested:
        _finish(url, job_id, status="cancelled", error="cancelled")
        return "cancelled"
    beat = _Heartbeat(url, job_id)
    beat.start()
    try:
        state = _execute(job_id, problem, settings)
        return state
    except SearchCancelled:
        _finish(url, job_id, status="cancelled", error="cancelled by request")
        return "cancelled"
    except PrunePilotError as exc:
        _finish(url, job_id, status="failed", error=str(exc))
        return "failed"
    except Exception as exc:  # noqa: BLE001 - a bug must end the job with a message, not leave it running
        log.error("job %s crashed:\n%s", job_id, traceback.format_exc())
        _finish(url, job_id, status="failed", error=f"internal error: {type(exc).__name__}: {exc}")
        return "failed"
    finally:
        beat.stop.set()


def _execute(job_id: str, problem: dict[str, Any], settings: Settings) -> str:
    url = settings.db_url
    spec = problem["spec"]
    torch.set_num_threads(max(1, int(settings.job_cpus)) if settings.job_cpus >= 1 else 1)
    constraints = PruningConstraints(**spec["constraints"])
    session = open_session(spec["arch"], problem["weights_path"], problem["dataset_path"], settings, constraints,
                           spec["criterion"], image_size=spec.get("image_size"))
    budget = Budget.model_validate(spec["budget"])
    latency_constraint = budget.get("latency")
    table = None
    if latency_constraint is not None:
        table = LatencyTable(session.pruner.graph, session.pruner.model, SqlLatencyStore(url),
                             latency_constraint.batch_size, torch.get_num_threads())
        table.build(should_stop=lambda: _cancelled(url, job_id))
        table.calibrate()
    fid = spec["fidelity"]
    fidelity = Fidelity(method=fid["method"], val_images=fid["val_images"], calib_images=fid["calib_images"],
                        finetune_steps=fid["finetune_steps"])
    evaluator = Evaluator(session.pruner, session.splits, fidelity, latency_model=table)
    g = session.pruner.graph
    dense = {"flops": float(g.dense_macs), "params": float(g.dense_params), "size": float(evaluator.dense_size),
             "latency": table.dense_ms if table else None}
    limits = budget.ratio_limits(dense)
    search = SearchLimits(spec["search"]["max_evaluations"], spec["search"]["max_seconds"])
    recorder = SqlTrialRecorder(url, job_id, search.max_evaluations)
    state_dir = settings.data_dir / "jobs" / job_id / "state"
    env = SearchEnv(map=_ray_map(), optuna_storage=url, study_name=f"job-{job_id}")
    ctx = SearchContext(evaluator, limits, search, recorder, seed=spec["seed"], agent=spec["agent"], state_dir=state_dir, env=env)
    result = create_agent(spec["agent"], **spec.get("agent_options", {})).search(ctx)
    if result.best is None:
        raise PrunePilotError("the search found no strategy within the budget")
    result = check_measured_latency(ctx, result)  # a latency budget is met as measured, not only as predicted

    with session_scope(url) as s:
        repo.update_job(s, job_id=job_id, status="finetuning", finetune_started_at=utcnow(), progress=1.0)
    ft = spec["finetune"]
    config = FinetuneConfig(epochs=ft["epochs"], lr=ft["lr"], distill=ft["distill"], batch_size=ft["batch_size"], seed=spec["seed"])
    progress = _FinetuneProgress(url, job_id)
    final = finalize(session.pruner, session.splits, result.best.strategy, config, finetune_dense=ft["finetune_dense"],
                     test_images=spec["measure"]["test_images"], latency_batches=tuple(spec["measure"]["latency_batches"]),
                     threads=torch.get_num_threads(), on_step=progress, initial_model=result.model)
    report = {"arch": spec["arch"], "agent": spec["agent"], "budget": budget.describe(), "limits": limits,
              "search": {"evaluations": result.trials, "seconds": result.seconds, "best_step": result.best.step,
                         "best_search_accuracy": result.best.accuracy, "fidelity": fidelity.tag,
                         "pareto_steps": [t.step for t in result.pareto],
                         **({"latency_check": result.info["latency_check"]} if "latency_check" in result.info else {})},
              "decode_failures": [f.__dict__ for f in session.splits.failures][:100],
              **final.report()}
    if table is not None:
        report["latency_table"] = table.summary()
    store = LocalArtifactStore(settings.artifacts_dir)
    out = settings.artifacts_dir / job_id / "model"
    save_artifact(final.pruned.model, final.pruned.spec, out, report)
    location = store.put(job_id, "model", out)
    weights_file = out / "model.safetensors"
    with session_scope(url) as s:
        repo.add_artifact(s, job_id=job_id, kind="model", path=location, size_bytes=weights_file.stat().st_size,
                          sha256=hashlib.sha256(weights_file.read_bytes()).hexdigest())
        repo.update_job(s, job_id=job_id, status="succeeded", result=report, finetune_progress=1.0, finished_at=utcnow())
    return "succeeded"


def _cancelled(url: str, job_id: str) -> bool:
    with session_scope(url) as s:
        job = repo.get_job(s, job_id=job_id)
        return job is None or job.cancel_requested


class _FinetuneProgress:
    """Fine-tune step callback: progress to the job row every few seconds, and the cancel flag."""

    def __init__(self, url: str, job_id: str, every_s: float = 2.0) -> None:
        import time

        self.url, self.job_id, self.every_s = url, job_id, every_s
        self._clock = time.monotonic
        self._last = 0.0

    def __call__(self, step: int, total: int, loss: float) -> bool:
        now = self._clock()
        if now - self._last < self.every_s and step < total:
            return False
        self._last = now
        with session_scope(self.url) as s:
            repo.update_job(s, job_id=self.job_id, finetune_progress=step / max(1, total), heartbeat_at=utcnow())
            job = repo.get_job(s, job_id=self.job_id)
            if job is not None and job.cancel_requested:
                raise SearchCancelled("cancelled during fine-tuning")
        return False


def _ray_map() -> Mapper | None:
    """Fan independent evaluations (NetAdapt proposals) out as Ray tasks when running inside Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
    except ImportError:  # pragma: no cover
        return None

    def mapper(fn: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any]) -> list[Any]:
        remote = ray.remote(num_cpus=1, max_retries=1)(fn)
        ref = ray.put(shared)
        return ray.get([remote.remote(ref, item) for item in items])

    return mapper


def stale(heartbeat: Any, seconds: float) -> bool:
    if heartbeat is None:
        return True
    return (utcnow() - as_utc(heartbeat)).total_seconds() > seconds

