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
import torch
import torch.nn as nn
from pydantic import TypeAdapter, ValidationError

from prunepilot.compression import Evaluator, Fidelity, LatencyModel, Metrics, PrunePilotError, Strategy
from prunepilot.compression.budget import BudgetChecker
from prunepilot.compression.evaluate import EvalData
from prunepilot.compression.resources import MEASURED_TOLERANCE, within
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


Mapper = Callable[[Callable[[Any, Any], Any], Any, Sequence[Any]], Sequence[Any]]


@dataclass(frozen=True)
class SearchEnv:
    """What the host running a search provides: the server's choices, never a user's option.

    ``map`` fans independent evaluations out (the service passes a Ray version); ``optuna_storage``
    is the database URL a persistent Optuna study lives in and ``study_name`` its unique, internal
    name (one per job), so a study survives a killed worker and no job can reach another's.
    """

    map: Mapper | None = None
    optuna_storage: str | None = None
    study_name: str | None = None


@dataclass
class SearchResult:
    best: TrialRecord | None
    trials: int
    seconds: float
    pareto: list[TrialRecord] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    # The network the agent ends with when it trained one (NetAdapt): the final fine-tune starts
    # from it instead of re-pruning the dense model.
    model: Any = None


class TrialLedger:
    """One search's trials: their numbering, the record a resumed job replays, and the best so far.

    Steps count up from 0. A step already in the record (a retried job) is answered from it instead of
    being evaluated again; seeded agents regenerate the same proposals, so nothing is lost or run twice.
    """

    def __init__(self, recorder: TrialRecorder) -> None:
        self.recorder = recorder
        self._done: dict[int, TrialRecord] = {t.step: t for t in recorder.existing()}
        self.step = 0
        self.best: TrialRecord | None = None
        for t in self.trials():
            self._track_best(t)

    def recorded(self, step: int) -> TrialRecord | None:
        return self._done.get(step)

    def add(self, trial: TrialRecord) -> None:
        """Record a new trial (at ``trial.step``) and follow the best."""
        self.recorder.record(trial)
        self._done[trial.step] = trial
        self._track_best(trial)

    def fast_forward(self) -> None:
        if self._done:
            self.step = max(self.step, max(self._done) + 1)

    def trials(self) -> list[TrialRecord]:
        return sorted(self._done.values(), key=lambda t: t.step)

    def _track_best(self, trial: TrialRecord) -> None:
        if trial.feasible and trial.kind != "sensitivity" and (self.best is None or trial.accuracy > self.best.accuracy):
            self.best = trial


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
        env: SearchEnv | None = None,
        on_trial: Callable[[TrialRecord], None] | None = None,
        tolerances: Mapping[str, float] | None = None,
    ) -> None:
        self.budget = BudgetChecker(evaluator, limits)
        self.evaluator = evaluator
        self.pruner = evaluator.pruner
        self.limits = self.budget.limits
        self.tolerances = dict(tolerances or {})  # per resource, the budget's slack for measured usage
        self.search = search
        self.recorder = recorder or MemoryRecorder()
        self.ledger = TrialLedger(self.recorder)
        self.seed = seed
        self.agent = agent
        self.fidelity = fidelity
        self.state_dir = state_dir
        self.env = env or SearchEnv()
        self.on_trial = on_trial
        self.rng = np.random.default_rng(seed)
        self.started = time.monotonic()
        self.layer_names = self.pruner.layer_names
        self.max_ratios = self.pruner.max_ratios()
        # Every agent would otherwise find out its own way (some by never finding a strategy).
        # Resources fall as ratios grow, so the largest allowed ratios are the floor.
        missed = self.budget.exceeded(self.budget.max_ratios)
        if missed:
            detail = ", ".join(f"{r} {100 * v:.1f} % of dense > limit {100 * self.limits[r]:.1f} %" for r, v in missed.items())
            raise PrunePilotError(f"budget is infeasible under the layer limits: even the largest allowed ratio in every layer "
                                  f"gives {detail}")

    # ------------------------------------------------------------------ the problem (read-only views)
    # Agents see the model and its costs through these, never through the evaluator: what the
    # evaluator caches, how it times itself and which fidelity it applies stay its own.

    @property
    def channels(self) -> np.ndarray:
        """Dense output channels of each prunable layer, in depth order."""
        return self.pruner.graph.channels

    @property
    def importance(self) -> list[np.ndarray]:
        """Per-layer channel importance scores (the pruner's criterion), in depth order."""
        return self.pruner.scores

    def kept(self, ratios: np.ndarray) -> np.ndarray:
        """Channels each layer keeps under ``ratios`` (the constraints' rounding applied)."""
        return self.pruner.kept_from_vector(ratios)

    def costs(self, kept: np.ndarray) -> dict[str, float]:
        """Each resource as a share of dense for a network keeping ``kept`` channels per layer."""
        return self.evaluator.resources(kept)

    @property
    def predicts_latency(self) -> bool:
        """Whether latency comes from a lookup table (so a measured check can disagree with it)."""
        return self.evaluator.latency_model is not None

    @property
    def latency_model(self) -> LatencyModel | None:
        """The lookup table that predicts latency (None without a latency budget)."""
        return self.evaluator.latency_model

    def eval_data(self) -> EvalData:
        """The validation (and calibration) images this search's fidelity uses."""
        return self.evaluator.data(self.fidelity or self.evaluator.fidelity)

    @property
    def device(self) -> torch.device:
        """The compute device the evaluator runs models on; an agent that trains its own networks uses it too."""
        return self.evaluator.device

    def network_metrics(self, model: nn.Module, kept: np.ndarray, accuracy: float, label: str) -> Metrics:
        """Metrics of a network the agent built itself (NetAdapt's fine-tuned proposals): its
        accuracy as measured by the agent, its costs as the evaluator counts every network's."""
        return self.evaluator.metrics_for(model, kept, accuracy, label)

    def evaluation_seconds(self) -> tuple[float, float]:
        """(forward-pass seconds, total evaluation seconds) spent by the evaluator so far."""
        return self.evaluator.forward_seconds, self.evaluator.total_seconds

    # ------------------------------------------------------------------ budget (see compression.budget)

    def resources(self, ratios: np.ndarray) -> dict[str, float]:
        return self.budget.resources(ratios)

    def within_measured(self, resource: str, usage: float) -> bool:
        """A measured usage (a network timed on the target) against its limit, with the budget's
        ``tolerance`` for that resource; predictions are held to the limit itself (``feasible``)."""
        return within(usage, self.limits[resource], self.tolerances.get(resource, MEASURED_TOLERANCE))

    def feasible(self, ratios: np.ndarray) -> bool:
        return self.budget.feasible(ratios)

    def project(self, shape: np.ndarray, fill: bool = True) -> np.ndarray | None:
        return self.budget.project(shape, fill=fill)

    def fill(self, ratios: np.ndarray) -> np.ndarray:
        return self.budget.fill(ratios)

    def project_within(self, shape: np.ndarray, **limits: float) -> np.ndarray | None:
        """``project`` onto this search's limits with some replaced (a limit tightened after a
        measurement disagreed with its prediction)."""
        return BudgetChecker(self.evaluator, {**self.limits, **limits}).project(shape)

    # ------------------------------------------------------------------ evaluation

    def map(self, fn: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any]) -> list[Any]:
        """``[fn(shared, item) for item in items]``; the service swaps in a parallel (Ray) version
        through ``env.map``, with ``shared`` placed once in the object store."""
        if self.env.map is not None:
            return list(self.env.map(fn, shared, items))
        return [fn(shared, item) for item in items]

    # ------------------------------------------------------------------ the ledger (TrialLedger)

    @property
    def step(self) -> int:
        """The next trial's number."""
        return self.ledger.step

    @step.setter
    def step(self, value: int) -> None:
        self.ledger.step = value

    @property
    def best(self) -> TrialRecord | None:
        """The most accurate feasible trial so far (sensitivity probes excluded)."""
        return self.ledger.best

    def is_recorded(self, step: int) -> bool:
        return self.ledger.recorded(step) is not None

    def fast_forward(self) -> None:
        """Continue after the recorded trials (for agents whose own state remembers them)."""
        self.ledger.fast_forward()

    def exhausted(self) -> bool:
        if self.search.max_evaluations is not None and self.step >= self.search.max_evaluations:
            return True
        return self.search.max_seconds is not None and time.monotonic() - self.started >= self.search.max_seconds

    def check_cancel(self) -> None:
        if self.recorder.should_stop():
            raise SearchCancelled("search cancelled")

    def evaluate(self, ratios: np.ndarray | Mapping[str, float], kind: str = "search", reward: float | None = None,
                 extra: dict[str, Any] | None = None, count: bool = True,
                 reward_fn: Callable[[dict[str, Any]], float] | None = None,
                 evaluate_fn: Callable[[np.ndarray], Metrics] | None = None) -> TrialRecord:
        """Evaluate a strategy as the next trial, or return the recorded trial of a resumed job."""
        self.check_cancel()
        vec = to_vector(ratios, self.layer_names) if isinstance(ratios, Mapping) else np.asarray(ratios, dtype=np.float64)
        step = self.step
        recorded = self.ledger.recorded(step)
        if recorded is not None:
            trial = recorded
            kept = list(self.pruner.kept_from_vector(vec))
            if trial.metrics.get("kept") is not None and list(trial.metrics["kept"]) != kept:
                log.warning("resumed step %d differs from the recorded trial; keeping the recorded one", step)
            if count:
                self.step += 1
            return trial
        m: Metrics = evaluate_fn(vec) if evaluate_fn is not None else self.evaluator.evaluate_vector(vec, self.fidelity)
        feasible = all(within(m.resource(r), lim) for r, lim in self.limits.items())
        metrics = _metrics_dict(m)
        if reward_fn is not None:
            reward = reward_fn(metrics)
        trial = TrialRecord(step=step, agent=self.agent, strategy=m.strategy, metrics=metrics,
                            reward=m.accuracy if reward is None else reward, feasible=feasible, kind=kind,
                            wall_time_s=m.wall_time_s, extra=dict(extra or {}))
        self.ledger.add(trial)
        if count:
            self.step += 1
        if self.on_trial is not None:
            self.on_trial(trial)
        return trial

    def trials(self) -> list[TrialRecord]:
        """Every trial of this search so far, resumed ones included, in step order."""
        return self.ledger.trials()

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
    # The options the agent reads, each with its type (pydantic: bounds, literals). Anything else is a
    # typo the user should hear about, not a silent no-op; a value of the wrong type is refused when the
    # agent is made (the API's submission), not when the search reads it in a worker.
    option_types: ClassVar[Mapping[str, Any]] = {}
    option_names: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.option_names = frozenset(cls.option_types)

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - self.option_names)
        if unknown:
            allowed = ", ".join(sorted(self.option_names)) or "none"
            raise PrunePilotError(f"unknown option(s) for agent {self.name!r}: {', '.join(unknown)}; allowed: {allowed}")
        self.options = {key: self._checked(key, value) for key, value in options.items() if value is not None}  # None: unset

    def _checked(self, key: str, value: Any) -> Any:
        try:
            return TypeAdapter(self.option_types[key]).validate_python(value)
        except ValidationError as exc:
            raise PrunePilotError(f"agent {self.name!r} option {key!r}: {exc.errors()[0]['msg']} (got {value!r})") from None

    # Said after "found no strategy within the budget" when a search ends with no feasible trial.
    no_feasible_hint: ClassVar[str] = "the budget may be infeasible under the layer limits"

    def search(self, ctx: SearchContext) -> SearchResult:
        """Run the search (``explore``) and hold it to the one rule every agent shares: a search
        ends with a feasible best strategy, or with an error that says why it has none."""
        result = self.explore(ctx)
        if result.best is None:
            raise PrunePilotError(f"{self.name} found no strategy within the budget; {self.no_feasible_hint}")
        return result

    @abstractmethod
    def explore(self, ctx: SearchContext) -> SearchResult:
        """The agent's own search. Every evaluation goes through ``ctx.evaluate``; return
        ``ctx.result(...)`` (its best may be None: :meth:`search` turns that into the error)."""
