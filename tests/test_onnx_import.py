"""Users' ONNX models: reading, refusals, conversion to a prunable module, export back, MACs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers.onnx_models import CLASSES, SIZE, Net, export_net
from helpers.onnx_models import make_net as _net
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from prunepilot.compression import OnnxModelError, Pruner, PruningConstraints, PruningGraph, WeightsError
from prunepilot.compression.onnx_io import (
    OnnxModelInfo,
    _normalize,
    check_against_onnxruntime,
    export_onnx,
    onnx_macs,
    onnx_to_torch,
    probe_pruning,
    read_onnx,
    read_onnx_info,
)


def _count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.fixture(scope="module")
def net_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Net, Path]:
    """The legacy exporter without constant folding keeps every BatchNormalization (the dynamo
    exporter fuses them into the convolutions: :func:`test_dynamo_export_converts`)."""
    net, path = _net(), tmp_path_factory.mktemp("onnx") / "net.onnx"
    export_net(net, path)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"BatchNormalization", "Concat", "Reshape", "Gemm"} <= ops
    return net, path


@pytest.fixture(scope="module")
def converted(net_onnx: tuple[Net, Path]) -> tuple[nn.Module, OnnxModelInfo]:
    return onnx_to_torch(net_onnx[1])


def test_convert_matches_and_keeps_every_layer(net_onnx: tuple[Net, Path], converted: tuple[nn.Module, OnnxModelInfo]) -> None:
    (net, path), (model, info) = net_onnx, converted
    assert (info.input_name, info.channels, info.height, info.width, info.num_classes, info.opset) == ("x", 3, SIZE, SIZE, CLASSES, 17)
    assert info.input_size == SIZE and len(info.sha256) == 64 and info.batch is None
    assert info == read_onnx_info(path) and isinstance(read_onnx(path), onnx.ModelProto)
    assert isinstance(model, torch.fx.GraphModule) and not model.training
    assert check_against_onnxruntime(model, path, input_size=SIZE) <= 1e-4
    with torch.no_grad():
        x = torch.randn(3, 3, SIZE, SIZE)
        torch.testing.assert_close(model(x), net(x), rtol=1e-4, atol=1e-4)
    for kind in (nn.Conv2d, nn.BatchNorm2d, nn.Linear):  # every weighted layer is a real torch module
        assert _count(model, kind) == _count(net, kind), kind.__name__
    assert not any(type(m).__name__ in ("OnnxBatchNorm", "OnnxGemm", "OnnxReshape") for m in model.modules())
    # no weight is kept twice: constants the rewrites consumed are gone
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in net.parameters())


def test_prune_export_and_count_macs(converted: tuple[nn.Module, OnnxModelInfo], net_onnx: tuple[Net, Path], tmp_path: Path) -> None:
    model, info = converted
    graph = PruningGraph(model, SIZE)
    assert len(graph.layers) > 0
    assert onnx_macs(net_onnx[1]) == graph.dense_macs
    pruner = Pruner(model, "x", info.num_classes, SIZE)
    # the SE block's Reshape was rewritten, so the group through it (its conv and fc2) is prunable
    assert any(len(layer.coupled) == 2 and layer.type == "conv" and "fc2" in layer.coupled[1] for layer in pruner.layers)
    assert len(pruner.layer_names) == 5  # stem, dw block + SE, SE squeeze, the two concatenated branches
    strategy = {name: 0.5 for name in pruner.layer_names}
    pruned = pruner.prune(strategy)
    with torch.no_grad():
        assert pruned.model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, CLASSES)
    bn_widths = sorted(m.num_features for m in pruned.model.modules() if isinstance(m, nn.BatchNorm2d))
    dense_widths = sorted(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert sum(bn_widths) < sum(dense_widths)  # BNs are pruned with their convs (they are real BatchNorm2d)

    out = export_onnx(pruned.model, tmp_path / "pruned.onnx", input_size=SIZE)
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["pruned.onnx"]
    assert check_against_onnxruntime(pruned.model, out, input_size=SIZE) <= 1e-4
    macs, predicted = onnx_macs(out), pruner.cost(strategy).macs
    assert predicted < graph.dense_macs and abs(macs - predicted) <= 0.02 * predicted, (macs, predicted)


def test_dynamo_export_converts(tmp_path: Path) -> None:
    """The default exporter writes opset 18+ (down-converted for onnx2torch), fuses BN into the convs
    and writes Reshape(allowzero=1); the converted model still matches and prunes."""
    net, path = _net(), tmp_path / "dyn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, SIZE, SIZE),), str(path), dynamo=True, external_data=False,
                          input_names=["x"], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    converted, info = onnx_to_torch(path)
    assert info.opset >= 18 and info.num_classes == CLASSES
    assert check_against_onnxruntime(converted, path, input_size=SIZE, samples=3) <= 1e-4
    assert _count(converted, nn.Conv2d) == _count(net, nn.Conv2d) and _count(converted, nn.Linear) == 3
    pruner = Pruner(converted, "x", CLASSES, SIZE)
    assert len(pruner.layer_names) == 5
    pruned = pruner.prune({name: 0.5 for name in pruner.layer_names})
    with torch.no_grad():
        assert pruned.model(torch.randn(1, 3, SIZE, SIZE)).shape == (1, CLASSES)


def test_onnx2torch_batchnorm_wrapper_is_replaced() -> None:
    """onnx2torch alone turns a BatchNormalization whose parameters are not initializers into its
    functional OnnxBatchNorm (Torch-Pruning cannot prune it); normalization makes it a BatchNorm2d."""
    import onnx2torch

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((CLASSES, 8)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv")]
    for p, value in zip(("scale", "bias", "mean", "var"), (1.5, 0.2, 0.1, 2.0), strict=True):
        inits.append(numpy_helper.from_array(np.full(8, value, np.float32), p + "_init"))
        nodes.append(helper.make_node("Identity", [p + "_init"], [p]))
    nodes += [helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"], name="bn"),
              helper.make_node("GlobalAveragePool", ["b"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
              helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    model = _model(nodes, inits, opset=17)
    raw = onnx2torch.convert(model)
    assert any(type(m).__name__ == "OnnxBatchNorm" for m in raw.modules())
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = raw(x)
        _normalize(raw, x)
        torch.testing.assert_close(raw(x), expected)
    assert not any(type(m).__name__ == "OnnxBatchNorm" for m in raw.modules()) and _count(raw, nn.BatchNorm2d) == 1
    converted, _ = onnx_to_torch(model)
    assert _count(converted, nn.BatchNorm2d) == 1
    assert check_against_onnxruntime(converted, model.SerializeToString(), input_size=SIZE) <= 1e-4


def test_per_channel_constants_become_prunable(tmp_path: Path) -> None:
    """A per-channel scale and shift after a conv (what some exporters leave of a BatchNorm) become a
    depthwise 1x1 conv that prunes with its producer; a MatMul by a constant becomes a Linear."""
    rng = np.random.default_rng(1)
    c = 8
    inits = [numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32), "scale"),
             numpy_helper.from_array(rng.standard_normal((c, 1, 1)).astype(np.float32), "shift"),
             numpy_helper.from_array(rng.standard_normal((c, CLASSES)).astype(np.float32), "m"),
             numpy_helper.from_array(rng.standard_normal(CLASSES).astype(np.float32), "mb")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "scale"], ["s"]), helper.make_node("Add", ["shift", "s"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("MatMul", ["f", "m"], ["mm"]),
             helper.make_node("Add", ["mm", "mb"], ["y"])]
    model = _model(nodes, inits, opset=13, out_shape=["N", "classes"])
    converted, info = onnx_to_torch(model)
    assert info.num_classes == CLASSES  # the file leaves it dynamic: taken from a forward pass
    assert _count(converted, nn.Conv2d) == 3 and _count(converted, nn.Linear) == 1
    assert check_against_onnxruntime(converted, model.SerializeToString(), input_size=SIZE) <= 1e-4
    pruner = Pruner(converted, "x", CLASSES, SIZE)
    assert len(pruner.layer_names) == 1
    pruned = pruner.prune({pruner.layer_names[0]: 0.5})
    with torch.no_grad():
        assert pruned.model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, CLASSES)
    assert pruner.cost({pruner.layer_names[0]: 0.5}).macs < pruner.graph.dense_macs


# ------------------------------------------------------------------------------------------ refusals


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], *, opset: int, inputs: tuple[str, ...] = ("x",),
           extra_opsets: tuple[onnx.OperatorSetIdProto, ...] = (), out_shape: list[int | str] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 3, SIZE, SIZE]) for name in inputs],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, out_shape or ["N", CLASSES])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _relu_model(opset: int = 17) -> onnx.ModelProto:
    return _model([helper.make_node("Relu", ["x"], ["y"])], [], opset=opset, out_shape=["N", 3, SIZE, SIZE])


def _pool_model(opset: int = 17) -> onnx.ModelProto:
    """The smallest "classifier": the mean of each input channel (N x 3)."""
    return _model([helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)], [], opset=opset, out_shape=["N", 3])


def test_refuses_old_opset(tmp_path: Path) -> None:
    path = _save(_pool_model(opset=12), tmp_path / "old.onnx")
    with pytest.raises(OnnxModelError, match=r"old\.onnx uses opset 12; opset 13 or newer"):
        read_onnx(path)


def test_refuses_two_inputs(tmp_path: Path) -> None:
    model = _model([helper.make_node("Add", ["x", "x2"], ["y"])], [], opset=17, inputs=("x", "x2"), out_shape=["N", 3, SIZE, SIZE])
    with pytest.raises(OnnxModelError, match=r"2 inputs \('x', 'x2'\)"):
        onnx_to_torch(_save(model, tmp_path / "two.onnx"))


def test_refuses_garbage_and_truncated_files(tmp_path: Path, net_onnx: tuple[Net, Path]) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(OnnxModelError, match=r"garbage\.onnx is not"):
        read_onnx(garbage)
    data = net_onnx[1].read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxModelError, match=r"truncated\.onnx"):
        onnx_to_torch(truncated)
    with pytest.raises(WeightsError, match=r"upload\.onnx"):  # OnnxModelError is a WeightsError; ``source`` names it
        read_onnx(garbage, source="upload.onnx")


def test_refuses_unsupported_operators_naming_all(tmp_path: Path) -> None:
    nodes = [helper.make_node("Swizzle", ["x"], ["a"], domain="com.example", name="swizzle_1"),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Swizzle", ["b"], ["c"], domain="com.example", name="swizzle_2"),
             helper.make_node("Frobnicate", ["c"], ["y"], domain="com.example", name="frob")]
    model = _model(nodes, [], opset=17, extra_opsets=(helper.make_opsetid("com.example", 1),))
    with pytest.raises(OnnxModelError) as err:
        onnx_to_torch(_save(model, tmp_path / "custom.onnx"))
    msg = str(err.value)
    assert "com.example.Swizzle" in msg and "'swizzle_1', 'swizzle_2'" in msg and "com.example.Frobnicate" in msg and "'frob'" in msg
    assert "\n" not in msg


def test_refuses_files_over_the_limit(tmp_path: Path) -> None:
    path = _save(_pool_model(), tmp_path / "big.onnx")
    size = path.stat().st_size
    with pytest.raises(OnnxModelError, match=rf"big\.onnx is {size:,} bytes, over the limit of {size - 1:,}"):
        read_onnx(path, max_bytes=size - 1)
    assert read_onnx_info(path, max_bytes=size).channels == 3


def test_refuses_external_data(tmp_path: Path) -> None:
    inits = [numpy_helper.from_array(np.ones((8, 3, 3, 3), np.float32), "w")]
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"])], inits, opset=17, out_shape=["N", 8, 30, 30])
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.weights", size_threshold=0)
    with pytest.raises(OnnxModelError, match=r"tensor 'w' is stored in an external file \('ext\.weights'\)"):
        read_onnx(tmp_path / "ext.onnx")


def test_refuses_non_image_input_and_non_classifier_output(tmp_path: Path) -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])])
    with pytest.raises(OnnxModelError, match=r"input 'x' has rank 2"):
        read_onnx(_save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "vec.onnx"))
    with pytest.raises(OnnxModelError, match=r"output 'y' has rank 4; a classifier's output is N x classes"):
        onnx_to_torch(_relu_model())


@pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")
def test_other_constants_block_their_channel_group() -> None:
    """A constant pruning could not resize (here a full 1 x C x H x W tensor added after a conv) becomes a
    parameter, so the dependency graph leaves that conv's channel group whole; the rest still prunes."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((1, 8, SIZE, SIZE)).astype(np.float32), "pos"),
             numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal((CLASSES, 8)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Add", ["c1", "pos"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    model = _model(nodes, inits, opset=17)
    converted, _ = onnx_to_torch(model)
    assert any(p.shape == (1, 8, SIZE, SIZE) for p in converted.parameters())
    pruner = Pruner(converted, "x", CLASSES, SIZE)
    assert pruner.layer_names == ["conv2"]
    pruned = pruner.prune({"conv2": 0.5})
    with torch.no_grad():
        assert pruned.model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, CLASSES)


def test_export_falls_back_to_the_legacy_exporter(converted: tuple[nn.Module, OnnxModelInfo], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from prunepilot.compression import artifacts

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("dynamo cannot trace this")

    monkeypatch.setattr(artifacts, "_export_to", fail)
    out = export_onnx(converted[0], tmp_path / "legacy.onnx", input_size=SIZE)
    assert read_onnx_info(out).opset == 17 and sorted(p.name for p in tmp_path.iterdir()) == ["legacy.onnx"]


def test_probe_finds_layers_a_shape_constant_pins() -> None:
    """A channel shuffle (Reshape to N x 2 x 4 x H x W, Transpose, Reshape back) keeps the channel count in
    its constant shapes: pruning conv1 breaks the forward pass, which probe_pruning reports for exclusion."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.array([0, 2, 4, SIZE, SIZE], np.int64), "shape5"),
             numpy_helper.from_array(np.array([0, 8, SIZE, SIZE], np.int64), "shape4"),
             numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal((CLASSES, 8)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Reshape", ["c1", "shape5"], ["r5"]),
             helper.make_node("Transpose", ["r5"], ["t"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t", "shape4"], ["r4"]),
             helper.make_node("Conv", ["r4", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    model = _model(nodes, inits, opset=17)
    converted, _ = onnx_to_torch(model)
    assert check_against_onnxruntime(converted, model.SerializeToString(), input_size=SIZE) <= 1e-4
    broken = probe_pruning(converted, SIZE)
    assert list(broken) == ["conv1"] and "invalid for input of size" in broken["conv1"]
    pruner = Pruner(converted, "x", CLASSES, SIZE, constraints=PruningConstraints(exclude=tuple(broken)))
    assert pruner.layer_names == ["conv2"]
