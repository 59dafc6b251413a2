from __future__ import annotations

import copy

import pytest

from prunepilot.agents import MemoryRecorder, SearchContext, SearchLimits, create_agent
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

    # a worker dies in the middle of the second iteration, after 13 recorded proposals
    rec = MemoryRecorder(stop=lambda: len(rec.trials) >= 13)
    first = SearchContext(ev, limits, SearchLimits(max_evaluations=400), rec, seed=0, agent="netadapt", state_dir=tmp_path,
                          options={"map": counting_map})
    from prunepilot.agents import SearchCancelled

    with pytest.raises(SearchCancelled):
        create_agent("netadapt", initial_reduction=0.05, short_steps=1).search(first)
    assert len(rec.trials) == 13 and len(mapped) == 2 and mapped[0] == 9  # every layer proposes in iteration 0
    second = mapped[1]
    rec._stop = None
    mapped.clear()
    again = SearchContext(ev, limits, SearchLimits(max_evaluations=400), rec, seed=0, agent="netadapt", state_dir=tmp_path,
                          options={"map": counting_map})
    result = create_agent("netadapt", initial_reduction=0.05, short_steps=1).search(again)
    steps = [t.step for t in rec.trials]
    assert steps == list(range(len(steps)))  # no gaps, no step twice
    assert mapped[0] == second - 4  # the resumed iteration only trains the proposals it had not recorded
    assert result.best.metrics["macs_ratio"] <= 0.8
    iterations = [t.extra["iteration"] for t in rec.trials]
    assert iterations == sorted(iterations) and iterations.count(1) == second
