from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from prunepilot.agents import (
    AGENTS,
    MemoryRecorder,
    SearchCancelled,
    SearchContext,
    SearchEnv,
    SearchLimits,
    create_agent,
    solve_uniform,
)
from prunepilot.compression import Evaluator, Fidelity, PrunePilotError, Pruner

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def evaluator(resnet20, mini_splits) -> Evaluator:
    return Evaluator(Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32), mini_splits, Fidelity(val_images=100, calib_images=128))


def ctx_for(ev: Evaluator, name: str, evals: int = 6, limits: dict[str, float] | None = None, **kw) -> SearchContext:
    return SearchContext(ev, limits or {"flops": 0.5}, SearchLimits(max_evaluations=evals), seed=0, agent=name, **kw)


# Small settings so every agent finishes quickly; NetAdapt's schedule needs more (cheap) proposals.
QUICK = {"sensitivity": (24, {}), "netadapt": (60, {"initial_reduction": 0.12, "short_steps": 1})}


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_each_agent_meets_the_budget(evaluator: Evaluator, name: str) -> None:
    evals, options = QUICK.get(name, (6, {}))
    ctx = ctx_for(evaluator, name, evals=evals)
    result = create_agent(name, **options).search(ctx)
    assert result.best is not None and result.best.feasible
    assert result.best.metrics["macs_ratio"] <= 0.5
    assert result.trials <= ctx.search.max_evaluations
    # every trial was recorded under the agent's name, numbered without gaps
    steps = [t.step for t in ctx.recorder.existing()]
    assert steps == list(range(len(steps))) and all(t.agent == name for t in ctx.recorder.existing())


def test_uniform_solver_hits_the_flops_target_within_one_percent(evaluator: Evaluator) -> None:
    for target in (0.3, 0.5, 0.7):
        ctx = ctx_for(evaluator, "uniform", limits={"flops": target})
        ratios = solve_uniform(ctx)
        macs = ctx.resources(ratios)["flops"]
        assert target * 0.99 <= macs <= target


def test_multiple_constraints_hold_together(evaluator: Evaluator) -> None:
    ctx = ctx_for(evaluator, "random", limits={"flops": 0.6, "params": 0.4})
    best = create_agent("random").search(ctx).best
    assert best.metrics["macs_ratio"] <= 0.6 and best.metrics["params_ratio"] <= 0.4


def test_a_budget_below_the_floor_is_refused_before_any_search(evaluator: Evaluator) -> None:
    """The floor is every layer at its largest allowed ratio. Under it SearchContext refuses the
    budget at once, naming the resource, the floor and the limit; just over it, it accepts."""
    pruner = evaluator.pruner
    floor = evaluator.resources(pruner.kept_from_vector(pruner.max_ratios()))["flops"]
    assert 0.05 < floor < 0.5
    before = evaluator.evaluations
    below = floor * 0.98
    message = f"budget is infeasible under the layer limits: even the largest allowed ratio in every layer gives " \
              f"flops {100 * floor:.1f} % of dense > limit {100 * below:.1f} %"
    with pytest.raises(PrunePilotError, match=re.escape(message)):
        ctx_for(evaluator, "random", limits={"flops": below})
    assert evaluator.evaluations == before
    ctx_for(evaluator, "random", limits={"flops": floor * 1.001})


class OverBudgetEvaluator(Evaluator):
    """Reports every network it measures at the dense model's MACs. The pruning graph's arithmetic
    (what SearchContext checks a budget against) is untouched, so a budget is reachable, yet no
    evaluated trial is feasible. NetAdapt reports its own fine-tuned candidates through
    ``metrics_for`` too, so every agent sees the same."""

    def metrics_for(self, model, kept, acc, fidelity_tag):  # type: ignore[no-untyped-def]
        m = super().metrics_for(model, kept, acc, fidelity_tag)
        m.macs, m.macs_ratio = self.pruner.graph.dense_macs, 1.0
        return m


@pytest.fixture(scope="module")
def over_budget(resnet20, mini_splits) -> Evaluator:
    return OverBudgetEvaluator(Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32), mini_splits,
                               Fidelity(val_images=100, calib_images=128))


# NetAdapt asked for the whole reduction at once proposes the layers (or windows of layers) that meet
# it (one short fine-tune each) until the graph says the budget is met; a loose budget keeps that short.
NO_FEASIBLE = {"netadapt": (20, {"initial_reduction": 1.0, "short_steps": 1}, 0.85)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(AGENTS))
def test_a_search_that_finds_no_feasible_strategy_is_a_clear_error(over_budget: Evaluator, name: str) -> None:
    evals, options, limit = NO_FEASIBLE.get(name, (2, {}, 0.5))
    ctx = ctx_for(over_budget, name, evals=evals, limits={"flops": limit})
    assert ctx.feasible(ctx.max_ratios)  # reachable: SearchContext accepted it
    with pytest.raises(PrunePilotError, match="no strategy within the budget"):
        create_agent(name, **options).search(ctx)
    trials = ctx.recorder.existing()
    assert trials and not any(t.feasible for t in trials)  # it searched, and every evaluated network missed
    assert all(t.metrics["macs_ratio"] == 1.0 for t in trials)


def test_unknown_agent_and_resource(evaluator: Evaluator) -> None:
    with pytest.raises(PrunePilotError, match="unknown agent 'nope'"):
        create_agent("nope")
    with pytest.raises(PrunePilotError, match="unknown budget resource"):
        ctx_for(evaluator, "random", limits={"energy": 0.5})
    with pytest.raises(PrunePilotError, match="latency model"):
        ctx_for(evaluator, "random", limits={"latency": 0.5})


def test_resume_replays_recorded_trials_without_evaluating_again(evaluator: Evaluator) -> None:
    first = ctx_for(evaluator, "random", evals=4)
    create_agent("random").search(first)
    recorded = first.recorder.existing()
    before = evaluator.evaluations
    evaluator._cache.clear()
    resumed = ctx_for(evaluator, "random", evals=6, recorder=MemoryRecorder(recorded[:3]))
    create_agent("random").search(resumed)
    trials = resumed.recorder.existing()
    assert [t.step for t in trials] == list(range(6))
    assert evaluator.evaluations - before == 3  # steps 0-2 came from the record
    assert [t.strategy for t in trials[:4]] == [t.strategy for t in recorded[:4]]  # same seed, same proposals


def test_cancel_stops_the_search(evaluator: Evaluator) -> None:
    calls = []
    rec = MemoryRecorder(stop=lambda: len(calls) > 0)
    ctx = ctx_for(evaluator, "random", evals=10, recorder=rec, on_trial=calls.append)
    with pytest.raises(SearchCancelled):
        create_agent("random").search(ctx)
    assert len(rec.trials) == 1


def test_nsga2_returns_a_pareto_front(evaluator: Evaluator) -> None:
    ctx = ctx_for(evaluator, "optuna-nsga2", evals=10)
    result = create_agent("optuna-nsga2", population=4).search(ctx)
    front = result.pareto
    assert front
    for a in front:  # no point of the front dominates another
        for b in front:
            if a is not b:
                assert not (b.accuracy >= a.accuracy and b.metrics["macs_ratio"] <= a.metrics["macs_ratio"]
                            and (b.accuracy > a.accuracy or b.metrics["macs_ratio"] < a.metrics["macs_ratio"]))


def test_sensitivity_records_curves(evaluator: Evaluator) -> None:
    ctx = ctx_for(evaluator, "sensitivity", evals=30)
    result = create_agent("sensitivity", points=2).search(ctx)
    curves = [t for t in ctx.recorder.existing() if t.kind == "sensitivity"]
    assert len(curves) == 1 + 2 * len(ctx.layer_names)
    assert set(result.info["curves"]) == set(evaluator.pruner.layer_names)
    assert result.best.kind == "search"


def test_optuna_resumes_a_study_after_the_process_is_killed(tmp_path: Path, mini_zip: Path, resnet20_weights: Path) -> None:
    from prunepilot.service.db import repo
    from prunepilot.service.db.engine import session_scope
    from prunepilot.service.db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'resume.db'}"
    upgrade(url)
    with session_scope(url) as s:
        repo.create_job(s, job_id="job1", agent="optuna-tpe", arch="resnet20", dataset="mini", problem={}, problem_key="k")
    cmd = [sys.executable, str(HERE / "helpers" / "optuna_job.py"), url, "job1", str(mini_zip), str(resnet20_weights), "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        with session_scope(url) as s:
            _, n = repo.list_trials(s, job_id="job1")
        if n >= 4 or proc.poll() is not None:
            break
        time.sleep(0.2)
    finished_early = proc.poll()
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up, like a dead worker
    _, err = proc.communicate(timeout=30)
    with session_scope(url) as s:
        _, killed_at = repo.list_trials(s, job_id="job1")
    assert finished_early is None, f"the search process exited (rc {finished_early}) before it was killed: {err[-2000:]}"
    assert 4 <= killed_at < 10, f"{killed_at} trials when killed; stderr: {err[-2000:]}"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    with session_scope(url) as s:
        rows, total = repo.list_trials(s, job_id="job1")
    assert total == 10 and [r.step for r in rows] == list(range(10))
    assert out["evaluated"] == 10 - killed_at  # nothing recorded was evaluated twice
    study = optuna.load_study(study_name="job-job1", storage=url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 10
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert sorted(t.user_attrs["step"] for t in complete) == list(range(10))


def test_unknown_agent_options_are_rejected_by_name() -> None:
    with pytest.raises(PrunePilotError, match=r"unknown option\(s\) for agent 'amc': budget_mod; allowed: .*budget_mode"):
        create_agent("amc", budget_mod="bound")
    with pytest.raises(PrunePilotError, match="agent 'uniform'.*allowed: none"):
        create_agent("uniform", points=3)
    for name, cls in AGENTS.items():  # every declared option name is accepted; None leaves it unset
        assert cls.option_names == set(cls.option_types)
        assert create_agent(name, **{o: None for o in cls.option_names}).options == {}


def test_a_trial_recorded_but_never_told_is_settled_with_its_attributes(tmp_path: Path, evaluator: Evaluator) -> None:
    """A worker killed between recording a trial and telling the study leaves it RUNNING; on resume
    it must be completed with the step and overshoot every finished trial carries."""
    from prunepilot.service.db import repo
    from prunepilot.service.db.engine import session_scope
    from prunepilot.service.db.migrate import upgrade
    from prunepilot.service.db.store import JobStore
    from prunepilot.service.recorder import SqlTrialRecorder

    url = f"sqlite:///{tmp_path / 'told.db'}"
    upgrade(url)
    with session_scope(url) as s:
        repo.create_job(s, job_id="job1", agent="optuna-tpe", arch="resnet20", dataset="mini", problem={}, problem_key="k")

    def context(evals: int) -> SearchContext:
        return SearchContext(evaluator, {"flops": 0.5}, SearchLimits(max_evaluations=evals), SqlTrialRecorder(JobStore(url), "job1"),
                             seed=3, agent="optuna-tpe", env=SearchEnv(optuna_storage=url, study_name="job-job1"))

    agent = create_agent("optuna-tpe")
    ctx = context(1)
    study = agent._study(ctx)
    orphan = study.ask()
    ctx.evaluate(ctx.project(np.ones(len(ctx.layer_names))), extra={"optuna_trial": orphan.number})  # recorded, not told
    agent.search(context(3))
    study = optuna.load_study(study_name="job-job1", storage=url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["step"] for t in complete) == [0, 1, 2]
    assert all("overshoot" in t.user_attrs for t in complete)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
