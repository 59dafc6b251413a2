"""The cheap baselines a user expects: uniform, random, sensitivity scan, global ranking."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import Field

from prunepilot.compression import PrunePilotError

from ._base import Agent, SearchContext, SearchResult, TrialRecord


def solve_uniform(ctx: SearchContext) -> np.ndarray:
    """The one ratio for every layer that just meets the budget (bisection)."""
    ratios = ctx.project(np.ones(len(ctx.layer_names)))
    if ratios is None:
        raise PrunePilotError("budget is infeasible: even the largest allowed ratio in every layer misses it")
    return ratios


class UniformAgent(Agent):
    name = "uniform"
    description = "one ratio for all prunable layers, solved by bisection to meet the budget exactly"

    def explore(self, ctx: SearchContext) -> SearchResult:
        ratios = solve_uniform(ctx)
        ctx.evaluate(ratios)
        return ctx.result(ratio=float(ratios.max()))


class RandomAgent(Agent):
    name = "random"
    description = "random per-layer ratio profiles, each scaled to just meet the budget; the floor to beat"

    def explore(self, ctx: SearchContext) -> SearchResult:
        n = len(ctx.layer_names)
        # every profile projects onto the budget: SearchContext refuses a budget the maximal ratios miss
        while not ctx.exhausted():
            shape = ctx.rng.uniform(0.05, 1.0, n)
            ratios = ctx.project(shape)
            if ratios is None:
                continue
            ctx.evaluate(ratios)
        return ctx.result()


class GlobalAgent(Agent):
    """Global ranking: channels of all layers compete on normalized importance.

    Each layer's scores are divided by their mean (a layer's scale says nothing about its worth),
    then one threshold across the network removes the least important channels until the budget
    is met, within the first-layer and max-ratio limits.
    """

    name = "global"
    description = "global importance ranking across layers, threshold searched to meet the budget"

    def explore(self, ctx: SearchContext) -> SearchResult:
        scores = [np.asarray(s, dtype=np.float64) / max(float(np.mean(s)), 1e-12) for s in ctx.importance]
        channels = ctx.channels

        def ratios_at(threshold: float) -> np.ndarray:
            r = np.array([(s < threshold).sum() / c for s, c in zip(scores, channels, strict=True)])
            return np.minimum(r, ctx.max_ratios)

        # above every score every layer sits at its largest ratio, which SearchContext has checked is feasible
        hi = max(float(s.max()) for s in scores) * 1.0001
        lo = 0.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if ctx.feasible(ratios_at(mid)) else (mid, hi)
        ctx.evaluate(ratios_at(hi))
        return ctx.result(threshold=hi)


class SensitivityAgent(Agent):
    """The classic scan: per layer, accuracy vs ratio with all other layers dense; then choose each
    layer's ratio as the largest whose accuracy drop stays under a threshold, the threshold
    searched so the budget is met. The curves are recorded (kind ``sensitivity``) for the dashboard.
    """

    name = "sensitivity"
    option_types = {"points": Annotated[int, Field(ge=0, le=100)]}  # 0: chosen from the evaluation budget
    description = "per-layer sensitivity curves, ratios chosen by an accuracy-drop threshold that meets the budget"

    def explore(self, ctx: SearchContext) -> SearchResult:
        n = len(ctx.layer_names)
        budget = ctx.search.max_evaluations
        points = int(self.options.get("points", 0)) or (max(2, min(8, (budget - 2) // n)) if budget else 8)
        dense = ctx.evaluate(np.zeros(n), kind="sensitivity", extra={"layer": None, "ratio": 0.0})
        base = dense.accuracy
        curves: dict[int, list[tuple[float, float]]] = {}
        for i in range(n):
            grid = np.linspace(ctx.max_ratios[i] / points, ctx.max_ratios[i], points)
            curves[i] = [(0.0, base)]
            for r in grid:
                # Keep one evaluation for the chosen profile: small budgets cut the scan short instead.
                if ctx.exhausted() or (budget is not None and ctx.step >= budget - 1):
                    break
                probe = np.zeros(n)
                probe[i] = r
                t = ctx.evaluate(probe, kind="sensitivity", extra={"layer": ctx.layer_names[i], "ratio": float(r)})
                curves[i].append((float(r), t.accuracy))
        # A layer whose scan was cut short by the limit keeps what was measured (ratio 0 otherwise).

        def ratios_at(threshold: float) -> np.ndarray:
            out = np.zeros(n)
            for i, curve in curves.items():
                ok = [r for r, acc in curve if base - acc <= threshold]
                out[i] = max(ok) if ok else 0.0
            return out

        lo, hi = 0.0, 1.0
        if not ctx.feasible(ratios_at(hi)):
            # The scanned grid cannot reach the budget: scale the most tolerant profile up.
            ratios = ctx.project(np.maximum(ratios_at(hi), 1e-3))
            if ratios is None:
                raise PrunePilotError("budget is infeasible under the layer limits")
        else:
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if ctx.feasible(ratios_at(mid)) else (mid, hi)
            # Re-scale the chosen profile so the budget is met exactly rather than overshot.
            ratios = ctx.project(ratios_at(hi)) if ratios_at(hi).any() else ratios_at(hi)
            if ratios is None:
                ratios = ratios_at(hi)
        final: TrialRecord = ctx.evaluate(ratios, extra={"threshold": hi})
        return ctx.result(threshold=hi, final_step=final.step,
                       curves={ctx.layer_names[i]: c for i, c in curves.items()})
