"""Bring-your-own-model matrix: torchvision architectures and a hand-written CNN, each exported to
ONNX the way users do (legacy exporter, opset 17, dynamic batch, 32 x 32, random weights), then:

1. the converted module matches ONNX Runtime on the user's file;
2. the least uniform pruning meeting ``flops=0.5`` (``analytic_checker`` + ``uniform_within`` on a
   verified ``Pruner``) lands within 2 % under the target, counted by ``onnx_macs`` from the exported
   pruned file against an ONNX export of the converted dense model (not by our cost model);
3. the pruned model written by ``export_onnx`` runs in ONNX Runtime (dynamic batch) and agrees with
   the pruned torch model;
4. ``inspect_model`` names the blocked layers (at least the classifier) with reasons.

Outcomes (see each row's comment for why a row checks less):

| model | outcome |
|---|---|
| net (helpers.onnx_models), resnet18, mobilenet_v3_small, efficientnet_b0, regnet_x_400mf, convnext_tiny | pruned, checks 1-4 |
| densenet121 | pruned, checks 1-4 (export through the legacy fallback); uniform pruning lands at 48.2 %, not within 2 % (rounding), see its test |
| shufflenet_v2_x0_5 | ONNX: converts and round-trips, not pruned here (the dependency graph takes ~5 min); the torch module: refused (Torch-Pruning's tracer fails) |
| vgg11_bn | not in this file: not exportable at 32 px with the legacy exporter (AdaptiveAvgPool2d(7) of a 1x1 map), and at 224 px its 528 MB file takes ~40 s; benchmarks/byom.py runs it at 224 px. The dynamo exporter's 32 px file makes Torch-Pruning's group search grow without end: the search bound refuses it (compression/guard.py) |
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from helpers.onnx_models import export_net, make_net
from torch import nn

from prunepilot.compression import (
    Budget,
    Pruner,
    PruningConstraints,
    PruningGraph,
    StrategyError,
    inspect_model,
    parse_constraint,
)
from prunepilot.compression.budget import analytic_checker, uniform_within
from prunepilot.compression.inspect import PrunabilityReport
from prunepilot.compression.onnx_io import (
    OnnxModelInfo,
    check_against_onnxruntime,
    export_onnx,
    onnx_macs,
    onnx_to_torch,
)

pytestmark = [pytest.mark.filterwarnings("ignore:Unwrapped parameters detected"),
              pytest.mark.filterwarnings("ignore:Using a non-tuple sequence for multidimensional indexing")]

SIZE = 32
CLASSES = 10
TARGET = 0.5  # flops=0.5
LOW = TARGET * (1 - 0.02)  # within 2 % under the target: 0.49 <= MACs ratio <= 0.5

# the classifier (the last Gemm), as onnx2torch names it: never pruned, always reported blocked
CLASSIFIER = {
    "net": "fc/Gemm",
    "resnet18": "fc/Gemm",
    "mobilenet_v3_small": "classifier/classifier/3/Gemm",
    "efficientnet_b0": "classifier/classifier/1/Gemm",
    "regnet_x_400mf": "fc/Gemm",
    "densenet121": "classifier/Gemm",
    "convnext_tiny": "classifier/classifier/2/Gemm",
}
PRUNED = list(CLASSIFIER)
CONVERTED = [*PRUNED, "shufflenet_v2_x0_5"]
# export_onnx tries the dynamo exporter first and falls back to the legacy one; for DenseNet-121 the
# dynamo export takes ~11 s of this file's budget, so its row exercises the fallback (the benchmark
# runs the default path for every model).
LEGACY_EXPORT = {"densenet121"}
# Prunable channel groups after the correctness check (the number is the check: a tracer or
# converter change that loses or invents groups shows here).
GROUPS = {"net": 5, "resnet18": 12, "mobilenet_v3_small": 27, "efficientnet_b0": 40, "regnet_x_400mf": 5,
          "densenet121": 120, "convnext_tiny": 22}


def _quiet() -> contextlib.AbstractContextManager[object]:
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def _torchvision(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, num_classes=CLASSES).eval()


@dataclass
class Converted:
    path: Path  # the user's ONNX file
    model: nn.Module
    info: OnnxModelInfo
    diff: float  # check_against_onnxruntime on the user's file


@dataclass
class PrunedCase:
    pruner: Pruner
    ratios: np.ndarray  # the uniform ratios uniform_within chose
    kept: np.ndarray
    model: nn.Module
    path: Path  # export_onnx of the pruned model
    dense_macs: int  # onnx_macs of the user's file (convnext_tiny: of the converted dense model, see below)
    macs: int  # onnx_macs of the exported pruned file
    report: PrunabilityReport


class Matrix:
    """Each model is exported, converted and pruned once per module; the tests read the results."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._converted: dict[str, Converted] = {}
        self._pruned: dict[str, PrunedCase] = {}

    def converted(self, name: str) -> Converted:
        if name not in self._converted:
            net = make_net() if name == "net" else _torchvision(name)
            path = export_net(net, self.root / f"{name}.onnx", size=SIZE)
            model, info = onnx_to_torch(path)
            self._converted[name] = Converted(path, model, info, check_against_onnxruntime(model, path, input_size=SIZE))
        return self._converted[name]

    def pruned(self, name: str) -> PrunedCase:
        if name not in self._pruned:
            conv = self.converted(name)
            pruner = Pruner(conv.model, name, CLASSES, SIZE, verify=True)
            budget = Budget(constraints=[parse_constraint(f"flops={TARGET}")])
            checker = analytic_checker(conv.model, pruner.graph, pruner.constraints, budget)
            ratios = uniform_within(checker)
            kept = checker.kept(ratios)
            model = pruner.prune_kept(kept).model
            with _quiet(), contextlib.ExitStack() as stack:
                if name in LEGACY_EXPORT:
                    stack.enter_context(mock.patch("prunepilot.compression.artifacts._export_to",
                                                   side_effect=RuntimeError("test: legacy exporter")))
                path = export_onnx(model, self.root / f"{name}-pruned.onnx", input_size=SIZE)
                dense_macs = onnx_macs(conv.path)
                if name == "convnext_tiny":
                    # The converter turns per-channel Mul / Add constants into 1x1 depthwise convs
                    # (ConvNeXt's layer scale): MACs the user's file counts as Mul (none). Count the
                    # dense side from an ONNX export of the converted model too, so both see the same ops.
                    dense = self.root / f"{name}-dense.onnx"
                    torch.onnx.export(conv.model, (torch.randn(1, 3, SIZE, SIZE),), str(dense), dynamo=False, opset_version=17)
                    dense_macs = onnx_macs(dense)
            report = inspect_model(pruner)
            self._pruned[name] = PrunedCase(pruner, ratios, kept, model, path, dense_macs, onnx_macs(path), report)
        return self._pruned[name]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Matrix:
    return Matrix(tmp_path_factory.mktemp("byom"))


# ------------------------------------------------------------------------------------ 1. conversion


@pytest.mark.parametrize("name", CONVERTED)
def test_conversion_matches_onnxruntime(matrix: Matrix, name: str) -> None:
    conv = matrix.converted(name)
    assert conv.diff <= 1e-4
    assert (conv.info.channels, conv.info.input_size, conv.info.num_classes, conv.info.batch) == (3, SIZE, CLASSES, None)
    with torch.no_grad():
        assert conv.model(torch.randn(5, 3, SIZE, SIZE)).shape == (5, CLASSES)  # dynamic batch survives conversion


# ------------------------------------------------------------------------------------ 2. 50 % MACs


def _dense_macs_agree(matrix: Matrix, name: str) -> None:
    """The cost model's dense MACs equal onnx_macs of the user's file, but for ops the converter
    turned into convs."""
    case, conv = matrix.pruned(name), matrix.converted(name)
    graph = case.pruner.graph
    assert graph.dense_macs == case.dense_macs
    user = onnx_macs(conv.path)
    if name == "convnext_tiny":  # layer scale: a Mul in the user's file, a 1x1 depthwise conv after conversion
        added = sum(m.out_channels * int(np.prod(graph.shapes[n][1][2:])) for n, m in conv.model.named_modules()
                    if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == m.in_channels > 1)
        assert added > 0 and case.dense_macs == user + added
    else:
        assert case.dense_macs == user


@pytest.mark.parametrize("name", [n for n in PRUNED if n != "densenet121"])
def test_uniform_half_macs_lands_within_two_percent(matrix: Matrix, name: str) -> None:
    case = matrix.pruned(name)
    assert len(case.pruner.layers) == GROUPS[name] and not case.pruner.verify_failed
    # uniform: one ratio, clipped only by the layer limits (the first layer's 50 %)
    np.testing.assert_allclose(case.ratios, np.minimum(case.ratios.max(), case.pruner.max_ratios()))
    _dense_macs_agree(matrix, name)
    ratio = case.macs / case.dense_macs
    assert LOW <= ratio <= TARGET, f"{name}: {ratio:.4f} of dense MACs (ONNX-counted)"
    # and our cost model predicted exactly that file
    assert case.macs == case.pruner.cost_of_kept(case.kept).macs


def test_densenet121_uniform_rounding_overshoots_the_band(matrix: Matrix) -> None:
    """DenseNet-121: 58 of its 120 groups are 32-channel growth convs. One uniform ratio crosses
    their rounding step all at once, so the least uniform pruning meeting 50 % lands at ~48.2 %,
    outside the 2 % band, and no uniform ratio lands closer. The honest check: the exported file
    is under the target, its ONNX-counted MACs are exactly what the cost model predicted, and the
    next less-pruned uniform setting already misses the target (so the gap is rounding, not a
    search or counting error)."""
    case = matrix.pruned("densenet121")
    assert len(case.pruner.layers) == GROUPS["densenet121"] and not case.pruner.verify_failed
    _dense_macs_agree(matrix, "densenet121")
    ratio = case.macs / case.dense_macs
    assert 0.47 <= ratio < LOW, f"{ratio:.4f}: if this now lands in the band, move densenet121 to the test above"
    assert case.macs == case.pruner.cost_of_kept(case.kept).macs
    less = case.pruner.cost_of_kept(case.pruner.kept_from_vector(case.ratios - 1e-6)).macs / case.pruner.graph.dense_macs
    assert less > TARGET, f"a slightly smaller uniform ratio still meets the budget ({less:.4f}): uniform_within is not minimal"


# ------------------------------------------------------------------------------------ 3. pruned export in ORT


@pytest.mark.parametrize("name", PRUNED)
def test_pruned_export_runs_in_onnxruntime(matrix: Matrix, name: str) -> None:
    case = matrix.pruned(name)
    session = ort.InferenceSession(str(case.path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))  # not the batch it was exported with
    out = session.run(None, {inp.name: x.numpy()})[0]
    assert out.shape == (3, CLASSES)
    with torch.no_grad():
        ours = case.model(x).numpy()
    np.testing.assert_allclose(out, ours, rtol=1e-4, atol=1e-4 * float(np.abs(ours).max()))
    dense_params = sum(p.numel() for p in matrix.converted(name).model.parameters())
    pruned_params = sum(int(np.prod(t.dims)) for t in onnx.load(str(case.path)).graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert pruned_params < dense_params  # the file holds the smaller weights, not masks


# ------------------------------------------------------------------------------------ 4. inspect


@pytest.mark.parametrize("name", PRUNED)
def test_inspect_lists_blocked_layers_with_reasons(matrix: Matrix, name: str) -> None:
    report = matrix.pruned(name).report
    assert len(report.groups) == GROUPS[name] and report.verified
    reasons = {b.name: b.reason for b in report.blocked}
    assert reasons.get(CLASSIFIER[name]) == "output layer (the classifier)"
    assert all(r.strip() for r in reasons.values())
    assert report.floors["flops"] < TARGET
    if name == "regnet_x_400mf":  # grouped convolutions: only the stem and the stage transitions' groups are free
        grouped = [r for r in reasons.values() if r.startswith("grouped convolution coupling (groups=")]
        assert len(grouped) == len(reasons) - 1 >= 40
    else:
        assert list(reasons) == [CLASSIFIER[name]]
    assert CLASSIFIER[name] in report.table()


# ------------------------------------------------------------------------------------ refusals and reduced rows


def test_shufflenet_module_refused_with_the_tracer_error() -> None:
    """torchvision's ShuffleNetV2 handed over as a module (Python API, plugin, timm path): Torch-Pruning's
    tracer divides by zero on the channel shuffle's view; the user gets one line naming the cause."""
    model = _torchvision("shufflenet_v2_x0_5")
    with pytest.raises(StrategyError) as err:
        Pruner(model, "module:ShuffleNetV2", CLASSES, SIZE, PruningConstraints(), verify=True)
    assert str(err.value) == ("Torch-Pruning cannot trace this model's channel dependencies "
                              "(ZeroDivisionError: integer division or modulo by zero)")


def test_shufflenet_onnx_converts_and_round_trips(matrix: Matrix, tmp_path: Path) -> None:
    """The ONNX ShuffleNetV2 traces (its shuffle is Reshape / Transpose / Slice), but Torch-Pruning's
    group search through the shuffles takes ~5 min per graph on this machine, twice with the
    correctness check: too slow for this file, so this row checks conversion (above) and that the
    converted module, with onnx2torch's Shape / Gather modules, exports back to a file ONNX Runtime
    runs (it failed with an AttributeError under torch 2.9+ before onnx_io's compat shim)."""
    conv = matrix.converted("shufflenet_v2_x0_5")
    assert any(type(m).__name__ == "OnnxShape" for m in conv.model.modules())
    with _quiet():
        out = export_onnx(conv.model, tmp_path / "shufflenet.onnx", input_size=SIZE)
    assert check_against_onnxruntime(conv.model, out, input_size=SIZE, samples=3) <= 1e-4


def test_convnext_module_layer_scale_blocks_its_groups() -> None:
    """torchvision's ConvNeXt as a module: layer scale is a bare nn.Parameter (C x 1 x 1) multiplying
    the residual branch, which the plan cannot prune, so every group reaching one is left whole with
    that reason (the ONNX row above prunes: the converter turns the Mul into a depthwise conv)."""
    graph = PruningGraph(_torchvision("convnext_tiny"), SIZE)
    layer_scale = [b for b in graph.blocked if "bare nn.Parameter" in b.reason and "layer_scale" in b.reason]
    assert layer_scale and {b.name for b in layer_scale} >= {"features.0.0", "features.1.0.block.0"}
    assert graph.layers and all(layer.name.endswith("block.3") for layer in graph.layers)  # the MLP's hidden width
