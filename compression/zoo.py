"""Model zoo: architectures by name, and safe weight loading (never unpickles a module)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn

from .cifar_resnet import CIFAR_RESNET_DEPTHS, DEFAULT_BUFFERS, cifar_resnet
from .errors import UnknownArchitectureError, WeightsError

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchInfo:
    name: str
    family: str  # "cifar-resnet" or "torchvision"
    input_size: int  # default square input resolution
    description: str


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        return tvm.get_model(name, weights=None, num_classes=num_classes)

    return build


_TORCHVISION = {
    "resnet18": "ResNet-18 (torchvision)",
    "resnet34": "ResNet-34 (torchvision)",
    "resnet50": "ResNet-50 (torchvision)",
    "mobilenet_v2": "MobileNet-v2 (torchvision)",
    "mobilenet_v3_small": "MobileNet-v3 small (torchvision)",
    "mobilenet_v3_large": "MobileNet-v3 large (torchvision)",
    "vgg11_bn": "VGG-11 with BN (torchvision)",
    "vgg16_bn": "VGG-16 with BN (torchvision)",
}

_BUILDERS: dict[str, tuple[ArchInfo, Callable[[int], nn.Module]]] = {}
for _name, _depth in CIFAR_RESNET_DEPTHS.items():
    _BUILDERS[_name] = (
        ArchInfo(_name, "cifar-resnet", 32, f"CIFAR ResNet-{_depth}, option-A shortcuts"),
        (lambda d: (lambda num_classes: cifar_resnet(d, num_classes)))(_depth),
    )
for _name, _desc in _TORCHVISION.items():
    _BUILDERS[_name] = (ArchInfo(_name, "torchvision", 224, _desc), _torchvision(_name))


def architectures() -> list[ArchInfo]:
    return [info for info, _ in _BUILDERS.values()]


def arch_info(arch: str) -> ArchInfo:
    try:
        return _BUILDERS[arch][0]
    except KeyError:
        known = ", ".join(sorted(_BUILDERS))
        raise UnknownArchitectureError(f"unknown architecture {arch!r}; known: {known}") from None


def build_model(arch: str, num_classes: int = 10) -> nn.Module:
    arch_info(arch)
    model = _BUILDERS[arch][1](num_classes)
    model.eval()
    return model


def read_state_dict(path: str | Path, source: str | None = None) -> dict[str, torch.Tensor]:
    """Read tensors from a state-dict file (``torch.save``) or a safetensors file, safely.

    ``torch.load(weights_only=True)`` refuses anything but tensors and plain containers, so a
    crafted pickle cannot run code. Checkpoints of the form ``{"state_dict": ...}`` are unwrapped
    and a DataParallel ``module.`` prefix is stripped. ``source`` names the file in messages (an
    upload's own name, not the server's path for it).
    """
    path = Path(path)
    source = source or path.name
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    with path.open("rb") as fh:
        head = fh.read(16)
    try:
        if path.suffix == ".safetensors" or _looks_like_safetensors(head):
            from safetensors.torch import load_file

            raw: object = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure here means "not a safe weights file"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"cannot read weights from {source}: not a state dict or safetensors file ({first})") from None
    return normalize_state_dict(raw, source=source)


def _looks_like_safetensors(head: bytes) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) > 9 and head[8:9] == b"{"


def normalize_state_dict(raw: object, source: str = "weights") -> dict[str, torch.Tensor]:
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not raw:
        raise WeightsError(f"{source}: expected a non-empty mapping of parameter names to tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise WeightsError(f"{source}: entry {key!r} is not a tensor")
        out[key.removeprefix("module.")] = value
    return out


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "weights") -> nn.Module:
    """Load ``state_dict`` strictly; a mismatch names the missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    # Older checkpoints predate BatchNorm's num_batches_tracked buffer (it does not affect outputs);
    # dense checkpoints lack buffers the architecture derives (DEFAULT_BUFFERS), which keep their defaults.
    derived = {f"{name}.{buffer}" for name, m in model.named_modules() for buffer in DEFAULT_BUFFERS.get(type(m), ())}
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked") and k not in derived]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)):
            if keys:
                shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise WeightsError(f"{source} does not match the architecture: " + "; ".join(parts))
    full = dict(state_dict)
    for k, v in expected.items():
        full.setdefault(k, v)
    model.load_state_dict(full, strict=True)
    return model


def load_model(arch: str, weights: str | Path | None = None, num_classes: int = 10) -> nn.Module:
    model = build_model(arch, num_classes)
    if weights is not None:
        load_weights(model, read_state_dict(weights), source=Path(weights).name)
    return model.eval()
