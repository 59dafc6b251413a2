"""Resolving user references (architecture + weights, data set) into engine objects.

Shared by the CLI and the job workers so both read models and data the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from prunepilot.compression import (
    DataError,
    DataSplits,
    Pruner,
    PruningConstraints,
    WeightsError,
    load_splits,
    load_weights,
    read_state_dict,
)
from prunepilot.compression.sources import InputSpec, ModelSource, SourceKind

from .settings import Settings

BUILTIN_DATASETS = {"cifar10-jpeg": "CIFAR-10 as JPEG files (50,000 train / 10,000 test, 32x32)"}


def infer_num_classes(state_dict: dict[str, torch.Tensor]) -> int:
    """Classes from the last 2-D weight (the classifier), so users need not say it."""
    for key in reversed(list(state_dict)):
        if key.endswith("weight") and state_dict[key].ndim == 2:
            return int(state_dict[key].shape[0])
    raise WeightsError("cannot find a classifier (2-D weight) in the weights to infer the number of classes")


def check_weight_values(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse weights that load but cannot mean anything: NaN / infinite values, integer parameters.

    ``load_state_dict`` casts integers into float parameters and copies NaN silently; such a job ran
    to the end and "succeeded" at chance accuracy. Integer buffers (BatchNorm's counter, channel
    indices) are legitimately integer and only floating-point tensors are checked for finiteness.
    """
    parameters = {name for name, _ in model.named_parameters()}
    for name, tensor in state_dict.items():
        if name in parameters and not tensor.is_floating_point():
            raise WeightsError(f"weights: {name} holds {str(tensor.dtype).removeprefix('torch.')} values; parameters must be floating point")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WeightsError(f"weights: {name} holds values that are not finite (NaN or infinity)")


def load_user_model(source: ModelSource, weights: str | Path | None, weights_name: str | None = None) -> tuple[nn.Module, int]:
    """The dense model with its weights: the upload's (loaded strictly), or an ONNX file's own.

    ``weights_name`` names the weights in messages (an upload's own file name, not the server's path)."""
    if source.carries_weights:
        if weights is not None:
            raise WeightsError("an ONNX model carries its own weights: send no weights file with it")
        declared = source.default_input()
        if declared.channels != 3:
            raise WeightsError(f"the model takes {declared.channels}-channel images; prunepilot's data sets are RGB (3 channels)")
        model = source.build()
        return model, classes_of(model, declared.size or 32)
    if weights is None:
        raise WeightsError(f"{source.ref} needs weights (a state dict or safetensors file)")
    weights_name = weights_name or Path(weights).name
    state = read_state_dict(weights, source=weights_name)
    num_classes = infer_num_classes(state)
    model = source.build(num_classes)
    load_weights(model, state, source=weights_name)
    check_weight_values(model, state)
    return model.eval(), num_classes


def classes_of(model: nn.Module, size: int) -> int:
    """The number of classes a model outputs (it must output one row of logits per image)."""
    with torch.no_grad():
        try:
            out = model(torch.zeros(1, 3, size, size))
        except Exception as exc:  # noqa: BLE001 - the user's model failing on a plain image, reported in one line
            raise WeightsError(f"the model fails on a 1x3x{size}x{size} image: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise WeightsError(f"the model must output (batch, classes) logits for classification; it outputs {shape}")
    return int(out.shape[1])


def dataset_path(ref: str, settings: Settings) -> Path:
    """Where a data set reference points: the built-in name, a name registered on this machine
    (``PRUNEPILOT_DATASETS``), or (the CLI's, an accepted upload's) a path."""
    if ref == "cifar10-jpeg":
        path = settings.cifar10_zip
        if not path.is_file():
            raise DataError(f"built-in data set cifar10-jpeg not found at {path}; set PRUNEPILOT_CIFAR10_ZIP")
        return path
    if ref in settings.datasets:
        path = settings.datasets[ref]
        if not path.is_dir():
            raise DataError(f"registered data set {ref} is not on this machine ({path} is not a directory); register it with "
                            "the same path on every worker (PRUNEPILOT_DATASETS)")
        return path
    path = Path(ref)
    if not path.exists():
        raise DataError(f"data not found: {ref} (use cifar10-jpeg, a registered data set name or a path to an ImageFolder "
                        "directory or zip)")
    return path


def registered_classes(name: str, settings: Settings) -> list[str] | None:
    """The classes of a registered data set's training images, or None where this machine does not
    see its folder (it is registered for the workers; they check it when the job starts)."""
    from prunepilot.compression.data import tree_classes

    path = settings.datasets[name]
    return tree_classes(path) if path.is_dir() else None


def open_data(ref: str, settings: Settings, inputs: InputSpec | None = None, val_size: int | None = None,
              progress: bool = False) -> DataSplits:
    """The data set decoded at ``inputs.size`` (None: native size), normalized with its mean and std."""
    inputs = inputs or InputSpec()
    return load_splits(dataset_path(ref, settings), cache_dir=settings.cache_dir, val_size=val_size,
                       image_size=inputs.size, progress=progress, mean=inputs.mean, std=inputs.std,
                       max_image_bytes=settings.max_image_bytes, max_image_pixels=settings.max_image_pixels,
                       max_decoded_bytes=settings.max_decoded_bytes, loader_workers=settings.loader_workers)


def model_inputs(source: ModelSource, image_size: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> InputSpec:
    """The job's input settings: the user's where given, else the model's own (one rule for every caller)."""
    inputs = source.default_input().with_overrides(image_size, mean, std)
    if inputs.channels != 3:
        raise DataError(f"the model takes {inputs.channels}-channel images; prunepilot's data sets are RGB (3 channels)")
    return inputs


class JobSpecLike(Protocol):
    arch: str


@dataclass
class Session:
    source: ModelSource
    inputs: InputSpec
    model: nn.Module
    num_classes: int
    splits: DataSplits
    pruner: Pruner

    @property
    def arch(self) -> str:
        return self.source.ref


def open_session(
    model: ModelSource | str,
    weights: str | Path | None,
    data: str,
    settings: Settings,
    constraints: PruningConstraints | None = None,
    criterion: str = "l2",
    progress: bool = False,
    inputs: InputSpec | None = None,
) -> Session:
    """Model, data and pruner for one job; ``inputs`` defaults to the model's own (:func:`model_inputs`)."""
    source = model if isinstance(model, ModelSource) else ModelSource.parse(model)
    inputs = inputs or model_inputs(source)
    dense, num_classes = load_user_model(source, weights)
    splits = open_data(data, settings, inputs, progress=progress)
    if splits.num_classes != num_classes:
        raise DataError(f"the data has {splits.num_classes} classes but the model classifies {num_classes}")
    taylor = None
    if criterion == "taylor":
        from prunepilot.compression import Normalizer

        sub = splits.train.subset(256, seed=2).load()
        taylor = (Normalizer(splits.mean, splits.std)(sub.images), sub.labels)
    pruner = make_pruner(source, dense, num_classes, splits.image_size, constraints, criterion, taylor)
    return Session(source, inputs, dense, num_classes, splits, pruner)


def make_pruner(source: ModelSource, dense: nn.Module, num_classes: int, input_size: int,
                constraints: PruningConstraints | None = None, criterion: str = "l2",
                taylor: tuple[torch.Tensor, torch.Tensor] | None = None) -> Pruner:
    """The pruner of a job's model: every source but the built-ins (whose plans the test suite
    checks) has its layers' pruning plans verified first, and inexact ones are left whole."""
    return Pruner(dense, source.ref, num_classes, input_size, constraints, criterion, taylor, source_file=source.file,
                  verify=source.kind is not SourceKind.BUILTIN)


def job_source(spec: JobSpecLike, problem: dict[str, object]) -> ModelSource:
    """An accepted job's model source: an ONNX job's file is its stored ``weights_path``."""
    file = problem.get("weights_path") if spec.arch.startswith("onnx:") else None
    return ModelSource.parse(spec.arch, file=str(file) if file is not None else None)
