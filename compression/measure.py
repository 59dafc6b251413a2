"""Measured costs of a real model: MACs, parameters, size on disk, latency.

MACs count multiply-accumulates of conv and linear layers (the convention behind the published
ResNet-56 ~125 M / ResNet-20 ~41 M figures); FLOPs are about twice that, and a FLOPs *ratio*
budget is the same as a MACs ratio.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import save as safetensors_save
from torch import nn


@dataclass(frozen=True)
class ModelCost:
    macs: int
    params: int
    size_bytes: int


def count_macs(model: nn.Module, input_size: int) -> int:
    total = 0

    def conv_hook(m: nn.Conv2d, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.shape[1] * out.shape[2] * out.shape[3] * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_dict_bytes(model: nn.Module) -> bytes:
    return safetensors_save({k: v.detach().contiguous() for k, v in model.state_dict().items()})


def size_on_disk(model: nn.Module) -> int:
    """Bytes of the model's weights as a safetensors file (what the artifact ships)."""
    return len(state_dict_bytes(model))


def model_cost(model: nn.Module, input_size: int) -> ModelCost:
    return ModelCost(count_macs(model, input_size), count_params(model), size_on_disk(model))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Pin the intra-op thread count for a measurement, restoring it afterwards."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p10_ms: float
    p90_ms: float
    batch_size: int
    threads: int
    repeats: int


def latency_from_times(times_ms: Sequence[float], batch_size: int, threads: int) -> Latency:
    """Median and 10th / 90th percentiles of raw per-run milliseconds."""
    ts = list(times_ms)
    q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
    return Latency(statistics.median(ts), q[0], q[-1], batch_size, threads, len(ts))


def measure_latency(
    models: Sequence[nn.Module],
    input_size: int,
    batch_size: int = 1,
    threads: int | None = 2,
    warmup: int = 5,
    repeats: int = 30,
    min_time_s: float = 0.0,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> list[Latency]:
    """Latency of several models, measured interleaved in one run so machine noise hits all alike.

    Each round runs every model once (in rotating order); the figure is the median over rounds
    after ``warmup`` rounds. Compare models only within one call, never across calls. Models are
    measured as copies in one memory format (default: PyTorch's contiguous layout, what a user
    deploys), whatever layout the caller keeps them in for evaluation.
    """
    x = torch.randn(batch_size, 3, input_size, input_size).contiguous(memory_format=memory_format)
    models = [copy.deepcopy(m).eval().to(memory_format=memory_format) for m in models]
    times: list[list[float]] = [[] for _ in models]
    with torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            for m in models:
                m(x)
        start = time.perf_counter()
        r = 0
        while r < repeats or (time.perf_counter() - start) < min_time_s:
            order = list(range(len(models)))
            order = order[r % len(order):] + order[: r % len(order)]
            for i in order:
                t0 = time.perf_counter()
                models[i](x)
                times[i].append((time.perf_counter() - t0) * 1000.0)
            r += 1
    return [latency_from_times(ts, batch_size, threads or torch.get_num_threads()) for ts in times]


def measure_pair(
    reference: nn.Module,
    model: nn.Module,
    input_size: int,
    batch_size: int = 1,
    threads: int | None = 2,
    warmup: int = 3,
    repeats: int = 60,
    rounds: int = 3,
) -> tuple[Latency, Latency]:
    """:func:`prunepilot.compression.backends.measure_pair` in PyTorch eager on this CPU: ``reference``
    and ``model`` in ``rounds`` separate interleaved runs, the run with the median ratio."""
    from .backends import TorchBackend
    from .backends import measure_pair as on_backend

    return on_backend(TorchBackend(threads), reference, model, input_size, batch_size, threads, warmup, repeats, rounds)
