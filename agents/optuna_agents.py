"""Optuna agents: TPE with the budget as a constraint, and NSGA-II for Pareto fronts.

Search space: a per-layer *profile* ``s_i`` in [0, 1]; the strategy is the least pruning along
that profile that meets the budget (``ctx.project``). Every TPE trial is therefore a candidate at
the budget line, so no evaluation is wasted on strategies that break it or leave capacity unused;
the sampler's constraints still see each trial's overshoot (<= 0 here), so the sampler stays correct if
a projection ever falls short. The uniform solution is enqueued as the first trial.

When the host gives a database (``SearchEnv.optuna_storage``, the service's own database) the study
lives in Optuna's RDB tables beside ours under the job's internal study name, so it survives a
killed worker and opens in optuna-dashboard. Neither is a user option: storage is the server's
choice, and a user-chosen study name could attach to another job's study.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import numpy as np
import optuna
from pydantic import Field, PositiveInt

from prunepilot.compression import PrunePilotError
from prunepilot.compression.resources import Resource

from ._base import Agent, SearchContext, SearchResult, TrialRecord

log = logging.getLogger("prunepilot.agents.optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    return list(trial.user_attrs.get("overshoot", [1.0]))


# Optuna 5 takes constraints per trial (Trial.set_constraint) and deprecates constraints_func;
# Optuna 4 only has constraints_func. Both read the same overshoot values.
_PER_TRIAL_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")


def _constraint_kwargs() -> dict[str, Any]:
    return {} if _PER_TRIAL_CONSTRAINTS else {"constraints_func": _constraints}


def _set_overshoot(trial: optuna.Trial, names: list[str], overshoot: list[float]) -> None:
    trial.set_user_attr("overshoot", overshoot)
    if _PER_TRIAL_CONSTRAINTS:
        for name, value in zip(names, overshoot, strict=True):
            trial.set_constraint(name, value)


class _OptunaAgent(Agent):
    directions: list[str]

    def _sampler(self, ctx: SearchContext) -> optuna.samplers.BaseSampler:
        raise NotImplementedError

    def _study(self, ctx: SearchContext) -> optuna.Study:
        storage = ctx.env.optuna_storage
        name = ctx.env.study_name or f"prunepilot-{self.name}-seed{ctx.seed}"
        kwargs: dict[str, Any] = {"sampler": self._sampler(ctx), "study_name": name, "load_if_exists": True}
        if storage:
            kwargs["storage"] = optuna.storages.RDBStorage(
                storage, engine_kwargs={"connect_args": {"timeout": 30}} if str(storage).startswith("sqlite") else {})
        if len(self.directions) == 1:
            kwargs["direction"] = self.directions[0]
        else:
            kwargs["directions"] = self.directions
        return optuna.create_study(**kwargs)

    def _resume(self, ctx: SearchContext, study: optuna.Study) -> None:
        """A persistent study keeps its history: settle trials a killed worker left RUNNING."""
        recorded = {t.extra.get("optuna_trial"): t for t in ctx.recorder.existing() if "optuna_trial" in t.extra}
        for ft in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            rec = recorded.get(ft.number)
            if rec is not None:
                # killed between recording the trial and telling the study: give it the attributes
                # a finished trial carries (the constraint and the Pareto front read them)
                trial = optuna.trial.Trial(study, ft._trial_id)
                trial.set_user_attr("step", rec.step)
                _set_overshoot(trial, list(ctx.limits), [_resource_ratio(rec, r) / lim - 1.0 for r, lim in ctx.limits.items()])
                study.tell(ft.number, self._values(ctx, rec), skip_if_finished=True)
            else:
                study.tell(ft.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        if recorded:
            ctx.fast_forward()

    def _values(self, ctx: SearchContext, rec: TrialRecord) -> float | list[float]:
        raise NotImplementedError

    def _propose(self, ctx: SearchContext, trial: optuna.Trial) -> np.ndarray | None:
        raise NotImplementedError

    def explore(self, ctx: SearchContext) -> SearchResult:
        study = self._study(ctx)
        if ctx.env.optuna_storage:
            self._resume(ctx, study)
        if not study.trials:
            study.enqueue_trial(self._uniform_params(ctx))
        failures = 0
        while not ctx.exhausted():
            trial = study.ask()
            ratios = self._propose(ctx, trial)
            if ratios is None:
                _set_overshoot(trial, list(ctx.limits), [1.0] * len(ctx.limits))
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                failures += 1
                if failures > 50:
                    raise PrunePilotError("the sampler keeps proposing strategies that cannot meet the budget")
                continue
            rec = ctx.evaluate(ratios, extra={"optuna_trial": trial.number})
            overshoot = [_resource_ratio(rec, r) / lim - 1.0 for r, lim in ctx.limits.items()]
            _set_overshoot(trial, list(ctx.limits), overshoot)
            trial.set_user_attr("step", rec.step)
            study.tell(trial, self._values(ctx, rec))  # a kill before this line is settled by _resume
        return self._result(ctx, study)

    def _uniform_params(self, ctx: SearchContext) -> dict[str, float]:
        return {f"s{i}": 1.0 for i in range(len(ctx.layer_names))}

    def _result(self, ctx: SearchContext, study: optuna.Study) -> SearchResult:
        return ctx.result(study=study.study_name, optuna_trials=len(study.trials))


class OptunaTPEAgent(_OptunaAgent):
    name = "optuna-tpe"
    option_types = {"startup": PositiveInt}
    description = "Optuna TPE (multivariate) over per-layer profiles projected onto the budget; uniform enqueued first"
    directions = ["maximize"]

    def _sampler(self, ctx: SearchContext) -> optuna.samplers.BaseSampler:
        budget = ctx.search.max_evaluations or 100
        return optuna.samplers.TPESampler(seed=ctx.seed, multivariate=True, **_constraint_kwargs(),
                                          n_startup_trials=int(self.options.get("startup", max(5, min(10, budget // 6)))))

    def _propose(self, ctx: SearchContext, trial: optuna.Trial) -> np.ndarray | None:
        shape = np.array([trial.suggest_float(f"s{i}", 0.0, 1.0) for i in range(len(ctx.layer_names))])
        return ctx.project(shape)

    def _values(self, ctx: SearchContext, rec: TrialRecord) -> float:
        return rec.accuracy


def _resource_ratio(rec: TrialRecord, resource: str) -> float:
    usage = Resource(resource).usage(rec.metrics)
    return 1e9 if usage is None else usage  # unmeasured: as far from feasible as it gets


class OptunaNSGA2Agent(_OptunaAgent):
    """Multi-objective: accuracy up, every budgeted resource down.

    Each trial is a profile plus a ``scale`` around the budget line (``scale`` 1 = exactly at the
    budget): the population spreads on both sides of the limit, which is where the Pareto front
    matters; trials past the limit are infeasible for ``constraints_func`` but still on the front.
    """

    name = "optuna-nsga2"
    option_types = {"population": Annotated[int, Field(ge=2)]}
    description = "Optuna NSGA-II: Pareto front of accuracy vs the budgeted resources, best point within budget"

    @property
    def directions(self) -> list[str]:  # type: ignore[override]
        return ["maximize"] + ["minimize"] * self._n_resources

    def explore(self, ctx: SearchContext) -> SearchResult:
        self._n_resources = len(ctx.limits)
        return super().explore(ctx)

    def _sampler(self, ctx: SearchContext) -> optuna.samplers.BaseSampler:
        budget = ctx.search.max_evaluations or 100
        pop = int(self.options.get("population", max(8, min(50, budget // 4))))
        return optuna.samplers.NSGAIISampler(seed=ctx.seed, population_size=pop, **_constraint_kwargs())

    def _uniform_params(self, ctx: SearchContext) -> dict[str, float]:
        return {**super()._uniform_params(ctx), "scale": 1.0}

    def _propose(self, ctx: SearchContext, trial: optuna.Trial) -> np.ndarray | None:
        shape = np.array([trial.suggest_float(f"s{i}", 0.0, 1.0) for i in range(len(ctx.layer_names))])
        scale = trial.suggest_float("scale", 0.7, 1.3)
        at_budget = ctx.project(shape)
        if at_budget is None:
            return None
        return np.minimum(at_budget * scale, ctx.max_ratios)

    def _values(self, ctx: SearchContext, rec: TrialRecord) -> list[float]:
        return [rec.accuracy] + [_resource_ratio(rec, r) for r in ctx.limits]

    def _result(self, ctx: SearchContext, study: optuna.Study) -> SearchResult:
        result = super()._result(ctx, study)
        steps = {t.user_attrs.get("step") for t in study.best_trials}
        by_step = {t.step: t for t in ctx.recorder.existing()}
        result.pareto = sorted((by_step[s] for s in steps if s in by_step), key=lambda t: _resource_ratio(t, next(iter(ctx.limits))))
        return result
