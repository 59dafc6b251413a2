"""Architecture specs: a pruned model described by channel counts, rebuilt without pickle.

A spec names the zoo architecture and, for every conv / linear / norm layer whose width changed,
its new channel counts. Rebuilding builds the dense architecture, resizes those layers in place
and loads the weights strictly, so a pruned model travels as JSON plus a safetensors file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from .cifar_resnet import ShortcutA
from .errors import WeightsError
from .zoo import build_model, load_weights

SPEC_VERSION = 1


@dataclass
class ArchSpec:
    arch: str
    num_classes: int
    input_size: int
    layers: dict[str, dict[str, int]] = field(default_factory=dict)
    version: int = SPEC_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "arch": self.arch, "num_classes": self.num_classes, "input_size": self.input_size, "layers": self.layers}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchSpec:
        try:
            if int(data.get("version", 1)) > SPEC_VERSION:
                raise WeightsError(f"spec version {data['version']} is newer than this prunepilot understands")
            return cls(str(data["arch"]), int(data["num_classes"]), int(data["input_size"]),
                       {k: {a: int(v) for a, v in d.items()} for k, d in data.get("layers", {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise WeightsError(f"invalid architecture spec: {exc}") from None


def _widths(m: nn.Module) -> dict[str, int] | None:
    if isinstance(m, nn.Conv2d):
        return {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
    if isinstance(m, nn.Linear):
        return {"in_features": m.in_features, "out_features": m.out_features}
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return {"num_features": m.num_features}
    if isinstance(m, ShortcutA):
        return {"in_channels": m.in_channels, "out_channels": m.out_channels}
    return None


@lru_cache(maxsize=32)
def arch_widths(arch: str, num_classes: int) -> dict[str, dict[str, int]]:
    """Layer widths of the unpruned zoo architecture (what specs are relative to)."""
    return {name: w for name, m in build_model(arch, num_classes).named_modules() if (w := _widths(m)) is not None}


def spec_of(pruned: nn.Module, arch: str, num_classes: int, input_size: int) -> ArchSpec:
    """The spec of ``pruned``, a (possibly repeatedly) pruned instance of the zoo architecture ``arch``."""
    layers: dict[str, dict[str, int]] = {}
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
    elif isinstance(m, ShortcutA):
        m.resize(w["in_channels"], w["out_channels"])
    else:
        raise WeightsError(f"spec resizes an unsupported layer type {type(m).__name__}")


def build_from_spec(spec: ArchSpec, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    model = build_model(spec.arch, spec.num_classes)
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
