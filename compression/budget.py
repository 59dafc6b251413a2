"""Budget arithmetic on ratio vectors, shared by agents and the RL environment.

Every resource (MACs, params, size, and latency when a latency model exists) falls monotonically
as any layer's ratio grows, which makes three cheap operations exact: a feasibility check, the
least pruning along a ratio profile that meets the budget (bisection), and AMC's action bound (the
smallest ratio for one layer that keeps the budget reachable if all later layers go to their
maximum).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from .errors import BudgetError
from .graph import PruningGraph
from .problem import Budget
from .resources import RESOURCES, Resource, SizeModel, dense_values, exceeded
from .strategy import PruningConstraints

if TYPE_CHECKING:
    from .evaluate import LatencyModel


class BudgetChecker:
    """Budget checks for one model: ``resources(kept)`` gives each resource as a ratio of dense."""

    def __init__(self, evaluator, limits: Mapping[str, float]) -> None:
        self._setup(evaluator.resources, evaluator.pruner.graph.channels, evaluator.pruner.constraints, limits,
                    getattr(evaluator, "latency_model", None) is not None)

    @classmethod
    def analytic(cls, graph: PruningGraph, constraints: PruningConstraints, limits: Mapping[str, float],
                 size: SizeModel, latency: LatencyModel | None = None) -> BudgetChecker:
        """FLOPs / params / size straight from the pruning graph (no data, no evaluator), plus latency
        when a calibrated ``latency`` model (a table) is given; the same figures the evaluator gives
        (``size`` is the evaluator's size model)."""
        dense = graph.cost(np.zeros(len(graph.layers)))

        def resources(kept: np.ndarray) -> dict[str, float]:
            c = graph.cost(graph.channels - kept)
            out = {"flops": c.macs / dense.macs, "params": c.params / dense.params, "size": size.ratio(c.params + c.bn_buffers)}
            if latency is not None:
                out["latency"] = latency.predict(kept) / latency.dense_ms
            return out

        checker = cls.__new__(cls)
        checker._setup(resources, graph.channels, constraints, limits, has_latency=latency is not None)
        return checker

    def _setup(self, resources: Callable[[np.ndarray], dict[str, float]], channels: np.ndarray, constraints: PruningConstraints,
               limits: Mapping[str, float], has_latency: bool) -> None:
        unknown = [r for r in limits if r not in RESOURCES]
        if unknown:
            raise BudgetError(f"unknown budget resource(s): {', '.join(unknown)}")
        if not limits:
            raise BudgetError("a budget needs at least one constraint")
        if "latency" in limits and not has_latency:
            raise BudgetError("a latency budget needs a latency model (build the lookup table first)")
        self._resources = resources
        self.constraints = constraints
        self.limits = dict(limits)
        self.channels = np.asarray(channels)
        self.max_ratios = constraints.max_ratios(len(self.channels))

    def kept(self, ratios: np.ndarray) -> np.ndarray:
        return self.constraints.kept_vector(self.channels, ratios)

    def resources(self, ratios: np.ndarray) -> dict[str, float]:
        return self._resources(self.kept(ratios))

    def feasible(self, ratios: np.ndarray) -> bool:
        return not self.exceeded(ratios)

    def exceeded(self, ratios: np.ndarray) -> dict[str, float]:
        """The limited resources ``ratios`` leave over their limits, with their values."""
        res = self.resources(ratios)
        return {r: res[r] for r in exceeded(res, self.limits)}

    def slack(self, ratios: np.ndarray) -> float:
        """Largest relative overshoot over the limits (<= 0 when within budget)."""
        res = self.resources(ratios)
        return max(res[r] / lim - 1.0 for r, lim in self.limits.items())

    def reachable(self) -> bool:
        return self.feasible(self.max_ratios)

    def floor(self) -> dict[str, float]:
        """Each limited resource at the largest allowed ratios: the least the budget can ask for."""
        res = self.resources(self.max_ratios)
        return {r: res[r] for r in self.limits}

    def project(self, shape: np.ndarray, iters: int = 30, fill: bool = True) -> np.ndarray | None:
        """Least pruning along ``clip(t * shape)`` that meets the budget (bisection on t).

        Resources fall monotonically as t grows, so the smallest feasible t keeps the most
        capacity; ``fill`` then hands back channels lost to rounding. Returns None if even the
        maximal ratios along this shape miss the budget.
        """
        shape = np.maximum(np.asarray(shape, dtype=np.float64), 0.0)
        if not shape.any():
            shape = np.ones_like(shape)
        top = float(np.max(self.max_ratios / np.maximum(shape, 1e-12)))

        def at(t: float) -> np.ndarray:
            return np.minimum(t * shape, self.max_ratios)

        if not self.feasible(at(top)):
            return None
        if self.feasible(at(0.0)):
            return at(0.0)
        lo, hi = 0.0, top
        for _ in range(iters):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self.feasible(at(mid)) else (mid, hi)
        return self.fill(at(hi)) if fill else at(hi)

    def fill(self, ratios: np.ndarray) -> np.ndarray:
        """Give back channels while the budget allows, most-pruned layers first.

        Channel counts are integers, so a ratio profile scaled onto the budget usually stops short
        of it; this spends the rest, one channel (or rounding step) at a time.
        """
        channels = self.channels
        kept = self.kept(np.asarray(ratios, dtype=np.float64))
        exact = (channels - kept) / channels
        blocked = np.zeros(len(kept), dtype=bool)
        while not blocked.all():
            # the layer keeping the smallest share of its channels gets the next one
            i = int(np.argmin(kept / channels + blocked * 10.0))
            trial = exact.copy()
            new_kept = kept
            for step in range(1, int(channels[i] - kept[i]) + 1):
                trial[i] = (channels[i] - kept[i] - step) / channels[i]
                new_kept = self.kept(trial)
                if new_kept[i] > kept[i]:
                    break
            if new_kept[i] > kept[i] and self.feasible(trial):
                exact, kept = trial, new_kept
            else:
                blocked[i] = True
        return exact

    def min_ratio(self, ratios: np.ndarray, index: int, iters: int = 14) -> float:
        """AMC's action bound: the least ratio for layer ``index`` such that, with the layers before
        it as given and every later layer at its maximum, the budget is still met."""
        probe = np.array(ratios, dtype=np.float64)
        probe[index + 1:] = self.max_ratios[index + 1:]
        probe[index] = 0.0
        if self.feasible(probe):
            return 0.0
        lo, hi = 0.0, float(self.max_ratios[index])
        probe[index] = hi
        if not self.feasible(probe):
            return hi  # cannot be met any more; prune as hard as allowed
        for _ in range(iters):
            mid = (lo + hi) / 2
            probe[index] = mid
            lo, hi = (lo, mid) if self.feasible(probe) else (mid, hi)
        return hi


def analytic_checker(model: nn.Module, graph: PruningGraph, constraints: PruningConstraints, budget: Budget) -> BudgetChecker:
    """The budget's FLOPs / params / size constraints as ratio limits on this model (absolute values
    converted with the dense model's figures); refuses latency, which needs a measured table."""
    if any(c.resource == Resource.LATENCY for c in budget.constraints):
        raise BudgetError("a latency budget needs a latency table: submit a job (prunepilot submit), which measures one")
    size = SizeModel.of(model, graph.dense_params)  # the evaluator's own size model, so both agree
    dense = dense_values(graph.dense_macs, graph.dense_params, size)
    limits = {str(c.resource): c.limit_ratio(dense[c.resource]) for c in budget.constraints}
    return BudgetChecker.analytic(graph, constraints, limits, size)


def uniform_within(checker: BudgetChecker) -> np.ndarray:
    """The least uniform pruning that meets the budget (one ratio for every layer, before rounding)."""
    ratios = checker.project(np.ones(len(checker.channels)), fill=False)
    if ratios is None:
        floor = checker.floor()
        raise BudgetError("the budget is below what the layer limits reach: " +
                          ", ".join(f"{r} can go down to {floor[r]:.1%} of dense" for r in floor))
    return ratios
