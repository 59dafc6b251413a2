from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch_pruning as tp

from prunepilot.compression import (
    Pruner,
    PruningConstraints,
    StrategyError,
    build_from_spec,
    build_model,
    count_macs,
    count_params,
    uniform_strategy,
)
from prunepilot.compression.cifar_resnet import ShortcutA, ShortcutAPruner
from prunepilot.compression.strategy import from_vector

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "vgg16_bn"]


STREAMS = ["conv1", "layer2.0.conv2", "layer3.0.conv2"]  # roots of each stage's residual channels


def test_cifar_resnet_prunes_block_internals_and_residual_streams(resnet20) -> None:
    pruner = Pruner(resnet20, "resnet20", 10, 32)
    inner = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    # in forward order: a stage's first block conv runs before the block output that roots the stream
    assert pruner.layer_names == ["conv1", *inner[:4], "layer2.0.conv2", *inner[4:7], "layer3.0.conv2", *inner[7:]]
    by_name = {layer.name: layer for layer in pruner.layers}
    # one ratio per stage for the stem / every block output tied by the residual additions
    assert set(by_name["conv1"].coupled) == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    assert set(by_name["layer3.0.conv2"].coupled) == {f"layer3.{b}.conv2" for b in range(3)}
    assert [by_name[n].c_out for n in STREAMS] == [16, 32, 64]


def test_excluded_layers_stay_whole(resnet20) -> None:
    pruner = Pruner(resnet20, "resnet20", 10, 32, PruningConstraints(exclude=("layer1.1.conv2", "layer2.0.conv2", "layer3.0.conv2")))
    assert pruner.layer_names == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]  # named by a coupled member too
    assert PruningConstraints(exclude=["conv1"]).exclude == ("conv1",)  # JSON lists become tuples
    with pytest.raises(StrategyError, match="cannot exclude layer9.conv: not a prunable layer"):
        Pruner(resnet20, "resnet20", 10, 32, PruningConstraints(exclude=("layer9.conv",)))
    with pytest.raises(StrategyError, match="cannot exclude linear"):
        Pruner(resnet20, "resnet20", 10, 32, PruningConstraints(exclude=("linear",)))


def _zero_channels(bn: torch.nn.BatchNorm2d, channels: list[int]) -> None:
    with torch.no_grad():
        bn.weight[channels] = 0.0
        bn.bias[channels] = 0.0


def test_pruned_resnet_computes_the_dense_model_with_removed_channels_zeroed(resnet20) -> None:
    """Independent of Torch-Pruning: removing channels must equal silencing them in the dense model.

    Silencing a block-internal channel zeroes its BN; silencing a residual channel zeroes it at the
    stem / every block output of the stage and drops it from the stage's option-A shortcut.
    """
    pruner = Pruner(resnet20, "resnet20", 10, 32)
    strategy = from_vector(np.random.default_rng(3).uniform(0.1, 0.7, len(pruner.layers)), pruner.layer_names)
    pruned = pruner.prune(strategy)
    assert all(k < layer.c_out for k, layer in zip(pruned.kept, pruner.layers, strict=True))
    reference = copy.deepcopy(resnet20)
    for i, layer in enumerate(pruner.layers):
        removed = sorted(int(c) for c in np.argsort(-pruner.scores[i], kind="stable")[pruned.kept[i]:])
        if layer.name in STREAMS:
            stage = STREAMS.index(layer.name) + 1
            if stage == 1:
                _zero_channels(reference.bn1, removed)
            for block in getattr(reference, f"layer{stage}"):
                _zero_channels(block.bn2, removed)
            shortcut = getattr(reference, f"layer{stage}")[0].shortcut
            if isinstance(shortcut, ShortcutA):
                shortcut.index[removed] = shortcut.in_channels
        else:
            _zero_channels(reference.get_submodule(layer.name.replace("conv1", "bn1")), removed)
    x = torch.randn(4, 3, 32, 32)
    expected = reference(x)
    assert not torch.allclose(expected, resnet20(x), atol=1e-2)  # the silencing did change the network
    assert torch.allclose(pruned.model(x), expected, atol=1e-4)


def test_uniform_half_removes_half_the_macs(resnet20) -> None:
    inner = PruningConstraints(exclude=tuple(STREAMS))
    pruner = Pruner(resnet20, "resnet20", 10, 32, inner)
    pruned = pruner.prune(uniform_strategy(pruner.layer_names, 0.5))
    dense_macs = count_macs(resnet20, 32)
    assert count_macs(pruned.model, 32) / dense_macs == pytest.approx(0.505, abs=0.01)
    assert pruned.kept == [8] * 3 + [16] * 3 + [32] * 3
    # with the residual channels pruned too, every conv loses half its inputs and outputs: ~1/4
    everything = Pruner(resnet20, "resnet20", 10, 32)
    pruned = everything.prune(uniform_strategy(everything.layer_names, 0.5))
    assert count_macs(pruned.model, 32) / dense_macs == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("arch", ["resnet56", *TORCHVISION])
def test_random_strategy_prunes_every_zoo_arch_and_cost_model_is_exact(arch: str) -> None:
    size = 32 if arch == "resnet56" or arch == "vgg16_bn" else 64
    model = build_model(arch)
    pruner = Pruner(model, arch, 10, size)
    rng = np.random.default_rng(0)
    strategy = from_vector(rng.uniform(0, 0.8, len(pruner.layers)), pruner.layer_names)
    pruned = pruner.prune(strategy)
    out = pruned.model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    cost = pruner.cost(strategy)
    assert cost.macs == count_macs(pruned.model, size)
    assert cost.params == count_params(pruned.model)
    assert cost.macs < pruner.graph.dense_macs


@pytest.mark.parametrize("arch", ["resnet20", "mobilenet_v2"])
def test_rebuilt_from_spec_equals_pruned(arch: str, resnet20) -> None:
    model = resnet20 if arch == "resnet20" else build_model(arch)
    size = 32
    pruner = Pruner(model, arch, 10, size)
    rng = np.random.default_rng(1)
    pruned = pruner.prune(from_vector(rng.uniform(0, 0.7, len(pruner.layers)), pruner.layer_names))
    rebuilt = build_from_spec(pruned.spec, pruned.model.state_dict())
    x = torch.randn(3, 3, size, size)
    assert torch.equal(rebuilt(x), pruned.model(x))


def test_replayed_plan_matches_torch_pruning_group_pruning(resnet20) -> None:
    """Our recorded plans must prune exactly what Torch-Pruning's own group.prune() would."""
    pruner = Pruner(resnet20, "resnet20", 10, 32)
    strategy = from_vector([0.5, 0.25, 0.5, 0.0, 0.25, 0.5, 0.25, 0.75, 0.75, 0.5, 0.5, 0.25], pruner.layer_names)
    ours = pruner.prune(strategy).model
    theirs = copy.deepcopy(resnet20)
    dg = tp.DependencyGraph().build_dependency(theirs, example_inputs=torch.randn(1, 3, 32, 32),
                                               customized_pruners={ShortcutA: ShortcutAPruner()})
    for i, layer in enumerate(pruner.layers):
        kept = pruner.kept_channels(strategy)[i]
        order = np.argsort(-pruner.scores[i], kind="stable")
        drop = sorted(int(c) for c in order[kept:])
        if drop:
            m = theirs.get_submodule(layer.name)
            dg.get_pruning_group(m, tp.prune_conv_out_channels, drop).prune()
    assert any(k < layer.c_out for k, layer in zip(pruner.kept_channels(strategy), pruner.layers, strict=True) if layer.name in STREAMS)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(ours(x), theirs(x))


def test_constraints_first_layer_max_and_rounding(resnet20) -> None:
    pruner = Pruner(resnet20, "resnet20", 10, 32, PruningConstraints(max_ratio=0.75))
    kept = pruner.kept_channels(uniform_strategy(pruner.layer_names, 0.9))
    assert kept[0] == 8  # first prunable layer held to 50 %
    assert list(kept[1:]) == [4, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16]  # others held to 75 %
    rounded = Pruner(resnet20, "resnet20", 10, 32, PruningConstraints(round_to=8))
    kept = rounded.kept_channels(uniform_strategy(rounded.layer_names, 0.3))
    assert all(k % 8 == 0 for k in kept)
    tiny = PruningConstraints(max_ratio=0.99, first_layer_max_ratio=0.99)
    assert tiny.kept(4, 0.99, 3) == 1  # never fewer than one channel


def test_bad_strategies(resnet20) -> None:
    pruner = Pruner(resnet20, "resnet20", 10, 32)
    with pytest.raises(StrategyError, match="unknown layer"):
        pruner.prune({"layer9.conv": 0.5})
    with pytest.raises(StrategyError, match=r"\[0, 1\)"):
        pruner.prune({pruner.layer_names[0]: 1.0})
    with pytest.raises(StrategyError):
        uniform_strategy(pruner.layer_names, -0.1)


def test_pruning_leaves_the_dense_model_untouched(resnet20) -> None:
    pruner = Pruner(resnet20, "resnet20", 10, 32)
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    pruner.prune(uniform_strategy(pruner.layer_names, 0.6))
    after = resnet20.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn-scale", "taylor"])
def test_every_importance_criterion_prunes(resnet20, mini_splits, criterion: str) -> None:
    from prunepilot.compression.data import Normalizer

    batch = None
    if criterion == "taylor":
        sub = mini_splits.train.subset(64, seed=0)
        batch = (Normalizer(mini_splits.mean, mini_splits.std)(sub.images), sub.labels)
    pruner = Pruner(resnet20, "resnet20", 10, 32, criterion=criterion, taylor_batch=batch)
    scores = pruner.scores
    assert [len(s) for s in scores] == [layer.c_out for layer in pruner.layers]
    assert all(np.isfinite(s).all() and s.std() > 0 for s in scores)
    pruned = pruner.prune(uniform_strategy(pruner.layer_names, 0.5))
    assert pruned.model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_criteria_choose_different_channels(resnet20, mini_splits) -> None:
    l1 = Pruner(resnet20, "resnet20", 10, 32, criterion="l1").scores
    bn = Pruner(resnet20, "resnet20", 10, 32, criterion="bn-scale").scores
    keep = lambda s: set(np.argsort(-s)[: len(s) // 2])  # noqa: E731
    assert any(keep(a) != keep(b) for a, b in zip(l1, bn, strict=True))


def test_taylor_without_a_batch_is_a_clear_error(resnet20) -> None:
    with pytest.raises(StrategyError, match="taylor criterion needs a batch"):
        Pruner(resnet20, "resnet20", 10, 32, criterion="taylor").scores  # noqa: B018
