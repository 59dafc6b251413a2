"""The one job pipeline (agents/pipeline.py), in-process: phases in order, hooks at their points,
the report the worker stores and the CLI prints, and the typed config a job spec parses into."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from prunepilot.agents import MemoryRecorder, SearchLimits
from prunepilot.agents.pipeline import FinalConfig, PipelineConfig, PipelineHooks, run_pipeline, timed_config
from prunepilot.compression import Budget, Fidelity, FinetuneConfig, PrunePilotError, Pruner
from prunepilot.service.schemas import JobCreate

BUDGET = Budget.model_validate({"constraints": [{"resource": "flops", "ratio": 0.5}]})


def config(**over) -> PipelineConfig:  # type: ignore[no-untyped-def]
    fields = {"agent": "random", "budget": BUDGET, "search": SearchLimits(max_evaluations=3),
              "fidelity": Fidelity(val_images=100, calib_images=64),
              "final": FinalConfig(finetune=FinetuneConfig(steps=2, batch_size=32), test_images=100, latency_batches=(1,)), **over}
    return PipelineConfig(**fields)


def test_a_job_runs_through_every_phase_with_its_hooks(resnet20, mini_splits) -> None:
    events: list[str] = []
    recorder = MemoryRecorder()
    hooks = PipelineHooks(recorder=recorder, threads=2,
                          on_trial=lambda t: events.append(f"trial {t.step}"),
                          on_search_done=lambda r: events.append(f"search done, best {r.best.step}"),
                          on_finetune_step=lambda step, total, loss: events.append(f"ft {step}/{total}"))
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    result = run_pipeline(pruner, mini_splits, config(), hooks, "resnet20")
    best = result.search.best
    assert best is not None and best.feasible
    assert events[:3] == ["trial 0", "trial 1", "trial 2"]
    assert events[3] == f"search done, best {best.step}"
    assert events[4:] == ["ft 1/2", "ft 2/2"]  # fine-tuning only after the search
    assert [t.step for t in recorder.trials] == [0, 1, 2]
    report = result.report
    assert report["search"]["best_step"] == best.step and report["search"]["evaluations"] == 3
    assert report["strategy"] == best.strategy and report["macs_ratio"] <= 0.5
    assert report["test_images"] == 100 and set(report["figures"]) == {"dense", "pruned"}
    assert report["budget_check"] == {"flops": {"limit": 0.5, "measured": report["macs_ratio"], "tolerance": 0.005, "met": True}}


def test_a_search_with_no_feasible_best_ends_before_fine_tuning(resnet20, mini_splits) -> None:
    tuned: list[int] = []
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    hooks = PipelineHooks(on_search_done=lambda r: tuned.append(1))
    with pytest.raises(PrunePilotError, match="infeasible"):
        run_pipeline(pruner, mini_splits, config(budget=Budget.model_validate({"constraints": [{"resource": "flops", "ratio": 0.05}]})),
                     hooks, "resnet20")
    assert not tuned


def test_a_latency_budget_needs_a_place_for_its_table(resnet20, mini_splits) -> None:
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    latency = Budget.model_validate({"constraints": [{"resource": "latency", "ratio": 0.8}]})
    with pytest.raises(PrunePilotError, match="latency store"):
        run_pipeline(pruner, mini_splits, config(budget=latency), PipelineHooks(), "resnet20")


def test_the_final_phase_times_the_batch_size_a_latency_budget_names() -> None:
    latency = Budget.model_validate({"constraints": [{"resource": "latency", "ratio": 0.8, "batch_size": 8}]})
    assert timed_config(config(budget=latency)).latency_batches == (1, 8)
    batch_one = Budget.model_validate({"constraints": [{"resource": "latency", "ratio": 0.8}]})
    assert timed_config(config(budget=batch_one)).latency_batches == (1,) and timed_config(config()).latency_batches == (1,)


def test_a_job_spec_parses_once_into_the_engine_configs() -> None:
    spec = JobCreate.model_validate({"arch": "resnet20", "budget": {"constraints": [{"resource": "params", "ratio": 0.4}]},
                                     "agent": "amc", "agent_options": {"recipe": "paper"}, "seed": 7,
                                     "fidelity": {"val_images": 200}, "finetune": {"epochs": 2, "finetune_dense": True},
                                     "constraints": {"max_ratio": 0.7, "exclude": ["conv1"]}, "measure": {"latency_batches": [1, 8]}})
    c = spec.pipeline_config()
    assert (c.agent, dict(c.agent_options), c.seed) == ("amc", {"recipe": "paper"}, 7)
    assert c.fidelity == Fidelity(val_images=200)  # everything else the engine's default
    assert c.final.finetune == FinetuneConfig(epochs=2, seed=7) and c.final.finetune_dense
    assert c.final.latency_batches == (1, 8) and c.search == SearchLimits(60)
    constraints = spec.constraints.to_engine()
    assert constraints.max_ratio == 0.7 and constraints.exclude == ("conv1",) and constraints.first_layer_max_ratio == 0.5


def test_the_final_figures_are_timed_on_the_jobs_latency_target(resnet20, mini_splits, monkeypatch) -> None:
    """A job whose target is ONNX Runtime reports its final latency as timed there, not in torch eager;
    the default target keeps torch's clock."""
    from prunepilot.agents import pipeline
    from prunepilot.compression.backends import LatencyTarget
    from prunepilot.compression.measure import Latency

    class Spy:
        name = "onnxruntime"
        threads = 2
        calls: list[int] = []

        def measure(self, models, input_size, batch_size, threads, warmup, repeats):  # type: ignore[no-untyped-def]
            Spy.calls.append(batch_size)
            return [Latency(4.0 / (i + 1), 0, 0, batch_size, 2, repeats) for i in range(len(models))]

    asked: list[str] = []
    monkeypatch.setattr(pipeline, "local_backend", lambda name, threads: asked.append(name) or Spy())
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    final = FinalConfig(finetune=FinetuneConfig(steps=0), test_images=50, latency_batches=(1,), target=LatencyTarget("onnxruntime"))
    done = pipeline.finish(pruner, mini_splits, {}, final, PipelineHooks(threads=2))
    assert asked == ["onnxruntime"] and Spy.calls == [1, 1, 1]  # three interleaved rounds at batch 1
    report = done.report()
    assert report["latency_measured_on"] == "onnxruntime"
    assert done.figures["dense"].latency_ms == {"1": 4.0} and done.figures["pruned"].latency_ms == {"1": 2.0}
    assert done.usage(1)["latency"] == 0.5 and done.usage(8)["latency"] is None  # batch 8 was not timed
    torch_run = pipeline.finish(pruner, mini_splits, {}, dataclasses.replace(final, target=LatencyTarget()), PipelineHooks(threads=2))
    assert asked == ["onnxruntime"] and torch_run.report()["latency_measured_on"] == "torch"
