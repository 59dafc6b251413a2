from __future__ import annotations

import copy

import pytest

from prunepilot.agents import MemoryRecorder, SearchContext, SearchEnv, SearchLimits, check_measured_latency, create_agent
from prunepilot.compression import Evaluator, Fidelity, Pruner
from prunepilot.compression.latency import FileLatencyStore, LatencyTable
from prunepilot.compression.measure import measure_pair


@pytest.fixture(scope="module")
def setup(resnet20, mini_splits, tmp_path_factory: pytest.TempPathFactory):
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    table = LatencyTable(pruner.graph, pruner.model, FileLatencyStore(tmp_path_factory.mktemp("lut") / "t.json"))
    table.build(warmup=3, repeats=15)
    table.calibrate(repeats=40)
    ev = Evaluator(pruner, mini_splits, Fidelity(val_images=100, calib_images=128), latency_model=table)
    return ev, table


def test_netadapt_meets_a_latency_budget_as_measured(setup, tmp_path) -> None:
    ev, table = setup
    limit = 0.8
    ctx = SearchContext(ev, {"latency": limit}, SearchLimits(max_evaluations=400), seed=0, agent="netadapt", state_dir=tmp_path)
    result = create_agent("netadapt", initial_reduction=0.06, decay=0.96, short_steps=2).search(ctx)
    assert result.info["final_within_budget"] and result.best.metrics["latency_ratio"] <= limit
    # each iteration's chosen proposal met that iteration's predicted-latency target
    chosen = {}
    for t in ctx.recorder.existing():
        it = t.extra["iteration"]
        if it not in chosen or t.accuracy > chosen[it].accuracy:
            chosen[it] = t
    previous = 1.0
    for it in sorted(chosen):
        t = chosen[it]
        assert t.metrics["latency_ratio"] <= t.extra["target"] + 1e-9
        assert t.metrics["latency_ratio"] < previous
        previous = t.metrics["latency_ratio"]
    # as measured, interleaved with the dense model, median of three runs (one noisy run cannot decide)
    final = result.model
    dense, pruned = measure_pair(ev.pruner.model, final, 32, batch_size=1, threads=2, warmup=10, repeats=200)
    assert result.info["latency_checks"] >= 1  # the prediction was checked against a measurement
    assert pruned.median_ms / dense.median_ms <= limit * 1.07


def test_netadapt_resumes_without_redoing_recorded_proposals(setup, tmp_path) -> None:
    ev, _ = setup
    limits = {"flops": 0.8}
    mapped: list[int] = []

    def counting_map(fn, shared, items):  # the service passes a Ray map here
        mapped.append(len(items))
        return [fn(shared, item) for item in items]

    # a worker dies in the middle of the second iteration, after 16 recorded proposals (12 + 4)
    rec = MemoryRecorder(stop=lambda: len(rec.trials) >= 16)
    first = SearchContext(ev, limits, SearchLimits(max_evaluations=400), rec, seed=0, agent="netadapt", state_dir=tmp_path,
                          env=SearchEnv(map=counting_map))
    from prunepilot.agents import SearchCancelled

    with pytest.raises(SearchCancelled):
        create_agent("netadapt", initial_reduction=0.05, short_steps=1).search(first)
    assert len(rec.trials) == 16 and len(mapped) == 2 and mapped[0] == 12  # every layer proposes in iteration 0
    second = mapped[1]
    rec._stop = None
    mapped.clear()
    again = SearchContext(ev, limits, SearchLimits(max_evaluations=400), rec, seed=0, agent="netadapt", state_dir=tmp_path,
                          env=SearchEnv(map=counting_map))
    result = create_agent("netadapt", initial_reduction=0.05, short_steps=1).search(again)
    steps = [t.step for t in rec.trials]
    assert steps == list(range(len(steps)))  # no gaps, no step twice
    assert mapped[0] == second - 4  # the resumed iteration only trains the proposals it had not recorded
    assert result.best.metrics["macs_ratio"] <= 0.8
    iterations = [t.extra["iteration"] for t in rec.trials]
    assert iterations == sorted(iterations) and iterations.count(1) == second




@pytest.fixture()
def searched(setup):
    """Random search under a predicted latency budget (80 % of dense); a new search per test,
    since the check may add trials."""
    ev, _ = setup
    ctx = SearchContext(ev, {"latency": 0.8}, SearchLimits(max_evaluations=12), seed=1, agent="random")
    return ctx, create_agent("random").search(ctx)


def _ranked(ctx) -> list:
    return sorted((t for t in ctx.trials() if t.feasible), key=lambda t: (-t.accuracy, t.step))


def _trial_of(ctx, model):
    """Networks told apart by their parameter count (a stand-in clock needs to know which it times)."""
    n = sum(p.numel() for p in model.parameters())
    return next(t for t in reversed(ctx.trials()) if t.metrics["params"] == n)


def test_latency_check_walks_down_the_ranking_to_the_first_network_within_budget(searched) -> None:
    ctx, result = searched
    ranked = _ranked(ctx)
    assert len({tuple(t.metrics["kept"]) for t in ranked[:3]}) == 3
    over = {ranked[0].step, ranked[1].step}  # the two most accurate networks measure over the budget
    checked = check_measured_latency(ctx, result, measure=lambda m: 0.9 if _trial_of(ctx, m).step in over else 0.7)
    info = checked.info["latency_check"]
    assert checked.best.step == ranked[2].step == info["chosen_step"] and info["within_budget_measured"]
    assert [c["step"] for c in info["checks"]] == [t.step for t in ranked[:3]]
    assert info["searched_best_step"] == ranked[0].step and len(ctx.trials()) == 12  # nothing evaluated


def test_latency_check_shrinks_the_best_profile_when_the_top_networks_all_measure_over(searched) -> None:
    """A clock 8 % slower than the table: the best profile is projected onto 0.8 / 1.08 of dense
    as predicted, evaluated once more, and that network is the answer."""
    ctx, result = searched
    best = _ranked(ctx)[0]
    checked = check_measured_latency(ctx, result, measure=lambda m: 1.08 * _trial_of(ctx, m).metrics["latency_ratio"])
    info = checked.info["latency_check"]
    assert len(info["checks"]) == 4 and checked.best.kind == "latency-check" and checked.best.step == 12
    assert checked.best.extra["profile_of_step"] == best.step
    assert checked.best.metrics["latency_ratio"] <= 0.8 / 1.08 * (1 + 1e-6)
    assert info["checks"][-1]["measured_latency"] <= 0.8 * (1 + 1e-6)
    # the same profile pruned further (filling rounding slack may move single channels between layers)
    assert checked.best.metrics["latency_ratio"] < best.metrics["latency_ratio"]
    assert sum(checked.best.metrics["kept"]) < sum(best.metrics["kept"])


def test_latency_check_keeps_the_fastest_when_nothing_gets_within(searched) -> None:
    ctx, result = searched
    checked = check_measured_latency(ctx, result, measure=lambda m: 0.95)
    info = checked.info["latency_check"]
    assert not info["within_budget_measured"] and checked.best.step == _ranked(ctx)[0].step
    assert len(info["checks"]) <= 6 and sum(t.kind == "latency-check" for t in ctx.trials()) <= 3


def test_latency_check_with_the_real_clock(searched) -> None:
    ctx, result = searched
    searched_best = result.best.step
    checked = check_measured_latency(ctx, result)
    info = checked.info["latency_check"]
    checks = info["checks"]
    assert checks[0]["step"] == searched_best == info["searched_best_step"]
    if info["within_budget_measured"]:
        assert checks[-1]["step"] == checked.best.step and checks[-1]["measured_latency"] <= 0.8
        assert all(c["measured_latency"] > 0.8 for c in checks[:-1])
    else:
        assert checked.best.step == min(checks, key=lambda c: c["measured_latency"])["step"]


def test_latency_check_leaves_other_budgets_alone(setup) -> None:
    ev, _ = setup
    ctx = SearchContext(ev, {"flops": 0.6}, SearchLimits(max_evaluations=3), seed=0, agent="random")
    result = create_agent("random").search(ctx)
    assert check_measured_latency(ctx, result, measure=lambda m: 2.0).best is result.best
    assert "latency_check" not in result.info
