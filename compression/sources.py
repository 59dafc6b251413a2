"""Where a dense model comes from: a built-in name, a timm architecture, a plugin, or an ONNX file.

One reference string names a model everywhere (jobs, specs, artifacts, the CLI):
``resnet56`` (built-in), ``timm:<name>``, ``plugin:<name>`` (an entry point of the group
``prunepilot.models``) or ``onnx:<sha256>`` (an uploaded file, kept by content). A path to an
``.onnx`` file given to the CLI or the Python API becomes ``onnx:<sha256>`` with that file.
Built-in, timm and plugin models take their weights from a separate upload; an ONNX file carries
its own.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

from torch import nn

from .errors import UnknownArchitectureError, WeightsError
from .zoo import CIFAR_MEAN, CIFAR_STD, ArchInfo, arch_info, architectures, build_model

PLUGIN_GROUP = "prunepilot.models"
IMAGENET_MEAN, IMAGENET_STD = CIFAR_MEAN, CIFAR_STD  # the zoo's constants are ImageNet's statistics


class SourceKind(StrEnum):
    BUILTIN = "builtin"
    TIMM = "timm"
    PLUGIN = "plugin"
    ONNX = "onnx"


@dataclass(frozen=True)
class InputSpec:
    """What the model eats: a square RGB image of ``size`` pixels, normalized with ``mean``/``std``.

    ``size`` None means "the data's native size" (the model accepts any: torchvision, timm)."""

    size: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channels: int = 3

    def with_overrides(self, size: int | None = None, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None) -> InputSpec:
        """The user's settings over the model's own: any of them may be left out."""
        return replace(self, size=size or self.size, mean=_triple(mean, "mean") if mean is not None else self.mean,
                       std=_triple(std, "std", positive=True) if std is not None else self.std)

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std), "channels": self.channels}


def _triple(values: Sequence[float], what: str, positive: bool = False) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) != 3:
        raise WeightsError(f"{what} needs 3 values (R, G, B), got {len(vals)}")
    if positive and min(vals) <= 0:
        raise WeightsError(f"{what} values must be positive, got {', '.join(f'{v:g}' for v in vals)}")
    return vals[0], vals[1], vals[2]


@dataclass(frozen=True)
class ModelSource:
    """A dense model's origin. ``file``: where an ONNX source's bytes are (not part of its identity)."""

    kind: SourceKind
    name: str  # built-in / timm / plugin name; for ONNX the file's sha256
    file: Path | None = None

    @property
    def ref(self) -> str:
        return self.name if self.kind is SourceKind.BUILTIN else f"{self.kind.value}:{self.name}"

    @property
    def carries_weights(self) -> bool:
        return self.kind is SourceKind.ONNX

    @classmethod
    def parse(cls, ref: str, file: str | Path | None = None) -> ModelSource:
        """A reference (or a path to an ``.onnx`` file) -> a source; unknown names fail here, clearly."""
        ref = ref.strip()
        kind, sep, name = ref.partition(":")
        if ref.lower().endswith(".onnx") or (file is None and Path(ref).suffix == ".onnx"):
            path = Path(ref)
            if not path.is_file():
                raise UnknownArchitectureError(f"ONNX file not found: {ref}")
            return cls(SourceKind.ONNX, sha256_of(path), path)
        if sep and kind == SourceKind.ONNX.value:
            if file is None:
                raise UnknownArchitectureError(f"{ref} names an ONNX file by content; the file itself is needed")
            return cls(SourceKind.ONNX, name, Path(file))
        if sep and kind == SourceKind.TIMM.value:
            _timm()  # installed? say so now, not in a worker
            if not name:
                raise UnknownArchitectureError("timm: needs an architecture name, e.g. timm:resnet18")
            import timm

            if not timm.is_model(name):
                raise UnknownArchitectureError(f"unknown timm architecture {name!r} (timm {timm.__version__}; see timm.list_models())")
            return cls(SourceKind.TIMM, name)
        if sep and kind == SourceKind.PLUGIN.value:
            _plugin(name)
            return cls(SourceKind.PLUGIN, name)
        try:
            arch_info(ref)
        except UnknownArchitectureError as exc:  # the message lists the built-ins; say how to bring one's own
            raise UnknownArchitectureError(f"{exc}; for your own model give an .onnx file, timm:<name> or plugin:<name> "
                                           "(or call prunepilot.compress in Python)") from None
        return cls(SourceKind.BUILTIN, ref)

    def info(self) -> ArchInfo:
        if self.kind is SourceKind.BUILTIN:
            return arch_info(self.name)
        if self.kind is SourceKind.PLUGIN:
            builder = _plugin(self.name)
            return ArchInfo(self.ref, "plugin", int(getattr(builder, "input_size", 224)),
                            str(getattr(builder, "description", "") or f"plugin {self.name}"))
        if self.kind is SourceKind.TIMM:
            return ArchInfo(self.ref, "timm", 224, f"timm {self.name}")
        return ArchInfo(self.ref, "onnx", self.default_input().size or 224, "uploaded ONNX model")

    def default_input(self) -> InputSpec:
        """The model's own input settings: what it declares, else ImageNet's statistics at native size."""
        if self.kind is SourceKind.BUILTIN:
            info = arch_info(self.name)
            # the CIFAR ResNets are defined at 32 px; torchvision's nets take any size
            return InputSpec(info.input_size if info.family == "cifar-resnet" else None)
        if self.kind is SourceKind.TIMM:
            import timm

            cfg = timm.get_pretrained_cfg(self.name)
            if cfg is None:
                return InputSpec()
            return InputSpec(None, _triple(cfg.mean, "mean"), _triple(cfg.std, "std", positive=True))
        if self.kind is SourceKind.PLUGIN:
            b = _plugin(self.name)
            size = getattr(b, "fixed_input_size", None)
            return InputSpec(int(size) if size else None, _triple(getattr(b, "mean", IMAGENET_MEAN), "mean"),
                             _triple(getattr(b, "std", IMAGENET_STD), "std", positive=True))
        from .onnx_io import read_onnx_info

        onnx_info = read_onnx_info(self._onnx_file())
        return InputSpec(onnx_info.input_size, channels=onnx_info.channels)

    def build(self, num_classes: int | None = None) -> nn.Module:
        """The dense model in eval mode: random weights, except an ONNX source's own."""
        if self.kind is SourceKind.BUILTIN:
            return build_model(self.name, num_classes or 10)
        if self.kind is SourceKind.TIMM:
            import timm

            return timm.create_model(self.name, pretrained=False, num_classes=num_classes or 1000).eval()
        if self.kind is SourceKind.PLUGIN:
            model = _plugin(self.name)(num_classes or 10)
            if not isinstance(model, nn.Module):
                raise UnknownArchitectureError(f"plugin {self.name!r} returned {type(model).__name__}, not a torch nn.Module")
            return model.eval()
        return copy.deepcopy(_converted(self.name, str(self._onnx_file()))[0])

    def _onnx_file(self) -> Path:
        if self.file is None or not self.file.is_file():
            raise UnknownArchitectureError(f"the ONNX source {self.name[:12]} is not available here ({self.file})")
        return self.file


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# A job converts its ONNX file once per process, not once per rebuilt candidate (NetAdapt, exports).
_CONVERTED: dict[tuple[str, str], tuple[nn.Module, Any]] = {}
_CONVERTED_LOCK = threading.Lock()


def _converted(sha: str, path: str) -> tuple[nn.Module, Any]:
    with _CONVERTED_LOCK:
        hit = _CONVERTED.get((sha, path))
        if hit is None:
            from .onnx_io import onnx_to_torch

            if sha256_of(Path(path)) != sha:
                raise WeightsError(f"{path} does not hold the ONNX model {sha[:12]} (content changed)")
            hit = onnx_to_torch(Path(path))
            if len(_CONVERTED) >= 8:
                _CONVERTED.pop(next(iter(_CONVERTED)))
            _CONVERTED[(sha, path)] = hit
        return hit


def _timm() -> None:
    try:
        import timm  # noqa: F401
    except ImportError:
        raise UnknownArchitectureError("timm architectures need the timm package: pip install 'prunepilot[timm]'") from None


def plugin_entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP)}


def _plugin(name: str) -> Callable[[int], nn.Module]:
    ep = plugin_entry_points().get(name)
    if ep is None:
        raise UnknownArchitectureError(
            f"plugin model {name!r} is not installed here (entry point group {PLUGIN_GROUP!r}); on a cluster, install "
            "the plugin's package on every worker as on the API server")
    try:
        builder = ep.load()
    except Exception as exc:  # noqa: BLE001 - a broken plugin is the plugin's error, reported in one line
        raise UnknownArchitectureError(f"plugin model {name!r} failed to load ({ep.value}): {type(exc).__name__}: {exc}") from None
    if not callable(builder):
        raise UnknownArchitectureError(f"plugin model {name!r} ({ep.value}) is not callable")
    return cast(Callable[[int], nn.Module], builder)


def available_models() -> list[ArchInfo]:
    """Built-ins, installed plugins, and timm (by name) when installed: what ``GET /v1/models`` lists."""
    out = list(architectures())
    for name in sorted(plugin_entry_points()):
        try:
            out.append(ModelSource(SourceKind.PLUGIN, name).info())
        except UnknownArchitectureError:
            continue  # a broken plugin is not offered
    try:
        import timm

        out.append(ArchInfo("timm:<name>", "timm", 224, f"any timm {timm.__version__} architecture by name, e.g. timm:resnet18"))
    except ImportError:
        pass
    return out
