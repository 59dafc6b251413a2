"""Bounds on work done for models we did not write: a runaway dependency search is refused, the
process lives on."""

from __future__ import annotations

import time

import pytest
import torch

from prunepilot.compression import PruningGraph, build_model, graph
from prunepilot.compression.guard import LimitExceeded, WorkLimits, bounded


def test_a_runaway_loop_is_stopped_by_the_time_bound() -> None:
    start = time.monotonic()
    with pytest.raises(LimitExceeded, match="spinning took longer than 0.3 s; this model is refused"):
        with bounded("spinning", WorkLimits(seconds=0.3, extra_bytes=None)):
            while True:
                pass
    assert time.monotonic() - start < 5


def test_a_growing_loop_is_stopped_by_the_memory_bound() -> None:
    grown: list[list[int]] = []
    with pytest.raises(LimitExceeded, match="growing needed more than 0.2 GiB of memory"):
        with bounded("growing", WorkLimits(seconds=60, extra_bytes=200 << 20)):
            while True:
                grown.append(list(range(100_000)))
    assert len(grown) > 20  # it grew to the bound (about 3.6 MB a step) before it was stopped


def test_work_within_the_bounds_is_untouched_and_nothing_fires_later() -> None:
    with bounded("quick", WorkLimits(seconds=0.2, extra_bytes=None)):
        total = sum(range(1000))
    time.sleep(0.4)  # past the bound: a late interrupt would surface in the next bytecodes
    assert total == 499500 and sum(range(10)) == 45


def test_a_dependency_search_past_its_bound_refuses_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def endless(*_args: object, **_kw: object) -> None:
        indices: list[int] = []
        while True:  # what Torch-Pruning did on a dynamo-exported VGG: an index list growing without end
            indices.extend(range(1000))
            indices.clear()

    monkeypatch.setattr(graph, "trace_dependencies", endless)
    with pytest.raises(LimitExceeded, match="tracing the model's channel dependencies took longer than 0.5 s"):
        PruningGraph(build_model("resnet20"), 32, limits=WorkLimits(seconds=0.5))
    assert torch.ones(2).sum().item() == 2  # and the interpreter carries on
