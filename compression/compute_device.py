"""The compute device: where a job's forward and backward passes run (``cpu`` or ``cuda``).

Not the latency *target* (where a latency budget is measured, a backend on a device fingerprint):
a job on a GPU may still be budgeted for a phone's CPU. Everything that runs a model (the
evaluator's BN re-estimation, validation and reconstruction; fine-tuning; the final measurement of
accuracy; NetAdapt's proposals) takes one resolved :class:`torch.device`; models and data are moved
there once, and results come back as Python numbers and CPU tensors.

On the CPU the code path is the one the recorded figures were measured with: no autocast, the
fidelity's batch sizes. On CUDA fine-tuning runs under bf16 autocast (where the GPU supports it) in
channels-last layout, with augmentation on the device, and inference passes use large batches.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TypeVar

import torch

from .errors import PrunePilotError

# Default batch size of inference passes (validation, test) on a GPU (PRUNEPILOT_GPU_EVAL_BATCH):
# large batches keep it busy, and in eval mode a batch's size does not change its outputs. The CPU
# keeps the caller's batch size, which its recorded throughput was measured with. BN re-estimation
# keeps the fidelity's batch size everywhere: its statistics depend on it.
GPU_EVAL_BATCH = 1024
_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")  # service/settings.py checks PRUNEPILOT_DEVICE with the same


class DeviceError(PrunePilotError):
    """A device that cannot be used here (no CUDA, an index past the GPUs, an unknown name)."""


def check_device_name(name: str) -> str:
    """The name, lower-cased, if it names a device kind prunepilot runs on; else DeviceError."""
    value = str(name).strip().lower()
    if not _PATTERN.match(value):
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    return value


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): CUDA when this process sees a GPU, else the CPU. ``cuda`` without a
    usable GPU is one clear error, not a CUDA traceback later. ``cuda`` means the current GPU
    (under Ray, the one the task was given)."""
    if isinstance(name, torch.device):
        name = str(name)
    value = check_device_name(name or "auto")
    if value == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if value == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if available else torch.device("cpu")
    if not available:
        raise DeviceError(f"device {value!r} was asked for but CUDA is not available in this process "
                          f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}): "
                          "use device 'cpu' or 'auto'")
    index = int(value.split(":")[1]) if ":" in value else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {value!r}: this process sees {torch.cuda.device_count()} GPU(s) (cuda:0 to "
                          f"cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H200)``: for reports."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters live (the CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


M = TypeVar("M", bound=torch.nn.Module)


def place(model: M, device: torch.device) -> M:
    """``model`` moved to ``device`` in channels-last layout, in place (returned for chaining)."""
    model.to(device)
    model.to(memory_format=torch.channels_last)
    return model


def inference_batch(device: torch.device, batch_size: int, gpu_batch: int = GPU_EVAL_BATCH) -> int:
    """The batch size of an inference pass: the caller's on the CPU, at least ``gpu_batch`` on a GPU."""
    return batch_size if device.type == "cpu" else max(batch_size, gpu_batch)


def training_autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on a GPU that supports it; nothing on the CPU (its figures stay float32)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """Measurement passes (BN re-estimation, validation, test) in true float32 on a GPU: PyTorch runs
    CUDA convolutions in TF32 by default, whose 10-bit mantissa moves accuracy figures away from the
    CPU's. These small networks leave the GPU waiting on kernel launches, so it costs nothing
    measurable. Nothing changes on the CPU."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
