"""Latency backends: where a latency table's entries and a job's measured check are timed.

A backend times two things the same way: latency-table *entries* (one conv with its BatchNorm and
ReLU, at the layer's input size: :meth:`LatencyBackend.time_entries`) and whole candidate networks
(:meth:`LatencyBackend.measure`, interleaved so that machine noise hits all alike). Its
:meth:`~LatencyBackend.fingerprint` keys the table's entries, so a table is reused by any job on the
same backend, device, thread count and batch size.

* ``torch``: PyTorch eager on this CPU (the default; its fingerprint is the one tables have always
  been stored under, :func:`device_fingerprint`).
* ``onnxruntime``: ONNX Runtime, CPU execution provider by default (others where installed). Each
  probe and network is exported to ONNX once (:func:`onnx_bytes`) and timed in an
  ``InferenceSession`` with ``intra_op_num_threads`` pinned (:mod:`.ort_timing`, which a remote
  device agent runs too).
* ``cuda``: PyTorch eager on the GPU, timed with CUDA events after synchronizing.

A remote device (the service's device agents) is a backend named ``remote``; it lives in the
service layer, not here. :class:`LatencyTarget` is what a job asks for.
"""

from __future__ import annotations

import contextlib
import copy
import io
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn

from .errors import PrunePilotError
from .measure import Latency, latency_from_times, measure_latency, torch_threads
from .ort_timing import cpu_model

__all__ = [
    "BACKENDS", "DEVICE_BACKENDS", "STEPPED_BACKENDS", "CudaBackend", "LatencyBackend", "LatencyTarget", "OnnxRuntimeBackend", "TorchBackend", "cpu_model",
    "device_fingerprint", "local_backend", "measure_pair", "onnx_bytes", "time_onnx",
]

BACKENDS = ("torch", "onnxruntime", "cuda")  # the local ones; a remote device is "remote"
DEVICE_BACKENDS = ("onnxruntime",)  # what a device agent times with (`prunepilot device-agent --backend`)
# Where latency is a staircase in the channel count, so a job that names no rounding gets measured
# channel steps (docs/benchmarks.md: in ONNX Runtime, counts off its block of 4-16 run slower than
# larger aligned ones, and mobilenet_v2 at 50 % MACs ran slower than dense without the steps).
STEPPED_BACKENDS = ("onnxruntime",)

Probe = tuple[nn.Module, torch.Tensor]
Timer = Callable[[nn.Module, torch.Tensor, int, int], float]


@runtime_checkable
class LatencyBackend(Protocol):
    """Times latency-table entries and whole networks on one runtime and device."""

    name: str  # "torch", "onnxruntime", "cuda"; a remote device uses "remote"

    def fingerprint(self, threads: int, batch_size: int) -> str:
        """The latency table's key: backend + device (+ threads, batch)."""
        ...

    def time_entries(self, probes: Sequence[Probe], warmup: int, repeats: int, rounds: int) -> list[float]:
        """Median ms of each probe (a conv+BN+ReLU module with its input): ``rounds`` rounds over all
        probes, each probe run ``repeats`` times in a row per round (``warmup`` runs before its first
        round), the fastest round's median kept per probe."""
        ...

    def measure(self, models: Sequence[nn.Module], input_size: int, batch_size: int, threads: int | None,
                warmup: int, repeats: int) -> list[Latency]:
        """Whole networks (3-channel square inputs) measured interleaved in one run; compare them only
        with each other."""
        ...


@dataclass(frozen=True)
class LatencyTarget:
    """Where a job's latency is measured: a local ``backend``, or a remote ``device`` (by name) whose
    agent measures with one of :data:`DEVICE_BACKENDS` (``backend`` says which)."""

    backend: str = "torch"
    device: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise PrunePilotError(f"unknown latency backend {self.backend!r}; known: {', '.join(BACKENDS)}")
        if self.device is not None and self.backend not in DEVICE_BACKENDS:
            raise PrunePilotError(f"latency backend {self.backend!r} is not one a device agent runs: device agents run "
                                  f"{', '.join(DEVICE_BACKENDS)} (device {self.device!r} measures with its agent's; leave backend out)")

    def describe(self) -> dict[str, str | None]:
        return {"backend": self.backend, "device": self.device}

    @property
    def default_round_to(self) -> Literal["measured"] | None:
        """``round_to`` for a job that names none: ``"measured"`` on :data:`STEPPED_BACKENDS` (a
        device's agent included), else no rounding (torch eager's latency falls smoothly with the
        count; the GPU's steps are not measured yet)."""
        return "measured" if self.backend in STEPPED_BACKENDS else None


# ---------------------------------------------------------------------------------------------- torch


def device_fingerprint(threads: int, batch_size: int) -> str:
    """The torch backend's key (unchanged since tables were first stored: they stay valid)."""
    return f"cpu={cpu_model()}|threads={threads}|torch={torch.__version__.split('+')[0]}|batch={batch_size}"


def time_module(m: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
    """Median ms of ``repeats`` eager runs of ``m(x)`` after ``warmup`` runs."""
    with torch.inference_mode():
        for _ in range(warmup):
            m(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            m(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def _fastest_rounds(probes: Sequence[Probe], timer: Timer, warmup: int, repeats: int, rounds: int) -> list[float]:
    best = [float("inf")] * len(probes)
    for r in range(max(1, rounds)):
        for i, (module, x) in enumerate(probes):
            best[i] = min(best[i], timer(module, x, warmup if r == 0 else 1, max(1, repeats)))
    return best


class TorchBackend:
    """PyTorch eager on this CPU, ``threads`` intra-op threads (None: torch's current setting).

    ``timer`` and ``measure`` replace the clocks (tests pass deterministic stand-ins): ``timer(probe,
    x, warmup, repeats)`` gives one entry's median ms, ``measure`` has :func:`measure_latency`'s
    signature."""

    name = "torch"

    def __init__(self, threads: int | None = None, timer: Timer | None = None,
                 measure: Callable[..., Sequence[Latency]] | None = None) -> None:
        self.threads = threads
        self.timer = timer
        self._measure = measure

    def fingerprint(self, threads: int, batch_size: int) -> str:
        return device_fingerprint(threads, batch_size)

    def time_entries(self, probes: Sequence[Probe], warmup: int, repeats: int, rounds: int) -> list[float]:
        with torch_threads(self.threads):
            return _fastest_rounds(probes, self.timer or time_module, warmup, repeats, rounds)

    def measure(self, models: Sequence[nn.Module], input_size: int, batch_size: int, threads: int | None,
                warmup: int, repeats: int) -> list[Latency]:
        measure = self._measure or measure_latency
        return list(measure(models, input_size, batch_size, threads, warmup=warmup, repeats=repeats))


# ---------------------------------------------------------------------------------------------- ONNX Runtime


def onnx_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """``module`` as ONNX bytes at ``example``'s fixed shape, for timing (not an artifact: no check).

    TorchScript exporter at opset 17 (a conv probe takes milliseconds; the dynamo exporter seconds),
    falling back to the dynamo exporter for modules it cannot trace. BatchNorm stays a node: ONNX
    Runtime fuses it into the conv when it loads the session, as it does for a deployed model.
    """
    from .artifacts import _TRACE_LOCK
    from .onnx_io import TORCH_OPSET, _onnx2torch_export_compat

    with contextlib.suppress(ImportError):
        _onnx2torch_export_compat()  # converted user models: onnx2torch's modules export through it
    module = copy.deepcopy(module).eval()
    buffer = io.BytesIO()
    with _TRACE_LOCK, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=TORCH_OPSET,  # type: ignore[arg-type]  # it writes file objects too
                              input_names=["input"], output_names=["output"])
        except Exception as legacy_error:  # noqa: BLE001 - try the other exporter before refusing
            try:
                program = torch.onnx.export(module, (example,), dynamo=True, verbose=False, input_names=["input"],
                                            output_names=["output"], external_data=False)
                if program is None:
                    raise PrunePilotError("the dynamo exporter returned no program") from None
                return program.model_proto.SerializeToString()
            except Exception as exc:  # noqa: BLE001
                raise PrunePilotError(f"cannot export {type(module).__name__} to ONNX for timing: "
                                      f"{str(legacy_error).splitlines()[0][:200]}; dynamo: {str(exc).splitlines()[0][:200]}") from None
    return buffer.getvalue()


def time_onnx(model_bytes: bytes, input_shape: tuple[int, ...], threads: int | None, warmup: int, repeats: int,
              providers: list[str] | None = None) -> list[float]:
    """Raw per-run ms of one ONNX model in ONNX Runtime (see :mod:`.ort_timing`, numpy + onnxruntime only)."""
    from .ort_timing import time_onnx as _time

    return _time(model_bytes, input_shape, threads, warmup, repeats, providers)


class OnnxRuntimeBackend:
    """ONNX Runtime with ``providers`` (default: the CPU execution provider), ``threads`` intra-op
    threads (None: ONNX Runtime's default). Probes and networks are exported once per call."""

    name = "onnxruntime"

    def __init__(self, threads: int | None = None, providers: Sequence[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise PrunePilotError("latency backend 'onnxruntime' needs the onnxruntime package, which is not installed") from None
        from .ort_timing import DEFAULT_PROVIDERS

        self.providers = list(providers or DEFAULT_PROVIDERS)
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise PrunePilotError(f"ONNX Runtime execution provider(s) {', '.join(missing)} not installed here; "
                                  f"available: {', '.join(ort.get_available_providers())}")
        self.threads = threads
        self.version = ort.__version__

    def fingerprint(self, threads: int, batch_size: int) -> str:
        from .ort_timing import entry_method

        providers = "+".join(self.providers)
        return (f"backend=onnxruntime|ort={self.version}|providers={providers}|cpu={cpu_model()}|threads={threads}|batch={batch_size}"
                f"|entries={entry_method(self.providers)}")

    def time_entries(self, probes: Sequence[Probe], warmup: int, repeats: int, rounds: int) -> list[float]:
        from .ort_timing import time_onnx_entries

        models = [(onnx_bytes(m, x), tuple(x.shape)) for m, x in probes]
        return time_onnx_entries(models, self.threads, warmup, repeats, rounds, self.providers)

    def measure(self, models: Sequence[nn.Module], input_size: int, batch_size: int, threads: int | None,
                warmup: int, repeats: int) -> list[Latency]:
        from .ort_timing import time_onnx_models

        x = torch.randn(batch_size, 3, input_size, input_size)
        exported = [(onnx_bytes(m, x), tuple(x.shape)) for m in models]
        times = time_onnx_models(exported, threads, warmup, repeats, self.providers)
        return [latency_from_times(ts, batch_size, threads or 0) for ts in times]


# ---------------------------------------------------------------------------------------------- CUDA


def _cuda_driver() -> str:
    getter = getattr(torch._C, "_cuda_getDriverVersion", None)  # not public API; absent: leave it out
    if getter is None:
        return "unknown"
    with contextlib.suppress(Exception):
        v = int(getter())
        return f"{v // 1000}.{(v % 1000) // 10}"
    return "unknown"


class CudaBackend:
    """PyTorch eager on one CUDA GPU, timed with CUDA events (each run between two events, the end
    event synchronized), medians after warm-up. Models and probes are copied to the GPU; the
    input is made there. cuDNN's algorithm choice is left at torch's setting (``benchmark`` off
    unless the process turned it on)."""

    name = "cuda"

    def __init__(self, index: int = 0) -> None:
        if not torch.cuda.is_available():
            raise PrunePilotError("latency backend 'cuda' needs a CUDA GPU, and none is available here")
        if index >= torch.cuda.device_count():
            raise PrunePilotError(f"latency backend 'cuda': no GPU {index} (this machine has {torch.cuda.device_count()})")
        self.device = torch.device("cuda", index)
        self.threads: int | None = None  # CPU threads do not key GPU timings

    def fingerprint(self, threads: int, batch_size: int) -> str:
        props = torch.cuda.get_device_properties(self.device)
        return (f"backend=cuda|gpu={props.name}|cc={props.major}.{props.minor}|cuda={torch.version.cuda}|driver={_cuda_driver()}"
                f"|torch={torch.__version__.split('+')[0]}|batch={batch_size}")

    def _runs(self, m: nn.Module, x: torch.Tensor, count: int) -> list[float]:
        out = []
        for _ in range(count):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            m(x)
            end.record()
            end.synchronize()
            out.append(float(start.elapsed_time(end)))
        return out

    def _warm(self, m: nn.Module, x: torch.Tensor, count: int) -> None:
        for _ in range(count):
            m(x)
        torch.cuda.synchronize(self.device)

    def time_entries(self, probes: Sequence[Probe], warmup: int, repeats: int, rounds: int) -> list[float]:
        moved = [(copy.deepcopy(m).eval().to(self.device), x.to(self.device)) for m, x in probes]
        best = [float("inf")] * len(moved)
        with torch.inference_mode(), torch.cuda.device(self.device):
            for r in range(max(1, rounds)):
                for i, (m, x) in enumerate(moved):
                    self._warm(m, x, warmup if r == 0 else 1)
                    best[i] = min(best[i], statistics.median(self._runs(m, x, max(1, repeats))))
        return best

    def measure(self, models: Sequence[nn.Module], input_size: int, batch_size: int, threads: int | None,
                warmup: int, repeats: int) -> list[Latency]:
        moved = [copy.deepcopy(m).eval().to(self.device) for m in models]
        x = torch.randn(batch_size, 3, input_size, input_size, device=self.device)
        times: list[list[float]] = [[] for _ in moved]
        with torch.inference_mode(), torch.cuda.device(self.device):
            for _ in range(warmup):
                for m in moved:
                    self._warm(m, x, 1)
            n = len(moved)
            for r in range(repeats):
                for j in range(n):
                    i = (j + r) % n
                    times[i] += self._runs(moved[i], x, 1)
        return [latency_from_times(ts, batch_size, 0) for ts in times]


# ---------------------------------------------------------------------------------------------- choosing


def local_backend(name: str, threads: int | None) -> LatencyBackend:
    """The backend called ``name`` on this machine; a one-line :class:`PrunePilotError` for an
    unknown name or one this machine cannot run (no onnxruntime, no GPU)."""
    if name == "torch":
        return TorchBackend(threads)
    if name == "onnxruntime":
        return OnnxRuntimeBackend(threads)
    if name == "cuda":
        return CudaBackend()
    raise PrunePilotError(f"unknown latency backend {name!r}; known: {', '.join(BACKENDS)}")


def measure_pair(backend: LatencyBackend, reference: nn.Module, model: nn.Module, input_size: int, batch_size: int = 1,
                 threads: int | None = 2, warmup: int = 3, repeats: int = 60, rounds: int = 3) -> tuple[Latency, Latency]:
    """``reference`` and ``model`` in ``rounds`` separate interleaved runs on ``backend``; returns the
    run whose model/reference ratio is the median, so one burst of load elsewhere cannot decide it."""
    runs = [backend.measure([reference, model], input_size, batch_size, threads, warmup, repeats) for _ in range(rounds)]
    ref, mine = sorted(runs, key=lambda r: r[1].median_ms / r[0].median_ms)[len(runs) // 2]
    return ref, mine
