from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from prunepilot.compression import Pruner, WeightsError, export_format, load_artifact, save_artifact
from prunepilot.compression.strategy import from_vector


@pytest.fixture(scope="module")
def artifact(resnet20, tmp_path_factory: pytest.TempPathFactory):
    pruner = Pruner(resnet20, "resnet20", 10, 32)
    pruned = pruner.prune(from_vector(np.linspace(0.1, 0.7, len(pruner.layers)), pruner.layer_names))
    path = save_artifact(pruned.model, pruned.spec, tmp_path_factory.mktemp("art"), {"note": "test"})
    return path, pruned.model


def test_state_dict_artifact_round_trip(artifact) -> None:
    path, model = artifact
    again = load_artifact(path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again(x), model(x))
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "report.json", "spec.json"]


def test_exported_program_and_onnx(artifact) -> None:
    path, model = artifact
    pt2 = export_format(path, "pt2")
    program = torch.export.load(str(pt2))
    x = torch.randn(5, 3, 32, 32)  # a batch size other than the one traced: the batch dimension is dynamic
    assert torch.allclose(program.module()(x), model(x), atol=1e-5)
    onnx_path = export_format(path, "onnx")
    onnx.checker.check_model(str(onnx_path))
    assert onnx.load(str(onnx_path)).graph.input[0].name == "input"


def test_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not a prunepilot artifact"):
        load_artifact(tmp_path)
