"""Per-device latency lookup tables (NetAdapt, Yang et al. ECCV 2018).

Every conv (with the BN and ReLU that follow it) is measured on its own, at its input size and
the job's batch size, for the channel counts pruning can give it: a grid over (C_in, C_out).
Entries are keyed by a device fingerprint (CPU model, thread count, torch version) and a layer
signature (op, C_in, C_out, H, W, kernel, stride, groups, batch), so any model or job with the
same layer on the same machine reuses them. A strategy's latency is predicted as the sum of its
layers' entries (bilinear between grid points) plus the dense model's measured remainder (stem,
pooling, residual adds, classifier), which pruning leaves unchanged.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import numpy as np
import torch
from torch import nn

from .errors import PrunePilotError
from .graph import PruningGraph
from .measure import Latency, measure_latency, torch_threads


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_fingerprint(threads: int, batch_size: int) -> str:
    return f"cpu={cpu_model()}|threads={threads}|torch={torch.__version__.split('+')[0]}|batch={batch_size}"


def signature(op: str, c_in: int, c_out: int, h: int, w: int, kernel: int, stride: int, padding: int, groups: int,
              batch: int) -> str:
    return f"{op}|cin={c_in}|cout={c_out}|h={h}|w={w}|k={kernel}|s={stride}|p={padding}|g={groups}|b={batch}"


class LatencyStore(Protocol):
    """Where table entries live: a JSON file here, SQL rows in the service."""

    def get(self, device: str) -> dict[str, float]: ...

    def put(self, device: str, entries: Mapping[str, tuple[float, int]]) -> None: ...


class FileLatencyStore:
    """Entries in one JSON file per store: {device: {signature: [ms, repeats]}}; writes are atomic."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _load(self) -> dict[str, dict[str, list[float]]]:
        if not self.path.is_file():
            return {}
        return json.loads(self.path.read_text())

    def get(self, device: str) -> dict[str, float]:
        return {sig: float(v[0]) for sig, v in self._load().get(device, {}).items()}

    def put(self, device: str, entries: Mapping[str, tuple[float, int]]) -> None:
        blob = self._load()
        bucket = blob.setdefault(device, {})
        for sig, (ms, n) in entries.items():
            bucket.setdefault(sig, [ms, n])  # the first measurement stays: tables are reused, not re-measured
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(blob))
        os.replace(tmp, self.path)


def channel_grid(channels: int, max_points: int = 12, step: int = 4) -> list[int]:
    """Channel counts to measure: every ``step`` while that stays under ``max_points``, else evenly spread."""
    if channels <= 1:
        return [channels]
    points = list(range(step, channels, step))
    if len(points) + 2 > max_points:
        points = sorted({int(round(x)) for x in np.linspace(1, channels, max_points)})
    return sorted({1, *points, channels})


@dataclass
class _ConvEntry:
    name: str
    op: str
    c_in: int
    c_out: int
    h: int
    w: int
    kernel: int
    stride: int
    padding: int
    groups: int
    depthwise: bool
    cin_grid: list[int]
    cout_grid: list[int]


def _probe_module(e: _ConvEntry, c_in: int, c_out: int) -> nn.Module:
    groups = c_out if e.depthwise else 1
    c_in = c_out if e.depthwise else c_in
    conv = nn.Conv2d(c_in, c_out, e.kernel, e.stride, padding=e.padding, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)).eval()


def _time_module(m: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            m(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            m(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


class LatencyTable:
    """Lookup table for one architecture on one device; predicts a pruned model's latency."""

    def __init__(self, graph: PruningGraph, model: nn.Module, store: LatencyStore, batch_size: int = 1, threads: int = 2,
                 max_points: int = 12, step: int = 4, quantum: int | None = None,
                 timer: Callable[[nn.Module, torch.Tensor, int, int], float] | None = None,
                 measure: Callable[..., Sequence[Latency]] | None = None) -> None:
        self.graph = graph
        # The clocks: ``timer(probe, x, warmup, repeats)`` gives one entry's median ms (default
        # ``_time_module``), ``measure`` times whole models for ``calibrate`` (default
        # ``measure_latency``, same signature). Tests pass deterministic stand-ins.
        self.timer = timer
        self.measure = measure
        # Kernels work on channel blocks, so latency can be a staircase in the channel count: on
        # NetAdapt's ResNet-56 here, 7 -> 8 and 13 -> 16 kept channels cost nothing measurable
        # while 4 -> 8 did. ``quantum`` > 1 rounds counts up to its multiple before interpolating.
        # Default 1 (plain bilinear): on random strategies neither predictor won consistently
        # (benchmarks/latency_table.py scores both on the same measurements).
        self.quantum = 1 if quantum is None else quantum
        self.model = model
        self.store = store
        self.batch_size = batch_size
        self.threads = threads
        self.device = device_fingerprint(threads, batch_size)
        self.entries: list[_ConvEntry] = []
        convs = [wm for wm in graph.weighted_modules() if wm.kind == "conv"]
        for wm in convs:
            m = model.get_submodule(wm.name)
            assert isinstance(m, nn.Conv2d)  # wm.kind == "conv"
            _, _, h, w = graph.shapes[wm.name][0]
            self.entries.append(_ConvEntry(
                wm.name, "conv-bn-relu", wm.c_in, wm.c_out, h, w, m.kernel_size[0], m.stride[0], cast(tuple[int, ...], m.padding)[0],
                wm.groups, wm.depthwise,
                channel_grid(wm.c_in, max_points, step) if (wm.varies_in and not wm.depthwise) else [wm.c_in],
                channel_grid(wm.c_out, max_points, step) if wm.varies_out else [wm.c_out],
            ))
        self._rows = [wm.row for wm in convs]
        self._dense_in, self._dense_out = graph.module_widths(np.zeros(len(graph.layers)))
        self.values: dict[str, float] = {}
        self.dense_measured_ms: float | None = None
        self.remainder_ms = 0.0
        self.scale = 1.0
        self.calibration: dict[str, object] = {}
        self._calibration_points: tuple[list[np.ndarray], np.ndarray] | None = None  # kept vectors, measured ms

    # ------------------------------------------------------------------ building

    def _sig(self, e: _ConvEntry, c_in: int, c_out: int) -> str:
        return signature(e.op, c_in, c_out, e.h, e.w, e.kernel, e.stride, e.padding, c_out if e.depthwise else 1, self.batch_size)

    def signatures(self) -> list[tuple[_ConvEntry, int, int, str]]:
        out = []
        for e in self.entries:
            for cin in e.cin_grid:
                for cout in e.cout_grid:
                    cin_eff = cout if e.depthwise else cin
                    out.append((e, cin_eff, cout, self._sig(e, cin_eff, cout)))
        return out

    def missing(self) -> list[tuple[_ConvEntry, int, int, str]]:
        known = self.store.get(self.device)
        seen: set[str] = set()
        todo = []
        for item in self.signatures():
            if item[3] not in known and item[3] not in seen:
                seen.add(item[3])
                todo.append(item)
        return todo

    def build(self, warmup: int = 5, repeats: int = 24, progress: Callable[[int, int], None] | None = None,
              flush_every: int = 32, should_stop: Callable[[], bool] | None = None, rounds: int = 3) -> int:
        """Measure the missing entries; saved in batches, so an interrupted build resumes where it stopped.

        Within a batch every entry is timed in ``rounds`` interleaved rounds and keeps the fastest
        round's median: a burst of load from a neighbour then slows one round of many entries
        instead of all samples of one entry, and the table does not record it.
        """
        todo = self.missing()
        done = 0
        per_round = max(1, repeats // rounds)
        timer = self.timer or _time_module
        with torch_threads(self.threads):
            for start in range(0, len(todo), flush_every):
                if should_stop is not None and should_stop():
                    break
                chunk = todo[start:start + flush_every]
                probes = [(_probe_module(e, cin, cout), torch.randn(self.batch_size, cin, e.h, e.w)) for e, cin, cout, _ in chunk]
                best = [float("inf")] * len(chunk)
                for r in range(rounds):
                    for i, (module, x) in enumerate(probes):
                        best[i] = min(best[i], timer(module, x, warmup if r == 0 else 1, per_round))
                self.store.put(self.device, {sig: (ms, per_round * rounds) for (*_, sig), ms in zip(chunk, best, strict=True)})
                done += len(chunk)
                if progress is not None:
                    progress(done, len(todo))
        self.load()
        return done

    def load(self) -> None:
        known = self.store.get(self.device)
        sigs = self.signatures()
        lacking = [s for *_, s in sigs if s not in known]
        if lacking:
            raise PrunePilotError(f"latency table incomplete on {self.device}: {len(lacking)} entries missing; build it first")
        self.values = {s: known[s] for *_, s in sigs}
        self._grids = []
        for e in self.entries:
            grid = np.array([[self.values[self._sig(e, cout if e.depthwise else cin, cout)] for cout in e.cout_grid]
                             for cin in e.cin_grid])
            self._grids.append((np.array(e.cin_grid, dtype=np.float64), np.array(e.cout_grid, dtype=np.float64), grid))

    def calibrate(self, repeats: int = 40, probes: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8), seed: int = 0) -> float:
        """Fit ``latency = remainder + scale * sum(entries)`` to end-to-end measurements.

        Layers timed alone do not run at the speed they run inside the network (caches, neighbours,
        the model's own overhead; the fitted scale has come out between 0.87 and 1.11 here), so the
        raw sum misjudges what pruning saves. The dense model and a few pruned variants
        (uniform at ``probes`` and as many random profiles) are measured interleaved in one run and
        the two coefficients fitted by least squares; the layer entries keep the shape, the fit
        the scale. Returns the fitted dense latency.
        """
        from .strategy import PruningConstraints

        limits = PruningConstraints(max_ratio=0.9, first_layer_max_ratio=0.9)
        rng = np.random.default_rng(seed)
        n = len(self.graph.layers)
        vectors = [np.zeros(n)] + [np.full(n, p) for p in probes] + [rng.uniform(0.0, 0.8, n) for _ in probes]
        kept = [limits.kept_vector(self.graph.channels, v) for v in vectors]
        models = [self.model] + [_pruned_copy(self.graph, self.model, k) for k in kept[1:]]
        measure = self.measure or measure_latency
        measured = measure(models, self.graph.input_size, self.batch_size, self.threads, warmup=5, repeats=repeats)
        self._calibration_points = (kept, np.array([m.median_ms for m in measured]))
        return self.refit()

    def refit(self) -> float:
        """Fit remainder and scale again to the last calibration's measurements (after changing
        ``quantum``, say); returns the fitted dense latency."""
        if self._calibration_points is None:
            raise PrunePilotError("latency table not calibrated: call calibrate() first")
        kept, times = self._calibration_points
        sums = np.array([self.layers_ms(self.graph.channels - k) for k in kept])
        design = np.stack([np.ones_like(sums), sums], axis=1)
        (remainder, scale), *_ = np.linalg.lstsq(design, times, rcond=None)
        if scale <= 0:  # degenerate fit (noise swamped the signal): fall back to the plain sum
            remainder, scale = float(times[0] - sums[0]), 1.0
        self.scale = float(scale)
        self.remainder_ms = float(remainder)
        self.dense_measured_ms = float(remainder + scale * sums[0])
        self.calibration = {"measured_ms": times.tolist(), "layer_sums_ms": sums.tolist(), "scale": self.scale,
                            "remainder_ms": self.remainder_ms}
        return self.dense_measured_ms

    def restore_calibration(self, calibration: Mapping[str, object], tolerance: float = 0.01) -> None:
        """Reuse a calibration saved from ``self.calibration`` (several runs sharing one latency model).

        The fit maps *these* table entries to end-to-end time; entries measured on another machine
        or at another time sum differently, and the old scale would then predict nonsense (a dense
        model at half its latency). The saved dense layer sum must match this table's within
        ``tolerance``, or the calibration is refused.
        """
        sums = calibration.get("layer_sums_ms")
        if not isinstance(sums, list) or not sums:
            raise PrunePilotError("latency calibration lacks its layer sums; calibrate again")
        mine = self.layers_ms(np.zeros(len(self.graph.layers)))
        if abs(mine - float(sums[0])) > tolerance * float(sums[0]):
            raise PrunePilotError(f"latency calibration was fitted to other table entries (dense layer sum {float(sums[0]):.3f} ms, "
                                  f"this table {mine:.3f} ms); calibrate again")
        self.scale = float(cast(float, calibration["scale"]))  # numbers, as saved from self.calibration
        self.remainder_ms = float(cast(float, calibration["remainder_ms"]))
        self.dense_measured_ms = self.remainder_ms + self.scale * mine
        self.calibration = dict(calibration)

    # ------------------------------------------------------------------ prediction

    def lookup(self, index: int, c_in: float, c_out: float) -> float:
        cins, couts, grid = self._grids[index]
        return float(_bilinear(cins, couts, grid, c_in, c_out))

    def layers_ms(self, pruned: np.ndarray) -> float:
        cin, cout = self.graph.module_widths(pruned)
        cin, cout = self._quantize(cin, self._dense_in), self._quantize(cout, self._dense_out)
        return float(sum(self.lookup(i, cin[row], cout[row]) for i, row in enumerate(self._rows)))

    def _quantize(self, channels: np.ndarray, dense: np.ndarray) -> np.ndarray:
        if self.quantum <= 1:
            return channels
        return np.minimum(np.ceil(channels / self.quantum - 1e-9) * self.quantum, dense)

    def predict(self, kept: np.ndarray) -> float:
        if self.dense_measured_ms is None:
            raise PrunePilotError("latency table not calibrated: call calibrate() after building")
        return self.remainder_ms + self.scale * self.layers_ms(self.graph.channels - np.asarray(kept))

    @property
    def dense_ms(self) -> float:
        if self.dense_measured_ms is None:
            raise PrunePilotError("latency table not calibrated")
        return self.dense_measured_ms

    def summary(self) -> dict[str, object]:
        return {"device": self.device, "entries": len(self.values), "layers": len(self.entries), "quantum": self.quantum,
                "dense_ms": self.dense_measured_ms, "remainder_ms": self.remainder_ms, "scale": self.scale}


def _pruned_copy(graph: PruningGraph, model: nn.Module, kept: np.ndarray) -> nn.Module:
    keep = {i: np.arange(int(k)) for i, k in enumerate(kept) if k < graph.channels[i]}
    return graph.prune(model, keep)


def _bilinear(xs: np.ndarray, ys: np.ndarray, grid: np.ndarray, x: float, y: float) -> float:
    def locate(axis: np.ndarray, v: float) -> tuple[int, int, float]:
        if len(axis) == 1:
            return 0, 0, 0.0
        if v < axis[0] - 1e-9 or v > axis[-1] + 1e-9:
            raise PrunePilotError(f"channel count {v:g} outside the table's range [{axis[0]:g}, {axis[-1]:g}]")
        j = int(np.clip(np.searchsorted(axis, v, side="right") - 1, 0, len(axis) - 2))
        t = (v - axis[j]) / (axis[j + 1] - axis[j])
        return j, j + 1, float(np.clip(t, 0.0, 1.0))

    i0, i1, tx = locate(xs, x)
    j0, j1, ty = locate(ys, y)
    top = grid[i0, j0] * (1 - ty) + grid[i0, j1] * ty
    bottom = grid[i1, j0] * (1 - ty) + grid[i1, j1] * ty
    return top * (1 - tx) + bottom * tx
