"""Latency backends (torch, ONNX Runtime, CUDA), the table keyed by them, monotone predictions and
measured channel steps.

The table's control logic runs on deterministic clocks (tests/helpers/clock.py and the shaped
clocks below); real ONNX Runtime is used where the runtime itself matters (export, sessions, the
store's keys), asserting structure and interleaved orderings with wide margins, never absolute time.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.clock import REMAINDER_MS, FakeClock
from helpers.nets import TwoConvs
from torch import nn

from prunepilot.compression import PrunePilotError, Pruner, PruningConstraints, StrategyError
from prunepilot.compression.backends import (
    LatencyBackend,
    LatencyTarget,
    OnnxRuntimeBackend,
    TorchBackend,
    cpu_model,
    device_fingerprint,
    local_backend,
    measure_pair,
    onnx_bytes,
    time_onnx,
)
from prunepilot.compression.inspect import MIN_SPEEDUP, NO_SPEEDUP, latency_outlook, latency_problems
from prunepilot.compression.latency import FileLatencyStore, LatencyTable
from prunepilot.compression.measure import Latency


def tiny_pruner() -> Pruner:
    torch.manual_seed(0)
    return Pruner(TwoConvs(8, 16).eval(), "tiny", 10, 16)


class ShapedClock(FakeClock):
    """FakeClock whose layer entries are ``conv_ms * factor(c_in) * factor(c_out)`` (networks as FakeClock's)."""

    def __init__(self, factor: Callable[[int], float]) -> None:
        super().__init__()
        self.factor = factor

    def time_probe(self, module: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
        conv = module[0]
        return super().time_probe(module, x, warmup, repeats) * self.factor(conv.in_channels) * self.factor(conv.out_channels)


def clock_table(pruner: Pruner, tmp_path: Path, clock: FakeClock, **kw) -> LatencyTable:  # type: ignore[no-untyped-def]
    table = LatencyTable(pruner.graph, pruner.model, FileLatencyStore(tmp_path / "lut.json"), timer=clock.time_probe,
                         measure=clock.measure, **kw)
    table.build(warmup=1, repeats=3)
    return table


# ---------------------------------------------------------------------------------------------- backends


def test_the_torch_backend_keeps_the_stored_tables_key() -> None:
    """Tables stored before backends existed stay valid: the torch backend's key is the old one, verbatim."""
    version = torch.__version__.split("+")[0]
    assert TorchBackend(2).fingerprint(2, 8) == device_fingerprint(2, 8) == f"cpu={cpu_model()}|threads=2|torch={version}|batch=8"
    ort = OnnxRuntimeBackend(2).fingerprint(2, 8)
    assert ort != device_fingerprint(2, 8) and "onnxruntime" in ort and "threads=2" in ort and "batch=8" in ort
    assert isinstance(TorchBackend(1), LatencyBackend) and isinstance(OnnxRuntimeBackend(1), LatencyBackend)


def test_unknown_or_unavailable_backends_are_refused_in_one_line() -> None:
    with pytest.raises(PrunePilotError, match="unknown latency backend 'tvm'; known: torch, onnxruntime, cuda"):
        local_backend("tvm", 1)
    with pytest.raises(PrunePilotError, match="unknown latency backend"):
        LatencyTarget(backend="tensorrt")
    with pytest.raises(PrunePilotError, match="'torch' is not one a device agent runs"):
        LatencyTarget(backend="torch", device="board")
    with pytest.raises(PrunePilotError, match="execution provider"):
        OnnxRuntimeBackend(1, providers=["NoSuchExecutionProvider"])
    if not torch.cuda.is_available():
        with pytest.raises(PrunePilotError, match="needs a CUDA GPU") as info:
            local_backend("cuda", 1)
        assert "\n" not in str(info.value)


def test_onnx_export_of_a_probe_computes_what_torch_computes() -> None:
    import onnxruntime as ort

    probe = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()).eval()
    with torch.no_grad():
        probe[1].running_mean.uniform_(-1, 1)
        probe[1].running_var.uniform_(0.5, 2)
    x = torch.randn(1, 4, 9, 9)
    session = ort.InferenceSession(onnx_bytes(probe, x), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, probe(x).numpy(), rtol=1e-4, atol=1e-5)
    runs = time_onnx(onnx_bytes(probe, x), (1, 4, 9, 9), threads=1, warmup=1, repeats=7)
    assert len(runs) == 7 and all(0 < ms < 1e4 for ms in runs)


def test_onnxruntime_backend_times_entries_and_networks_in_order() -> None:
    """Interleaved timings: a conv with 256x the MACs of another is timed slower (by a margin far
    inside the 256x, so load cannot flip it); whole networks come back as one Latency each."""
    backend = OnnxRuntimeBackend(1)
    small = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()
    big = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()).eval()
    ms = backend.time_entries([(small, torch.randn(1, 4, 32, 32)), (big, torch.randn(1, 64, 32, 32))], warmup=2, repeats=5, rounds=2)
    assert len(ms) == 2 and all(math.isfinite(v) and v > 0 for v in ms)
    assert ms[1] > 3 * ms[0]
    pruner = tiny_pruner()
    half = pruner.prune_kept(pruner.kept_from_vector(np.full(len(pruner.layers), 0.5))).model
    dense, mine = measure_pair(backend, pruner.model, half, 16, 1, 1, warmup=1, repeats=5)
    assert isinstance(dense, Latency) and dense.repeats == mine.repeats == 5 and dense.batch_size == 1


def test_onnxruntime_entries_are_a_layers_own_kernels_without_layout_reorders() -> None:
    """From the profiler's events, per run: the kernels inside that run, the reorders into and out
    of the blocked layout left out, half a microsecond added back per node (it counts whole ones).
    On real ONNX Runtime the entry is positive and under the same probe's wall time (the session's
    own overhead is left out too), and the fingerprint says what an entry holds."""
    from prunepilot.compression.ort_timing import (
        ENTRY_METHOD,
        WALL_METHOD,
        entry_method,
        kernel_ms_per_run,
        time_onnx,
        time_onnx_entries,
    )

    def node(op: str, ts: int, dur: int) -> dict:
        return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100}, node("ReorderInput", 5, 3), node("Conv", 10, 20),
              node("ReorderOutput", 40, 4), {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100}, node("FusedConv", 210, 30),
              node("Relu", 250, 2), node("Conv", 400, 50)]
    assert kernel_ms_per_run(events) == pytest.approx([0.0205, 0.0330])

    probe = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()).eval()
    x = torch.randn(1, 16, 8, 8)
    data = onnx_bytes(probe, x)
    # three interleaved pairs, the median of each side: a burst of load during one of them (seen once
    # in a loaded suite: 9.3 us of wall against 16 us idle) decides nothing
    pairs = [(time_onnx_entries([(data, tuple(x.shape))], 1, warmup=3, repeats=20, rounds=2)[0],
              float(np.median(time_onnx(data, tuple(x.shape), 1, warmup=3, repeats=40)))) for _ in range(3)]
    kernels, wall = float(np.median([k for k, _ in pairs])), float(np.median([w for _, w in pairs]))
    assert 0 < kernels < wall, pairs
    assert OnnxRuntimeBackend(1).fingerprint(1, 1).endswith(f"|entries={ENTRY_METHOD}")
    # providers that launch kernels asynchronously keep wall-time entries (the profiler's node times
    # there are host-side), under their own key
    assert entry_method(["CUDAExecutionProvider", "CPUExecutionProvider"]) == WALL_METHOD != ENTRY_METHOD == entry_method(None)


def test_an_onnxruntime_table_is_stored_under_its_own_key(tmp_path: Path) -> None:
    """Entries timed in ONNX Runtime are keyed by its fingerprint: reused by the next ONNX Runtime
    table, never by a torch table of the same layers (which has them all still to measure)."""
    pruner = tiny_pruner()
    store = FileLatencyStore(tmp_path / "lut.json")
    ort_table = LatencyTable(pruner.graph, pruner.model, store, 1, 1, max_points=3, backend=OnnxRuntimeBackend(1))
    n = ort_table.build(warmup=1, repeats=2, rounds=1)
    assert n == len(ort_table.values) > 0 and all(0 < v < 1e3 for v in ort_table.values.values())
    assert ort_table.summary()["backend"] == "onnxruntime"
    again = LatencyTable(pruner.graph, pruner.model, store, 1, 1, max_points=3, backend=OnnxRuntimeBackend(1))
    assert again.missing() == []
    torch_table = LatencyTable(pruner.graph, pruner.model, store, 1, 1, max_points=3)
    assert torch_table.backend.name == "torch" and len(torch_table.missing()) == n
    with pytest.raises(PrunePilotError, match="threads"):
        LatencyTable(pruner.graph, pruner.model, store, 1, 2, backend=OnnxRuntimeBackend(1))


class CountingBackend:
    """A backend that records what it was asked to time and answers from a formula."""

    name = "counting"

    def __init__(self, ratio: float) -> None:
        self.ratio, self.calls = ratio, 0

    def fingerprint(self, threads: int, batch_size: int) -> str:
        return f"counting|{threads}|{batch_size}"

    def time_entries(self, probes, warmup: int, repeats: int, rounds: int) -> list[float]:  # type: ignore[no-untyped-def]
        return [1.0 for _ in probes]

    def measure(self, models, input_size: int, batch_size: int, threads, warmup: int, repeats: int) -> list[Latency]:  # type: ignore[no-untyped-def]
        self.calls += 1
        times = [10.0] + [10.0 * self.ratio] * (len(models) - 1)  # the first model is the reference (dense)
        return [Latency(ms, ms, ms, batch_size, 1, repeats) for ms in times]


def test_the_measured_check_times_on_the_tables_backend(tmp_path: Path) -> None:
    from prunepilot.agents import SearchContext, SearchLimits
    from prunepilot.agents.latency_check import measured_share
    from prunepilot.compression import FormulaEvaluator

    pruner = tiny_pruner()
    backend = CountingBackend(0.42)
    table = LatencyTable(pruner.graph, pruner.model, FileLatencyStore(tmp_path / "lut.json"), 1, 1, backend=backend)
    table.build(warmup=1, repeats=1)
    table.calibrate(repeats=1)
    evaluator = FormulaEvaluator(pruner, lambda share: float(share.mean()), "formula")
    evaluator.latency_model = table
    ctx = SearchContext(evaluator, {"flops": 0.5}, SearchLimits(max_evaluations=1), seed=0, agent="check")
    before = backend.calls
    assert measured_share(ctx, copy.deepcopy(pruner.model)) == pytest.approx(0.42)
    assert backend.calls - before == 3  # three interleaved rounds, all on the table's backend


# ---------------------------------------------------------------------------------------------- monotone predictions


def test_a_slow_narrow_kernel_never_makes_a_pruned_net_predicted_slower(resnet20, tmp_path: Path) -> None:
    """Entries at counts off a multiple of 4 time 6x slower (a slow kernel path): raw, the table would
    predict heavily pruned networks slower than dense. The lookup takes the larger width's time
    instead: predictions never rise as channels are removed, and none exceeds dense."""
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32, PruningConstraints(max_ratio=0.95, first_layer_max_ratio=0.95))
    table = clock_table(pruner, tmp_path, ShapedClock(lambda c: 6.0 if c % 4 else 1.0))
    assert any(v > 0 for v in table.values.values())
    e = next(i for i, e in enumerate(table.entries) if e.cout_grid[0] == 1 and len(e.cout_grid) > 2)
    entry = table.entries[e]
    raw_1 = table.values[table._sig(entry, entry.c_in if not entry.depthwise else 1, 1)]
    raw_4 = table.values[table._sig(entry, entry.c_in if not entry.depthwise else 4, 4)]
    assert raw_1 > raw_4  # the stored measurement is kept as timed
    assert table.lookup(e, entry.c_in, 1) <= table.lookup(e, entry.c_in, 4)
    table.calibrate(repeats=1)
    rng = np.random.default_rng(0)
    n = len(pruner.layers)
    previous = table.predict(pruner.graph.channels)
    assert previous == pytest.approx(table.dense_ms)
    for ratio in np.linspace(0.05, 0.95, 10):  # uniform, ever more pruned: never slower
        now = table.predict(pruner.kept_from_vector(np.full(n, ratio)))
        assert now <= previous + 1e-9
        previous = now
    for _ in range(20):
        assert table.predict(pruner.kept_from_vector(rng.uniform(0.0, 0.95, n))) <= table.dense_ms + 1e-9


# ---------------------------------------------------------------------------------------------- measured channel steps


def staircase(c: int) -> float:
    """A width-8 blocked kernel: c input or output channels cost what ceil(c / 8) * 8 do."""
    return math.ceil(c / 8) * 8 / c


def test_channel_steps_snap_counts_off_a_staircase_and_leave_a_smooth_curve_alone(resnet20, tmp_path: Path) -> None:
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    lowest = pruner.constraints.lowest_vector(pruner.graph.channels)
    smooth = clock_table(pruner, tmp_path / "smooth", FakeClock()).channel_steps(lowest)
    assert [len(s) for s in smooth] == [int(c - lo + 1) for c, lo in zip(pruner.graph.channels, lowest, strict=True)]

    table = clock_table(pruner, tmp_path / "stairs", ShapedClock(staircase))
    steps = table.channel_steps(lowest)
    snapped = PruningConstraints(round_to="measured", steps=steps)
    plain = PruningConstraints()
    # exactly the block ends are worth their latency: every count between them costs the next block's
    for layer_steps, c, lo in zip(steps, pruner.graph.channels, lowest, strict=True):
        assert list(layer_steps) == [m for m in range(int(lo), int(c) + 1) if m % 8 == 0]
    i = next(i for i, c in enumerate(pruner.graph.channels) if c == 64)
    efficient = steps[i]
    curve = table.layer_sums(i, list(range(int(lowest[i]), 65)))
    for c in range(int(lowest[i]), 65):
        s = snapped._snap(i, c)
        assert (s == c) == (c in efficient)
        assert s <= c if c >= efficient[0] else s == efficient[0]  # under every step: up to the smallest
        assert curve[s - lowest[i]] <= curve[c - lowest[i]] + 1e-12  # never slower (up: the same block)
        if s < c:  # a snap down saves more than a quarter of the layer's average cost per channel removed
            slope = (curve[-1] - curve[0]) / (len(curve) - 1)
            assert curve[c - lowest[i]] - curve[s - lowest[i]] > 0.25 * slope * (c - s)
    rng = np.random.default_rng(1)
    smallest = np.array([layer_steps[0] for layer_steps in steps])
    for _ in range(50):  # vector and scalar paths agree; snapping removes channels, except up to the smallest step
        ratios = rng.uniform(0.0, 0.8, len(pruner.layers))
        kept = snapped.kept_vector(pruner.graph.channels, ratios)
        assert [snapped.kept(int(c), float(r), j) for j, (c, r) in enumerate(zip(pruner.graph.channels, ratios, strict=True))] == kept.tolist()
        assert (kept <= np.maximum(plain.kept_vector(pruner.graph.channels, ratios), smallest)).all() and (kept >= lowest).all()
    assert (snapped.kept_vector(pruner.graph.channels, np.full(len(pruner.layers), 0.1)) !=
            plain.kept_vector(pruner.graph.channels, np.full(len(pruner.layers), 0.1))).any()


def test_on_an_alignment_steps_are_judged_among_counts_on_the_block(resnet20, tmp_path: Path) -> None:
    """Entries in blocks of 6 channels (a kernel padding to 6), and a calibration that found counts
    off a multiple of 4 slower in the network. 16 runs what 18 does, but 18 is off the block: among
    the counts on it, 16 costs clearly less than 20 (next block), so 16 is a step. 8 and 20 are not
    (12 and 24 cost the same). Judged among all counts first, 16 lost to 18 and was then dropped as
    off the block, so a 32-channel layer went from 24 straight down to 12."""
    from prunepilot.compression.cifar_resnet import RESIDUAL_ROOTS

    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32, PruningConstraints(exclude=RESIDUAL_ROOTS))
    table = clock_table(pruner, tmp_path / "sixes", ShapedClock(lambda c: math.ceil(c / 6) * 6 / c))
    dense_sum = table.layers_ms(np.zeros(len(pruner.layers)))
    table.restore_calibration({"layer_sums_ms": [dense_sum], "scale": 1.0, "remainder_ms": REMAINDER_MS,
                               "alignment": 4, "penalty_ms": 0.05 * dense_sum})
    lowest = pruner.constraints.lowest_vector(pruner.graph.channels)
    steps = table.channel_steps(lowest)
    wide = [s for s, c in zip(steps, pruner.graph.channels, strict=True) if c == 32]
    assert wide
    for layer_steps in wide:
        assert {12, 16, 24, 28, 32} <= set(layer_steps) and not {8, 20} & set(layer_steps), layer_steps
        assert all(c % 4 == 0 or c in (1, 2) for c in layer_steps), layer_steps


class BlockedClock(FakeClock):
    """FakeClock whose *networks* pay ``penalty`` ms for every conv with an output count off a
    multiple of 4 (a runtime that changes layout around such a layer), which entries timed alone do
    not show: only the calibration on whole networks can find it."""

    def __init__(self, penalty: float) -> None:
        super().__init__()
        self.penalty = penalty

    def network_ms(self, model: nn.Module, input_size: int, batch_size: int = 1) -> float:
        off = sum(m.out_channels % 4 != 0 for m in model.modules() if isinstance(m, nn.Conv2d))
        return super().network_ms(model, input_size, batch_size) + self.penalty * off


def test_the_calibration_finds_the_channel_alignment_networks_reward(resnet20, tmp_path: Path) -> None:
    """Block-internal layers only, so each prunable layer is one conv's output count. On a clock
    where a network pays 1 ms (about 1 % of it) per such count off a multiple of 4, the fit finds alignment 4 and
    that cost (not 2, whose multiples still pay; not 8, whose off-multiples do not), predicts every
    network to rounding error, and the measured steps keep only multiples of 4. On the same clock
    without the penalty it keeps alignment 1 and every count."""
    from prunepilot.compression.cifar_resnet import RESIDUAL_ROOTS

    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32, PruningConstraints(exclude=RESIDUAL_ROOTS))
    n = len(pruner.layers)
    clock = BlockedClock(1.0)
    table = clock_table(pruner, tmp_path / "blocked", clock)
    table.calibrate(repeats=1)
    assert table.alignment == 4 and table.penalty_ms == pytest.approx(1.0 * n, rel=1e-6)
    assert table.calibration["alignment"] == 4 and float(table.calibration["fit_errors"]["4"]) < 1e-12
    assert min(float(table.calibration["fit_errors"][q]) for q in ("1", "2", "8", "16")) > 1e-6
    rng = np.random.default_rng(3)
    kept_all = [pruner.kept_from_vector(rng.uniform(0.0, 0.8, n)) for _ in range(10)]
    assert any(table.misaligned(k) > 0.5 for k in kept_all) and any((k % 4 == 0).all() for k in [table.aligned_up(k) for k in kept_all])
    for kept in kept_all + [table.aligned_up(k) for k in kept_all]:
        assert table.predict(kept) == pytest.approx(clock.network_ms(pruner.prune_kept(kept).model, 32), rel=1e-9)
    lowest = pruner.constraints.lowest_vector(pruner.graph.channels)
    for layer_steps, c, lo in zip(table.channel_steps(lowest), pruner.graph.channels, lowest, strict=True):
        assert set(layer_steps) <= {m for m in range(int(lo), int(c) + 1) if m % 4 == 0} | {int(c)} and int(c) in layer_steps
    curve = table.layer_curve(0, [7, 8])
    assert curve[0] > curve[1]  # the outlook shows the off-block count slower than a wider one

    saved = json.loads(json.dumps(table.calibration))
    again = LatencyTable(pruner.graph, pruner.model, table.store, timer=clock.time_probe, measure=clock.measure)
    again.load()
    again.restore_calibration(saved)
    assert again.alignment == 4 and again.predict(kept_all[0]) == pytest.approx(table.predict(kept_all[0]))

    smooth = clock_table(pruner, tmp_path / "smooth", FakeClock())
    smooth.calibrate(repeats=1)
    assert smooth.alignment == 1 and smooth.penalty_ms == 0.0
    assert [len(s) for s in smooth.channel_steps(lowest)] == [int(c - lo + 1) for c, lo in zip(pruner.graph.channels, lowest, strict=True)]


class CrowdedClock(FakeClock):
    """FakeClock on which a run of more than two networks slows each network's convs by 5 % per extra
    network (caches shared by more weights), while a pair runs them at their own speed."""

    def measure(self, models: Sequence[nn.Module], input_size: int, batch_size: int = 1, threads: int | None = 2,
                **_: object) -> list[Latency]:
        crowd = 1.0 + 0.05 * max(0, len(models) - 2)
        out = []
        for m in models:
            ms = REMAINDER_MS + (self.network_ms(m, input_size, batch_size) - REMAINDER_MS) * crowd
            out.append(Latency(ms, ms, ms, batch_size, threads or 1, 1))
        return out


def test_the_calibration_times_each_network_in_a_pair_with_dense_as_the_check_does(resnet20, tmp_path: Path) -> None:
    """The measured check times a candidate in a pair with the dense model; the calibration must time
    its networks the same way, or a runtime whose speed depends on the company a network keeps
    (ONNX Runtime: 0.94-1.31 of dense in a run of ten, 1.29-1.72 in pairs) calibrates the table
    to a speed no check will see. On a clock where crowded runs are slower the fit still predicts
    every pair timing exactly."""
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32, PruningConstraints())
    clock = CrowdedClock()
    table = clock_table(pruner, tmp_path / "crowded", clock)
    assert table.calibrate(repeats=1) == pytest.approx(clock.network_ms(pruner.model, 32), rel=1e-9)
    rng = np.random.default_rng(4)
    for _ in range(5):
        kept = pruner.kept_from_vector(rng.uniform(0.0, 0.8, len(pruner.layers)))
        dense, mine = clock.measure([pruner.model, pruner.prune_kept(kept).model], 32)
        assert table.predict(kept) / table.dense_ms == pytest.approx(mine.median_ms / dense.median_ms, rel=1e-9)


class RecordingClock(FakeClock):
    """FakeClock that records the output widths of every network it measures."""

    def __init__(self) -> None:
        super().__init__()
        self.widths: set[tuple[int, ...]] = set()

    def network_ms(self, model: nn.Module, input_size: int, batch_size: int = 1) -> float:
        self.widths.add(tuple(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)))
        return super().network_ms(model, input_size, batch_size)


def test_the_calibration_also_times_its_profiles_on_every_candidate_block(resnet20, tmp_path: Path) -> None:
    """Besides networks off the blocks and one width on each block, the calibration times its
    uniform and random profiles rounded onto multiples of the largest candidate alignment (16), so
    the fit sees aligned networks at several widths: one per profile, none of them dense."""
    from prunepilot.compression.latency import ALIGNMENTS

    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32, PruningConstraints())
    clock = RecordingClock()
    clock_table(pruner, tmp_path / "rec", clock).calibrate(repeats=1, probes=(0.3, 0.5, 0.7))
    dense = tuple(m.out_channels for m in pruner.model.modules() if isinstance(m, nn.Conv2d))
    q = max(ALIGNMENTS)
    on_blocks = {w for w in clock.widths if w != dense and all(c % q == 0 or c == d < q for c, d in zip(w, dense, strict=True))}
    assert len(on_blocks) >= 5, sorted(on_blocks)  # 3 uniform + 3 random profiles, rounded (two may coincide)


def test_the_alignment_probes_sit_on_their_blocks(tmp_path: Path) -> None:
    """The networks that tell one alignment from another have every layer on a multiple of it (at
    least one block), or whole where the layer is narrower than a block; and one network has every
    layer off all of them. A 20-channel layer at 75 % (15) goes to 16 for the alignment 16, not
    back to 20, which is off the block it is meant to show."""
    from prunepilot.compression.latency import ALIGNMENTS

    torch.manual_seed(0)
    pruner = Pruner(TwoConvs(20, 12).eval(), "odd", 10, 16)  # 75 % of 20 is under one block of 16; 12 is narrower
    channels = [int(c) for c in pruner.graph.channels]
    table = clock_table(pruner, tmp_path, FakeClock())
    odd, *aligned = (list(map(int, k)) for k in table._alignment_probes())
    assert all(k % 2 == 1 for k in odd)
    for q, kept in zip(ALIGNMENTS, aligned, strict=True):
        assert all((k % q == 0 and q <= k <= c) or k == c < q for k, c in zip(kept, channels, strict=True)), (q, kept, channels)
    assert dict(zip(ALIGNMENTS, aligned, strict=True))[16][channels.index(20)] == 16


def test_round_to_measured_is_validated() -> None:
    with pytest.raises(StrategyError, match="positive integer or 'measured'"):
        PruningConstraints(round_to="fastest")  # type: ignore[arg-type]
    with pytest.raises(StrategyError, match="only used with round_to='measured'"):
        PruningConstraints(steps=((1, 2),))
    unset = PruningConstraints(round_to="measured")  # no table yet: counts are not snapped
    assert unset.kept_vector(np.array([16, 32]), np.array([0.3, 0.3])).tolist() == PruningConstraints().kept_vector(
        np.array([16, 32]), np.array([0.3, 0.3])).tolist()


def test_measured_steps_snap_down_and_below_the_smallest_step_up() -> None:
    """A count between steps goes down to the step under it; a count under every step goes up to
    the smallest (a count off every step would run off the runtime's block), never under the layer's
    lowest count; kept_vector and kept agree."""
    steps = PruningConstraints(round_to="measured", steps=((16, 32), (8, 16, 24, 32)))
    channels = np.array([32, 32])
    for ratios, kept in (([0.4, 0.4], [16, 16]), ([0.7, 0.7], [16, 8]), ([0.0, 0.2], [32, 24]), ([0.8, 0.9], [16, 8])):
        assert steps.kept_vector(channels, np.array(ratios)).tolist() == kept, ratios
        assert [steps.kept(32, r, i) for i, r in enumerate(ratios)] == kept, ratios


# ---------------------------------------------------------------------------------------------- the outlook


def test_the_outlook_says_when_pruning_cannot_make_it_faster(resnet20, tmp_path: Path) -> None:
    """A target whose layers cost a fixed 5 ms each whatever their width: nothing to gain, and a
    latency budget is refused with the sentence; on the smooth clock the outlook promises a speedup."""
    from prunepilot.compression import Budget, parse_constraint

    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    budget = Budget(constraints=[parse_constraint("latency=0.8")])
    flat = FakeClock()
    flat.time_probe = lambda module, x, warmup, repeats: 5.0  # type: ignore[method-assign]
    flat.measure = lambda models, size, batch=1, threads=None, **_: [Latency(100.0, 100.0, 100.0, batch, 1, 1) for _ in models]  # type: ignore[method-assign]
    table = clock_table(pruner, tmp_path / "flat", flat)
    table.calibrate(repeats=1)
    outlook = latency_outlook(pruner, table, budget)
    assert outlook.floor_speedup < MIN_SPEEDUP and not outlook.will_speed_up and NO_SPEEDUP in outlook.verdict
    problems = latency_problems(pruner, table, budget)
    assert len(problems) == 1 and problems[0].startswith(NO_SPEEDUP)

    good = clock_table(pruner, tmp_path / "smooth", FakeClock())
    good.calibrate(repeats=1)
    fine = latency_outlook(pruner, good, Budget(constraints=[parse_constraint("flops=0.5")]))
    assert fine.will_speed_up and NO_SPEEDUP not in fine.verdict
    assert fine.uniform_speedup is not None and fine.uniform_speedup > 1.2 and fine.stepped_speedup is not None
    assert len(fine.layers) == len(pruner.layers)
    for curve in fine.layers:  # each layer's curve: ms at its grid, rising with the channels
        assert list(curve.counts) == sorted(curve.counts) and curve.counts[-1] == max(curve.counts)
        assert all(b >= a - 1e-12 for a, b in zip(curve.ms, curve.ms[1:], strict=False))
        assert curve.ms[-1] == pytest.approx(good.dense_ms)
    assert latency_problems(pruner, good, Budget(constraints=[parse_constraint("latency=0.8")])) == []
    below = latency_problems(pruner, good, Budget(constraints=[parse_constraint("latency=0.01")]))
    assert len(below) == 1 and "below the reachable floor" in below[0]



# ---------------------------------------------------------------------------------------------- the pipeline and the service


def flat_table(pruner: Pruner, store) -> LatencyTable:  # type: ignore[no-untyped-def]
    """A target where every layer costs 5 ms whatever its width: pruning cannot make it faster."""
    clock = FakeClock()
    clock.time_probe = lambda module, x, warmup, repeats: 5.0  # type: ignore[method-assign]
    clock.measure = lambda models, size, batch=1, threads=None, **_: [Latency(100.0, 100.0, 100.0, batch, 1, 1) for _ in models]  # type: ignore[method-assign]
    table = LatencyTable(pruner.graph, pruner.model, store, 1, 2, timer=clock.time_probe, measure=clock.measure)
    table.build(warmup=1, repeats=1)
    return table


def test_prepare_sets_measured_steps_and_refuses_a_latency_budget_with_no_speedup(resnet20, tmp_path: Path) -> None:
    from prunepilot.agents.pipeline import PipelineConfig, PipelineHooks, prepare
    from prunepilot.compression import Budget, parse_constraint

    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32, PruningConstraints(round_to="measured"))
    table = clock_table(pruner, tmp_path / "stairs", ShapedClock(staircase))
    flops = PipelineConfig(agent="uniform", budget=Budget(constraints=[parse_constraint("flops=0.5")]))
    prepared = prepare(pruner, None, flops, PipelineHooks(latency_table=table))  # type: ignore[arg-type]
    assert pruner.constraints.steps == table.channel_steps(pruner.constraints.lowest_vector(pruner.graph.channels))
    assert prepared.table is None and prepared.backend == "torch"  # built for the steps; no latency to predict

    plain = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    flat = flat_table(plain, FileLatencyStore(tmp_path / "flat.json"))
    flat.calibrate(repeats=1)
    latency = PipelineConfig(agent="uniform", budget=Budget(constraints=[parse_constraint("latency=0.8")]))
    with pytest.raises(PrunePilotError, match=NO_SPEEDUP):
        prepare(plain, None, latency, PipelineHooks(latency_table=flat))  # type: ignore[arg-type]
    remote = PipelineConfig(agent="uniform", budget=latency.budget, target=LatencyTarget("onnxruntime", device="board-1"))
    with pytest.raises(PrunePilotError, match="device 'board-1'"):
        prepare(plain, None, remote, PipelineHooks(latency_store=FileLatencyStore(tmp_path / "x.json")))  # type: ignore[arg-type]


def test_a_latency_budget_the_stored_table_says_cannot_speed_up_is_refused_at_submission(api, resnet20, resnet20_weights: Path) -> None:
    """With the target's table stored (every layer at a fixed cost), the job is refused with the
    sentence; the same budget on a target without a stored table is accepted (its prepare decides)."""
    from helpers.specs import quick_spec

    from prunepilot.service.db.store import JobStore
    from prunepilot.service.latency_outlook import worker_threads
    from prunepilot.service.latency_store import SqlLatencyStore

    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    assert worker_threads(api.settings) == 2  # the fingerprint flat_table stores under
    flat_table(pruner, SqlLatencyStore(JobStore(api.settings.db_url)))
    spec = quick_spec(dataset="cifar10-jpeg", budget={"constraints": [{"resource": "latency", "ratio": 0.8}]})
    r = api.submit(spec, resnet20_weights)
    assert r.status_code == 422 and r.json()["detail"].startswith(NO_SPEEDUP), r.text
    r = api.submit({**spec, "target": {"backend": "onnxruntime"}}, resnet20_weights)
    assert r.status_code == 202, r.text


@pytest.mark.parametrize(("target", "field"), [({"backend": "tvm"}, "backend"), ({"device": "../etc"}, "device"),
                                               ({"backend": "torch", "gpu": 1}, "gpu")])
def test_a_bad_latency_target_is_refused_naming_the_field(api, resnet20_weights: Path, target: dict, field: str) -> None:
    from helpers.specs import quick_spec

    r = api.submit(quick_spec(dataset="cifar10-jpeg", target=target), resnet20_weights)
    assert r.status_code == 422 and "target" in r.text and field in r.text, r.text


def test_inspect_with_a_target_shows_its_outlook_or_says_why_not(api, resnet20) -> None:
    from prunepilot.service.db.store import JobStore
    from prunepilot.service.latency_store import SqlLatencyStore

    spec = {"arch": "resnet20", "budget": {"constraints": [{"resource": "latency", "ratio": 0.8}]}, "target": {"backend": "onnxruntime"}}
    body = api.post_files("/v1/inspect", spec).json()
    assert body["latency"] is None and "no complete latency table" in body["latency_note"]
    flat_table(Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32), SqlLatencyStore(JobStore(api.settings.db_url)))
    r = api.post_files("/v1/inspect", {**spec, "target": {"backend": "torch"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["latency"]["backend"] == "torch" and not body["latency"]["will_speed_up"]
    assert body["latency"]["verdict"].startswith(NO_SPEEDUP) and body["budget_problems"][0].startswith(NO_SPEEDUP)
    assert len(body["latency"]["layers"]) == len(body["groups"])


@pytest.mark.parametrize(("target", "constraints", "expected"), [
    ({}, {}, None),
    ({"backend": "torch"}, {}, None),
    ({"backend": "cuda"}, {}, None),
    ({"backend": "onnxruntime"}, {}, "measured"),
    ({"device": "board"}, {}, "measured"),
    ({"backend": "onnxruntime"}, {"round_to": None}, None),
    ({"device": "board"}, {"round_to": 8}, 8),
    ({"backend": "torch"}, {"round_to": "measured"}, "measured"),
])
def test_a_job_on_onnx_runtime_gets_measured_steps_unless_it_names_its_rounding(target: dict, constraints: dict, expected) -> None:
    """ONNX Runtime's latency is a staircase in the channel count (docs/benchmarks.md), so a job whose
    target runs it (a device's agent included) and that names no rounding gets measured steps; the
    stored spec carries them, so the job keeps them when the worker reads it again."""
    from prunepilot.service.schemas import ConstraintsSpec, JobCreate

    spec = {"arch": "resnet20", "budget": {"constraints": [{"resource": "latency", "ratio": 0.8}]}, "target": target,
            "constraints": constraints}
    job = JobCreate.model_validate(spec)
    assert job.constraints.round_to == expected
    stored = job.model_dump(mode="json")
    assert stored["constraints"]["round_to"] == expected and JobCreate.model_validate(stored).constraints.round_to == expected
    assert job.constraints.to_engine().round_to == expected
    given = ConstraintsSpec.model_validate(constraints)  # an instance of the caller's is left as it was
    assert JobCreate(**{**spec, "constraints": given}).constraints.round_to == expected and given.round_to == constraints.get("round_to")
