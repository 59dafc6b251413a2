"""The prunability report: what pruning can do to a model, before any search.

Computed once per model source and shown before a job starts: the channel groups the dependency
graph found, the layers it leaves whole and why (the graph's own findings plus the correctness
check of :meth:`PruningGraph.verify`), the largest reduction reachable at the layer limits for
each resource (the *floor* a budget cannot go under), the dense model's figures, and the time a
search of a given length is expected to take.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .budget import BudgetChecker, uniform_within
from .errors import BudgetError
from .evaluate import Fidelity, LatencyModel
from .graph import BlockedLayer
from .latency import LatencyTable
from .measure import torch_threads
from .problem import UNITS, Budget
from .pruning import Pruner
from .resources import Resource, SizeModel, dense_values, within
from .strategy import PruningConstraints

__all__ = ["MIN_SPEEDUP", "NO_SPEEDUP", "GroupReport", "LatencyOutlook", "LayerCurve", "PrunabilityReport", "estimate_evaluation_seconds",
           "inspect_model", "latency_outlook", "latency_problems", "timed_report"]


@dataclass(frozen=True)
class GroupReport:
    """One prunable channel group: its root layer, the layers pruned with it, and what it weighs.

    ``macs_share``: MACs of every conv / linear whose input or output channels the group prunes,
    as a share of the dense model's MACs (a layer between two groups counts in both, so the shares
    add up to more than 1)."""

    name: str
    type: str  # "conv", "depthwise-conv" or "linear"
    channels: int
    coupled: tuple[str, ...]
    macs: int
    macs_share: float
    max_ratio: float


@dataclass(frozen=True)
class PrunabilityReport:
    """What pruning can do to one model (see :func:`inspect_model`).

    ``floors``: each resource's remaining share of the dense model (MACs for ``flops``) with every
    prunable layer at its largest allowed ratio; the smallest budget a search can meet.
    ``latency`` is present only when a latency model was given.
    """

    arch: str
    input_size: int
    groups: tuple[GroupReport, ...]
    blocked: tuple[BlockedLayer, ...]
    dense_macs: int
    dense_params: int
    dense_size_bytes: int
    dense_latency_ms: float | None
    floors: Mapping[str, float]
    max_ratio: float
    first_layer_max_ratio: float
    verified: bool  # whether the blocked layers include the correctness check's findings
    verify_seconds: float | None = None
    seconds_per_evaluation: float | None = None
    evaluations: int | None = None
    _dense: Mapping[str, float | None] = field(default_factory=dict, repr=False, compare=False)

    @property
    def search_seconds(self) -> float | None:
        """Expected time of the requested search: evaluations x seconds per evaluation."""
        if self.seconds_per_evaluation is None or self.evaluations is None:
            return None
        return self.seconds_per_evaluation * self.evaluations

    def floor(self, resource: str) -> float:
        """The least share of the dense model ``resource`` can be pruned to under the layer limits."""
        r = str(resource)
        if r not in self.floors:
            if r == Resource.LATENCY:
                raise BudgetError("no latency floor: the report was made without a latency table")
            raise BudgetError(f"unknown resource {resource!r}; known: {', '.join(self.floors)}")
        return float(self.floors[r])

    def limits_text(self) -> str:
        return f"max ratio {self.max_ratio:g}, first layer {self.first_layer_max_ratio:g}"

    def below_floor(self, budget: Budget) -> list[str]:
        """A message for each constraint of ``budget`` under the reachable floor (empty: reachable).

        Absolute limits are converted with the dense model's values; a latency limit is judged only
        when the report has a latency floor."""
        messages = []
        for c in budget.constraints:
            resource = Resource(c.resource).value
            if resource not in self.floors:
                continue
            limit = c.limit_ratio(self._dense.get(resource))
            floor = self.floors[resource]
            if within(floor, limit):
                continue
            asked = f"{c.ratio:g}" if c.ratio is not None else f"{c.value:g} {UNITS[resource]} ({limit:.3g} of dense)"
            messages.append(f"{resource} {asked} is below the reachable floor {floor:.3g} for this model at the layer "
                            f"limits ({self.limits_text()})")
        return messages

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "arch": self.arch,
            "input_size": self.input_size,
            "groups": [{"name": g.name, "type": g.type, "channels": g.channels, "coupled": list(g.coupled), "macs": g.macs,
                        "macs_share": g.macs_share, "max_ratio": g.max_ratio} for g in self.groups],
            "blocked": [{"name": b.name, "reason": b.reason, "group": list(b.group)} for b in self.blocked],
            "dense": {"macs": self.dense_macs, "params": self.dense_params, "size_bytes": self.dense_size_bytes,
                      "latency_ms": self.dense_latency_ms},
            "floors": dict(self.floors),
            "limits": {"max_ratio": self.max_ratio, "first_layer_max_ratio": self.first_layer_max_ratio},
            "verified": self.verified,
            "verify_seconds": self.verify_seconds,
            "time": {"seconds_per_evaluation": self.seconds_per_evaluation, "evaluations": self.evaluations,
                     "search_seconds": self.search_seconds},
        }

    def table(self) -> str:
        """The report as text for the CLI."""
        lines = [f"{self.arch} at {self.input_size}x{self.input_size}: {len(self.groups)} prunable layers, "
                 f"{len(self.blocked)} left whole" + ("" if self.verified else " (correctness check not run)")]
        dense = f"dense: {self.dense_macs / 1e6:.1f} M MACs, {self.dense_params / 1e6:.2f} M params, {self.dense_size_bytes / 1e6:.2f} MB"
        if self.dense_latency_ms is not None:
            dense += f", {self.dense_latency_ms:.2f} ms"
        lines.append(dense)
        floors = ", ".join(f"{r} {v:.1%}" for r, v in self.floors.items())
        lines.append(f"reachable floor at the layer limits ({self.limits_text()}): {floors}")
        if self.seconds_per_evaluation is not None:
            line = f"time: {self.seconds_per_evaluation:.2f} s per evaluation"
            if self.search_seconds is not None:
                line += f", {self.evaluations} evaluations ~ {_duration(self.search_seconds)}"
            lines.append(line)
        if self.groups:
            width = max(24, *(len(g.name) for g in self.groups))
            lines += ["", f"{'prunable layer':<{width}}  {'type':<14} {'channels':>8} {'MACs share':>10}  coupled"]
            for g in self.groups:
                others = [c for c in g.coupled if c != g.name]
                coupled = ", ".join(others[:3]) + (f" (+{len(others) - 3})" if len(others) > 3 else "")
                lines.append(f"{g.name:<{width}}  {g.type:<14} {g.channels:>8} {g.macs_share:>10.1%}  {coupled or '-'}")
        if self.blocked:
            width = max(24, *(len(b.name) for b in self.blocked))
            lines += ["", f"{'left whole':<{width}}  reason"]
            lines += [f"{b.name:<{width}}  {b.reason}" for b in self.blocked]
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _latency_floor(model: LatencyModel, kept: np.ndarray) -> float:
    """The least predicted latency at the layer limits ``kept``: as they are, or (a table with a
    channel alignment) raised to the block, which may be faster than the counts off it."""
    floor = model.predict(kept)
    if isinstance(model, LatencyTable):
        floor = min(floor, model.predict(model.aligned_up(kept)))
    return floor


def inspect_model(pruner: Pruner, *, latency_table: LatencyModel | None = None, seconds_per_evaluation: float | None = None,
                  evaluations: int | None = None, verify: bool = True, seed: int = 0,
                  dense_latency_ms: float | None = None) -> PrunabilityReport:
    """The prunability report of ``pruner``'s model under its constraints.

    ``verify`` runs :meth:`PruningGraph.verify`: layers whose plan fails it are reported blocked
    and held whole in the floors (a search must not prune them). ``latency_table`` (anything with
    ``predict(kept)`` and ``dense_ms``, e.g. a calibrated ``LatencyTable``) adds the latency floor;
    without one, ``dense_latency_ms`` (a plain measurement) is shown as the dense latency.
    """
    graph = pruner.graph
    failed: list[BlockedLayer] = []
    verify_seconds = None
    graph_blocked = list(graph.blocked)
    if pruner.verified:  # checked when the pruner was made: those layers are already excluded from its graph
        failed, verify_seconds, verify = list(pruner.verify_failed), pruner.verify_seconds, True
        held = {name for b in failed for name in (b.name, *b.group)}
        graph_blocked = [b for b in graph_blocked if b.name not in held]
    elif verify:
        start = time.perf_counter()
        failed = graph.verify(pruner.model, seed=seed)
        verify_seconds = time.perf_counter() - start
    failed_names = {b.name for b in failed}
    max_ratios = np.asarray(pruner.max_ratios(), dtype=np.float64)
    max_ratios = np.where([layer.name in failed_names for layer in graph.layers], 0.0, max_ratios)

    size = SizeModel.of(pruner.model, graph.dense_params)
    dense_latency = latency_table.dense_ms if latency_table is not None else dense_latency_ms
    floors: dict[str, float] = {}
    if graph.layers:
        checker = BudgetChecker.analytic(graph, pruner.constraints, {Resource.FLOPS.value: 1.0}, size)
        floors.update(checker.resources(max_ratios))
        if latency_table is not None and dense_latency:
            floors[Resource.LATENCY.value] = _latency_floor(latency_table, checker.kept(max_ratios)) / dense_latency
    else:
        floors = {r: 1.0 for r in ("flops", "params", "size")} | ({"latency": 1.0} if latency_table is not None else {})

    dense_macs = max(graph.dense_macs, 1)
    groups = tuple(
        GroupReport(layer.name, layer.type, layer.c_out, layer.coupled, int(layer.group_flops),
                    float(layer.group_flops / dense_macs), float(pruner.constraints.layer_max(layer.index)))
        for layer in graph.layers if layer.name not in failed_names
    )
    order = {name: i for i, name in enumerate(graph.forward_order)}
    blocked = tuple(sorted([*graph_blocked, *failed], key=lambda b: order.get(b.name, len(order))))
    return PrunabilityReport(
        arch=pruner.arch, input_size=pruner.input_size, groups=groups, blocked=blocked,
        dense_macs=int(graph.dense_macs), dense_params=int(graph.dense_params), dense_size_bytes=int(size.dense_bytes),
        dense_latency_ms=dense_latency, floors=floors, max_ratio=pruner.constraints.max_ratio,
        first_layer_max_ratio=pruner.constraints.first_layer_max_ratio, verified=verify, verify_seconds=verify_seconds,
        seconds_per_evaluation=seconds_per_evaluation, evaluations=evaluations,
        _dense=dense_values(graph.dense_macs, graph.dense_params, size, dense_latency),
    )


def estimate_evaluation_seconds(pruner: Pruner, fidelity: Fidelity | None = None, threads: int | None = None) -> float:
    """Seconds one search evaluation takes here, timed on random images: prune a candidate (every
    layer at half its limit), then the passes the fidelity makes (BatchNorm re-estimation on the
    calibration images, accuracy on the validation images). Short-finetune fidelities add their
    steps at the same per-image rate, times three for the backward pass."""
    fidelity = fidelity or Fidelity()
    start = time.perf_counter()
    candidate = pruner.prune_kept(pruner.kept_from_vector(np.asarray(pruner.max_ratios()) / 2)).model
    prune_s = time.perf_counter() - start
    batch = fidelity.batch_size
    x = torch.randn(min(batch, 256), 3, pruner.input_size, pruner.input_size)
    with torch_threads(threads), torch.inference_mode():
        candidate.eval()(x[:2])  # warm-up
        start = time.perf_counter()
        candidate(x)
        per_image = (time.perf_counter() - start) / len(x)
    images = fidelity.calib_images + (fidelity.val_images or 5000)
    if fidelity.method == "short-finetune":
        images += 3 * fidelity.finetune_steps * batch
    return prune_s + per_image * images


def timed_report(pruner: Pruner, evaluations: int, threads: int | None, latency_table: LatencyModel | None = None) -> PrunabilityReport:
    """:func:`inspect_model` with this machine's figures: the dense model's batch-1 latency and the
    estimated seconds per evaluation (what ``prunepilot inspect`` and ``POST /v1/inspect`` show)."""
    from .measure import measure_latency

    dense_ms = measure_latency([pruner.model], pruner.input_size, 1, threads=threads, repeats=10)[0].median_ms
    seconds = estimate_evaluation_seconds(pruner, threads=threads) if pruner.layers else None
    return inspect_model(pruner, latency_table=latency_table, seconds_per_evaluation=seconds, evaluations=evaluations,
                         dense_latency_ms=dense_ms)


# ---------------------------------------------------------------------------------------------- latency outlook

NO_SPEEDUP = "pruning will not make this faster on this target"
# The least predicted speedup at the layer limits worth a latency search: the table's validation
# target is a 5 % median error (benchmarks/latency_table.py), so a predicted gain under 5 % is within
# what it misjudges, and the measured check could not confirm it.
MIN_SPEEDUP = 1.05


@dataclass(frozen=True)
class LayerCurve:
    """One prunable layer's latency curve: predicted network ms with the layer keeping each of
    ``counts`` channels (the table's grid for it) and every other layer whole."""

    name: str
    counts: tuple[int, ...]
    ms: tuple[float, ...]


@dataclass(frozen=True)
class LatencyOutlook:
    """What pruning can do to latency on one target, from its calibrated latency table.

    ``floor_speedup``: dense over predicted latency with every layer at its largest ratio (the most a
    search can get); ``uniform_speedup`` / ``stepped_speedup``: at the requested budget, the least
    uniform pruning meeting it, without and with measured channel steps (``round_to="measured"``)."""

    backend: str
    device: str
    batch_size: int
    dense_ms: float
    floor_speedup: float
    layers: tuple[LayerCurve, ...]
    budget: str | None = None
    uniform_speedup: float | None = None
    stepped_speedup: float | None = None
    budget_problem: str | None = None  # why the speedups at the budget are missing
    calibration: str | None = None  # "measured" now, or "stored" by an earlier job or build of the model on this target

    @property
    def will_speed_up(self) -> bool:
        return self.floor_speedup >= MIN_SPEEDUP

    @property
    def verdict(self) -> str:
        if not self.will_speed_up:
            return (f"{NO_SPEEDUP}: the latency table ({self.backend}, batch {self.batch_size}) predicts at most "
                    f"{self.floor_speedup:.3f}x at the layer limits (under {MIN_SPEEDUP:g}x)")
        return f"pruning can make this up to {self.floor_speedup:.2f}x faster on this target (predicted, at the layer limits)"

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "device": self.device, "batch_size": self.batch_size, "dense_ms": self.dense_ms,
                "floor_speedup": self.floor_speedup, "will_speed_up": self.will_speed_up, "verdict": self.verdict,
                "budget": self.budget, "uniform_speedup": self.uniform_speedup, "stepped_speedup": self.stepped_speedup,
                "budget_problem": self.budget_problem, "calibration": self.calibration,
                "layers": [{"name": c.name, "counts": list(c.counts), "ms": list(c.ms)} for c in self.layers]}

    def table(self, curve_points: int = 6) -> str:
        """The outlook as text for the CLI (each curve shown at up to ``curve_points`` of its counts)."""
        lines = [f"latency on {self.backend} ({self.device}), batch {self.batch_size}: dense {self.dense_ms:.3f} ms "
                 f"(calibration {self.calibration or 'measured'})",
                 self.verdict]
        if self.budget is not None:
            if self.budget_problem is not None:
                lines.append(f"at {self.budget}: {self.budget_problem}")
            else:
                lines.append(f"at {self.budget}: uniform pruning {self.uniform_speedup:.2f}x, "
                             f"with measured channel steps {self.stepped_speedup:.2f}x (predicted)")
        if self.layers:
            width = max(24, *(len(c.name) for c in self.layers))
            lines += ["", f"{'layer latency curve':<{width}}  predicted network ms at kept channels (others whole)"]
            for c in self.layers:
                picks = sorted(set(np.linspace(0, len(c.counts) - 1, min(curve_points, len(c.counts))).round().astype(int).tolist()))
                lines.append(f"{c.name:<{width}}  " + "  ".join(f"{c.counts[j]}:{c.ms[j]:.3f}" for j in picks))
        return "\n".join(lines)


def _without_steps(constraints: PruningConstraints) -> PruningConstraints:
    if constraints.round_to == "measured":
        return dataclasses.replace(constraints, round_to=None, steps=None)
    return constraints


def _speedup_at(pruner: Pruner, table: Any, constraints: PruningConstraints, limits: Mapping[str, float]) -> float:
    checker = BudgetChecker.analytic(pruner.graph, constraints, limits, SizeModel.of(pruner.model, pruner.graph.dense_params),
                                     latency=table)
    kept = checker.kept(uniform_within(checker))
    return float(table.dense_ms / table.predict(kept))


def latency_outlook(pruner: Pruner, table: Any, budget: Budget | None = None) -> LatencyOutlook:
    """Each layer's latency curve and the predicted speedups of ``pruner``'s model on ``table``'s
    target (a built and calibrated ``LatencyTable``)."""
    graph = pruner.graph
    base = _without_steps(pruner.constraints)
    floor = base.kept_vector(graph.channels, base.max_ratios(len(graph.layers)))
    dense_ms = float(table.dense_ms)
    curves = tuple(LayerCurve(layer.name, tuple(table.layer_grid(i)),
                              tuple(float(v) for v in table.layer_curve(i, table.layer_grid(i))))
                   for i, layer in enumerate(graph.layers))
    outlook = LatencyOutlook(backend=table.backend.name, device=table.device, batch_size=int(table.batch_size), dense_ms=dense_ms,
                             floor_speedup=dense_ms / _latency_floor(table, floor), layers=curves,
                             calibration=table.calibration_source)
    if budget is None or not graph.layers:
        return outlook
    size = SizeModel.of(pruner.model, graph.dense_params)
    limits = budget.ratio_limits(dense_values(graph.dense_macs, graph.dense_params, size, dense_ms))
    stepped = dataclasses.replace(base, round_to="measured", steps=table.channel_steps(base.lowest_vector(graph.channels)))
    try:
        uniform, with_steps = _speedup_at(pruner, table, base, limits), _speedup_at(pruner, table, stepped, limits)
    except BudgetError as exc:
        return dataclasses.replace(outlook, budget=budget.describe(), budget_problem=str(exc))
    return dataclasses.replace(outlook, budget=budget.describe(), uniform_speedup=uniform, stepped_speedup=with_steps)


def latency_problems(pruner: Pruner, table: Any, budget: Budget) -> list[str]:
    """Why ``budget``'s latency constraint cannot be met on ``table``'s target (empty: it can, or the
    budget has none): no speedup worth a search at all (:data:`NO_SPEEDUP`), or a limit under the
    latency floor (the prunability report's own check)."""
    if budget.get("latency") is None or not pruner.graph.layers:
        return []
    base = _without_steps(pruner.constraints)
    floor = base.kept_vector(pruner.graph.channels, base.max_ratios(len(pruner.graph.layers)))
    speedup = float(table.dense_ms) / _latency_floor(table, floor)
    if speedup < MIN_SPEEDUP:
        return [f"{NO_SPEEDUP}: the latency table ({table.backend.name}, batch {table.batch_size}) predicts at most "
                f"{speedup:.3f}x at the layer limits (under {MIN_SPEEDUP:g}x)"]
    report = inspect_model(pruner, latency_table=table, verify=False)
    return [m for m in report.below_floor(budget) if m.startswith(Resource.LATENCY.value)]
