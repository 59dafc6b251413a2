from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from prunepilot.compression import (
    Evaluator,
    Fidelity,
    FinetuneConfig,
    FormulaEvaluator,
    PrunePilotError,
    Pruner,
    finetune,
    uniform_strategy,
)
from prunepilot.compression.data import Normalizer
from prunepilot.compression.evaluate import accuracy, fold_batchnorm, recalibrate_batchnorm, reconstruct_next_layers
from prunepilot.compression.finalizing import heldout_tensors

# Measured here: pretrained ResNet-20 on all 10,000 JPEG test images (prunepilot prune ... --uniform 0).
RESNET20_FULL_TEST_ACC = 0.810


@pytest.fixture(scope="module")
def evaluator(resnet20, mini_splits) -> Evaluator:
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    return Evaluator(pruner, mini_splits, Fidelity(val_images=300, calib_images=512))


def test_subset_accuracy_close_to_full_test_set(resnet20, mini_splits) -> None:
    x, y = heldout_tensors(mini_splits)
    assert len(y) == 500
    acc = accuracy(copy.deepcopy(resnet20), x, y)
    assert acc == pytest.approx(RESNET20_FULL_TEST_ACC, abs=0.04)


def test_folded_batchnorm_gives_the_same_predictions(resnet20, mini_splits) -> None:
    x, _ = heldout_tensors(mini_splits, 64)
    model = copy.deepcopy(resnet20).eval()
    with torch.no_grad():
        assert torch.allclose(fold_batchnorm(model)(x), model(x), atol=1e-4)


def test_uniform_at_half_the_macs_with_adaptive_bn_far_above_chance(evaluator: Evaluator) -> None:
    s = uniform_strategy(evaluator.pruner.layer_names, 0.3)  # every conv loses ~30 % of its inputs and outputs
    none = evaluator.evaluate(s, Fidelity(method="none", val_images=300, calib_images=512))
    abn = evaluator.evaluate(s)
    assert abn.macs_ratio == pytest.approx(0.529, abs=0.01)
    assert abn.accuracy > 0.25  # chance is 0.1
    assert abn.accuracy > none.accuracy + 0.1  # stale BN statistics wreck the pruned net
    assert abn.forward_time_s > 0 and abn.wall_time_s >= abn.forward_time_s
    assert abn.fidelity.startswith("adaptive-bn")


def test_results_are_cached_by_architecture(evaluator: Evaluator) -> None:
    s = uniform_strategy(evaluator.pruner.layer_names, 0.3)
    first = evaluator.evaluate(s)
    n = evaluator.evaluations
    # a different ratio that rounds to the same channel counts is the same architecture
    again = evaluator.evaluate(uniform_strategy(evaluator.pruner.layer_names, 0.31))
    assert evaluator.evaluations == n and again.cached and again.accuracy == first.accuracy


def test_resources_match_evaluated_metrics(evaluator: Evaluator) -> None:
    rng = np.random.default_rng(4)
    ratios = rng.uniform(0, 0.7, len(evaluator.pruner.layers))
    kept = evaluator.pruner.kept_from_vector(ratios)
    res = evaluator.resources(kept)
    m = evaluator.evaluate_vector(ratios, Fidelity(method="none", val_images=100, calib_images=64))
    assert res["flops"] == pytest.approx(m.macs_ratio)
    assert res["params"] == pytest.approx(m.params_ratio)
    assert res["size"] == pytest.approx(m.size_ratio, rel=0.01)


def test_formula_evaluator_reports_the_real_evaluators_resources(evaluator: Evaluator) -> None:
    formula = FormulaEvaluator(evaluator.pruner, lambda kept_fraction: float(kept_fraction.mean()), tag="mean-kept")
    ratios = np.random.default_rng(5).uniform(0, 0.7, len(evaluator.pruner.layers))
    kept = evaluator.pruner.kept_from_vector(ratios)
    cheap = formula.evaluate_kept(kept)
    real = evaluator.evaluate_kept(kept, Fidelity(method="none", val_images=100, calib_images=64))
    assert (cheap.macs, cheap.params, cheap.kept, cheap.strategy) == (real.macs, real.params, real.kept, real.strategy)
    assert cheap.size_bytes == pytest.approx(real.size_bytes, rel=0.01)
    # the formula, fed kept fractions, is the accuracy
    assert cheap.accuracy == pytest.approx(float(np.mean(np.asarray(kept) / np.asarray(evaluator.pruner.graph.channels))))
    assert cheap.fidelity == "mean-kept" and formula.evaluations == 1
    with pytest.raises(PrunePilotError, match="without data"):
        formula.dense_accuracy()


def test_reconstruct_and_short_finetune_fidelities_run(evaluator: Evaluator) -> None:
    s = uniform_strategy(evaluator.pruner.layer_names, 0.3)
    abn = evaluator.evaluate(s, Fidelity(val_images=300, calib_images=256))
    rec = evaluator.evaluate(s, Fidelity(method="reconstruct", val_images=300, calib_images=256))
    ft = evaluator.evaluate(s, Fidelity(method="short-finetune", val_images=300, calib_images=256, finetune_steps=5, batch_size=64))
    assert rec.accuracy > abn.accuracy + 0.1  # refitting the convs recovers much more than BN statistics alone
    assert ft.accuracy > 0.2
    assert rec.fidelity.startswith("reconstruct") and "ft=5" in ft.fidelity


def test_reconstruction_fits_convs_that_lost_inputs_and_outputs(resnet20, mini_splits) -> None:
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    pruned = pruner.prune(uniform_strategy(pruner.layer_names, 0.3))
    # its inputs are residual channels, its outputs block-internal ones: both pruned; and 9 refitted
    # convs precede it, so it fits well only if it is fitted to their refitted features
    name = "layer2.1.conv1"
    conv, dense_conv = pruned.model.get_submodule(name), resnet20.get_submodule(name)
    assert conv.in_channels < dense_conv.in_channels and conv.out_channels < dense_conv.out_channels
    x = Normalizer(mini_splits.mean, mini_splits.std)(mini_splits.train.images[:128])
    kept = torch.as_tensor(pruned.kept_outputs[name])

    def error() -> float:
        seen: dict[str, torch.Tensor] = {}
        hooks = [conv.register_forward_hook(lambda m, i, o: seen.__setitem__("pruned", o)),
                 dense_conv.register_forward_hook(lambda m, i, o: seen.__setitem__("dense", o))]
        with torch.no_grad():
            pruned.model(x)
            resnet20(x)
        for h in hooks:
            h.remove()
        return float(((seen["pruned"] - seen["dense"][:, kept]) ** 2).mean())

    before = error()
    assert reconstruct_next_layers(copy.deepcopy(pruned.model), resnet20, x) == 0  # outputs shrank: without the map, left alone
    rebuilt = reconstruct_next_layers(pruned.model, resnet20, x, kept_outputs=pruned.kept_outputs)
    assert rebuilt == sum(1 for n, m in resnet20.named_modules() if isinstance(m, torch.nn.Conv2d) and n != "conv1")
    assert error() < 0.5 * before


def test_recalibration_uses_exact_average(resnet20, mini_splits) -> None:
    model = copy.deepcopy(resnet20)
    x = Normalizer(mini_splits.mean, mini_splits.std)(mini_splits.train.images[:64])
    recalibrate_batchnorm(model, x, batch_size=32)
    bn = model.bn1
    with torch.no_grad():
        feats = model.conv1(x)
    assert torch.allclose(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-4)
    assert bn.momentum == 0.1 and not model.training


def test_finetuning_improves_a_pruned_model(resnet20, mini_splits) -> None:
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    model = pruner.prune(uniform_strategy(pruner.layer_names, 0.4)).model
    norm = Normalizer(mini_splits.mean, mini_splits.std)
    recalibrate_batchnorm(model, norm(mini_splits.train.images[:512]))
    x, y = heldout_tensors(mini_splits)
    before = accuracy(model, x, y)
    result = finetune(model, mini_splits.train, norm, FinetuneConfig(steps=60, lr=0.01, batch_size=64))
    after = accuracy(model, x, y)
    assert result.steps == 60
    assert after > before + 0.05


def test_distillation_runs_and_needs_a_teacher(resnet20, mini_splits) -> None:
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    model = pruner.prune(uniform_strategy(pruner.layer_names, 0.5)).model
    norm = Normalizer(mini_splits.mean, mini_splits.std)
    cfg = FinetuneConfig(steps=5, lr=0.01, batch_size=32, distill=True)
    result = finetune(model, mini_splits.train, norm, cfg, teacher=copy.deepcopy(resnet20).eval())
    assert result.steps == 5 and np.isfinite(result.final_loss)
    from prunepilot.compression import PrunePilotError

    with pytest.raises(PrunePilotError, match="teacher"):
        finetune(model, mini_splits.train, norm, cfg)
