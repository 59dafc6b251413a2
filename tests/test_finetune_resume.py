"""Fine-tuning survives a killed worker: it checkpoints and continues where it stopped, ending as
the uninterrupted run would have (issue 23); and finalization takes any prunable root, a linear
layer's features as well as a conv's channels (issue 20, "Also fix")."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from prunepilot.compression import FinetuneConfig, Normalizer, Pruner, build_model, finalize, finetune
from prunepilot.compression.strategy import uniform_strategy

CONFIG = FinetuneConfig(steps=8, batch_size=16, lr=0.01)


class Killed(Exception):
    pass


def run(model, splits, config=CONFIG, checkpoint=None, kill_at=None, seen=None):  # type: ignore[no-untyped-def]
    def on_step(step: int, total: int, loss: float) -> None:
        if seen is not None:
            seen.append(step)
        if kill_at is not None and step == kill_at:
            raise Killed

    return finetune(model, splits.train, Normalizer(splits.mean, splits.std), config, on_step=on_step,
                    checkpoint=checkpoint, checkpoint_every=3)


def test_a_killed_fine_tune_resumes_and_ends_as_the_uninterrupted_one(resnet20, mini_splits, tmp_path: Path) -> None:
    torch.manual_seed(0)
    whole = copy.deepcopy(resnet20)
    run(whole, mini_splits)
    ckpt = tmp_path / "ft.pt"
    first = copy.deepcopy(resnet20)
    with pytest.raises(Killed):
        run(first, mini_splits, checkpoint=ckpt, kill_at=5)  # checkpoints after steps 3 (and 6, not reached)
    assert ckpt.is_file()
    again, seen = copy.deepcopy(resnet20), []
    run(again, mini_splits, checkpoint=ckpt, seen=seen)  # a new process: the model starts from the dense weights
    assert seen == [4, 5, 6, 7, 8]
    for (name, a), b in zip(whole.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    assert not ckpt.exists()  # a finished run leaves no checkpoint behind


def test_another_runs_checkpoint_is_not_resumed(resnet20, mini_splits, tmp_path: Path) -> None:
    ckpt = tmp_path / "ft.pt"
    with pytest.raises(Killed):
        run(copy.deepcopy(resnet20), mini_splits, checkpoint=ckpt, kill_at=4)
    seen: list[int] = []
    run(copy.deepcopy(resnet20), mini_splits, config=FinetuneConfig(steps=8, batch_size=16, lr=0.02), checkpoint=ckpt, seen=seen)
    assert seen == list(range(1, 9))


def test_finalize_takes_an_adapted_network_with_prunable_linear_layers(mini_splits) -> None:
    """mobilenet_v3_small's squeeze-excitation blocks have prunable linear roots (no out_channels)."""
    model = build_model("mobilenet_v3_small", 10)
    pruner = Pruner(model, "mobilenet_v3_small", 10, 32)
    roots = [type(pruner.model.get_submodule(layer.name)).__name__ for layer in pruner.layers]
    assert roots[-1] == "Linear"
    strategy = uniform_strategy(pruner.layer_names, 0.3)
    adapted = pruner.prune(strategy).model
    result = finalize(pruner, mini_splits, strategy, FinetuneConfig(), initial_model=adapted, test_images=20,
                      latency_batches=(1,), threads=1, adaptive_bn_images=32)
    assert result.pruned.kept == list(pruner.kept_channels(strategy))
    assert np.isfinite(result.figures["pruned"].accuracy)
