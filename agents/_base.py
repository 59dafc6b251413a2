"""The one interface every search agent obeys, and the machinery they share.

An agent gets a :class:`SearchContext` (the shared evaluator, the budget as ratio limits, search
limits, a trial recorder) and returns a :class:`SearchResult`. Every evaluation goes through
``ctx.evaluate``, which numbers it, records it as a trial, and on a resumed job returns the
recorded result for steps already done instead of evaluating again: seeded agents regenerate the
same proposals, so a restarted job continues where it stopped with nothing lost or run twice.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from prunepilot.compression import Evaluator, Fidelity, Metrics, PrunePilotError, Strategy
from prunepilot.compression.strategy import from_vector, to_vector

log = logging.getLogger("prunepilot.agents")


class SearchCancelled(PrunePilotError):
    """Raised inside an agent when the job was cancelled; the recorded trials stay."""


@dataclass
class TrialRecord:
    """One evaluation, as stored: the same row for every agent."""

    step: int
    agent: str
    strategy: Strategy
    metrics: dict[str, Any]
    reward: float | None = None
    feasible: bool = True
    kind: str = "search"  # search | sensitivity | proposal | final
    wall_time_s: float = 0.0
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return float(self.metrics["accuracy"])


class TrialRecorder(Protocol):
    def record(self, trial: TrialRecord) -> None: ...

    def existing(self) -> list[TrialRecord]: ...

    def should_stop(self) -> bool: ...


class MemoryRecorder:
    """Keeps trials in a list: for the CLI, tests and benchmarks."""

    def __init__(self, trials: Sequence[TrialRecord] = (), stop: Callable[[], bool] | None = None) -> None:
        self.trials: list[TrialRecord] = list(trials)
        self._stop = stop

    def record(self, trial: TrialRecord) -> None:
        self.trials.append(trial)

    def existing(self) -> list[TrialRecord]:
        return list(self.trials)

    def should_stop(self) -> bool:
        return bool(self._stop and self._stop())


@dataclass(frozen=True)
class SearchLimits:
    max_evaluations: int | None = 60
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.max_evaluations is None and self.max_seconds is None:
            raise PrunePilotError("give a maximum number of evaluations or a time limit")
        if self.max_evaluations is not None and self.max_evaluations < 1:
            raise PrunePilotError("max_evaluations must be >= 1")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise PrunePilotError("max_seconds must be > 0")


@dataclass
class SearchResult:
    best: TrialRecord | None
    trials: int
    seconds: float
    pareto: list[TrialRecord] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class SearchContext:
    """What an agent may use: the evaluator, the budget, the limits and the trial recorder."""

    def __init__(
        self,
        evaluator: Evaluator,
        limits: Mapping[str, float],
        search: SearchLimits,
        recorder: TrialRecorder | None = None,
        seed: int = 0,
        agent: str = "agent",
        fidelity: Fidelity | None = None,
        state_dir: Path | None = None,
        options: Mapping[str, Any] | None = None,
        on_trial: Callable[[TrialRecord], None] | None = None,
    ) -> None:
        if not limits:
            raise PrunePilotError("a search needs at least one budget constraint")
        self.evaluator = evaluator
        self.pruner = evaluator.pruner
        self.limits = dict(limits)
        missing = [r for r in self.limits if r not in ("flops", "params", "size", "latency")]
        if missing:
            raise PrunePilotError(f"unknown budget resource(s): {', '.join(missing)}")
        if "latency" in self.limits and evaluator.latency_model is None:
            raise PrunePilotError("a latency budget needs a latency model (build the lookup table first)")
        self.search = search
        self.recorder = recorder or MemoryRecorder()
        self.seed = seed
        self.agent = agent
        self.fidelity = fidelity
        self.state_dir = state_dir
        self.options = dict(options or {})
        self.on_trial = on_trial
        self.rng = np.random.default_rng(seed)
        self.started = time.monotonic()
        self._done: dict[int, TrialRecord] = {t.step: t for t in self.recorder.existing()}
        self.step = 0
        self.best: TrialRecord | None = None
        for t in sorted(self._done.values(), key=lambda t: t.step):
            self._track_best(t)
        self.layer_names = self.pruner.layer_names
        self.max_ratios = self.pruner.max_ratios()

    # ------------------------------------------------------------------ budget

    def resources(self, ratios: np.ndarray) -> dict[str, float]:
        return self.evaluator.resources(self.pruner.kept_from_vector(ratios))

    def feasible(self, ratios: np.ndarray) -> bool:
        res = self.resources(ratios)
        return all(res[r] <= lim * (1 + 1e-9) for r, lim in self.limits.items())

    def slack(self, ratios: np.ndarray) -> float:
        """Largest relative overshoot over the limits (<= 0 when within budget)."""
        res = self.resources(ratios)
        return max(res[r] / lim - 1.0 for r, lim in self.limits.items())

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
        channels = self.pruner.graph.channels
        ratios = np.array(ratios, dtype=np.float64)
        kept = self.pruner.kept_from_vector(ratios)
        exact = np.array([(c - k) / c for c, k in zip(channels, kept, strict=True)])
        blocked = np.zeros(len(ratios), dtype=bool)
        while not blocked.all():
            # the layer keeping the smallest share of its channels gets the next one
            order = np.argsort(kept / channels + blocked * 10.0, kind="stable")
            i = int(order[0])
            step = 1
            trial = exact.copy()
            while True:
                trial[i] = max(0.0, (channels[i] - kept[i] - step) / channels[i])
                new_kept = self.pruner.kept_from_vector(trial)
                if new_kept[i] > kept[i] or trial[i] == 0.0:
                    break
                step += 1
            if new_kept[i] > kept[i] and self.feasible(trial):
                exact, kept = trial, new_kept
            else:
                blocked[i] = True
        return exact

    # ------------------------------------------------------------------ evaluation

    def remaining(self) -> int | None:
        if self.search.max_evaluations is None:
            return None
        return self.search.max_evaluations - self.step

    def fast_forward(self) -> None:
        """Continue after the recorded trials (for agents whose own state remembers them)."""
        if self._done:
            self.step = max(self.step, max(self._done) + 1)

    def exhausted(self) -> bool:
        if self.search.max_evaluations is not None and self.step >= self.search.max_evaluations:
            return True
        return self.search.max_seconds is not None and time.monotonic() - self.started >= self.search.max_seconds

    def check_cancel(self) -> None:
        if self.recorder.should_stop():
            raise SearchCancelled("search cancelled")

    def evaluate(self, ratios: np.ndarray | Mapping[str, float], kind: str = "search", reward: float | None = None,
                 extra: dict[str, Any] | None = None, count: bool = True) -> TrialRecord:
        """Evaluate a strategy as the next trial, or return the recorded trial of a resumed job."""
        self.check_cancel()
        vec = to_vector(ratios, self.layer_names) if isinstance(ratios, Mapping) else np.asarray(ratios, dtype=np.float64)
        step = self.step
        if step in self._done:
            trial = self._done[step]
            kept = list(self.pruner.kept_from_vector(vec))
            if trial.metrics.get("kept") is not None and list(trial.metrics["kept"]) != kept:
                log.warning("resumed step %d differs from the recorded trial; keeping the recorded one", step)
            if count:
                self.step += 1
            return trial
        m: Metrics = self.evaluator.evaluate_vector(vec, self.fidelity)
        res = {r: m.resource(r) for r in self.limits}
        feasible = all(v is not None and v <= self.limits[r] * (1 + 1e-9) for r, v in res.items())
        trial = TrialRecord(step=step, agent=self.agent, strategy=m.strategy, metrics=_metrics_dict(m),
                            reward=m.accuracy if reward is None else reward, feasible=feasible, kind=kind,
                            wall_time_s=m.wall_time_s, extra=dict(extra or {}))
        self.recorder.record(trial)
        self._done[step] = trial
        if count:
            self.step += 1
        self._track_best(trial)
        if self.on_trial is not None:
            self.on_trial(trial)
        return trial

    def _track_best(self, trial: TrialRecord) -> None:
        if trial.feasible and trial.kind != "sensitivity" and (self.best is None or trial.accuracy > self.best.accuracy):
            self.best = trial

    def result(self, **info: Any) -> SearchResult:
        return SearchResult(self.best, self.step, time.monotonic() - self.started, info=info)

    def vector(self, strategy: Mapping[str, float]) -> np.ndarray:
        return to_vector(strategy, self.layer_names)

    def strategy(self, ratios: np.ndarray) -> Strategy:
        return from_vector(ratios, self.layer_names)


def _metrics_dict(m: Metrics) -> dict[str, Any]:
    d = m.to_dict()
    d.pop("strategy", None)
    return d


class Agent(ABC):
    """A search strategy. Subclasses set ``name`` and implement :meth:`search`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        self.options = options

    @abstractmethod
    def search(self, ctx: SearchContext) -> SearchResult: ...
