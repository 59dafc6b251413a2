"""Pruned-model artifacts in loadable, non-pickle forms.

A directory holds ``model.safetensors`` (weights) + ``spec.json`` (architecture by name and pruned
widths) - enough to rebuild the model with :func:`load_artifact` - and ``report.json``. The
``torch.export`` program (``model.pt2``) and ``model.onnx`` are derived from those on request.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import PrunePilotError, WeightsError
from .spec import ArchSpec, build_from_spec

Format = Literal["state_dict", "pt2", "onnx"]
FORMATS: tuple[str, ...] = ("state_dict", "pt2", "onnx")
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "spec.json"
REPORT_FILE = "report.json"
FILES = {"state_dict": WEIGHTS_FILE, "pt2": "model.pt2", "onnx": "model.onnx"}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_artifact(model: nn.Module, spec: ArchSpec, out_dir: str | Path, report: dict[str, Any] | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, out / WEIGHTS_FILE)
    _atomic_write_text(out / SPEC_FILE, json.dumps(spec.to_dict(), indent=2))
    if report is not None:
        _atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=2, default=str))
    return out


def load_artifact(path: str | Path) -> nn.Module:
    path = Path(path)
    spec_path, weights_path = path / SPEC_FILE, path / WEIGHTS_FILE
    if not spec_path.is_file() or not weights_path.is_file():
        raise WeightsError(f"{path} is not a prunepilot artifact (needs {SPEC_FILE} and {WEIGHTS_FILE})")
    spec = ArchSpec.from_dict(json.loads(spec_path.read_text()))
    return build_from_spec(spec, load_file(str(weights_path)))


def read_spec(path: str | Path) -> ArchSpec:
    return ArchSpec.from_dict(json.loads((Path(path) / SPEC_FILE).read_text()))


def export_format(path: str | Path, fmt: str) -> Path:
    """The artifact's file in ``fmt``, derived (and kept) on first request."""
    if fmt not in FORMATS:
        raise PrunePilotError(f"unknown model format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    target = path / FILES[fmt]
    if target.is_file():
        return target
    model = load_artifact(path)
    size = read_spec(path).input_size
    example = (torch.randn(2, 3, size, size),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    tmp = target.with_suffix(target.suffix + f".tmp{os.getpid()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "pt2":
            program = torch.export.export(model, example, dynamic_shapes=({0: batch},))
            torch.export.save(program, str(tmp))
        else:
            torch.onnx.export(model, example, str(tmp), dynamo=True, verbose=False, input_names=["input"],
                              output_names=["logits"], dynamic_shapes=({0: batch},))
    os.replace(tmp, target)
    return target
