"""Architecture specs: a pruned model described by channel counts, rebuilt without pickle.

A spec names the dense model's source (``compression/sources.py``: a built-in name, ``timm:``,
``plugin:`` or ``onnx:<sha256>``) and, for every conv / linear / norm layer whose width changed,
its new channel counts. Rebuilding builds the dense model, resizes those layers in place and loads
the weights strictly, so a pruned model travels as JSON plus a safetensors file (plus, for an ONNX
source, the source file: ``source_file``, relative to the artifact).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cifar_resnet import ShortcutA
from .errors import WeightsError
from .sources import InputSpec, ModelSource
from .zoo import load_weights

SPEC_VERSION = 2  # 2: input settings and the source file; version-1 specs (built-ins only) still load


@dataclass
class ArchSpec:
    arch: str  # the source's reference
    num_classes: int
    input_size: int
    layers: dict[str, dict[str, int]] = field(default_factory=dict)
    version: int = SPEC_VERSION
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    source_file: str | None = None  # an ONNX source's bytes (relative to the artifact directory once saved)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "arch": self.arch, "num_classes": self.num_classes,
                               "input_size": self.input_size, "layers": self.layers}
        if self.mean is not None and self.std is not None:
            out["input"] = {"mean": list(self.mean), "std": list(self.std)}
        if self.source_file is not None:
            out["source_file"] = self.source_file
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchSpec:
        try:
            if int(data.get("version", 1)) > SPEC_VERSION:
                raise WeightsError(f"spec version {data['version']} is newer than this prunepilot understands")
            norm = data.get("input") or {}
            mean = InputSpec().with_overrides(mean=norm["mean"]).mean if "mean" in norm else None
            std = InputSpec().with_overrides(std=norm["std"]).std if "std" in norm else None
            source_file = data.get("source_file")
            return cls(str(data["arch"]), int(data["num_classes"]), int(data["input_size"]),
                       {k: {a: int(v) for a, v in d.items()} for k, d in data.get("layers", {}).items()},
                       SPEC_VERSION, mean, std, str(source_file) if source_file is not None else None)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise WeightsError(f"invalid architecture spec: {exc}") from None

    def source(self, base: Path | None = None) -> ModelSource:
        """The dense model's source; ``base`` resolves a relative ``source_file`` (an artifact's directory)."""
        file = None
        if self.source_file is not None:
            file = Path(self.source_file) if base is None else base / self.source_file
        return ModelSource.parse(self.arch, file=file)


def _widths(m: nn.Module) -> dict[str, int] | None:
    if isinstance(m, nn.Conv2d):
        return {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
    if isinstance(m, nn.Linear):
        return {"in_features": m.in_features, "out_features": m.out_features}
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return {"num_features": m.num_features}
    if isinstance(m, nn.GroupNorm):
        return {"num_channels": m.num_channels}
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return {"normalized_shape": m.normalized_shape[0]}
    if isinstance(m, ShortcutA):
        return {"in_channels": m.in_channels, "out_channels": m.out_channels}
    return None


def module_widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """Every resizable layer's widths (what a spec records the changes against)."""
    return {name: w for name, m in model.named_modules() if (w := _widths(m)) is not None}


@lru_cache(maxsize=32)
def arch_widths(arch: str, num_classes: int) -> dict[str, dict[str, int]]:
    """Layer widths of an unpruned built-in architecture (what its specs are relative to)."""
    return module_widths(ModelSource.parse(arch).build(num_classes))


def spec_of(pruned: nn.Module, arch: str, num_classes: int, input_size: int,
            reference: Mapping[str, dict[str, int]] | None = None) -> ArchSpec:
    """The spec of ``pruned``, a (possibly repeatedly) pruned instance of the dense model ``arch``;
    ``reference``: the dense model's :func:`module_widths` (needed for any source but a built-in)."""
    layers: dict[str, dict[str, int]] = {}
    if reference is None:
        reference = arch_widths(arch, num_classes)
    for name, m in pruned.named_modules():
        w = _widths(m)
        if w is not None and w != reference.get(name):
            layers[name] = w
    return ArchSpec(arch, num_classes, input_size, layers)


def _resize(m: nn.Module, w: dict[str, int]) -> None:
    if isinstance(m, nn.Conv2d):
        m.in_channels, m.out_channels, m.groups = w["in_channels"], w["out_channels"], w["groups"]
        kh, kw = m.kernel_size
        m.weight = nn.Parameter(torch.empty(m.out_channels, m.in_channels // m.groups, kh, kw))
        if m.bias is not None:
            m.bias = nn.Parameter(torch.empty(m.out_channels))
    elif isinstance(m, nn.Linear):
        m.in_features, m.out_features = w["in_features"], w["out_features"]
        m.weight = nn.Parameter(torch.empty(m.out_features, m.in_features))
        if m.bias is not None:
            m.bias = nn.Parameter(torch.empty(m.out_features))
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        n = m.num_features = w["num_features"]
        if m.affine:
            m.weight = nn.Parameter(torch.empty(n))
            m.bias = nn.Parameter(torch.empty(n))
        if m.track_running_stats:
            m.running_mean = torch.zeros(n)
            m.running_var = torch.ones(n)
    elif isinstance(m, nn.GroupNorm):
        n = m.num_channels = w["num_channels"]
        if m.affine:
            m.weight = nn.Parameter(torch.empty(n))
            m.bias = nn.Parameter(torch.empty(n))
    elif isinstance(m, nn.LayerNorm):
        n = w["normalized_shape"]
        m.normalized_shape = (n,)
        if m.weight is not None:
            m.weight = nn.Parameter(torch.empty(n))
        if m.bias is not None:
            m.bias = nn.Parameter(torch.empty(n))
    elif isinstance(m, ShortcutA):
        m.resize(w["in_channels"], w["out_channels"])
    else:
        raise WeightsError(f"spec resizes an unsupported layer type {type(m).__name__}")


def build_from_spec(spec: ArchSpec, state_dict: dict[str, torch.Tensor] | None = None, base: Path | None = None) -> nn.Module:
    """The pruned model: the dense source rebuilt, its changed layers resized, ``state_dict`` loaded."""
    model = spec.source(base).build(spec.num_classes)
    for name, widths in spec.layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise WeightsError(f"spec names layer {name!r}, which {spec.arch} does not have") from None
        try:
            _resize(module, widths)
        except KeyError as exc:
            raise WeightsError(f"spec entry for {name!r} lacks {exc}") from None
    if state_dict is not None:
        load_weights(model, state_dict, source="pruned weights")
    return model.eval()
