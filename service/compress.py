"""``prunepilot.compress``: the job pipeline on an ``nn.Module`` in this process, no server.

The same pipeline as a job (search under the budget, the measured latency check, fine-tune,
measure against dense), fed from the caller's objects: any model the dependency graph can follow,
data as an ImageFolder directory / zip or as uint8 tensors, and optionally the caller's own metric
(``evaluate``) as the search's objective. ``storage`` (a database URL) records the run as a
finished job with its trials, so the dashboard of a server on that database shows it.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunepilot.agents import MemoryRecorder, SearchLimits, TrialRecord
from prunepilot.agents.pipeline import FinalConfig, PipelineConfig, PipelineHooks, run_pipeline
from prunepilot.compression import (
    Budget,
    DataError,
    DataSplits,
    FinetuneConfig,
    ImageSet,
    PrunePilotError,
    Pruner,
    PruningConstraints,
    load_splits,
    parse_constraint,
)
from prunepilot.compression.compute_device import resolve_device
from prunepilot.compression.data import split_train_val
from prunepilot.compression.latency import FileLatencyStore, LatencyStore
from prunepilot.compression.sources import InputSpec

from .settings import Settings, get_settings

ImageData = str | Path | tuple[torch.Tensor, torch.Tensor]


@dataclass
class Compressed:
    """What :func:`compress` returns: the pruned (and fine-tuned) model, its per-layer ratios, the report."""

    model: nn.Module
    strategy: dict[str, float]
    report: dict[str, Any]
    job_id: str | None = None  # the run's id in ``storage``, when given
    trials: list[TrialRecord] = field(default_factory=list)  # every evaluation of the search, in order


def compress(
    model: nn.Module,
    example_input: torch.Tensor,
    budget: str | Sequence[str] | Budget,
    train_data: ImageData,
    val_data: ImageData | None = None,
    *,
    agent: str = "optuna-tpe",
    evaluations: int = 60,
    finetune: float = 1.0,
    evaluate: Callable[[nn.Module], float] | None = None,
    storage: str | None = None,
    test_data: ImageData | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    exclude: Sequence[str] = (),
    agent_options: dict[str, Any] | None = None,
    seed: int = 0,
    name: str | None = None,
    device: str | torch.device | None = None,
) -> Compressed:
    """Prune ``model`` to ``budget`` ("flops=0.5", ["flops=0.5", "size=1MB"] or a ``Budget``).

    ``example_input``: one batch the model takes, (N, 3, H, H); H is the resolution images are
    decoded at. ``train_data`` / ``val_data`` / ``test_data``: an ImageFolder directory or zip (as the
    CLI takes), or ``(images, labels)`` with images uint8 (N, 3, H, H) and labels int64 (N,);
    validation and test are carved from training where not given. ``mean`` / ``std`` normalize the
    images (0-1 scale; default ImageNet's). ``evaluate(model) -> float``: the caller's metric of a
    candidate (higher is better) instead of validation accuracy. ``finetune``: epochs for the chosen
    network. ``storage``: a prunepilot database URL that keeps the run and its trials. ``device``:
    where models run (``auto``: CUDA when present, ``cpu``, ``cuda``, ``cuda:N``; default
    ``PRUNEPILOT_DEVICE``, auto); ``evaluate`` gets each candidate there, and the returned model is on
    the CPU.
    """
    if not isinstance(model, nn.Module):
        raise PrunePilotError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.ndim != 4 or example_input.shape[1] != 3 \
            or example_input.shape[2] != example_input.shape[3]:
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input).__name__
        raise DataError(f"example_input must be an (N, 3, H, H) image batch, got {shape}")
    if agent == "netadapt" and evaluate is not None:
        raise PrunePilotError("netadapt scores its own fine-tuned proposals by accuracy: use another agent with evaluate=")
    settings = get_settings()
    compute = resolve_device(device if device is not None else settings.device)  # one clear error before any work
    size = int(example_input.shape[-1])
    inputs = InputSpec(size).with_overrides(mean=mean, std=std)
    dense = copy.deepcopy(model).eval()
    with torch.no_grad():
        out = dense(example_input[:1])
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise PrunePilotError("the model must output (batch, classes) logits")
    splits = _splits(train_data, val_data, test_data, inputs, settings)
    if splits.num_classes != out.shape[1]:
        raise DataError(f"the data has {splits.num_classes} classes but the model outputs {out.shape[1]}")
    parsed = budget if isinstance(budget, Budget) else Budget(
        constraints=[parse_constraint(b) for b in ([budget] if isinstance(budget, str) else budget)])
    pruner = Pruner(dense, f"module:{type(model).__name__}", int(out.shape[1]), size, PruningConstraints(exclude=tuple(exclude)),
                    verify=True)
    if not pruner.layers:
        raise PrunePilotError(f"{type(model).__name__} has no prunable layers")
    config = PipelineConfig(agent=agent, budget=parsed, agent_options=dict(agent_options or {}),
                            search=_limits(evaluations), seed=seed,
                            final=FinalConfig(finetune=FinetuneConfig(epochs=finetune, seed=seed)))
    recorder = MemoryRecorder()
    hooks = PipelineHooks(recorder=recorder, latency_store=_latency_store(storage), score=evaluate, device=compute,
                          gpu_eval_batch=settings.gpu_eval_batch, calibration_repeats=settings.calibration_repeats)
    result = run_pipeline(pruner, splits, config, hooks, pruner.arch)
    assert result.search.best is not None  # run_pipeline raises when the search found nothing within the budget
    job_id = _store(storage, name, config, result.report, recorder, pruner.arch) if storage else None
    return Compressed(result.final.pruned.model, dict(result.search.best.strategy), result.report, job_id,
                      list(recorder.trials))


def _limits(evaluations: int) -> SearchLimits:
    if evaluations < 1:
        raise PrunePilotError(f"evaluations must be at least 1, got {evaluations}")
    return SearchLimits(evaluations, None)


def _latency_store(storage: str | None) -> LatencyStore:
    """Latency tables (a latency budget) are kept and reused: in ``storage``, else in the data directory."""
    if storage:
        from .db.store import JobStore
        from .latency_store import SqlLatencyStore

        return SqlLatencyStore(JobStore(storage))
    from .settings import get_settings

    return FileLatencyStore(get_settings().data_dir / "latency-tables.json")


def _image_set(data: tuple[torch.Tensor, torch.Tensor], what: str, size: int) -> ImageSet:
    try:
        images, labels = data
    except (TypeError, ValueError):
        raise DataError(f"{what}: expected a path or an (images, labels) pair") from None
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"{what}: images must be a uint8 tensor (N, 3, H, W) with values 0-255")
    if tuple(images.shape[-2:]) != (size, size):
        raise DataError(f"{what}: images are {images.shape[-2]}x{images.shape[-1]} but example_input is {size}x{size}")
    labels = torch.as_tensor(labels, dtype=torch.int64)
    classes = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
    return ImageSet(images, labels, classes)


def _splits(train: ImageData, val: ImageData | None, test: ImageData | None, inputs: InputSpec, settings: Settings) -> DataSplits:
    size = inputs.size
    assert size is not None
    if isinstance(train, (str, Path)):
        if val is not None or test is not None:
            raise DataError("with train_data a path, give validation and test folders inside it (train/, val/, test/)")
        return load_splits(train, image_size=size, mean=inputs.mean, std=inputs.std, max_decoded_bytes=settings.max_decoded_bytes,
                           loader_workers=settings.loader_workers)
    train_set = _image_set(train, "train_data", size)
    if isinstance(val, (str, Path)) or isinstance(test, (str, Path)):
        raise DataError("with train_data as tensors, give val_data and test_data as tensors too")
    val_set = _image_set(val, "val_data", size) if val is not None else None
    if val_set is None:
        train_set, val_set = split_train_val(train_set, max(1, len(train_set) // 10))
    test_set = _image_set(test, "test_data", size) if test is not None else val_set
    classes = max(train_set.classes, val_set.classes, test_set.classes, key=len)
    train_set.classes = val_set.classes = test_set.classes = classes
    return DataSplits(train_set, val_set, test_set, inputs.mean, inputs.std)


def _store(url: str, name: str | None, config: PipelineConfig, report: dict[str, Any], recorder: MemoryRecorder, arch: str) -> str:
    """The finished run as a job row with its trials, written in one transaction (no dispatcher on
    that database ever sees it queued)."""
    from .db import repo
    from .db.engine import session_scope
    from .db.lifecycle import JobStatus
    from .db.migrate import current_revision, ensure_current, upgrade

    if current_revision(url) is None:
        upgrade(url)  # a new database: create it; one at another revision is refused below, never migrated silently
    ensure_current(url)
    job_id = uuid.uuid4().hex
    worker = f"python-api-{uuid.uuid4().hex[:8]}"
    spec = {"arch": arch, "agent": config.agent, "budget": config.budget.model_dump(mode="json"), "dataset": "python-api"}
    with session_scope(url) as s:
        repo.create_job(s, job_id=job_id, agent=config.agent, arch=arch, dataset="python-api", problem={"spec": spec},
                        problem_key=f"py-{job_id[:13]}", owner_id=None)
        repo.claim_job(s, job_id=job_id, worker_id=worker)
        best = None
        for t in recorder.trials:
            repo.record_trial(s, job_id=job_id, trial=t)
            if t.feasible and (best is None or t.accuracy > best.accuracy):
                best = t
        repo.finish_job(s, job_id=job_id, status=JobStatus.SUCCEEDED, worker_id=worker, result=report, progress=1.0,
                        evaluations=len(recorder.trials), best_accuracy=best.accuracy if best else None,
                        best_step=best.step if best else None, best_metrics=best.metrics if best else None)
        job = repo.get_job(s, job_id=job_id)
        assert job is not None
        job.name = name
    return job_id
