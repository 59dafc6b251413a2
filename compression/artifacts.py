"""Pruned-model artifacts in loadable, non-pickle forms.

A directory holds ``model.safetensors`` (weights) + ``spec.json`` (architecture by name and pruned
widths) - enough to rebuild the model with :func:`load_artifact` - and ``report.json``. The
``torch.export`` program (``model.pt2``) and ``model.onnx`` are derived from those on request (the
ONNX file checked against the torch model in ONNX Runtime). An ONNX-sourced model's artifact also
keeps its source file (``source.onnx``), so the directory rebuilds on its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import uuid
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


SOURCE_FILE = "source.onnx"


def save_artifact(model: nn.Module, spec: ArchSpec, out_dir: str | Path, report: dict[str, Any] | None = None) -> Path:
    """Weights, spec and report; an ONNX source's file is copied in, so the directory is self-contained."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec.source_file is not None:
        src = Path(spec.source_file)
        if src.name != SOURCE_FILE or src.parent.resolve() != out.resolve():
            tmp_src = out / (SOURCE_FILE + f".tmp{os.getpid()}")
            shutil.copyfile(src, tmp_src)
            os.replace(tmp_src, out / SOURCE_FILE)
        spec = dataclasses.replace(spec, source_file=SOURCE_FILE)
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
    return build_from_spec(spec, load_file(str(weights_path)), base=path)


def read_spec(path: str | Path) -> ArchSpec:
    return ArchSpec.from_dict(json.loads((Path(path) / SPEC_FILE).read_text()))


def export_format(path: str | Path, fmt: str) -> Path:
    """The artifact's file in ``fmt``, derived (and kept) on first request."""
    if fmt not in FORMATS:
        raise PrunePilotError(f"unknown model format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    target = path / FILES[fmt]
    if _is_current(target):
        return target
    with _export_lock(target):
        if _is_current(target):  # exported by the request this one waited for
            return target
        model = load_artifact(path)
        size = read_spec(path).input_size
        if fmt == "onnx":  # checked against the torch model in ONNX Runtime before it is offered
            from .onnx_io import export_onnx

            export_onnx(model, target, input_size=size)
            for stale in _stale_external_data(target):
                stale.unlink(missing_ok=True)
            return target
        example = (torch.randn(2, 3, size, size),)
        # unique per call: another process may export the same file at once; the rename is atomic either way
        tmp = target.with_suffix(target.suffix + f".tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with _TRACE_LOCK:
                _export_to(model, example, fmt, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        for stale in _stale_external_data(target):
            stale.unlink(missing_ok=True)
    return target


# One lock per derived file (artifact directory + format), for the whole process: concurrent first
# downloads wait for one export instead of each tracing the model. Never dropped: one small lock
# per downloaded artifact and format.
_EXPORT_LOCKS: dict[str, threading.Lock] = {}
_EXPORT_LOCKS_GUARD = threading.Lock()
# torch.export keeps tracing state process-wide (dispatch mode stacks): two traces at once break each
# other even on different models, so tracing itself is serialized too.
_TRACE_LOCK = threading.Lock()


def _export_lock(target: Path) -> threading.Lock:
    with _EXPORT_LOCKS_GUARD:
        return _EXPORT_LOCKS.setdefault(str(target.resolve()), threading.Lock())


def _stale_external_data(target: Path) -> list[Path]:
    """External weights left by earlier versions, which exported ONNX beside a ``.data`` file that
    never travelled with the download (``model.onnx.tmp<pid>.data``)."""
    return sorted(target.parent.glob(target.name + ".tmp*.data")) if target.suffix == ".onnx" else []


def _is_current(target: Path) -> bool:
    # an ONNX file with stale external data predates self-contained exports: derive it again
    return target.is_file() and not _stale_external_data(target)


def _export_to(model: nn.Module, example: tuple[torch.Tensor, ...], fmt: str, dest: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "pt2":
            program = torch.export.export(model, example, dynamic_shapes=({0: batch},))
            torch.export.save(program, str(dest))
        else:
            # weights embedded (external_data=False): the download is one self-contained file; fine
            # below protobuf's 2 GB limit, far above any pruned model here
            torch.onnx.export(model, example, str(dest), dynamo=True, verbose=False, input_names=["input"],
                              output_names=["logits"], dynamic_shapes=({0: batch},), external_data=False)
