"""Every agent honours ``max_evaluations`` exactly (issue 23: NetAdapt used 16 evaluations against a cap of 10).

The cap covers every trial the search itself records, whatever its kind (``search``, ``proposal``,
``sensitivity``). The measured latency check that may follow a search under a latency budget
(``agents.latency_check``, kind ``latency-check``, at most ``rounds`` trials) verifies the search's
answer and is not part of the search's allowance."""

from __future__ import annotations

import copy

import pytest

from prunepilot.agents import AGENTS, MemoryRecorder, SearchContext, SearchLimits, create_agent
from prunepilot.compression import Evaluator, Fidelity, PrunePilotError, Pruner

CAP = 7
# NetAdapt: one short fine-tune step per proposal keeps it quick; ResNet-20 gives it more proposals per iteration than the cap.
OPTIONS = {"netadapt": {"short_steps": 1}}


@pytest.fixture(scope="module")
def evaluator(resnet20, mini_splits) -> Evaluator:
    return Evaluator(Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32), mini_splits, Fidelity(val_images=100, calib_images=128))


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_agent_records_at_most_max_evaluations(evaluator: Evaluator, name: str) -> None:
    recorder = MemoryRecorder()
    ctx = SearchContext(evaluator, {"flops": 0.5}, SearchLimits(max_evaluations=CAP), recorder=recorder, seed=0, agent=name)
    try:
        create_agent(name, **OPTIONS.get(name, {})).search(ctx)
    except PrunePilotError as exc:  # a progressive agent may not reach the budget in so few evaluations: fine, if it says so
        assert "found no strategy" in str(exc), exc
    kinds = sorted({t.kind for t in recorder.trials})
    assert len(recorder.trials) <= CAP, f"{name} recorded {len(recorder.trials)} trials ({', '.join(kinds)}) against a cap of {CAP}"
    assert ctx.step <= CAP
