"""The latency budget as measured, not only as predicted.

Agents meet a latency budget through the lookup table's prediction, and a search that maximizes
accuracy under a predicted limit drifts to where the table under-predicts (on ResNet-56 at 70 %
of dense, TPE's, AMC's and NSGA-II's best networks measured 71-74 %). After the search, the most
accurate candidates are timed against the dense model (interleaved, median of three rounds); the
first that meets the budget as measured is the answer, or else the best profile is pruned a little
further until it does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch.nn as nn

from prunepilot.compression.backends import TorchBackend, measure_pair

from ._base import SearchContext, SearchResult, TrialRecord

log = logging.getLogger("prunepilot.agents.latency_check")


@dataclass(frozen=True)
class LatencyCheck:
    step: int
    accuracy: float
    predicted: float
    measured: float

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "accuracy": self.accuracy, "predicted_latency": self.predicted, "measured_latency": self.measured}


def measured_share(ctx: SearchContext, model: nn.Module) -> float:
    """``model``'s latency as a share of dense at the table's batch size, on the table's backend (the
    runtime and device the table was measured on): the two timed interleaved in three rounds, median
    ratio (one burst of load elsewhere cannot decide it)."""
    table = ctx.latency_model
    batch, threads = int(getattr(table, "batch_size", 1)), getattr(table, "threads", None)
    backend = getattr(table, "backend", None) or TorchBackend(threads)
    dense, mine = measure_pair(backend, ctx.pruner.model, model, ctx.pruner.input_size, batch, threads, warmup=5, repeats=60)
    return mine.median_ms / dense.median_ms


def applies(ctx: SearchContext, result: SearchResult) -> bool:
    """Only for a latency budget predicted by a table, and not for an agent that already checked
    its own network against measurement (NetAdapt returns that network)."""
    return "latency" in ctx.limits and ctx.predicts_latency and result.best is not None and result.model is None


def candidates(trials: list[TrialRecord], count: int) -> list[TrialRecord]:
    """The ``count`` most accurate feasible trials, one per distinct network."""
    seen: set[tuple[int, ...]] = set()
    out: list[TrialRecord] = []
    for t in sorted((t for t in trials if t.feasible and t.kind != "sensitivity"), key=lambda t: (-t.accuracy, t.step)):
        key = tuple(int(k) for k in t.metrics.get("kept", []))
        if key in seen:
            continue
        seen.add(key)
        out.append(t)
        if len(out) == count:
            break
    return out


def check_measured_latency(ctx: SearchContext, result: SearchResult, count: int = 3, rounds: int = 3,
                           measure: Callable[[nn.Module], float] | None = None) -> SearchResult:
    """Make ``result.best`` a network that meets the latency budget as measured.

    The top ``count`` trials are timed in accuracy order; the first within the budget (its
    ``tolerance`` allowed, ``SearchContext.within_measured``) wins. The
    searches project every strategy onto the predicted budget, so the top trials usually sit on
    that line together and measure over it together; then the most accurate profile is projected
    onto a limit tightened by its measured overshoot (NetAdapt's rule), evaluated as one more trial
    (kind ``latency-check``) and timed, for at most ``rounds`` rounds. With nothing within, the
    network measured fastest is kept and ``result.info["latency_check"]`` says so. ``measure``
    maps a pruned network to its latency as a share of dense (default: timed interleaved with the
    dense model at the table's batch size, median of three rounds).
    """
    if not applies(ctx, result):
        return result
    searched = result.best
    assert searched is not None  # applies() checked it
    limit = ctx.limits["latency"]
    measure = measure or partial(measured_share, ctx)

    checks: list[LatencyCheck] = []
    timed: dict[int, TrialRecord] = {}

    def time_it(trial: TrialRecord) -> bool:
        ctx.check_cancel()
        measured = measure(ctx.pruner.prune(trial.strategy).model)
        checks.append(LatencyCheck(trial.step, trial.accuracy, float(trial.metrics.get("latency_ratio") or 0.0), measured))
        timed[trial.step] = trial
        return ctx.within_measured("latency", measured)

    chosen: TrialRecord | None = None
    pool = candidates(ctx.trials(), count)
    for trial in pool:
        if time_it(trial):
            chosen = trial
            break
    if chosen is None and pool:
        shape = ctx.vector(pool[0].strategy)
        last = checks[0]
        for r in range(rounds):
            internal = last.predicted * limit / last.measured
            ratios = ctx.project_within(shape, latency=internal)
            if ratios is None:  # the profile cannot shrink further within the layer limits
                break
            trial = ctx.evaluate(ratios, kind="latency-check", extra={"round": r, "internal_limit": internal,
                                                                       "profile_of_step": pool[0].step})
            if time_it(trial):
                chosen = trial
                break
            last = checks[-1]
    within = chosen is not None
    if chosen is None:
        lowest = min(checks, key=lambda c: c.measured)
        chosen = timed[lowest.step]
        log.warning("no network checked meets the latency budget %.1f%% as measured; keeping step %d at %.1f%%",
                    100 * limit, chosen.step, 100 * lowest.measured)
    elif chosen.step != searched.step:
        log.info("latency check: step %d over budget as measured; step %d meets it", searched.step, chosen.step)
    result.info["latency_check"] = {"limit": limit, "within_budget_measured": within, "searched_best_step": searched.step,
                                    "chosen_step": chosen.step, "checks": [c.to_dict() for c in checks]}
    result.best = chosen
    return result
