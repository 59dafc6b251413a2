"""The job service layer: validation, creation, queries and cancellation. Routes stay thin over it."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy.orm import Session

from prunepilot.agents import AGENTS, create_agent
from prunepilot.compression import (
    BudgetError,
    PrunePilotError,
    StrategyError,
    arch_info,
    build_model,
)
from prunepilot.compression.budget import BudgetChecker
from prunepilot.compression.graph import PruningGraph
from prunepilot.compression.resources import SizeModel, dense_values

from .db import repo
from .db.engine import read_scope, session_scope
from .db.lifecycle import JobStatus
from .db.models import Job, Trial
from .db.store import JobStore
from .schemas import JobCreate, JobPublic, Links, TrialPublic
from .settings import Settings
from .storage import LocalArtifactStore
from .uploads import (
    StoredUpload,
    dataset_classes,
    discard,
    publish,
    store_stream,
    validate_dataset_zip,
    validate_weights,
    validation_slot,
)
from .workspace import BUILTIN_DATASETS, decode_size


class NotFound(PrunePilotError):
    pass


class InvalidJob(PrunePilotError):
    """Rejected before anything was created (HTTP 422)."""


class NotReady(PrunePilotError):
    """The resource exists but is not available yet (HTTP 409)."""


class QuotaExceeded(PrunePilotError):
    """The key already has as many active jobs as it may (HTTP 429); nothing was read or created."""


@dataclass
class UploadedFile:
    stream: BinaryIO
    filename: str


def check_budget(spec: JobCreate, num_classes: int, input_size: int) -> dict[str, float]:
    """Ratio limits for the analytic resources; rejects budgets the layer limits cannot reach."""
    model = build_model(spec.arch, num_classes)
    constraints = spec.constraints.to_engine()
    try:
        graph = PruningGraph(model, input_size, exclude=constraints.exclude)
    except StrategyError as exc:
        raise InvalidJob(str(exc)) from None
    if not graph.layers:
        raise InvalidJob(f"{spec.arch} has no prunable layers" + (" left after the exclusions" if constraints.exclude else ""))
    size = SizeModel.of(model, graph.dense_params)  # the evaluator's own size model, so both agree
    dense = dense_values(graph.dense_macs, graph.dense_params, size)  # latency: converted on the worker, once measured
    limits: dict[str, float] = {}
    for c in spec.budget.constraints:
        if c.resource == "latency":
            continue  # converted on the worker, where latency is measured
        try:
            limits[c.resource] = c.limit_ratio(dense[c.resource])
        except BudgetError as exc:
            raise InvalidJob(str(exc)) from None
    if limits:
        checker = BudgetChecker.analytic(graph, constraints, limits, size)
        if not checker.reachable():
            floor = checker.floor()
            parts = ", ".join(f"{r} can go down to {floor[r]:.1%} of dense" for r in limits)
            raise InvalidJob(f"budget {spec.budget.describe()} is infeasible under the layer limits "
                             f"(max ratio {constraints.max_ratio}, first layer {constraints.first_layer_max_ratio}): {parts}")
    return limits


def problem_key(spec: JobCreate, weights_sha: str, dataset_key: str) -> str:
    """Jobs on the same model, data and budget share a key: the dashboard compares them."""
    blob = json.dumps({"arch": spec.arch, "weights": weights_sha, "data": dataset_key,
                       "budget": spec.budget.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def links(job_id: str) -> Links:
    base = f"/v1/jobs/{job_id}"
    return Links(self=base, trials=f"{base}/trials", model=f"{base}/model", report=f"{base}/report",
                 cancel=f"{base}/cancel", dashboard=f"/dashboard#job={job_id}")


def to_public(job: Job) -> JobPublic:
    budget = "; ".join(
        f"{c['resource']} <= " + (f"{c['ratio']:.0%}" if c.get("ratio") is not None else f"{c['value']:g}")
        for c in job.problem["spec"]["budget"]["constraints"])
    return JobPublic(
        id=job.id, name=job.name, status=JobStatus(job.status), agent=job.agent, arch=job.arch, dataset=job.dataset, budget=budget,
        problem_key=job.problem_key, progress=job.progress, finetune_progress=job.finetune_progress, evaluations=job.evaluations,
        best_accuracy=job.best_accuracy, best_step=job.best_step, best_metrics=job.best_metrics, result=job.result, error=job.error,
        attempts=job.attempts, created_at=job.created_at, started_at=job.started_at, finetune_started_at=job.finetune_started_at,
        finished_at=job.finished_at, links=links(job.id),
    )


def trial_public(t: Trial) -> TrialPublic:
    return TrialPublic(step=t.step, agent=t.agent, kind=t.kind, strategy=t.strategy, accuracy=t.accuracy, macs_ratio=t.macs_ratio,
                       params_ratio=t.params_ratio, size_ratio=t.size_ratio, latency_ms=t.latency_ms, reward=t.reward,
                       feasible=t.feasible, wall_time_s=t.wall_time_s, metrics=t.metrics, extra=t.extra or {}, created_at=t.created_at)


class JobService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.db_url
        self.store = JobStore(settings.db_url)

    # ------------------------------------------------------------------ create

    def check_quota(self, owner_id: int | None) -> None:
        """Refuse a key that already has ``max_active_jobs_per_key`` jobs queued, running or fine-tuning.

        Checked before the uploads are read, so it costs one count; not in the insert's transaction,
        which comes after the uploads are validated and published. Submissions of one key at once may
        therefore all pass the check and end over the limit, by fewer than the number in flight
        together; a soft limit is enough to keep one key from filling the queue, which is its purpose."""
        limit = self.settings.max_active_jobs_per_key
        if limit is None:
            return
        with read_scope(self.url) as s:
            active = repo.count_active_jobs(s, owner_id=owner_id)
        if active >= limit:
            raise QuotaExceeded(f"this API key already has {active} active jobs (queued, running or fine-tuning); the limit is "
                                f"{limit} (PRUNEPILOT_MAX_ACTIVE_JOBS_PER_KEY): wait for one to end or cancel one")

    def submit(self, owner_id: int | None, spec: JobCreate, weights: UploadedFile, dataset: UploadedFile | None = None) -> JobPublic:
        self.check_quota(owner_id)  # first: before the uploads are read or stored
        if spec.agent not in AGENTS:
            raise InvalidJob(f"unknown agent {spec.agent!r}; available: {', '.join(AGENTS)}")
        try:
            create_agent(spec.agent, **spec.agent_options)
        except PrunePilotError as exc:
            raise InvalidJob(str(exc)) from None
        info = arch_info(spec.arch)
        if spec.dataset not in BUILTIN_DATASETS and spec.dataset != "upload":
            raise InvalidJob(f"unknown dataset {spec.dataset!r}; use {', '.join(BUILTIN_DATASETS)} or 'upload' with a dataset zip")
        if spec.dataset == "upload" and dataset is None:
            raise InvalidJob("dataset 'upload' needs a dataset zip in the request (form field 'dataset')")
        if spec.dataset != "upload" and dataset is not None:
            raise InvalidJob("a dataset zip was sent but the spec names dataset " + repr(spec.dataset) + "; set dataset to 'upload'")
        if spec.search.max_evaluations is None and spec.search.max_seconds is None:
            raise InvalidJob("search needs max_evaluations or max_seconds")
        if spec.dataset == "cifar10-jpeg" and not self.settings.cifar10_zip.is_file():
            raise InvalidJob(f"built-in data set cifar10-jpeg is not available on this server ({self.settings.cifar10_zip})")
        stored: list[StoredUpload] = []
        try:
            w = store_stream(weights.stream, weights.filename, "weights", self.settings)
            stored.append(w)
            with validation_slot(self.settings):  # it loads the whole file: a few at a time, whatever arrives
                num_classes = validate_weights(spec.arch, w)
            input_size = spec.image_size or (info.input_size if info.family == "cifar-resnet" else 32)
            dataset_path: str = "cifar10-jpeg"
            dataset_key = "cifar10-jpeg"
            if spec.dataset == "cifar10-jpeg" and num_classes != 10:
                raise InvalidJob(f"cifar10-jpeg has 10 classes but the weights classify {num_classes}")
            if dataset is not None:
                d = store_stream(dataset.stream, dataset.filename, "dataset", self.settings)
                stored.append(d)
                validate_dataset_zip(d, self.settings, image_size=decode_size(spec.arch, spec.image_size))
                classes = dataset_classes(d)
                if len(classes) != num_classes:
                    raise InvalidJob(f"dataset {d.filename} has {len(classes)} class folder(s) with images "
                                     f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}) but the weights "
                                     f"{w.filename} classify {num_classes} classes")
                dataset_path, dataset_key = str(d.final), d.sha256
            check_budget(spec, num_classes, input_size)
        except BaseException as exc:  # staged files are this request's own: drop them whatever went wrong
            for up in stored:
                discard(up)
            if not isinstance(exc, PrunePilotError) or isinstance(exc, (InvalidJob, NotFound)):
                raise
            raise InvalidJob(str(exc)) from None
        for up in stored:  # accepted: before the job row exists, so it never names a missing file
            publish(up)
        job_id = uuid.uuid4().hex
        problem: dict[str, Any] = {"spec": spec.model_dump(mode="json"), "weights_path": str(w.final), "weights_sha256": w.sha256,
                                   "dataset_path": dataset_path, "num_classes": num_classes}
        with session_scope(self.url) as s:
            for up, kind in zip(stored, ("weights", "dataset"), strict=False):
                repo.add_upload(s, sha256=up.sha256, kind=kind, path=str(up.final), size_bytes=up.size, filename=up.filename)
            job = repo.create_job(s, job_id=job_id, agent=spec.agent, arch=spec.arch,
                                  dataset=spec.dataset if spec.dataset != "upload" else f"upload:{dataset_key[:12]}",
                                  problem=problem, problem_key=problem_key(spec, w.sha256, dataset_key), owner_id=owner_id)
            job.name = spec.name
            s.flush()
            return to_public(job)

    # ------------------------------------------------------------------ read

    def _job(self, s: Session, owner_id: int | None, job_id: str) -> Job:
        job = repo.get_job(s, job_id=job_id, owner_id=owner_id)
        if job is None:  # another user's job is indistinguishable from a missing one
            raise NotFound(f"job {job_id} not found")
        return job

    def get(self, owner_id: int | None, job_id: str) -> JobPublic:
        with read_scope(self.url) as s:
            return to_public(self._job(s, owner_id, job_id))

    def list_jobs(self, owner_id: int | None, status: str | None = None, agent: str | None = None, problem_key: str | None = None,
             limit: int = 50, offset: int = 0) -> tuple[list[JobPublic], int]:
        with read_scope(self.url) as s:
            rows, total = repo.list_jobs(s, owner_id=owner_id, status=status, agent=agent, problem_key=problem_key,
                                         limit=limit, offset=offset)
            return [to_public(j) for j in rows], total

    def trials(self, owner_id: int | None, job_id: str, limit: int | None = 100, offset: int = 0, kind: str | None = None
               ) -> tuple[list[TrialPublic], int]:
        with read_scope(self.url) as s:
            self._job(s, owner_id, job_id)
            rows, total = repo.list_trials(s, job_id=job_id, kind=kind, limit=limit, offset=offset)
            return [trial_public(t) for t in rows], total

    def report(self, owner_id: int | None, job_id: str) -> dict[str, Any]:
        with read_scope(self.url) as s:
            job = self._job(s, owner_id, job_id)
            if job.status != "succeeded" or job.result is None:
                raise NotReady(f"job {job_id} is {job.status}; the report exists once it has succeeded")
            return dict(job.result)

    def model_dir(self, owner_id: int | None, job_id: str) -> Path:
        with read_scope(self.url) as s:
            job = self._job(s, owner_id, job_id)
            art = repo.latest_artifact(s, job_id=job_id, kind="model")
            if job.status != "succeeded" or art is None:
                raise NotReady(f"job {job_id} is {job.status}; the model can be downloaded once it has succeeded")
            return LocalArtifactStore(self.settings.artifacts_dir).open_dir(art.path)

    # ------------------------------------------------------------------ cancel

    def cancel(self, owner_id: int | None, job_id: str) -> JobPublic:
        with read_scope(self.url) as s:
            self._job(s, owner_id, job_id)  # 404 for a missing job or another user's
        if self.store.request_cancel(job_id) is None:
            raise NotReady(f"job {job_id} already {self.store.status(job_id)}")
        with read_scope(self.url) as s:
            return to_public(self._job(s, owner_id, job_id))
