"""The one job pipeline: prepare -> search -> measured check -> finalize -> report.

The service's worker, the CLI and the comparison benchmark all run a job through these phases and
add only their wiring (an SQL recorder and Ray map, a progress bar, result files) through
:class:`PipelineHooks`. A change to the flow (as the measured latency check was) is made here once.

    prepared = prepare(pruner, splits, config, hooks)     # latency table, evaluator, ratio limits
    ctx, result = search(prepared, config, hooks)         # the agent, then the measured latency check
    final = finish(pruner, splits, result.best.strategy, timed_config(config), hooks,
                   initial_model=result.model)            # fine-tune, measure against dense
    out = report(prepared, config, result, final, arch)   # what the job stores, budget_check included

or all three at once with :func:`run_pipeline`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunepilot.compression import Budget, DataSplits, Evaluator, Fidelity, FinetuneConfig, PrunePilotError, Pruner, finalize
from prunepilot.compression.backends import LatencyBackend, LatencyTarget, local_backend
from prunepilot.compression.compute_device import GPU_EVAL_BATCH
from prunepilot.compression.compute_device import describe as describe_device
from prunepilot.compression.finalizing import FinalResult
from prunepilot.compression.latency import LatencyStore, LatencyTable
from prunepilot.compression.resources import Resource, dense_values

from ._base import MemoryRecorder, SearchContext, SearchEnv, SearchLimits, SearchResult, TrialRecord, TrialRecorder
from .latency_check import check_measured_latency
from .registry import create_agent

StepHook = Callable[[int, int, float], Any]


@dataclass(frozen=True)
class FinalConfig:
    """The last phase: fine-tune the chosen network (and optionally the dense one), measure both."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    finetune_dense: bool = False
    test_images: int | None = None
    latency_batches: tuple[int, ...] = (1, 64)
    # where the final latency figures are timed: the job's latency target (the default, torch on
    # the worker's CPU, keeps the figures exactly as they were measured before targets existed)
    target: LatencyTarget = field(default_factory=LatencyTarget)


@dataclass(frozen=True)
class PipelineConfig:
    """A job, parsed: every field typed, every default set once (by the engine configs)."""

    agent: str
    budget: Budget
    agent_options: Mapping[str, Any] = field(default_factory=dict)
    search: SearchLimits = field(default_factory=SearchLimits)
    fidelity: Fidelity = field(default_factory=Fidelity)
    final: FinalConfig = field(default_factory=FinalConfig)
    seed: int = 0
    target: LatencyTarget = field(default_factory=LatencyTarget)  # where latency is measured (table and check)


@dataclass
class PipelineHooks:
    """What the caller wires in; every hook is optional.

    ``recorder`` keeps the trials (SQL rows, a JSONL file, a list); ``env`` is the host's search
    environment (Ray map, Optuna storage); ``state_dir`` keeps the agent's and the fine-tune's
    checkpoints (a retried job resumes from them); ``latency_store`` keeps the latency table's entries;
    ``latency_table`` is a table the caller built itself (the benchmark keeps its calibration with
    its results); ``should_stop`` is polled while a table is built; ``on_search_done`` runs between
    the search and fine-tuning (the worker moves the job to 'finetuning' there); ``on_finetune_step``
    sees every fine-tune step and may raise to cancel; ``score`` replaces validation accuracy as the
    search's objective; ``device`` is the compute device every model runs on (the host's choice, like
    ``threads``: ``PRUNEPILOT_DEVICE``, ``prune --device``, ``compress(device=)``), not the latency target."""

    recorder: TrialRecorder | None = None
    env: SearchEnv = field(default_factory=SearchEnv)
    state_dir: Path | None = None
    threads: int | None = None
    latency_store: LatencyStore | None = None
    latency_table: LatencyTable | None = None
    should_stop: Callable[[], bool] | None = None
    on_trial: Callable[[TrialRecord], None] | None = None
    on_search_done: Callable[[SearchResult], None] | None = None
    on_finetune_step: StepHook | None = None
    score: Callable[[torch.nn.Module], float] | None = None  # the user's metric instead of accuracy (prunepilot.compress)
    latency_backend: LatencyBackend | None = None  # None: the local backend the job's target names (a remote device: the host's)
    device: str | torch.device = "cpu"  # compute device: auto, cpu, cuda, cuda:N (compression/compute_device.py)
    gpu_eval_batch: int = GPU_EVAL_BATCH  # inference batch on a GPU (validation, test)
    calibration_repeats: int | None = None  # whole-network runs per latency calibration network (None: the engine's)


@dataclass
class Prepared:
    pruner: Pruner
    splits: DataSplits
    evaluator: Evaluator
    limits: dict[str, float]
    table: LatencyTable | None
    backend: str | None = None  # the latency backend the table was measured on (None: no table)


@dataclass
class JobResult:
    search: SearchResult
    final: FinalResult
    report: dict[str, Any]


def _threads(hooks: PipelineHooks) -> int:
    return hooks.threads or torch.get_num_threads()


def latency_backend(target: LatencyTarget, hooks: PipelineHooks) -> LatencyBackend:
    """The backend the job's latency is measured on: the caller's, else the local one its target names."""
    if hooks.latency_backend is not None:
        return hooks.latency_backend
    if target.device is not None:
        raise PrunePilotError(f"latency target device {target.device!r} is measured through the service's device agents; "
                              "this run has none")
    return local_backend(target.backend, _threads(hooks))


def prepare(pruner: Pruner, splits: DataSplits, config: PipelineConfig, hooks: PipelineHooks) -> Prepared:
    """Latency table (for a latency budget, or for measured channel steps), the evaluator and the
    budget as ratios of dense. A latency budget the table says pruning cannot reach (the floor, or
    no speedup at all on this target) fails here, before any search."""
    from prunepilot.compression.inspect import latency_problems

    table = hooks.latency_table
    latency = config.budget.get("latency")
    measured_steps = pruner.constraints.round_to == "measured"
    if (latency is not None or measured_steps) and table is None:
        if hooks.latency_store is None:
            raise PrunePilotError("a latency budget (or round_to='measured') needs a latency store for its lookup table")
        batch = latency.batch_size if latency is not None else 1
        table = LatencyTable(pruner.graph, pruner.model, hooks.latency_store, batch, _threads(hooks), backend=latency_backend(config.target, hooks))
        table.build(should_stop=hooks.should_stop)
        # measured steps need it too: it finds the channel alignment the target rewards
        table.calibrated(repeats=hooks.calibration_repeats)
    backend_name = table.backend.name if table is not None else None
    if measured_steps and table is not None and pruner.constraints.steps is None:
        lowest = pruner.constraints.lowest_vector(pruner.graph.channels)
        pruner.constraints = dataclasses.replace(pruner.constraints, steps=table.channel_steps(lowest))
    if latency is None:
        table = None  # built for the channel steps only: no latency budget to predict
    elif table is not None:
        problems = latency_problems(pruner, table, config.budget)
        if problems:
            raise PrunePilotError("; ".join(problems))
    evaluator = Evaluator(pruner, splits, config.fidelity, latency_model=table, metric=hooks.score, device=hooks.device,
                          gpu_eval_batch=hooks.gpu_eval_batch)
    g = pruner.graph
    dense = dense_values(g.dense_macs, g.dense_params, evaluator.size_model, table.dense_ms if table is not None else None)
    return Prepared(pruner, splits, evaluator, config.budget.ratio_limits(dense), table, backend_name)


def search(prepared: Prepared, config: PipelineConfig, hooks: PipelineHooks, agent_name: str | None = None) -> tuple[SearchContext, SearchResult]:
    """Run the agent, then hold a latency budget to measurement (``check_measured_latency``).
    ``agent_name`` labels the trials when it differs from the agent (a benchmark's named variant)."""
    ctx = SearchContext(prepared.evaluator, prepared.limits, config.search, hooks.recorder or MemoryRecorder(), seed=config.seed,
                        agent=agent_name or config.agent, state_dir=hooks.state_dir, env=hooks.env, on_trial=hooks.on_trial,
                        tolerances=config.budget.tolerances())
    result = create_agent(config.agent, **dict(config.agent_options)).search(ctx)
    if result.best is None:
        raise PrunePilotError("the search found no strategy within the budget")
    return ctx, check_measured_latency(ctx, result)


def finish(pruner: Pruner, splits: DataSplits, strategy: Mapping[str, float], config: FinalConfig, hooks: PipelineHooks,
           initial_model: torch.nn.Module | None = None) -> FinalResult:
    """Prune with ``strategy`` (or start from ``initial_model``), fine-tune, measure against dense.
    Also the whole of ``prunepilot prune``, whose strategy is given instead of searched."""
    return finalize(pruner, splits, strategy, config.finetune, finetune_dense=config.finetune_dense,
                    test_images=config.test_images, latency_batches=config.latency_batches, threads=_threads(hooks),
                    on_step=hooks.on_finetune_step, initial_model=initial_model,
                    checkpoint_dir=hooks.state_dir / "finetune" if hooks.state_dir is not None else None, device=hooks.device,
                    gpu_eval_batch=hooks.gpu_eval_batch, latency_backend=_final_backend(config, hooks))


def _final_backend(config: FinalConfig, hooks: PipelineHooks) -> LatencyBackend | None:
    """The final figures' clock: the job's latency backend; None for the default target with no
    backend from the host (torch eager here, the clock ``finalize`` has always used)."""
    if hooks.latency_backend is None and config.target == LatencyTarget():
        return None
    return latency_backend(config.target, hooks)


def report(prepared: Prepared, config: PipelineConfig, result: SearchResult, final: FinalResult, arch: str) -> dict[str, Any]:
    best = result.best
    assert best is not None
    out: dict[str, Any] = {
        "arch": arch, "agent": config.agent, "budget": config.budget.describe(), "limits": prepared.limits,
        "data": prepared.splits.describe(),
        "compute_device": describe_device(prepared.evaluator.device),
        "search": {"evaluations": result.trials, "seconds": result.seconds, "best_step": best.step,
                   "best_search_accuracy": best.accuracy, "fidelity": prepared.evaluator.fidelity_tag(),
                   "pareto_steps": [t.step for t in result.pareto],
                   **({"latency_check": result.info["latency_check"]} if "latency_check" in result.info else {})},
        "decode_failures": [f.__dict__ for f in prepared.splits.failures][:100],
        **final.report(),
    }
    latency = config.budget.get(Resource.LATENCY)
    out["budget_check"] = config.budget.check_measured(prepared.limits, final.usage(latency.batch_size if latency else 1))
    if prepared.table is not None:
        out["latency_table"] = prepared.table.summary()
    out["latency_target"] = {**config.target.describe(), "measured_on": prepared.backend}
    constraints = prepared.pruner.constraints
    if constraints.round_to == "measured" and constraints.steps is not None:
        lowest = constraints.lowest_vector(prepared.pruner.graph.channels)
        out["channel_steps"] = {name: {"efficient_counts": len(steps), "of": int(c - lo + 1)} for name, steps, c, lo in
                                zip(prepared.pruner.layer_names, constraints.steps, prepared.pruner.graph.channels, lowest, strict=True)
                                if len(steps) < c - lo + 1}  # the layers whose counts are snapped
    return out


def timed_config(config: PipelineConfig) -> FinalConfig:
    """The final phase's settings, timing the batch size a latency budget names too (the report's
    ``budget_check`` holds the final figures to the budget)."""
    latency = config.budget.get(Resource.LATENCY)
    if latency is None or latency.batch_size in config.final.latency_batches:
        return config.final
    return dataclasses.replace(config.final, latency_batches=(*config.final.latency_batches, latency.batch_size))


def run_pipeline(pruner: Pruner, splits: DataSplits, config: PipelineConfig, hooks: PipelineHooks, arch: str) -> JobResult:
    """The whole job: prepare, search with the measured check, fine-tune and measure, report."""
    prepared = prepare(pruner, splits, config, hooks)
    _, result = search(prepared, config, hooks)
    if hooks.on_search_done is not None:
        hooks.on_search_done(result)
    assert result.best is not None
    final = finish(pruner, splits, result.best.strategy, timed_config(config), hooks, initial_model=result.model)
    return JobResult(result, final, report(prepared, config, result, final, arch))
