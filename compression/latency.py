"""Per-device latency lookup tables (NetAdapt, Yang et al. ECCV 2018).

Every conv (with the BN and ReLU that follow it) is measured on its own, at its input size and
the job's batch size, for the channel counts pruning can give it: a grid over (C_in, C_out).
Entries are keyed by a device fingerprint (CPU model, thread count, torch version) and a layer
signature (op, C_in, C_out, H, W, kernel, stride, groups, batch), so any model or job with the
same layer on the same machine reuses them. A strategy's latency is predicted as the sum of its
layers' entries (bilinear between grid points) plus the dense model's measured remainder (stem,
pooling, residual adds, classifier), which pruning leaves unchanged, plus, where the calibration
found one, a penalty for channel counts off the runtime's alignment (:meth:`LatencyTable.refit`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from .backends import LatencyBackend, TorchBackend, cpu_model, device_fingerprint
from .errors import PrunePilotError
from .graph import PruningGraph
from .measure import Latency

__all__ = ["FileLatencyStore", "LatencyStore", "LatencyTable", "channel_grid", "on_block", "cpu_model", "device_fingerprint", "signature"]


def signature(op: str, c_in: int, c_out: int, h: int, w: int, kernel: int, stride: int, padding: int, groups: int,
              batch: int) -> str:
    return f"{op}|cin={c_in}|cout={c_out}|h={h}|w={w}|k={kernel}|s={stride}|p={padding}|g={groups}|b={batch}"


class LatencyStore(Protocol):
    """Where table entries and calibrations live: JSON files here, SQL rows in the service."""

    def get(self, device: str) -> dict[str, float]: ...

    def put(self, device: str, entries: Mapping[str, tuple[float, int]]) -> None: ...

    def get_calibration(self, device: str, model_key: str) -> dict[str, Any] | None: ...

    def put_calibration(self, device: str, model_key: str, calibration: Mapping[str, Any]) -> None: ...


class FileLatencyStore:
    """Entries in one JSON file per store: {device: {signature: [ms, repeats]}}; calibrations beside
    it (``NAME.calibrations.json``: {device: {model key: calibration}}); writes are atomic."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.calibrations_path = self.path.with_name(f"{self.path.stem}.calibrations.json")

    def _load(self) -> dict[str, dict[str, list[float]]]:
        return _read_json(self.path)

    def get(self, device: str) -> dict[str, float]:
        return {sig: float(v[0]) for sig, v in self._load().get(device, {}).items()}

    def put(self, device: str, entries: Mapping[str, tuple[float, int]]) -> None:
        blob = self._load()
        bucket = blob.setdefault(device, {})
        for sig, (ms, n) in entries.items():
            bucket.setdefault(sig, [ms, n])  # the first measurement stays: tables are reused, not re-measured
        _write_json(self.path, blob)

    def get_calibration(self, device: str, model_key: str) -> dict[str, Any] | None:
        return _read_json(self.calibrations_path).get(device, {}).get(model_key)

    def put_calibration(self, device: str, model_key: str, calibration: Mapping[str, Any]) -> None:
        blob = _read_json(self.calibrations_path)
        blob.setdefault(device, {})[model_key] = dict(calibration)  # a recalibration replaces the one before
        _write_json(self.calibrations_path, blob)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, blob: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(blob))
    os.replace(tmp, path)


# Measured channel steps (LatencyTable.channel_steps): a larger count that adds less than a quarter of
# the layer's average per-channel latency per channel makes a smaller count not worth keeping; layers
# whose whole latency range is under 1 % of the network's are left alone.
STEP_SHARE = 0.25
STEP_MIN_RANGE = 0.01


# Channel alignments the calibration tries (:meth:`LatencyTable.refit`): runtimes with blocked
# layouts (ONNX Runtime's CPU kernels here: multiples of 4) run a layer whose count is off the block
# much slower inside the network than its own entries show. An alignment is kept only when its
# penalty is at least MIN_PENALTY of the dense latency for a network with every layer off it and it
# at least halves the fit's squared error.
ALIGNMENTS = (2, 4, 8, 16)
MIN_PENALTY = 0.02

# Whole-network runs per calibration network, split over its rounds (:meth:`LatencyTable.calibrate`);
# hosts may ask for fewer (PRUNEPILOT_CALIBRATION_REPEATS), trading the fit's noise for time.
CALIBRATION_REPEATS = 40


# Spread grid points sit on multiples of this: kernels work on channel blocks (ONNX Runtime's CPU
# convs on 8), so a grid point at a block's end, with the step point after it, shows the block.
GRID_ALIGN = 8


def channel_grid(channels: int, max_points: int = 12, step: int = 4) -> list[int]:
    """Channel counts to measure: every ``step`` while that stays under ``max_points``, else evenly
    spread and rounded to multiples of :data:`GRID_ALIGN` (plus 1 and ``channels``)."""
    if channels <= 1:
        return [channels]
    points = list(range(step, channels, step))
    if len(points) + 2 > max_points:
        spread = np.linspace(1, channels, max_points)
        points = sorted({max(GRID_ALIGN, int(round(x / GRID_ALIGN)) * GRID_ALIGN) for x in spread} - {channels})
        points = [p for p in points if p < channels]
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
    cin_steps: list[int] = field(default_factory=list)  # timed along c_in at the dense c_out only
    cout_steps: list[int] = field(default_factory=list)  # timed along c_out at the dense c_in only


def _probe_module(e: _ConvEntry, c_in: int, c_out: int) -> nn.Module:
    groups = c_out if e.depthwise else 1
    c_in = c_out if e.depthwise else c_in
    conv = nn.Conv2d(c_in, c_out, e.kernel, e.stride, padding=e.padding, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)).eval()


class LatencyTable:
    """Lookup table for one architecture on one device; predicts a pruned model's latency."""

    def __init__(self, graph: PruningGraph, model: nn.Module, store: LatencyStore, batch_size: int = 1, threads: int = 2,
                 max_points: int = 12, step: int = 4, quantum: int | None = None,
                 timer: Callable[[nn.Module, torch.Tensor, int, int], float] | None = None,
                 measure: Callable[..., Sequence[Latency]] | None = None, backend: LatencyBackend | None = None) -> None:
        self.graph = graph
        # Where entries and networks are timed (default: torch eager on this CPU at ``threads``);
        # its fingerprint keys the stored entries. The measured latency check times on it too.
        self.backend: LatencyBackend = backend if backend is not None else TorchBackend(threads)
        backend_threads = getattr(self.backend, "threads", None)
        if backend_threads is not None and backend_threads != threads:
            raise PrunePilotError(f"latency backend pinned to {backend_threads} threads, table keyed for {threads}")
        # Deterministic stand-ins for the torch backend's clocks (tests): ``timer(probe, x, warmup,
        # repeats)`` gives one entry's median ms, ``measure`` times whole models for ``calibrate``
        # (``measure_latency``'s signature). They replace the build's and the calibration's clocks only.
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
        self.max_points, self.step = max_points, step
        self.batch_size = batch_size
        self.threads = threads
        self.device = self.backend.fingerprint(threads, batch_size)
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
            e = self.entries[-1]
            e.cin_steps, e.cout_steps = _step_points(e.cin_grid), _step_points(e.cout_grid)
        self._rows = [wm.row for wm in convs]
        self._dense_in, self._dense_out = graph.module_widths(np.zeros(len(graph.layers)))
        self.values: dict[str, float] = {}
        self.dense_measured_ms: float | None = None
        self.remainder_ms = 0.0
        self.scale = 1.0
        # Calibrated: channel counts off a multiple of ``alignment`` cost ``penalty_ms`` for a network
        # with every layer off it (a share of that per layer), on top of the entries (see refit).
        self.alignment = 1
        self.penalty_ms = 0.0
        self.calibration: dict[str, object] = {}
        self.calibration_source: str | None = None  # "measured" (calibrate) or "stored" (restore_calibration)
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
            for cout in e.cout_steps:
                cin_eff = cout if e.depthwise else e.c_in
                out.append((e, cin_eff, cout, self._sig(e, cin_eff, cout)))
            for cin in e.cin_steps:
                out.append((e, cin, e.c_out, self._sig(e, cin, e.c_out)))
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
        clock = self._entry_clock()
        for start in range(0, len(todo), flush_every):
            if should_stop is not None and should_stop():
                break
            chunk = todo[start:start + flush_every]
            probes = [(_probe_module(e, cin, cout), torch.randn(self.batch_size, cin, e.h, e.w)) for e, cin, cout, _ in chunk]
            best = clock.time_entries(probes, warmup, per_round, rounds)
            self.store.put(self.device, {sig: (ms, per_round * rounds) for (*_, sig), ms in zip(chunk, best, strict=True)})
            done += len(chunk)
            if progress is not None:
                progress(done, len(todo))
        self.load()
        return done

    def _entry_clock(self) -> LatencyBackend:
        return TorchBackend(self.threads, timer=self.timer) if self.timer is not None else self.backend

    def measure_models(self, models: Sequence[nn.Module], warmup: int, repeats: int) -> list[Latency]:
        """Whole networks timed interleaved on the table's clock (the backend, or the test stand-in)."""
        if self.measure is not None:
            return list(self.measure(models, self.graph.input_size, self.batch_size, self.threads, warmup=warmup, repeats=repeats))
        return self.backend.measure(models, self.graph.input_size, self.batch_size, self.threads, warmup, repeats)

    def load(self) -> None:
        known = self.store.get(self.device)
        sigs = self.signatures()
        lacking = [s for *_, s in sigs if s not in known]
        if lacking:
            raise PrunePilotError(f"latency table incomplete on {self.device}: {len(lacking)} entries missing; build it first")
        self.values = {s: known[s] for *_, s in sigs}
        self._grids = []
        self._lines: list[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]] = []
        for e in self.entries:
            grid = np.array([[self.values[self._sig(e, cout if e.depthwise else cin, cout)] for cout in e.cout_grid]
                             for cin in e.cin_grid])
            self._grids.append((np.array(e.cin_grid, dtype=np.float64), np.array(e.cout_grid, dtype=np.float64), _monotone(grid)))
            outs = sorted({*e.cout_grid, *e.cout_steps})
            ins = sorted({*e.cin_grid, *e.cin_steps})
            along_out = np.array([self.values[self._sig(e, c if e.depthwise else e.c_in, c)] for c in outs])
            along_in = np.array([self.values[self._sig(e, c, e.c_out)] for c in ins])
            self._lines.append(((np.array(ins, dtype=np.float64), _monotone(along_in[:, None])[:, 0]),
                                (np.array(outs, dtype=np.float64), _monotone(along_out[None, :])[0])))

    def calibrate(self, repeats: int | None = None, probes: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8), seed: int = 0,
                  rounds: int = 3) -> float:
        """Fit the table to end-to-end measurements (:meth:`refit`); returns the dense latency.

        Layers timed alone do not run at the speed they run inside the network (caches, neighbours,
        the model's own overhead and the ops beside the convs, such as squeeze-excitation; layout
        changes around a layer whose channels are off the runtime's block), so the raw sum misjudges
        what pruning saves. Pruned variants (uniform at ``probes``, as many random profiles, and
        the same rounded onto every candidate block (:meth:`_on_every_block`), and
        :meth:`_alignment_probes`) are each timed interleaved with the dense model, in pairs, as the
        measured check times a candidate (docs/benchmarks.md: with all networks interleaved in one
        run, pruned networks measured up to a third faster relative to dense than in pairs in ONNX
        Runtime, and 3-5 % in torch). Every pair is timed in ``rounds`` separate runs of about
        ``repeats / rounds`` runs each; each network keeps the median of its shares of dense over the
        rounds, so a burst of load in one run decides nothing. ``repeats`` None: :data:`CALIBRATION_REPEATS`.
        """
        from .strategy import PruningConstraints

        repeats = CALIBRATION_REPEATS if repeats is None else repeats

        limits = PruningConstraints(max_ratio=0.9, first_layer_max_ratio=0.9)
        rng = np.random.default_rng(seed)
        n = len(self.graph.layers)
        vectors = [np.zeros(n)] + [np.full(n, p) for p in probes] + [rng.uniform(0.0, 0.8, n) for _ in probes]
        kept = [limits.kept_vector(self.graph.channels, v) for v in vectors]
        kept += [self._on_every_block(k) for k in kept[1:]] + self._alignment_probes()
        pruned = [_pruned_copy(self.graph, self.model, k) for k in kept[1:]]
        per_round = max(3, -(-repeats // max(1, rounds)))
        shares = np.ones((max(1, rounds), len(kept)))
        dense_ms: list[float] = []
        for r in range(max(1, rounds)):
            for j, net in enumerate(pruned, start=1):
                ref, mine = self.measure_models([self.model, net], warmup=3, repeats=per_round)
                shares[r, j] = mine.median_ms / ref.median_ms
                dense_ms.append(ref.median_ms)
        dense = float(np.median(dense_ms))
        self._calibration_points = (kept, np.median(shares, axis=0) * dense)
        self.calibration_source = "measured"
        return self.refit()

    def model_key(self) -> str:
        """What a calibration depends on beyond this table's entries and device, hashed: the dense
        model's structure (its module tree, an FX graph's code), its input size and its prunable
        layers (the probes prune them, and the alignment penalty is per prunable layer)."""
        h = hashlib.sha256(repr(self.model).encode())
        code = getattr(self.model, "code", None)  # onnx2torch and other FX graph modules: the forward itself
        if isinstance(code, str):
            h.update(code.encode())
        h.update(f"|input={self.graph.input_size}|layers={','.join(layer.name for layer in self.graph.layers)}".encode())
        return h.hexdigest()

    def calibrated(self, repeats: int | None = None, refresh: bool = False, keep: bool = True) -> float:
        """Calibrate once per model structure and device: the store's calibration when it was fitted
        to this table's entries (:meth:`restore_calibration`), else :meth:`calibrate`, stored when
        ``keep``. ``refresh`` calibrates again (and replaces the stored one). Returns the dense latency.

        Later jobs of the model on the device so share one fit (the same channel alignment and
        predictions, no whole-network timing in their prepare phase); their measured checks still
        time every answer."""
        key = self.model_key()
        saved = None if refresh else self.store.get_calibration(self.device, key)
        if saved is not None:
            try:
                self.restore_calibration(saved)
                return cast(float, self.dense_measured_ms)
            except PrunePilotError:
                pass  # fitted to other entries (the table was rebuilt since): calibrate again
        dense = self.calibrate(repeats)
        if keep:
            self.store.put_calibration(self.device, key, self.calibration)
        return dense

    def _on_every_block(self, kept: np.ndarray) -> np.ndarray:
        """``kept`` rounded down to multiples of the largest of :data:`ALIGNMENTS` (at least one
        block; a layer narrower than that stays whole): a network no candidate alignment penalizes.
        Measured beside the same profiles off the blocks, such networks tell the entries' share of
        the latency apart from the misalignment's; without them the fit saw aligned networks only at
        one width and predicted them much faster than measured (docs/benchmarks.md)."""
        return on_block(kept, self.graph.channels, max(ALIGNMENTS))

    def _alignment_probes(self, keep: float = 0.75) -> list[np.ndarray]:
        """Networks with every layer at about ``keep`` of its channels: once on odd counts (off every
        alignment), then on multiples of each of :data:`ALIGNMENTS` (:func:`on_block`: at least one
        block; a layer too narrow for one stays whole). Measured with the others, they show whether
        counts off a block cost more."""
        channels = self.graph.channels.astype(np.int64)
        base = np.maximum(1, np.floor(keep * channels)).astype(np.int64)
        odd = np.minimum(np.maximum(1, np.where(base % 2 == 0, base - 1, base)), channels)
        return [odd] + [on_block(base, channels, q) for q in ALIGNMENTS]

    def misaligned(self, kept: np.ndarray, alignment: int | None = None) -> float:
        """The share of prunable layers whose kept count is off a multiple of ``alignment`` (default:
        the calibrated one), less the share already off it when dense (0 for the dense model)."""
        q = self.alignment if alignment is None else alignment
        if q <= 1 or len(self.graph.channels) == 0:
            return 0.0
        kept = np.asarray(kept, dtype=np.int64)
        channels = self.graph.channels.astype(np.int64)
        return float(np.mean((kept % q != 0).astype(np.float64) - (channels % q != 0).astype(np.float64)))

    def refit(self) -> float:
        """Fit the latency model again to the last calibration's measurements (after changing
        ``quantum``, say); returns the dense latency.

        The fit is on shares of dense: a network whose entries sum to a fraction ``1 - x`` of the
        dense sum, with a share ``m`` of its layers' counts off a multiple of the alignment
        (:meth:`misaligned`), measures ``1 - b * x + u * m`` of dense. ``b`` (the share of the dense
        latency that scales with the entries) and ``u`` (the cost of leaving every layer off the
        block) come from least squares held at ``b, u >= 0``: a measurement in which pruning did not
        pay is fitted as no gain, never as a pruned network with aligned counts slower than dense.
        Alignment 1 (``u = 0``) unless one of :data:`ALIGNMENTS` earns its place (see there); the
        smallest of equally good ones wins. The dense point is met exactly.
        """
        if self._calibration_points is None:
            raise PrunePilotError("latency table not calibrated: call calibrate() first")
        kept, times = self._calibration_points
        sums = np.array([self.layers_ms(self.graph.channels - k) for k in kept])
        dense = float(times[0])
        removed = 1.0 - sums / sums[0]  # share of the dense entry sum each network's pruning removed
        saved = 1.0 - times / dense  # share of the dense latency it saved, as measured
        (share,), plain_error = _fit_savings([removed], saved)
        alignment, penalty, errors = 1, 0.0, {1: plain_error}
        best_error = plain_error
        for q in ALIGNMENTS:
            (b, u), error = _fit_savings([removed, -np.array([self.misaligned(k, q) for k in kept])], saved)
            errors[q] = error
            if u >= MIN_PENALTY and error <= 0.5 * plain_error and error < best_error:
                alignment, share, penalty, best_error = q, b, u, error
        self.scale = share * dense / float(sums[0])
        self.remainder_ms = (1.0 - share) * dense
        self.alignment, self.penalty_ms = alignment, penalty * dense
        self.dense_measured_ms = dense
        self.calibration = {"measured_ms": times.tolist(), "layer_sums_ms": sums.tolist(), "scale": self.scale,
                            "remainder_ms": self.remainder_ms, "alignment": alignment, "penalty_ms": self.penalty_ms,
                            "fit_errors": {str(q): e for q, e in errors.items()}}
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
        self.alignment = int(cast(int, calibration.get("alignment", 1)))  # absent: saved before alignments were fitted
        self.penalty_ms = float(cast(float, calibration.get("penalty_ms", 0.0)))
        self.dense_measured_ms = self.remainder_ms + self.scale * mine
        self.calibration = dict(calibration)
        self.calibration_source = "stored"

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
        return (self.remainder_ms + self.scale * self.layers_ms(self.graph.channels - np.asarray(kept))
                + self.penalty_ms * self.misaligned(kept))

    def aligned_up(self, kept: np.ndarray) -> np.ndarray:
        """``kept`` with each count raised to the next multiple of the calibrated alignment (at most
        the layer's channels): the nearest network that does not pay for counts off the block."""
        q = self.alignment
        kept = np.asarray(kept, dtype=np.int64)
        return kept if q <= 1 else np.minimum(-(-kept // q) * q, self.graph.channels.astype(np.int64))

    @property
    def dense_ms(self) -> float:
        if self.dense_measured_ms is None:
            raise PrunePilotError("latency table not calibrated")
        return self.dense_measured_ms

    # ------------------------------------------------------------------ per-layer curves and steps

    def layer_sums(self, index: int, counts: Sequence[int] | np.ndarray) -> np.ndarray:
        """The sum of the table's entries (uncalibrated ms) with prunable layer ``index`` keeping each
        of ``counts`` channels and every other layer whole; only the convs that layer touches are looked up."""
        n = len(self.graph.layers)
        base_in, base_out = self._dense_in, self._dense_out
        dense = np.array([self.lookup(i, base_in[row], base_out[row]) for i, row in enumerate(self._rows)])
        total = float(dense.sum())
        out = np.empty(len(counts), dtype=np.float64)
        channels = int(self.graph.channels[index])
        for j, c in enumerate(counts):
            pruned = np.zeros(n)
            pruned[index] = channels - int(c)
            cin, cout = self.graph.module_widths(pruned)
            cin, cout = self._quantize(cin, self._dense_in), self._quantize(cout, self._dense_out)
            changed = [(i, row) for i, row in enumerate(self._rows) if cin[row] != base_in[row] or cout[row] != base_out[row]]
            out[j] = total + sum(self._lookup_one_axis(i, cin[row], cout[row]) - dense[i] for i, row in changed)
        return out

    def _lookup_one_axis(self, index: int, c_in: float, c_out: float) -> float:
        """:meth:`lookup` where one width is dense: along that conv's finer line of entries (the grid
        plus one count above each grid point), which shows where a kernel's channel block ends."""
        e = self.entries[index]
        (ins, along_in), (outs, along_out) = self._lines[index]
        if e.depthwise or c_in == e.c_in:
            return _linear(outs, along_out, c_out)
        if c_out == e.c_out:
            return _linear(ins, along_in, c_in)
        return self.lookup(index, c_in, c_out)

    def layer_grid(self, index: int) -> list[int]:
        """The channel counts the table measures for prunable layer ``index`` (grid and step points)."""
        grid = channel_grid(int(self.graph.channels[index]), self.max_points, self.step)
        return sorted({*grid, *_step_points(grid)})

    def layer_curve(self, index: int, counts: Sequence[int] | np.ndarray) -> np.ndarray:
        """Predicted (calibrated) network ms with layer ``index`` at each of ``counts`` channels, others whole."""
        if self.dense_measured_ms is None:
            raise PrunePilotError("latency table not calibrated: call calibrate() after building")
        kept = np.repeat(self.graph.channels.astype(np.int64)[None, :], len(counts), axis=0)
        kept[:, index] = counts
        off = np.array([self.misaligned(k) for k in kept])
        return self.remainder_ms + self.scale * self.layer_sums(index, counts) + self.penalty_ms * off

    def channel_steps(self, lowest: np.ndarray | None = None, share: float = STEP_SHARE,
                      min_range: float = STEP_MIN_RANGE) -> tuple[tuple[int, ...], ...]:
        """Each prunable layer's *efficient* channel counts, for ``PruningConstraints(round_to="measured")``.

        With layer i alone pruned to c channels the table predicts L(c): once calibrated, the
        network's latency (:meth:`layer_curve`, alignment penalty included); before, the sum of the
        entries (:meth:`layer_sums`). A candidate count c is efficient when every larger candidate x
        costs more than ``share`` of the layer's average per-channel latency per extra channel:
        L(x) > L(c) + share * s * (x - c), s = (L(top) - L(bottom)) / (top - bottom) over the
        candidates. Otherwise a larger count is about as fast (a step of the staircase that c uses
        only part of), and snapping c down to the largest efficient count e below it saves more than
        ``share * s`` per channel removed. On a smooth curve every candidate is efficient. A layer
        whose whole range is under ``min_range`` of the dense network's latency keeps every
        candidate: its steps are within the table's noise. ``lowest``: the fewest channels each
        layer may keep (default 1).

        Candidates are every count from ``lowest`` to the layer's own, except on a calibrated
        alignment q > 1 (:meth:`refit`: counts off a multiple of q cost more inside the network):
        then the multiples of q, the layer's own count, and the powers of two under q (a layer may
        need fewer channels than one block; those counts stay on every finer block). Efficiency is
        judged among candidates only: a count off the block may look as fast in the entries as a
        candidate below it, but inside the network it pays for being off the block.
        """
        channels = self.graph.channels.astype(np.int64)
        lows = np.ones_like(channels) if lowest is None else np.asarray(lowest, dtype=np.int64)
        calibrated = self.dense_measured_ms is not None
        least = min_range * (self.dense_ms if calibrated else self.layers_ms(np.zeros(len(channels))))
        steps: list[tuple[int, ...]] = []
        for i, (c_max, lo) in enumerate(zip(channels.tolist(), lows.tolist(), strict=True)):
            counts = _step_candidates(max(1, lo), c_max, self.alignment)
            efficient = counts
            if len(counts) > 1:
                cost = self.layer_curve(i, counts) if calibrated else self.layer_sums(i, counts)
                span = float(cost[-1] - cost[0])
                if span >= least:
                    slack = share * span / float(counts[-1] - counts[0])
                    g = cost - slack * counts  # c is efficient iff g(c) < g(x) for every larger candidate x
                    after = np.append(np.minimum.accumulate(g[::-1])[::-1][1:], np.inf)
                    efficient = counts[g < after]  # c_max is always efficient (nothing larger): never empty
            steps.append(tuple(int(c) for c in efficient))
        return tuple(steps)

    def summary(self) -> dict[str, object]:
        return {"backend": self.backend.name, "device": self.device, "entries": len(self.values), "layers": len(self.entries), "quantum": self.quantum,
                "dense_ms": self.dense_measured_ms, "remainder_ms": self.remainder_ms, "scale": self.scale,
                "alignment": self.alignment, "penalty_ms": self.penalty_ms, "calibration": self.calibration_source}


def on_block(kept: np.ndarray, channels: np.ndarray, q: int) -> np.ndarray:
    """Each count of ``kept`` rounded down to a multiple of ``q``, at least ``q`` (or the layer's own
    count where it has fewer channels)."""
    rounded = np.asarray(kept, dtype=np.int64) // q * q
    return np.where(rounded >= q, rounded, np.minimum(np.asarray(channels, dtype=np.int64), q))


def _step_candidates(lowest: int, channels: int, alignment: int) -> np.ndarray:
    """Counts :meth:`LatencyTable.channel_steps` chooses among, ascending (see there)."""
    counts = np.arange(lowest, channels + 1)
    if alignment <= 1:
        return counts
    power_of_two = (counts & (counts - 1)) == 0
    return counts[(counts % alignment == 0) | (counts == channels) | ((counts < alignment) & power_of_two)]


def _fit_savings(columns: Sequence[np.ndarray], saved: np.ndarray) -> tuple[list[float], float]:
    """Least squares of ``saved = sum_j c_j * columns[j]`` with every ``c_j >= 0``: ``(c, squared
    error)``. Few unknowns, so the constrained optimum is found exactly by trying every subset of
    them free (the rest held at 0) and keeping the best feasible one."""
    A = np.stack([np.asarray(c, dtype=np.float64) for c in columns], axis=1)
    m = A.shape[1]
    best = (float(np.sum(saved ** 2)), np.zeros(m))
    for mask in range(1, 2 ** m):
        free = [j for j in range(m) if mask >> j & 1]
        sub = A[:, free]
        if not np.any(sub):
            continue
        coef, *_ = np.linalg.lstsq(sub, saved, rcond=None)
        if np.any(coef < 0):
            continue
        full = np.zeros(m)
        full[free] = coef
        error = float(np.sum((saved - A @ full) ** 2))
        if error < best[0] - 1e-15:
            best = (error, full)
    return [float(c) for c in best[1]], best[0]


def _step_points(grid: list[int]) -> list[int]:
    """One count above each grid point, inside the range: kernels work on channel blocks (ONNX
    Runtime's CPU convs run multiples of 8 far faster than the counts around them), and the count
    just past a block shows the jump that interpolating between grid points smooths over. Timed
    along one axis at the other's dense width only, for the per-layer curves and channel steps."""
    top = grid[-1]
    return sorted({g + 1 for g in grid if g + 1 < top} - set(grid))


def _linear(xs: np.ndarray, ys: np.ndarray, x: float) -> float:
    if len(xs) == 1:
        return float(ys[0])
    if x < xs[0] - 1e-9 or x > xs[-1] + 1e-9:
        raise PrunePilotError(f"channel count {x:g} outside the table's range [{xs[0]:g}, {xs[-1]:g}]")
    return float(np.interp(x, xs, ys))


def _monotone(grid: np.ndarray) -> np.ndarray:
    """The grid made non-decreasing in both channel counts: each entry becomes the least of itself and
    every entry with at least as many input and output channels.

    An entry timed slower than a larger one is a slow kernel path for that width (or noise): the
    table then predicts the larger width's time, so removing channels never raises the entries'
    sum (only the calibrated alignment penalty can, where the calibration measured networks off
    the runtime's block as slower). The measured latency check still times the real network;
    ``round_to="measured"`` steers counts off such widths.
    """
    out = np.minimum.accumulate(grid[::-1, :], axis=0)[::-1, :]
    return np.minimum.accumulate(out[:, ::-1], axis=1)[:, ::-1]


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
