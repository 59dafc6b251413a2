"""Timing ONNX models in ONNX Runtime.

This module imports only numpy and onnxruntime (never torch, never the rest of the engine), so a
device agent with a minimal install can time what the service sends it exactly the way the
``onnxruntime`` latency backend times it here. Models travel as ONNX bytes with a fixed input shape.

Sessions pin ``intra_op_num_threads`` (0 = ONNX Runtime's default, one per physical core), run
sequentially with one inter-op thread, and keep ONNX Runtime's default graph optimizations (Conv +
BatchNorm + ReLU fused), i.e. what a deployed model gets.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def cpu_model(labels: tuple[str, ...] = ("model name",)) -> str:
    """The CPU's name from the first /proc/cpuinfo line starting with one of ``labels`` (x86 says
    "model name"; ARM boards say "Hardware" or "Model"), else what ``platform`` knows. Latency tables
    are keyed by it, so the worker's backends and a device's agent read it the same way."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(labels):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

Model = tuple[bytes, tuple[int, ...]]  # ONNX bytes and the (fixed) input shape it is timed at


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def onnx_session(model_bytes: bytes, threads: int | None, providers: Sequence[str] | None = None,
                 profile_prefix: str | None = None) -> Any:
    """An ``InferenceSession`` for timing (profiling into ``profile_prefix``* when given); ``ValueError``
    naming a provider this install lacks."""
    import onnxruntime as ort

    wanted = list(providers or DEFAULT_PROVIDERS)
    missing = [p for p in wanted if p not in ort.get_available_providers()]
    if missing:
        raise ValueError(f"ONNX Runtime execution provider(s) {', '.join(missing)} not installed here; "
                         f"available: {', '.join(ort.get_available_providers())}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(0, int(threads or 0))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # Several sessions are timed interleaved, each with its own intra-op pool; spinning threads of
    # the session that just ran would compete with the next one's on the same cores (a spinning
    # ResNet-56 timed beside its pruned variants on 2 threads measured many times its own latency).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model_bytes, options, providers=wanted)


def _feed(session: Any, input_shape: Sequence[int], seed: int = 0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal(tuple(int(d) for d in input_shape), dtype=np.float32)
    return {session.get_inputs()[0].name: x}


def time_sessions(runs: Sequence[tuple[Any, dict[str, np.ndarray]]], warmup: int, repeats: int) -> list[list[float]]:
    """Raw per-run ms of several sessions, interleaved: each repeat runs every session once, in an
    order rotated by one each repeat (none always runs first), after ``warmup`` such rounds."""
    for _ in range(warmup):
        for session, feed in runs:
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in runs]
    n = len(runs)
    for r in range(repeats):
        for j in range(n):
            i = (j + r) % n
            session, feed = runs[i]
            start = time.perf_counter()
            session.run(None, feed)
            times[i].append((time.perf_counter() - start) * 1e3)
    return times


def _sessions(models: Sequence[Model], threads: int | None, providers: Sequence[str] | None,
              profile_dir: str | None = None) -> list[Any]:
    """One session per model, after a spare one that is created, run once and dropped: of sessions
    created in a row, the first ran 2-8 % slower than identical ones for its whole life here (ResNet-56,
    16 copies, 2 threads; docs/benchmarks.md), and the first is usually the dense reference."""
    if models:
        spare = onnx_session(models[0][0], threads, providers)
        spare.run(None, _feed(spare, models[0][1]))
    return [onnx_session(data, threads, providers, None if profile_dir is None else os.path.join(profile_dir, f"model{i}"))
            for i, (data, _) in enumerate(models)]


def time_onnx_models(models: Sequence[Model], threads: int | None, warmup: int, repeats: int,
                     providers: Sequence[str] | None = None) -> list[list[float]]:
    """Raw per-run ms of each model, all timed interleaved in one run (compare them only with each other)."""
    sessions = _sessions(models, threads, providers)
    return time_sessions([(s, _feed(s, shape)) for s, (_, shape) in zip(sessions, models, strict=True)], warmup, repeats)


def time_onnx(model_bytes: bytes, input_shape: tuple[int, ...], threads: int | None, warmup: int, repeats: int,
              providers: list[str] | None = None) -> list[float]:
    """Raw per-run ms of one ONNX model after ``warmup`` runs."""
    return time_onnx_models([(model_bytes, input_shape)], threads, warmup, repeats, providers)[0]


# What an entry holds (part of every ONNX Runtime latency-table key, here and on device agents).
# On the CPU execution provider, "kernels": the layer's own kernel time from ONNX Runtime's
# profiler. A layer run alone also pays the session's per-run overhead and, where it runs in a
# blocked channel layout, a reorder into and out of that layout; inside a network it pays neither
# (the calibration fits layout changes). At CIFAR sizes those costs were most of a lone layer's
# wall time (docs/benchmarks.md), so tables of wall times could not see what pruning saves. Other
# providers launch kernels asynchronously, so the profiler's host-side node times are not their
# run time: there an entry stays the probe's wall time ("wall").
ENTRY_METHOD = "kernels"
WALL_METHOD = "wall"
LAYOUT_OPS = frozenset({"ReorderInput", "ReorderOutput"})


def entry_method(providers: Sequence[str] | None = None) -> str:
    """What :func:`time_onnx_entries` measures on ``providers`` (default: the CPU provider)."""
    return ENTRY_METHOD if list(providers or DEFAULT_PROVIDERS) == ["CPUExecutionProvider"] else WALL_METHOD


def kernel_ms_per_run(events: Sequence[dict[str, Any]]) -> list[float]:
    """Per run (ONNX Runtime profiler events of one session, in run order): the summed kernel time
    of every node but the layout reorders, in ms. The profiler counts whole microseconds (cut off),
    so each node adds half of one back."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    nodes = sorted((e["ts"], e["dur"]) for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
                   and e.get("args", {}).get("op_name") not in LAYOUT_OPS)
    totals = [0.0] * len(runs)
    j = 0
    for ts, dur in nodes:
        while j < len(runs) and ts > runs[j][1]:
            j += 1
        if j < len(runs) and ts >= runs[j][0]:
            totals[j] += (dur + 0.5) / 1e3
    return totals


def time_onnx_entries(models: Sequence[Model], threads: int | None, warmup: int, repeats: int, rounds: int,
                      providers: Sequence[str] | None = None) -> list[float]:
    """Median ms of each model (latency-table entries: kernel or wall time, :func:`entry_method`):
    ``rounds`` rounds over all models, each model run ``repeats`` times in a row per round (after
    ``warmup`` runs in the first round, one in later ones), the fastest round's median kept; a
    burst of load elsewhere then slows one round of many entries instead of every sample of one."""
    plan = [(warmup if r == 0 else 1, max(1, repeats)) for r in range(max(1, rounds))]  # (runs skipped, runs kept)
    profiled = entry_method(providers) == ENTRY_METHOD
    with tempfile.TemporaryDirectory(prefix="prunepilot-ort-profile-") if profiled else contextlib.nullcontext(None) as tmp:
        sessions = _sessions(models, threads, providers, profile_dir=tmp)
        feeds = [_feed(s, shape) for s, (_, shape) in zip(sessions, models, strict=True)]
        walls: list[list[list[float]]] = [[] for _ in models]  # per model, per round: the kept runs' wall ms
        for skip, keep in plan:
            for i, (session, feed) in enumerate(zip(sessions, feeds, strict=True)):
                walls[i].append(time_sessions([(session, feed)], skip, keep)[0])
        if not profiled:
            return [min(statistics.median(ts) for ts in rounds_ms) for rounds_ms in walls]
        best = []
        for session in sessions:
            with open(session.end_profiling()) as f:
                per_run = kernel_ms_per_run(json.load(f))
            medians, at = [], 0
            for skip, keep in plan:  # the profiler saw every run, skipped ones too, in order
                kept = per_run[at + skip: at + skip + keep]
                at += skip + keep
                if kept:
                    medians.append(statistics.median(kept))
            if not medians:
                raise RuntimeError("ONNX Runtime's profiler recorded no runs")
            best.append(min(medians))
    return best
