"""Model sources: built-in names, timm architectures, plugins (entry points), and how pruned models
of each are saved and rebuilt."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from prunepilot.compression import Pruner, UnknownArchitectureError, load_artifact, save_artifact
from prunepilot.compression.sources import ModelSource, SourceKind, available_models

PLUGIN = '''
import torch
from torch import nn


def tiny(num_classes):
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


tiny.description = "a tiny test CNN"
tiny.fixed_input_size = 24
tiny.mean = (0.5, 0.5, 0.5)
tiny.std = (0.25, 0.25, 0.25)


def broken(num_classes):
    return "not a module"
'''


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed plugin package as pip leaves one: a module plus a dist-info with entry points."""
    (tmp_path / "pp_testplugin.py").write_text(PLUGIN)
    info = tmp_path / "pp_testplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pp-testplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [prunepilot.models]
        tinycnn = pp_testplugin:tiny
        brokencnn = pp_testplugin:broken
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_references_parse_to_their_kind() -> None:
    assert ModelSource.parse("resnet20") == ModelSource(SourceKind.BUILTIN, "resnet20")
    assert ModelSource.parse("timm:resnet18").ref == "timm:resnet18"
    with pytest.raises(UnknownArchitectureError, match="unknown architecture 'mynet'; known: .*resnet20"):
        ModelSource.parse("mynet")
    with pytest.raises(UnknownArchitectureError, match="unknown timm architecture 'no_such_net'"):
        ModelSource.parse("timm:no_such_net")
    with pytest.raises(UnknownArchitectureError, match="ONNX file not found: missing.onnx"):
        ModelSource.parse("missing.onnx")


def test_a_plugin_is_listed_built_and_its_declared_inputs_used(plugin_path: Path) -> None:
    source = ModelSource.parse("plugin:tinycnn")
    assert "plugin:tinycnn" in [m.name for m in available_models()]
    assert "plugin:brokencnn" in [m.name for m in available_models()]  # listed; it fails when built, clearly
    inputs = source.default_input()
    assert (inputs.size, inputs.mean, inputs.std) == (24, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert source.build(7)(torch.randn(1, 3, 24, 24)).shape == (1, 7)
    with pytest.raises(UnknownArchitectureError, match="plugin 'brokencnn' returned str, not a torch nn.Module"):
        ModelSource.parse("plugin:brokencnn").build(7)


def test_a_missing_plugin_says_where_it_must_be_installed() -> None:
    with pytest.raises(UnknownArchitectureError, match="plugin model 'nothere' is not installed here .*every worker"):
        ModelSource.parse("plugin:nothere")


@pytest.mark.parametrize("ref", ["plugin:tinycnn", "timm:resnet10t"])
def test_a_pruned_model_of_any_source_saves_and_rebuilds(ref: str, plugin_path: Path, tmp_path: Path) -> None:
    source = ModelSource.parse(ref)
    dense = source.build(5)
    pruner = Pruner(dense, source.ref, 5, 32)
    pruned = pruner.prune({name: 0.5 for name in pruner.layer_names})
    assert pruned.spec.layers, "pruning changed no layer widths"
    out = save_artifact(pruned.model, pruned.spec, tmp_path / "art")
    again = load_artifact(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), pruned.model(x))
