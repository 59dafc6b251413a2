from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from prunepilot.compression import PrunePilotError, Pruner, build_model
from prunepilot.compression.latency import FileLatencyStore, LatencyTable, channel_grid


def unique(table: LatencyTable) -> set[str]:
    """Layers with the same signature share one entry."""
    return {sig for *_, sig in table.signatures()}


@pytest.fixture(scope="module")
def table20(resnet20, tmp_path_factory: pytest.TempPathFactory) -> LatencyTable:
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    store = FileLatencyStore(tmp_path_factory.mktemp("lut") / "lut.json")
    table = LatencyTable(pruner.graph, pruner.model, store, batch_size=1, threads=2)
    assert table.build(warmup=3, repeats=15) == len(unique(table))
    table.calibrate(repeats=20)
    return table


def test_grid_covers_the_range() -> None:
    assert channel_grid(16, step=4) == [1, 4, 8, 12, 16]
    big = channel_grid(1280, max_points=12)
    assert big[0] == 1 and big[-1] == 1280 and len(big) <= 13


def test_entries_are_monotone_enough(table20: LatencyTable) -> None:
    """More channels must not be much faster: a table that says so would steer the search wrong."""
    for cins, couts, grid in table20._grids:
        for i in range(len(cins)):
            for j in range(len(couts)):
                for i2 in range(i, len(cins)):
                    for j2 in range(j, len(couts)):
                        # twice the work or more may not run 40 % faster (medians of repeats absorb noise)
                        if cins[i2] * couts[j2] >= 2 * cins[i] * couts[j]:
                            assert grid[i2, j2] >= 0.6 * grid[i, j], (cins[i], couts[j], cins[i2], couts[j2])


def test_lookup_interpolates_and_fails_clearly_outside(table20: LatencyTable) -> None:
    idx = next(i for i, e in enumerate(table20.entries) if len(e.cout_grid) > 1)
    e = table20.entries[idx]
    lo, hi = e.cout_grid[1], e.cout_grid[2]
    mid = (lo + hi) / 2
    a, b, m = table20.lookup(idx, e.c_in, lo), table20.lookup(idx, e.c_in, hi), table20.lookup(idx, e.c_in, mid)
    assert min(a, b) - 1e-9 <= m <= max(a, b) + 1e-9
    assert m == pytest.approx((a + b) / 2)
    with pytest.raises(PrunePilotError, match="outside the table"):
        table20.lookup(idx, e.c_in, e.c_out + 5)


def test_quantum_rounds_channel_counts_up_before_the_lookup(table20: LatencyTable) -> None:
    """With quantum 4, 5-8 kept channels cost what 8 do; with quantum 1 (default) they interpolate."""
    dense = table20.graph.channels
    layer = int(np.argmax(dense >= 16))
    k7, k8, k5 = dense.copy(), dense.copy(), dense.copy()
    k7[layer], k8[layer], k5[layer] = 7, 8, 5
    assert table20.quantum == 1
    assert table20.predict(k7) != table20.predict(k8)
    table20.quantum = 4
    try:
        assert table20.predict(k7) == table20.predict(k8) == table20.predict(k5)
        assert table20.predict(dense) == pytest.approx(table20.dense_ms)  # multiples of 4 stay as they are
        table20.refit()  # the fit follows the predictor
        assert table20.predict(dense) == pytest.approx(table20.dense_ms)
    finally:
        table20.quantum = 1
        table20.refit()


def test_prediction_of_dense_is_the_measured_dense(table20: LatencyTable) -> None:
    dense = table20.graph.channels
    assert table20.predict(dense) == pytest.approx(table20.dense_ms)
    half = np.maximum(1, dense // 2)
    assert table20.predict(half) < table20.dense_ms


def test_a_built_table_is_reused(table20: LatencyTable) -> None:
    again = LatencyTable(table20.graph, table20.model, table20.store, batch_size=1, threads=2)
    assert again.missing() == []
    assert again.build() == 0
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


def test_interrupted_build_resumes(resnet20, tmp_path: Path) -> None:
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    store = FileLatencyStore(tmp_path / "lut.json")
    table = LatencyTable(pruner.graph, pruner.model, store)
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
    assert table.build(warmup=1, repeats=3) == total - 48


def test_sql_store_shares_entries(db_url: str, resnet20) -> None:
    from prunepilot.service.db.migrate import upgrade
    from prunepilot.service.latency_store import SqlLatencyStore

    upgrade(db_url)
    pruner = Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32)
    first = LatencyTable(pruner.graph, pruner.model, SqlLatencyStore(db_url))
    n = first.build(warmup=1, repeats=3)
    assert n == len(unique(first))
    second = LatencyTable(pruner.graph, pruner.model, SqlLatencyStore(db_url))
    assert second.missing() == []
    second.store.put(second.device, {next(iter(first.values)): (123.0, 1)})  # a duplicate is ignored, not overwritten
    assert SqlLatencyStore(db_url).get(first.device)[next(iter(first.values))] == first.values[next(iter(first.values))]


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
