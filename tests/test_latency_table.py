from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.clock import REMAINDER_MS, FakeClock, layer_ms
from helpers.nets import TwoConvs

from prunepilot.compression import PrunePilotError, Pruner, PruningConstraints, build_model
from prunepilot.compression.latency import FileLatencyStore, LatencyStore, LatencyTable, channel_grid

# Real timings are noise (a busy machine made 30 channels time faster than 12): the table's logic
# is tested on a deterministic clock with a known cost model (tests/helpers/clock.py); only
# test_the_real_clocks_build_a_usable_table runs the real one. benchmarks/latency_table.py
# scores real predictions against real measurements.


def unique(table: LatencyTable) -> set[str]:
    """Layers with the same signature share one entry."""
    return {sig for *_, sig in table.signatures()}


def fake_table(pruner: Pruner, store: LatencyStore, clock: FakeClock | None = None, **kw) -> LatencyTable:
    clock = clock or FakeClock()
    return LatencyTable(pruner.graph, pruner.model, store, timer=clock.time_probe, measure=clock.measure, **kw)


@pytest.fixture(scope="module")
def pruner20(resnet20) -> Pruner:
    return Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)


@pytest.fixture(scope="module")
def table20(pruner20: Pruner, tmp_path_factory: pytest.TempPathFactory) -> LatencyTable:
    store = FileLatencyStore(tmp_path_factory.mktemp("lut") / "lut.json")
    table = fake_table(pruner20, store, batch_size=1, threads=2)
    assert table.build(warmup=3, repeats=15) == len(unique(table))
    table.calibrate(repeats=20)
    return table


def test_grid_covers_the_range() -> None:
    assert channel_grid(16, step=4) == [1, 4, 8, 12, 16]
    big = channel_grid(1280, max_points=12)
    assert big[0] == 1 and big[-1] == 1280 and len(big) <= 13


def test_a_burst_of_load_in_one_round_is_not_recorded(pruner20: Pruner, table20: LatencyTable, tmp_path: Path) -> None:
    """A batch of entries is timed in three interleaved rounds and each entry keeps its fastest
    round, so a neighbour's burst of load over a stretch of one round leaves no trace. In the first
    batch of 32, entries 20-31 run 4x slower in round one, 12-19 in round two, 0-11 in round three."""
    slowed = set(range(20, 32)) | set(range(32 + 12, 32 + 20)) | set(range(64, 64 + 12))
    clock = FakeClock(burst=lambda call: 4.0 if call in slowed else 1.0)
    table = fake_table(pruner20, FileLatencyStore(tmp_path / "lut.json"), clock, batch_size=1, threads=2)
    table.build(warmup=1, repeats=3, rounds=3, flush_every=32)
    assert len(clock.timed) == 3 * len(unique(table))
    assert clock.timed[:32] == clock.timed[32:64] == clock.timed[64:96]  # the same 32 entries in each round
    assert table.values == table20.values  # what the undisturbed clock gave


def test_lookup_between_grid_points_follows_the_timed_function(table20: LatencyTable) -> None:
    """Grid points are the measured entries; between them the lookup interpolates bilinearly, which
    reproduces this clock's cost (bilinear in C_in and C_out) exactly; outside the grid it refuses."""
    idx, e = next((i, e) for i, e in enumerate(table20.entries) if len(e.cin_grid) > 2 and len(e.cout_grid) > 2)
    h_out, w_out = (e.h + 2 * e.padding - e.kernel) // e.stride + 1, (e.w + 2 * e.padding - e.kernel) // e.stride + 1
    off_grid = [(c_in, c_out) for c_in in range(1, e.c_in + 1) for c_out in range(1, e.c_out + 1)
                if c_in not in e.cin_grid and c_out not in e.cout_grid]
    assert len(off_grid) > 100
    for c_in, c_out in off_grid[::7] + [(e.cin_grid[1] + 0.5, e.cout_grid[-2] + 1.25)]:
        assert table20.lookup(idx, c_in, c_out) == pytest.approx(layer_ms(c_in, c_out, h_out, w_out, e.kernel), rel=1e-9)
    c_in, c_out = e.cin_grid[1], e.cout_grid[2]
    assert table20.lookup(idx, c_in, c_out) == table20.values[table20._sig(e, c_in, c_out)]
    with pytest.raises(PrunePilotError, match="outside the table"):
        table20.lookup(idx, e.c_in, e.c_out + 5)


def test_quantum_rounds_channel_counts_up_before_the_lookup(table20: LatencyTable) -> None:
    """With quantum 4, 5-8 kept channels cost what 8 do; with quantum 1 (default) they interpolate.
    Multiples of 4 (every dense count here) cost the same under both."""
    dense = table20.graph.channels
    layer = int(np.argmax(dense >= 16))
    k7, k8, k5 = dense.copy(), dense.copy(), dense.copy()
    k7[layer], k8[layer], k5[layer] = 7, 8, 5
    assert table20.quantum == 1
    assert table20.predict(k5) < table20.predict(k7) < table20.predict(k8)
    fitted = copy.deepcopy(table20.calibration)
    unrounded = [table20.predict(k) for k in (dense, k8)]
    table20.quantum = 4
    try:
        assert table20.predict(k7) == table20.predict(k8) == table20.predict(k5)
        assert [table20.predict(k) for k in (dense, k8)] == unrounded
        # the fit follows the predictor: the calibration's networks keep counts between multiples of 4
        table20.refit()
        assert table20.calibration["layer_sums_ms"] != fitted["layer_sums_ms"]
    finally:
        table20.quantum = 1
        table20.refit()
    assert table20.calibration == fitted


def test_predictions_follow_the_clock_for_pruned_networks(pruner20: Pruner, table20: LatencyTable) -> None:
    """Calibrated on a clock whose cost model is known, the table predicts what that clock measures
    for the pruned network itself, to rounding error: dense, uniform and random profiles, with channel
    counts mostly between grid points. The fit recovers the model: entries at scale 1 plus the fixed
    remainder (stem input, pooling, adds, classifier) that pruning leaves alone."""
    clock = FakeClock()
    assert table20.scale == pytest.approx(1.0, rel=1e-9) and table20.remainder_ms == pytest.approx(REMAINDER_MS, rel=1e-6)
    assert table20.dense_ms == pytest.approx(clock.network_ms(pruner20.model, 32), rel=1e-9)
    rng = np.random.default_rng(0)
    n = len(pruner20.layers)
    vectors = [np.zeros(n), np.full(n, 0.5)] + [rng.uniform(0.0, 0.8, n) for _ in range(5)]
    kept_all = [pruner20.kept_from_vector(v) for v in vectors]
    assert sum(int(k) % 4 != 0 for kept in kept_all[2:] for k in kept) > 10  # off the channel grid
    for kept in kept_all:
        measured = clock.network_ms(pruner20.prune_kept(kept).model, 32)
        assert table20.predict(kept) == pytest.approx(measured, rel=1e-9)
    assert clock.network_ms(pruner20.prune_kept(kept_all[1]).model, 32) < 0.5 * table20.dense_ms  # the clock sees pruning


def test_a_built_table_is_reused(pruner20: Pruner, table20: LatencyTable) -> None:
    clock = FakeClock()
    again = fake_table(pruner20, table20.store, clock, batch_size=1, threads=2)
    assert again.missing() == []
    assert again.build() == 0 and clock.timed == []  # nothing timed again
    assert again.values == table20.values
    # another architecture with the same layer signatures needs no new measurement either
    r32 = build_model("resnet32")
    other = LatencyTable(Pruner(r32, "resnet32", 10, 32).graph, r32, table20.store, batch_size=1, threads=2)
    assert other.missing() == []
    # a different batch size is a different table
    b8 = LatencyTable(table20.graph, table20.model, table20.store, batch_size=8, threads=2)
    assert len(b8.missing()) == len(unique(table20))


def test_incomplete_table_refuses_to_predict(resnet20, tmp_path: Path) -> None:
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    table = LatencyTable(pruner.graph, pruner.model, FileLatencyStore(tmp_path / "empty.json"))
    with pytest.raises(PrunePilotError, match="missing"):
        table.load()


def test_interrupted_build_resumes(pruner20: Pruner, tmp_path: Path) -> None:
    store = FileLatencyStore(tmp_path / "lut.json")
    interrupted = FakeClock()
    table = fake_table(pruner20, store, interrupted)
    calls = []
    with pytest.raises(KeyboardInterrupt):
        def progress(done: int, total: int) -> None:
            calls.append(done)
            if done == 48:
                raise KeyboardInterrupt  # after the third batch of 16 was saved
        table.build(warmup=1, repeats=3, progress=progress, flush_every=16)
    total = len(unique(table))
    assert calls == [16, 32, 48]
    assert len(table.missing()) == total - 48  # every batch was saved before the interruption
    resumed = FakeClock()
    assert fake_table(pruner20, store, resumed).build(warmup=1, repeats=3) == total - 48
    assert len(set(interrupted.timed)) == 48 and len(set(resumed.timed)) == total - 48  # three rounds each
    assert not set(interrupted.timed) & set(resumed.timed)  # nothing saved was timed again


def test_sql_store_shares_entries(db_url: str, resnet20) -> None:
    from prunepilot.service.db.migrate import upgrade
    from prunepilot.service.db.store import JobStore
    from prunepilot.service.latency_store import SqlLatencyStore

    upgrade(db_url)
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    first = fake_table(pruner, SqlLatencyStore(JobStore(db_url)))
    n = first.build(warmup=1, repeats=3)
    assert n == len(unique(first))
    second = fake_table(pruner, SqlLatencyStore(JobStore(db_url)))
    assert second.missing() == []
    second.load()
    assert second.values == first.values
    second.store.put(second.device, {next(iter(first.values)): (123.0, 1)})  # a duplicate is ignored, not overwritten
    assert SqlLatencyStore(JobStore(db_url)).get(first.device)[next(iter(first.values))] == first.values[next(iter(first.values))]


def test_saved_calibration_restores_only_onto_the_same_entries(table20: LatencyTable, tmp_path: Path) -> None:
    """Runs sharing one latency model reuse its calibration; onto a table measured elsewhere
    (here: every entry twice as fast) the old fit would halve every prediction, so it is refused."""
    saved = json.loads(json.dumps(table20.calibration))
    kept = table20.graph.channels // 2
    same = LatencyTable(table20.graph, table20.model, table20.store, batch_size=1, threads=2)
    same.load()
    same.restore_calibration(saved)
    assert same.predict(kept) == pytest.approx(table20.predict(kept))
    assert same.dense_ms == pytest.approx(table20.dense_ms)

    blob = json.loads(Path(table20.store.path).read_text())
    faster = {dev: {sig: [v[0] / 2, v[1]] for sig, v in entries.items()} for dev, entries in blob.items()}
    (tmp_path / "other.json").write_text(json.dumps(faster))
    other = LatencyTable(table20.graph, table20.model, FileLatencyStore(tmp_path / "other.json"), batch_size=1, threads=2)
    other.load()
    with pytest.raises(PrunePilotError, match="other table entries"):
        other.restore_calibration(saved)
    with pytest.raises(PrunePilotError, match="layer sums"):
        other.restore_calibration({"scale": 1.0, "remainder_ms": 0.0})


class CountingClock(FakeClock):
    """The fake clock, counting whole-network timings (a calibration makes many)."""

    networks = 0

    def measure(self, models, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        self.networks += len(models)
        return super().measure(models, *args, **kwargs)


@pytest.mark.parametrize("store_kind", ["file", "sql"])
def test_a_calibration_is_stored_per_model_and_reused(store_kind: str, tmp_path: Path) -> None:
    """The first table of a model on a device calibrates and stores the fit; a later table of that
    model there (another job) restores it without timing a network; another model (the same convs,
    another head), other prunable layers, a rebuilt table (other entries) or a refresh calibrate
    again; a preview (keep=False) leaves the stored fit alone."""
    from prunepilot.service.db.migrate import upgrade
    from prunepilot.service.db.store import JobStore
    from prunepilot.service.latency_store import SqlLatencyStore

    if store_kind == "sql":
        upgrade(url := f"sqlite:///{tmp_path / 'db.sqlite'}")
        store: LatencyStore = SqlLatencyStore(JobStore(url))
    else:
        store = FileLatencyStore(tmp_path / "lut.json")
    torch.manual_seed(0)
    net = TwoConvs(16, 32).eval()

    def table_of(pruner: Pruner, clock: CountingClock, into: LatencyStore = store) -> LatencyTable:
        table = fake_table(pruner, into, clock, batch_size=1, threads=2)
        table.build(warmup=1, repeats=3)
        table.load()
        return table

    def calibrated(pruner: Pruner, into: LatencyStore = store, **kw) -> tuple[LatencyTable, int]:  # type: ignore[no-untyped-def]
        table = table_of(pruner, clock := CountingClock(), into)
        table.calibrated(repeats=3, **kw)
        return table, clock.networks

    first, timed = calibrated(Pruner(net, "two", 10, 8))
    assert first.calibration_source == "measured" and timed > 0
    second, timed = calibrated(Pruner(copy.deepcopy(net), "two", 10, 8))
    assert second.calibration_source == "stored" and timed == 0 and second.summary()["calibration"] == "stored"
    kept = first.graph.channels * 3 // 4
    assert second.dense_ms == pytest.approx(first.dense_ms) and second.predict(kept) == pytest.approx(first.predict(kept))
    assert calibrated(Pruner(net, "two", 10, 8), refresh=True)[0].calibration_source == "measured"

    other_head, timed = calibrated(Pruner(TwoConvs(16, 32, classes=7).eval(), "two", 7, 8))
    assert other_head.calibration_source == "measured" and timed > 0 and other_head.model_key() != first.model_key()
    fewer = calibrated(Pruner(net, "two", 10, 8, PruningConstraints(exclude=("a.0",))))[0]
    assert fewer.calibration_source == "measured" and fewer.model_key() != first.model_key()

    preview = calibrated(Pruner(TwoConvs(24, 32).eval(), "two", 10, 8), keep=False)[0]
    assert preview.calibration_source == "measured" and store.get_calibration(preview.device, preview.model_key()) is None

    if store_kind == "file":  # a table measured elsewhere (every entry twice as fast) does not take the old fit
        blob = json.loads((tmp_path / "lut.json").read_text())
        (tmp_path / "fast.json").write_text(json.dumps({d: {s: [v[0] / 2, v[1]] for s, v in e.items()} for d, e in blob.items()}))
        (tmp_path / "fast.calibrations.json").write_text((tmp_path / "lut.calibrations.json").read_text())
        fast = FileLatencyStore(tmp_path / "fast.json")
        assert fast.get_calibration(first.device, first.model_key()) is not None
        assert calibrated(Pruner(net, "two", 10, 8), into=fast)[0].calibration_source == "measured"


def test_the_real_clocks_build_a_usable_table(pruner20: Pruner, tmp_path: Path) -> None:
    """The default clocks, briefly (a coarse grid, few repeats): only what noise cannot change is
    asserted, that every entry and the fit are positive, finite times and the table predicts. One
    thread: two threads on a loaded two-core machine wait on each other (a ResNet-20 forward that
    takes 3 ms took 940 ms here while two other test runs were going)."""
    table = LatencyTable(pruner20.graph, pruner20.model, FileLatencyStore(tmp_path / "lut.json"), max_points=3, threads=1)
    assert table.timer is None and table.measure is None
    assert table.build(warmup=1, repeats=3) == len(unique(table)) > 0
    assert all(0 < ms < 1e3 for ms in table.values.values())
    assert 0 < table.calibrate(repeats=3) < 1e4
    assert np.isfinite(table.predict(pruner20.kept_from_vector(np.full(len(pruner20.layers), 0.5))))
