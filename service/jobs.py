"""The job service layer: validation, creation, queries and cancellation. Routes stay thin over it."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy.orm import Session
from torch import nn

from prunepilot.agents import AGENTS, create_agent
from prunepilot.compression import Budget, BudgetError, PrunePilotError, StrategyError, UnknownArchitectureError
from prunepilot.compression.budget import analytic_checker
from prunepilot.compression.sources import ModelSource, SourceKind

from .db import repo
from .db.lifecycle import JobStatus
from .db.models import Job, Trial
from .db.store import JobStore
from .schemas import InspectCreate, JobCreate, JobPublic, Links, ModelSpec, TrialPublic
from .settings import Settings
from .storage import LocalArtifactStore
from .uploads import (
    StoredUpload,
    dataset_classes,
    discard,
    publish,
    store_stream,
    validate_dataset_zip,
    validate_onnx,
    validate_weights,
    validation_slot,
)
from .workspace import BUILTIN_DATASETS, classes_of, make_pruner, model_inputs, registered_classes


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


def check_budget(spec: JobCreate, source: ModelSource, model: nn.Module, num_classes: int, input_size: int,
                 settings: Settings | None = None) -> dict[str, float]:
    """Ratio limits for the analytic resources; rejects budgets the layer limits cannot reach, and
    (given ``settings``) a latency budget the target's stored latency table says pruning cannot
    speed up at all (without a stored table the job's prepare phase refuses it, before any search)."""
    try:
        pruner = make_pruner(source, model, num_classes, input_size, spec.constraints.to_engine())
    except StrategyError as exc:
        raise InvalidJob(str(exc)) from None
    graph, constraints = pruner.graph, pruner.constraints
    if not graph.layers:
        raise InvalidJob(f"{source.ref} has no prunable layers" + (" left after the exclusions" if spec.constraints.exclude else "")
                         + ": POST /v1/inspect says why")
    if settings is not None:
        from .latency_outlook import submission_refusal

        refusal = submission_refusal(pruner, spec.budget, spec.target.to_engine(), settings)
        if refusal is not None:
            raise InvalidJob(refusal)
    analytic = [c for c in spec.budget.constraints if c.resource != "latency"]  # latency: converted on the worker, once measured
    if not analytic:
        return {}
    try:
        checker = analytic_checker(model, graph, constraints, Budget(constraints=analytic))
    except BudgetError as exc:
        raise InvalidJob(str(exc)) from None
    limits = dict(checker.limits)
    if not checker.reachable():
        from prunepilot.compression.inspect import inspect_model

        floor = checker.floor()
        parts = ", ".join(f"{r} can go down to {floor[r]:.1%} of dense" for r in limits)
        report = inspect_model(pruner, verify=False)  # a verifying pruner's findings are in it already
        blocked = "; ".join(f"{b.name}: {b.reason}" for b in report.blocked[:5]) + ("; ..." if len(report.blocked) > 5 else "")
        raise InvalidJob(f"budget {spec.budget.describe()} is infeasible under the layer limits "
                         f"(max ratio {constraints.max_ratio}, first layer {constraints.first_layer_max_ratio}): {parts}. "
                         f"Prunability: {len(report.groups)} prunable layers, {len(report.blocked)} left whole ({blocked}); "
                         "POST /v1/inspect gives the whole report")
    return limits


def _classifies(kind: str, filename: str) -> str:
    """'weights w.th classify' / 'model net.onnx classifies': the upload that fixes the class count, by its own name."""
    return f"{kind} {filename} " + ("classify" if kind == "weights" else "classifies")


def problem_key(spec: JobCreate, weights_sha: str, dataset_key: str) -> str:
    """Jobs on the same model, data and budget share a key: the dashboard compares them."""
    blob = json.dumps({"arch": spec.arch, "inputs": [spec.image_size, spec.mean, spec.std], "weights": weights_sha, "data": dataset_key,
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
        id=job.id, name=job.name, status=JobStatus(job.status), phase=job.phase, agent=job.agent, arch=job.arch, dataset=job.dataset, budget=budget,
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
        with self.store.read() as s:
            active = repo.count_active_jobs(s, owner_id=owner_id)
        if active >= limit:
            raise QuotaExceeded(f"this API key already has {active} active jobs (queued, running or fine-tuning); the limit is "
                                f"{limit} (PRUNEPILOT_MAX_ACTIVE_JOBS_PER_KEY): wait for one to end or cancel one")

    def submit(self, owner_id: int | None, spec: JobCreate, weights: UploadedFile | None,
               dataset: UploadedFile | None = None, model: UploadedFile | None = None) -> JobPublic:
        """Validate everything a worker will read, then create the job. ``model``: an ONNX file
        (``spec.arch`` 'onnx'), which carries its own weights; otherwise ``weights`` for ``spec.arch``."""
        self.check_quota(owner_id)  # first: before the uploads are read or stored
        if spec.agent not in AGENTS:
            raise InvalidJob(f"unknown agent {spec.agent!r}; available: {', '.join(AGENTS)}")
        try:
            create_agent(spec.agent, **spec.agent_options)
        except PrunePilotError as exc:
            raise InvalidJob(str(exc)) from None
        self._check_device(spec)
        source = self._source(spec, weights, model)
        registered = self.settings.datasets  # names only: a job never names a path on the server
        if spec.dataset not in BUILTIN_DATASETS and spec.dataset not in registered and spec.dataset != "upload":
            raise InvalidJob(f"dataset: unknown dataset {spec.dataset!r}; use {', '.join([*BUILTIN_DATASETS, *registered])} "
                             "or 'upload' with a dataset zip")
        if spec.dataset == "upload" and dataset is None:
            raise InvalidJob("dataset 'upload' needs a dataset zip in the request (form field 'dataset')")
        if spec.dataset != "upload" and dataset is not None:
            raise InvalidJob("a dataset zip was sent but the spec names dataset " + repr(spec.dataset) + "; set dataset to 'upload'")
        if spec.search.max_evaluations is None and spec.search.max_seconds is None:
            raise InvalidJob("search needs max_evaluations or max_seconds")
        if spec.dataset == "cifar10-jpeg" and not self.settings.cifar10_zip.is_file():
            raise InvalidJob(f"built-in data set cifar10-jpeg is not available on this server ({self.settings.cifar10_zip})")
        stored: list[tuple[StoredUpload, str]] = []
        try:
            source, dense, num_classes = self._load_model(source, weights, model, stored)
            w = stored[0][0]
            inputs = model_inputs(source, spec.image_size, spec.mean, spec.std)
            dataset_path: str = "cifar10-jpeg"
            dataset_key = "cifar10-jpeg"
            if spec.dataset == "cifar10-jpeg" and num_classes != 10:
                raise InvalidJob(f"cifar10-jpeg has 10 classes but the {_classifies(stored[0][1], w.filename)} {num_classes}")
            if spec.dataset in registered:  # the worker resolves the name through its own registry
                dataset_path, dataset_key = spec.dataset, f"registered:{spec.dataset}"
                classes = registered_classes(spec.dataset, self.settings)
                if classes is not None and len(classes) != num_classes:
                    raise InvalidJob(f"dataset {spec.dataset} has {len(classes)} classes but the "
                                     f"{_classifies(stored[0][1], w.filename)} {num_classes}")
            if dataset is not None:
                d = store_stream(dataset.stream, dataset.filename, "dataset", self.settings)
                stored.append((d, "dataset"))
                validate_dataset_zip(d, self.settings, image_size=inputs.size)
                classes = dataset_classes(d)
                if len(classes) != num_classes:
                    raise InvalidJob(f"dataset {d.filename} has {len(classes)} class folder(s) with images "
                                     f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}) but the "
                                     f"{_classifies(stored[0][1], w.filename)} {num_classes} classes")
                dataset_path, dataset_key = str(d.final), d.sha256
            # the size jobs decode at: the model's or the user's, else CIFAR-10's native 32 (uploads: checked on the worker)
            with validation_slot(self.settings):  # traces (and for a model we did not write, verifies) the model
                check_budget(spec, source, dense, num_classes, inputs.size or 32, self.settings)
        except BaseException as exc:  # staged files are this request's own: drop them whatever went wrong
            for up, _ in stored:
                discard(up)
            if not isinstance(exc, PrunePilotError) or isinstance(exc, (InvalidJob, NotFound)):
                raise
            raise InvalidJob(str(exc)) from None
        for up, _ in stored:  # accepted: before the job row exists, so it never names a missing file
            publish(up)
        spec = spec.model_copy(update={"arch": source.ref})  # an ONNX upload is named by its content from here on
        job_id = uuid.uuid4().hex
        # weights_path: the file that carries the weights (the ONNX file itself for an ONNX source)
        problem: dict[str, Any] = {"spec": spec.model_dump(mode="json"), "weights_path": str(w.final), "weights_sha256": w.sha256,
                                   "dataset_path": dataset_path, "num_classes": num_classes}
        with self.store.write() as s:
            for up, kind in stored:
                repo.add_upload(s, sha256=up.sha256, kind=kind, path=str(up.final), size_bytes=up.size, filename=up.filename)
            job = repo.create_job(s, job_id=job_id, agent=spec.agent, arch=spec.arch,
                                  dataset=spec.dataset if spec.dataset != "upload" else f"upload:{dataset_key[:12]}",
                                  problem=problem, problem_key=problem_key(spec, w.sha256, dataset_key), owner_id=owner_id)
            job.name = spec.name
            s.flush()
            return to_public(job)

    def _load_model(self, source: ModelSource, weights: UploadedFile | None, model: UploadedFile | None,
                    stored: list[tuple[StoredUpload, str]]) -> tuple[ModelSource, nn.Module, int]:
        """Stage the model's file (appended to ``stored``) and load it as the worker will."""
        if model is not None:
            up = store_stream(model.stream, model.filename, "model", self.settings)
            stored.append((up, "model"))
            with validation_slot(self.settings):  # converts and runs the model: a few at a time
                return validate_onnx(up, self.settings)
        if weights is None:  # an inspection without weights: the structure is the same with random ones
            dense = source.build()
            return source, dense, classes_of(dense, source.default_input().size or 32)
        up = store_stream(weights.stream, weights.filename, "weights", self.settings)
        stored.append((up, "weights"))
        with validation_slot(self.settings):  # it loads the whole file: a few at a time, whatever arrives
            dense, num_classes = validate_weights(source, up)
        return source, dense, num_classes

    def inspect(self, spec: InspectCreate, weights: UploadedFile | None, model: UploadedFile | None) -> dict[str, Any]:
        """The prunability report of the model (``POST /v1/inspect``); its uploads are never kept."""
        from prunepilot.compression.inspect import timed_report

        source = self._source(spec, weights, model, need_weights=False)
        stored: list[tuple[StoredUpload, str]] = []
        try:
            source, dense, num_classes = self._load_model(source, weights, model, stored)
            size = model_inputs(source, spec.image_size, spec.mean, spec.std).size or 32
            with validation_slot(self.settings):  # traces, verifies and times the model
                try:
                    pruner = make_pruner(source, dense, num_classes, size, spec.constraints.to_engine())
                except StrategyError as exc:
                    raise InvalidJob(str(exc)) from None
                report = timed_report(pruner, spec.evaluations, threads=1)
                latency: dict[str, Any] | None = None
                latency_note: str | None = None
                latency_problems: list[str] = []
                if spec.target is not None:
                    from .latency_outlook import outlook

                    latency, latency_note, latency_problems = outlook(pruner, spec.target.to_engine(), spec.budget, self.settings)
            problems = report.below_floor(spec.budget) if spec.budget is not None else []
            problems = [*latency_problems, *problems]
        except PrunePilotError as exc:
            raise exc if isinstance(exc, (InvalidJob, NotFound)) else InvalidJob(str(exc)) from None
        finally:
            for up, _ in stored:
                discard(up)
        return {**report.to_dict(), "budget_problems": problems, "latency": latency, "latency_note": latency_note}

    def _check_device(self, spec: JobCreate) -> None:
        """A target device must be declared (its agent may connect later: the job then waits for it), and
        an explicit backend must be the one its agent measures with."""
        name = spec.target.device
        if name is None:
            return
        with self.store.read() as s:
            device = repo.get_device(s, name=name)
            known = [d.name for d in repo.list_devices(s)]
        if device is None:
            raise InvalidJob(f"target.device: no device named {name!r} (known: {', '.join(known[:20]) or 'none'}); the operator "
                             f"declares one with `prunepilot keys create --device {name}`")
        if "backend" in spec.target.model_fields_set and device.backend is not None and spec.target.backend != device.backend:
            raise InvalidJob(f"target.backend: device {name!r} measures with {device.backend}, not {spec.target.backend}")

    @staticmethod
    def _source(spec: ModelSpec, weights: UploadedFile | None, model: UploadedFile | None, need_weights: bool = True) -> ModelSource:
        """The named source, checked against the files sent (an ONNX upload's is resolved once stored)."""
        if model is not None:
            if spec.arch != "onnx":
                raise InvalidJob(f"a model file was sent (form field 'model'): set arch to 'onnx', not {spec.arch!r}")
            if weights is not None:
                raise InvalidJob("an ONNX model carries its own weights: send no 'weights' part with it")
            return ModelSource(SourceKind.ONNX, "")
        if spec.arch == "onnx" or spec.arch.startswith("onnx:"):
            raise InvalidJob("arch 'onnx' needs the ONNX file in the request (form field 'model')")
        try:
            source = ModelSource.parse(spec.arch)
        except UnknownArchitectureError as exc:
            raise InvalidJob(f"arch: {exc}") from None
        if weights is None and need_weights:
            raise InvalidJob(f"arch {spec.arch!r} needs its weights in the request (form field 'weights': a state dict or safetensors file)")
        return source

    # ------------------------------------------------------------------ read

    def _job(self, s: Session, owner_id: int | None, job_id: str) -> Job:
        job = repo.get_job(s, job_id=job_id, owner_id=owner_id)
        if job is None:  # another user's job is indistinguishable from a missing one
            raise NotFound(f"job {job_id} not found")
        return job

    def get(self, owner_id: int | None, job_id: str) -> JobPublic:
        with self.store.read() as s:
            return to_public(self._job(s, owner_id, job_id))

    def list_jobs(self, owner_id: int | None, status: str | None = None, agent: str | None = None, problem_key: str | None = None,
             limit: int = 50, offset: int = 0) -> tuple[list[JobPublic], int]:
        with self.store.read() as s:
            rows, total = repo.list_jobs(s, owner_id=owner_id, status=status, agent=agent, problem_key=problem_key,
                                         limit=limit, offset=offset)
            return [to_public(j) for j in rows], total

    def trials(self, owner_id: int | None, job_id: str, limit: int | None = 100, offset: int = 0, kind: str | None = None
               ) -> tuple[list[TrialPublic], int]:
        with self.store.read() as s:
            self._job(s, owner_id, job_id)
            rows, total = repo.list_trials(s, job_id=job_id, kind=kind, limit=limit, offset=offset)
            return [trial_public(t) for t in rows], total

    def report(self, owner_id: int | None, job_id: str) -> dict[str, Any]:
        with self.store.read() as s:
            job = self._job(s, owner_id, job_id)
            if job.status != "succeeded" or job.result is None:
                raise NotReady(f"job {job_id} is {job.status}; the report exists once it has succeeded")
            return dict(job.result)

    def model_dir(self, owner_id: int | None, job_id: str) -> Path:
        with self.store.read() as s:
            job = self._job(s, owner_id, job_id)
            art = repo.latest_artifact(s, job_id=job_id, kind="model")
            if job.status != "succeeded" or art is None:
                raise NotReady(f"job {job_id} is {job.status}; the model can be downloaded once it has succeeded")
            return LocalArtifactStore(self.settings.artifacts_dir).open_dir(art.path)

    # ------------------------------------------------------------------ cancel

    def cancel(self, owner_id: int | None, job_id: str) -> JobPublic:
        with self.store.read() as s:
            self._job(s, owner_id, job_id)  # 404 for a missing job or another user's
        if self.store.request_cancel(job_id) is None:
            raise NotReady(f"job {job_id} already {self.store.status(job_id)}")
        with self.store.read() as s:
            return to_public(self._job(s, owner_id, job_id))
