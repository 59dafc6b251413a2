"""One budget contract (compression/resources.py): each resource's usage is read from one metric
field, feasibility is one rule, and the submission check and the evaluator use one size model, so
a budget the API accepts is the budget the worker searches."""

from __future__ import annotations

import copy
from dataclasses import fields

import numpy as np
import pytest

from prunepilot.compression import Budget, Evaluator, Metrics, Pruner
from prunepilot.compression.budget import BudgetChecker
from prunepilot.compression.resources import RESOURCES, Resource, SizeModel, exceeded, within


def test_every_resource_reads_a_metrics_field() -> None:
    names = {f.name for f in fields(Metrics)}
    assert set(RESOURCES) == {"flops", "params", "size", "latency"}
    for r in Resource:
        assert r.metric in names
        assert r.usage({r.metric: 0.25}) == 0.25 and r.usage({}) is None


def test_the_feasibility_rule() -> None:
    assert within(0.5, 0.5) and within(0.5 * (1 + 1e-12), 0.5)  # float noise at the limit is within
    assert not within(0.5001, 0.5) and not within(None, 0.5)  # an unmeasured usage is not within
    assert exceeded({"flops": 0.6, "params": 0.3}, {"flops": 0.5, "params": 0.4}) == {"flops": 0.6}
    assert exceeded({"flops": 0.4}, {"flops": 0.5, "latency": 0.7}) == {"latency": None}


def test_a_budget_holds_measured_usage_to_each_constraints_tolerance() -> None:
    budget = Budget.model_validate({"constraints": [{"resource": "latency", "ratio": 0.66, "tolerance": 0.02},
                                                    {"resource": "flops", "ratio": 0.5}, {"resource": "size", "value": 1e6}]})
    assert budget.tolerances() == {"latency": 0.02, "flops": 0.005, "size": 0.005}
    check = budget.check_measured({"latency": 0.66, "flops": 0.5, "size": 0.4}, {"latency": 0.67, "flops": 0.503, "size": None})
    assert check["latency"] == {"limit": 0.66, "measured": 0.67, "tolerance": 0.02, "met": True}  # 1.5 % over: within its 2 %
    assert check["flops"]["tolerance"] == 0.005 and not check["flops"]["met"]  # 0.6 % over the default 0.5 %
    assert check["size"] == {"limit": 0.4, "measured": None, "tolerance": 0.005, "met": False}  # not measured: not met
    flops = Budget.model_validate({"constraints": [{"resource": "flops", "ratio": 0.5}]})
    assert flops.check_measured({"flops": 0.5}, {"flops": 0.5024})["flops"]["met"]  # the other side of 0.5 %


def test_submission_and_evaluator_agree_on_every_resource(resnet20) -> None:
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    evaluator = Evaluator(pruner, None)
    analytic = BudgetChecker.analytic(pruner.graph, pruner.constraints, {"flops": 0.5},
                                      SizeModel.of(pruner.model, pruner.graph.dense_params))
    rng = np.random.default_rng(0)
    for _ in range(20):
        kept = pruner.kept_from_vector(rng.uniform(0.0, 0.8, len(pruner.layer_names)))
        ours, theirs = evaluator.resources(kept), analytic._resources(kept)
        for r in ("flops", "params", "size"):
            assert theirs[r] == pytest.approx(ours[r], rel=1e-12), r


def test_size_model_predicts_the_file_of_a_pruned_model(resnet20) -> None:
    """The size model against the bytes of a real pruned model's safetensors file."""
    from prunepilot.compression import size_on_disk

    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    model = SizeModel.of(pruner.model, pruner.graph.dense_params)
    assert model.bytes(model.dense_elements) == size_on_disk(pruner.model)
    kept = pruner.kept_from_vector(np.full(len(pruner.layer_names), 0.5))
    pruned = pruner.prune(pruner.effective(kept)).model
    cost = pruner.cost_of_kept(kept)
    assert model.bytes(cost.params + cost.bn_buffers) == pytest.approx(size_on_disk(pruned), rel=0.002)
