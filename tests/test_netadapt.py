from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from helpers.clock import FakeClock

import prunepilot.agents.latency_check as latency_check
import prunepilot.agents.netadapt as netadapt
from prunepilot.agents import MemoryRecorder, SearchContext, SearchEnv, SearchLimits, check_measured_latency, create_agent
from prunepilot.agents.latency_check import measured_share
from prunepilot.compression import Evaluator, Fidelity, Pruner, PruningConstraints
from prunepilot.compression.cifar_resnet import RESIDUAL_ROOTS
from prunepilot.compression.latency import FileLatencyStore, LatencyTable

# The table is built on a deterministic clock (tests/helpers/clock.py) whose cost model it predicts
# exactly, and "measured" latency comes from stand-in clocks: the control logic is tested, not the
# machine's load. test_measured_share_with_the_real_clock is the one real-clock check (interleaved
# ratios, stated tolerances); benchmarks/netadapt.py measures NetAdapt's networks for real.
CLOCK = FakeClock()


@pytest.fixture(scope="module")
def setup(resnet20, mini_splits, tmp_path_factory: pytest.TempPathFactory):
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    # one thread for the real-clock check (two threads on a loaded two-core machine wait on each other)
    table = LatencyTable(pruner.graph, pruner.model, FileLatencyStore(tmp_path_factory.mktemp("lut") / "t.json"), threads=1,
                         timer=CLOCK.time_probe, measure=CLOCK.measure)
    table.build(warmup=1, repeats=3)
    table.calibrate(repeats=1)
    ev = Evaluator(pruner, mini_splits, Fidelity(val_images=100, calib_images=128), latency_model=table)
    return ev, table


def test_netadapt_tightens_its_limit_until_the_network_meets_the_budget_as_measured(setup, tmp_path, monkeypatch) -> None:
    """A clock 10 % slower than the table predicts: the network that meets 85 % of dense as
    predicted measures over it; NetAdapt tightens its internal limit by the overshoot and goes on
    until the network it ends with measures within the budget."""
    ev, table = setup
    limit = 0.85
    dense_ms = CLOCK.network_ms(ev.pruner.model, 32)

    def slow_clock(ctx, model) -> float:  # type: ignore[no-untyped-def]
        return 1.1 * CLOCK.network_ms(model, 32) / dense_ms

    monkeypatch.setattr(netadapt, "measured_share", slow_clock)
    ctx = SearchContext(ev, {"latency": limit}, SearchLimits(max_evaluations=400), seed=0, agent="netadapt", state_dir=tmp_path)
    result = create_agent("netadapt", initial_reduction=0.1, decay=0.96, short_steps=1).search(ctx)
    checks = [h for h in result.info["history"] if "check" in h]
    assert result.info["latency_checks"] == len(checks) == 2
    # measured latency is held to the budget's tolerance (0.5 % by default)
    assert checks[0]["measured_latency"] > limit * 1.005 and checks[1]["measured_latency"] <= limit * 1.005
    assert slow_clock(ctx, result.model) <= limit * 1.005  # the network NetAdapt ends with, as measured
    assert result.best.metrics["latency_ratio"] <= limit / 1.1 * (1 + 1e-6)  # = predicted, under the tightened limit
    assert result.info["final_within_budget"]
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


def test_netadapt_resumes_without_redoing_recorded_proposals(setup, tmp_path) -> None:
    ev, _ = setup
    limits = {"flops": 0.9}  # a few iterations (0.8 took twice as many)
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
    assert result.best.metrics["macs_ratio"] <= limits["flops"]
    iterations = [t.extra["iteration"] for t in rec.trials]
    assert iterations == sorted(iterations) and iterations.count(1) == second



def test_netadapt_proposes_only_counts_the_constraints_allow(setup, tmp_path) -> None:
    """With measured channel steps (here: multiples of 8 and the layer's own count, and 4 in the
    16-channel layers) every proposal keeps counts among the steps, and each is the most a layer can
    keep that meets its iteration's target: the next allowed count up would not. (NetAdapt chose raw
    counts before, so round_to and the steps did nothing for it.)"""
    ev, _ = setup
    pruner = ev.pruner
    channels = [int(c) for c in pruner.graph.channels]
    steps = tuple(tuple(c for c in range(1, ch + 1) if c % 8 == 0 or c == ch or (ch == 16 and c == 4)) for ch in channels)
    plain = pruner.constraints
    pruner.constraints = dataclasses.replace(plain, round_to="measured", steps=steps)
    try:
        ctx = SearchContext(ev, {"flops": 0.8}, SearchLimits(max_evaluations=400), seed=0, agent="netadapt", state_dir=tmp_path)
        create_agent("netadapt", initial_reduction=0.1, short_steps=1).search(ctx)
        proposals = [t for t in ctx.recorder.existing() if t.kind == "proposal"]
        assert proposals
        for t in proposals:
            kept = np.array(t.metrics["kept"])
            assert all(int(k) in steps[i] for i, k in enumerate(kept)), kept
            (i,) = [ctx.layer_names.index(name) for name in t.extra["layers"]]  # a 10 % step: one layer meets it
            up = [c for c in steps[i] if c > kept[i]]
            if up:  # one allowed count more in that layer misses the target
                wider = kept.copy()
                wider[i] = up[0]
                assert ctx.costs(wider)["flops"] > t.extra["target"] + 1e-12
    finally:
        pruner.constraints = plain


@pytest.mark.parametrize("coarse", [False, True], ids=["every-count", "coarse-steps"])
def test_netadapt_cuts_windows_of_layers_when_no_layer_alone_meets_the_step(resnet20, mini_splits, tmp_path, coarse) -> None:
    """No block-internal conv of ResNet-20, even at its deepest allowed cut, saves a 20 % step of the
    MACs (checked per iteration below). Each such iteration proposes contiguous windows of layers
    that together cover every layer with room left. Each window meets the iteration's target, leaves
    the other layers as they were, keeps at least half of each of its layers' channels (also where
    the allowed counts are coarse: multiples of 16, and 4), unless no window can and the one window
    of every layer cuts deeper, and cuts no more than it must: one allowed count more in each of its
    layers misses the target. (Before, the deepest single-layer cut became the target, and layer
    after layer went to its least count.)"""
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32, PruningConstraints(exclude=RESIDUAL_ROOTS))
    channels = [int(c) for c in pruner.graph.channels]
    if coarse:
        steps = tuple(tuple(c for c in range(1, ch + 1) if c % 16 == 0 or c == 4 or c == ch) for ch in channels)
        pruner.constraints = dataclasses.replace(pruner.constraints, round_to="measured", steps=steps)
    allowed = [pruner.constraints.allowed_counts(ch, i) for i, ch in enumerate(channels)]  # the steps, the layer limits
    ev = Evaluator(pruner, mini_splits, Fidelity(val_images=100, calib_images=128))
    ctx = SearchContext(ev, {"flops": 0.55}, SearchLimits(max_evaluations=400), seed=0, agent="netadapt", state_dir=tmp_path)
    result = create_agent("netadapt", initial_reduction=0.2, short_steps=1).search(ctx)
    assert result.info["final_within_budget"]
    names, n = ctx.layer_names, len(ctx.layer_names)
    min_kept = pruner.kept_from_vector(ctx.max_ratios)
    iterations: dict[int, list] = {}
    for t in ctx.recorder.existing():
        iterations.setdefault(t.extra["iteration"], []).append(t)
    before = pruner.graph.channels.copy()
    windowed = capped = 0  # iterations that proposed windows; windows within half a layer
    for it in sorted(iterations):
        trials = iterations[it]
        target = trials[0].extra["target"]
        cuts = [[c for c in allowed[i] if min_kept[i] <= c < before[i]] for i in range(n)]
        room = {i for i in range(n) if cuts[i]}
        alone = [before.copy() for _ in range(n)]
        for i in range(n):
            alone[i][i] = min(cuts[i], default=before[i])
        # near the budget the rest of the way can be within one layer's reach: NetAdapt's own proposals
        single = any(ctx.costs(k)["flops"] <= target for k in alone)
        windowed += not single
        covered: set[int] = set()
        for t in trials:
            window = [names.index(name) for name in t.extra["layers"]]
            assert window == list(range(window[0], window[-1] + 1)), window
            assert (len(window) == 1) == single, (it, window)
            kept = np.array(t.metrics["kept"])
            assert ctx.costs(kept)["flops"] <= target + 1e-12
            assert all(kept[i] == before[i] for i in range(n) if i not in window)
            covered |= set(window)
            if single:
                continue
            deep = any(2 * kept[i] < before[i] for i in window)
            if deep:  # only when no window within half a layer can meet the target: one window of every layer
                assert len(trials) == 1 and set(window) == room
                halves = before.copy()
                for i in room:
                    halves[i] = min([c for c in cuts[i] if 2 * c >= before[i]] + [before[i]])
                assert ctx.costs(halves)["flops"] > target
            capped += not deep
            wider = kept.copy()
            for i in window:
                wider[i] = min([c for c in cuts[i] if (deep or 2 * c >= before[i]) and c > kept[i]] + [before[i]])
            assert ctx.costs(wider)["flops"] > target
        assert single or covered == room
        before = np.array(max(trials, key=lambda t: t.accuracy).metrics["kept"])  # the proposal NetAdapt went on with
    assert windowed >= 2 and capped >= 2


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


@pytest.mark.parametrize("tolerance, met", [(None, True), (0.0, False), (0.01, True)], ids=["default", "none", "1%"])
def test_latency_check_allows_the_budgets_tolerance_and_no_more(searched, tolerance, met) -> None:
    """Every network measures 0.4 % over the limit: within the default tolerance (0.5 %) and a
    1 % one, so the searched best stands; with none, nothing checked meets the budget."""
    ctx, result = searched
    if tolerance is not None:
        ctx.tolerances = {"latency": tolerance}
    searched_best = result.best.step
    checked = check_measured_latency(ctx, result, measure=lambda m: 0.8 * 1.004)
    info = checked.info["latency_check"]
    assert info["within_budget_measured"] == met
    assert (len(info["checks"]) == 1 and checked.best.step == searched_best) if met else len(info["checks"]) > 1


def test_latency_check_keeps_the_fastest_when_nothing_gets_within(searched) -> None:
    ctx, result = searched
    checked = check_measured_latency(ctx, result, measure=lambda m: 0.95)
    info = checked.info["latency_check"]
    assert not info["within_budget_measured"] and checked.best.step == _ranked(ctx)[0].step
    assert len(info["checks"]) <= 6 and sum(t.kind == "latency-check" for t in ctx.trials()) <= 3


def test_latency_check_times_with_measured_share_by_default(searched, monkeypatch) -> None:
    """Without a ``measure``, every network is timed by ``measured_share`` (interleaved with the
    dense model at the table's batch size); here a stand-in that records its calls."""
    ctx, result = searched
    timed = []

    def share(c, model) -> float:  # type: ignore[no-untyped-def]
        timed.append((c, _trial_of(ctx, model).step))
        return 0.5

    monkeypatch.setattr(latency_check, "measured_share", share)
    searched_best = result.best.step
    checked = check_measured_latency(ctx, result)
    info = checked.info["latency_check"]
    assert timed == [(ctx, searched_best)] and info["checks"][0]["measured_latency"] == 0.5
    assert checked.best.step == searched_best and info["within_budget_measured"]


def test_measured_share_with_the_real_clock(setup) -> None:
    """The real clock, asserting only what load cannot change. ``measured_share`` times a network
    interleaved with the dense model (three rounds, median ratio), so load slows both alike: the
    dense network against itself comes out within [0.8, 1.25], and one with about a tenth of the
    MACs (every layer at 70 %) under 0.8 of dense (about 0.3 on an idle machine)."""
    ev, _ = setup
    ctx = SearchContext(ev, {"flops": 0.5}, SearchLimits(max_evaluations=1), seed=0, agent="check")
    same = measured_share(ctx, copy.deepcopy(ev.pruner.model))
    assert 0.8 <= same <= 1.25
    small = ev.pruner.prune_kept(ev.pruner.kept_from_vector(np.full(len(ev.pruner.layers), 0.7))).model
    assert ev.resources(ev.pruner.kept_from_vector(np.full(len(ev.pruner.layers), 0.7)))["flops"] < 0.15
    assert measured_share(ctx, small) < 0.8


def test_latency_check_leaves_other_budgets_alone(setup) -> None:
    ev, _ = setup
    ctx = SearchContext(ev, {"flops": 0.6}, SearchLimits(max_evaluations=3), seed=0, agent="random")
    result = create_agent("random").search(ctx)
    assert check_measured_latency(ctx, result, measure=lambda m: 2.0).best is result.best
    assert "latency_check" not in result.info
