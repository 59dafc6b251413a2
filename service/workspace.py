"""Resolving user references (architecture + weights, data set) into engine objects.

Shared by the CLI and the job workers so both read models and data the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prunepilot.compression import (
    DataError,
    DataSplits,
    Pruner,
    PruningConstraints,
    WeightsError,
    arch_info,
    build_model,
    load_splits,
    load_weights,
    read_state_dict,
)

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


def load_user_model(arch: str, weights: str | Path, source: str | None = None) -> tuple[nn.Module, int]:
    """The architecture with the weights loaded; ``source`` names the weights in messages."""
    arch_info(arch)  # unknown architecture: clear error before reading any file
    source = source or Path(weights).name
    state = read_state_dict(weights, source=source)
    num_classes = infer_num_classes(state)
    model = build_model(arch, num_classes)
    load_weights(model, state, source=source)
    check_weight_values(model, state)
    return model.eval(), num_classes


def dataset_path(ref: str, settings: Settings) -> Path:
    if ref == "cifar10-jpeg":
        path = settings.cifar10_zip
        if not path.is_file():
            raise DataError(f"built-in data set cifar10-jpeg not found at {path}; set PRUNEPILOT_CIFAR10_ZIP")
        return path
    path = Path(ref)
    if not path.exists():
        raise DataError(f"data not found: {ref} (use cifar10-jpeg or a path to an ImageFolder directory or zip)")
    return path


def open_data(ref: str, settings: Settings, image_size: int | None = None, val_size: int | None = None, progress: bool = False) -> DataSplits:
    return load_splits(dataset_path(ref, settings), cache_dir=settings.cache_dir, val_size=val_size,
                       image_size=image_size, progress=progress,
                       max_image_bytes=settings.max_image_bytes, max_image_pixels=settings.max_image_pixels)


def decode_size(arch: str, image_size: int | None) -> int | None:
    """The size a job's images are decoded at: the spec's, else the CIFAR ResNets' own 32, else native (None)."""
    info = arch_info(arch)
    return image_size or (info.input_size if info.family == "cifar-resnet" else None)


@dataclass
class Session:
    arch: str
    model: nn.Module
    num_classes: int
    splits: DataSplits
    pruner: Pruner


def open_session(
    arch: str,
    weights: str | Path,
    data: str,
    settings: Settings,
    constraints: PruningConstraints | None = None,
    criterion: str = "l2",
    progress: bool = False,
    image_size: int | None = None,
) -> Session:
    model, num_classes = load_user_model(arch, weights)
    splits = open_data(data, settings, image_size=decode_size(arch, image_size), progress=progress)
    if splits.num_classes != num_classes:
        raise DataError(f"the data has {splits.num_classes} classes but the weights classify {num_classes}")
    taylor = None
    if criterion == "taylor":
        from prunepilot.compression import Normalizer

        sub = splits.train.subset(256, seed=2)
        taylor = (Normalizer(splits.mean, splits.std)(sub.images), sub.labels)
    pruner = Pruner(model, arch, num_classes, splits.image_size, constraints, criterion, taylor)
    return Session(arch, model, num_classes, splits, pruner)
