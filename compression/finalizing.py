"""The last phase of every run: prune with the chosen strategy, fine-tune, measure on the test split.

Final figures are always on the untouched test split after fine-tuning, next to the dense model
measured in the same run (latency interleaved), optionally after the same fine-tune budget so
the accuracy drop is honest. BN re-estimation, fine-tuning and accuracy run on the compute device;
the models come back to the CPU for their costs, their latency and the artifact.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .backends import LatencyBackend, TorchBackend, measure_pair
from .compute_device import GPU_EVAL_BATCH, exact_float32, inference_batch, place, resolve_device
from .data import DataSplits, ImageSource, Normalizer
from .evaluate import accuracy_on, recalibrate_batchnorm
from .finetuning import FinetuneConfig, StepCallback, finetune
from .measure import count_macs, count_params, size_on_disk
from .pruning import PrunedModel, Pruner
from .resources import Resource


@dataclass
class Figures:
    accuracy: float
    macs: int
    params: int
    size_bytes: int
    latency_ms: dict[str, float] = field(default_factory=dict)  # batch size -> median ms


@dataclass
class FinalResult:
    pruned: PrunedModel
    figures: dict[str, Figures]  # "dense", "pruned", optionally "dense_finetuned"
    finetune_seconds: float
    test_images: int
    seconds: float
    latency_on: str = "torch"  # the latency backend the figures' latency_ms were timed on

    def usage(self, latency_batch: int) -> dict[str, float | None]:
        """The pruned model's usage of each resource as a share of dense, from the final figures:
        latency at ``latency_batch`` (None where that batch size was not timed)."""
        d, p = self.figures["dense"], self.figures["pruned"]
        b = str(latency_batch)
        latency = p.latency_ms[b] / d.latency_ms[b] if b in p.latency_ms and d.latency_ms.get(b) else None
        return {Resource.FLOPS: p.macs / d.macs, Resource.PARAMS: p.params / d.params, Resource.SIZE: p.size_bytes / d.size_bytes,
                Resource.LATENCY: latency}

    def report(self) -> dict[str, Any]:
        d, p = self.figures["dense"], self.figures["pruned"]
        ref = self.figures.get("dense_finetuned", d)
        speedups = {b: d.latency_ms[b] / p.latency_ms[b] for b in p.latency_ms if b in d.latency_ms and p.latency_ms[b] > 0}
        usage = self.usage(1)  # the counted resources; latency is reported per batch size, as speedups
        return {
            "figures": {k: asdict(v) for k, v in self.figures.items()},
            "accuracy_drop": ref.accuracy - p.accuracy,
            "macs_ratio": usage[Resource.FLOPS],
            "params_ratio": usage[Resource.PARAMS],
            "size_ratio": usage[Resource.SIZE],
            "latency_speedup": speedups,
            "latency_measured_on": self.latency_on,
            "strategy": self.pruned.strategy,
            "kept_channels": self.pruned.kept,
            "spec": self.pruned.spec.to_dict(),
            "finetune_seconds": self.finetune_seconds,
            "test_images": self.test_images,
            "seconds": self.seconds,
        }


def heldout(splits: DataSplits, limit: int | None = None) -> ImageSource:
    """The images final figures are measured on: the test split, or a stratified subset of ``limit``."""
    return splits.test.subset(limit, seed=0).resident()


def heldout_tensors(splits: DataSplits, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`heldout` decoded and normalized (channels-last floats on the CPU)."""
    test = heldout(splits, limit).load()
    x = Normalizer(splits.mean, splits.std)(test.images).contiguous(memory_format=torch.channels_last)
    return x, test.labels


def figures(model: nn.Module, acc: float, input_size: int, latency: Mapping[int, float]) -> Figures:
    """A model's final figures from its measured accuracy; ``model`` on the CPU."""
    return Figures(acc, count_macs(model, input_size), count_params(model), size_on_disk(model),
                   {str(b): ms for b, ms in latency.items()})


def paired_latency(a: nn.Module, b: nn.Module, input_size: int, batches: tuple[int, ...], threads: int | None,
                   backend: LatencyBackend | None = None) -> tuple[dict[int, float], dict[int, float]]:
    """Both models' median ms per batch size, timed interleaved: in torch eager on this CPU, or on
    ``backend`` (the job's latency target: ONNX Runtime, a device's agent)."""
    la: dict[int, float] = {}
    lb: dict[int, float] = {}
    clock = backend if backend is not None else TorchBackend(threads)
    for bs in batches:
        ra, rb = measure_pair(clock, a, b, input_size, bs, threads, warmup=3, repeats=60 if bs == 1 else 10)
        la[bs], lb[bs] = ra.median_ms, rb.median_ms
    return la, lb


def output_channels(module: nn.Module) -> int:
    """Output width of a prunable layer's root: a conv's channels or a linear layer's features."""
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    raise TypeError(f"{type(module).__name__} is not a prunable root (conv or linear)")


def finalize(
    pruner: Pruner,
    splits: DataSplits,
    strategy: Mapping[str, float],
    config: FinetuneConfig,
    *,
    finetune_dense: bool = False,
    test_images: int | None = None,
    latency_batches: tuple[int, ...] = (1, 64),
    threads: int | None = 2,
    adaptive_bn_images: int = 1024,
    on_step: StepCallback | None = None,
    initial_model: nn.Module | None = None,
    checkpoint_dir: Path | None = None,
    device: str | torch.device = "cpu",
    gpu_eval_batch: int = GPU_EVAL_BATCH,
    latency_backend: LatencyBackend | None = None,
) -> FinalResult:
    """``initial_model``: the pruned network an agent already adapted (NetAdapt); fine-tuning starts
    from it instead of re-pruning the dense weights with ``strategy``. ``checkpoint_dir``: where the
    fine-tunes keep their checkpoints, so a run killed midway continues where it stopped.
    ``device``: the compute device of BN re-estimation, fine-tuning and test accuracy; the result's
    models are on the CPU. ``latency_backend``: where the final latency figures are timed (default:
    torch eager on this CPU)."""
    dev = resolve_device(device)
    start = time.perf_counter()
    if initial_model is not None:
        kept = [output_channels(initial_model.get_submodule(layer.name)) for layer in pruner.layers]
        pruned = PrunedModel(copy.deepcopy(initial_model), pruner.spec_of(initial_model),
                             pruner.effective(np.array(kept)), kept)
    else:
        pruned = pruner.prune(strategy)
    model = place(pruned.model, dev)
    norm = Normalizer(splits.mean, splits.std)
    train = splits.train.on(dev)  # moved once for both fine-tunes (a streamed set decodes to the device)
    calib = norm(splits.train.subset(adaptive_bn_images, seed=1).load().images.to(dev)).contiguous(memory_format=torch.channels_last)
    with exact_float32(dev):
        recalibrate_batchnorm(model, calib)  # a better start for fine-tuning than stale statistics
    teacher = pruner.model if config.distill else None
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    ft = finetune(model, train, norm, config, teacher=teacher, on_step=on_step,
                  checkpoint=checkpoint_dir / "finetune-pruned.pt" if checkpoint_dir is not None else None, device=dev)
    dense = copy.deepcopy(pruner.model).to(dev).eval()
    test = heldout(splits, test_images).on(dev)
    batch = inference_batch(dev, 128, gpu_eval_batch)
    with exact_float32(dev):
        acc = {"dense": accuracy_on(dense, test, norm, batch), "pruned": accuracy_on(model, test, norm, batch)}
    dense_ft = None
    if finetune_dense:
        dense_ft = copy.deepcopy(pruner.model)
        finetune(dense_ft, train, norm, config, teacher=teacher,
                 checkpoint=checkpoint_dir / "finetune-dense.pt" if checkpoint_dir is not None else None, device=dev)
        with exact_float32(dev):
            acc["dense_finetuned"] = accuracy_on(dense_ft, test, norm, batch)
    for m in (model, dense, dense_ft):  # costs, latency and the artifact are the host's (Module.to moves in place)
        if m is not None:
            m.to("cpu")
    size = pruner.input_size
    dense_lat, pruned_lat = paired_latency(dense, model, size, latency_batches, threads, latency_backend)
    figs = {"dense": figures(dense, acc["dense"], size, dense_lat), "pruned": figures(model, acc["pruned"], size, pruned_lat)}
    if dense_ft is not None:
        figs["dense_finetuned"] = figures(dense_ft, acc["dense_finetuned"], size, dense_lat)
    pruned.model = model
    pruned.spec.mean, pruned.spec.std = splits.mean, splits.std  # the artifact says how to feed it
    return FinalResult(pruned, figs, ft.seconds, len(test), time.perf_counter() - start,
                       latency_backend.name if latency_backend is not None else "torch")
