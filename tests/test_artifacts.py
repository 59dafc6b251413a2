from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from prunepilot.compression import Pruner, WeightsError, artifacts, export_format, load_artifact, save_artifact
from prunepilot.compression.artifacts import FILES, REPORT_FILE, SPEC_FILE, WEIGHTS_FILE
from prunepilot.compression.strategy import from_vector


@pytest.fixture(scope="module")
def artifact(resnet20, tmp_path_factory: pytest.TempPathFactory):
    pruner = Pruner(resnet20, "resnet20", 10, 32)
    pruned = pruner.prune(from_vector(np.linspace(0.1, 0.7, len(pruner.layers)), pruner.layer_names))
    path = save_artifact(pruned.model, pruned.spec, tmp_path_factory.mktemp("art"), {"note": "test"})
    return path, pruned.model


def test_state_dict_artifact_round_trip(artifact) -> None:
    path, model = artifact
    again = load_artifact(path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again(x), model(x))
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "report.json", "spec.json"]


def test_exported_program_and_onnx(artifact) -> None:
    path, model = artifact
    pt2 = export_format(path, "pt2")
    program = torch.export.load(str(pt2))
    x = torch.randn(5, 3, 32, 32)  # a batch size other than the one traced: the batch dimension is dynamic
    assert torch.allclose(program.module()(x), model(x), atol=1e-5)
    onnx_path = export_format(path, "onnx")
    onnx.checker.check_model(str(onnx_path))
    assert onnx.load(str(onnx_path)).graph.input[0].name == "input"


def test_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not a prunepilot artifact"):
        load_artifact(tmp_path)


@pytest.fixture()
def fresh_artifact(artifact, tmp_path: Path):
    """The module's artifact with its source files only (nothing exported yet), in its own directory."""
    src, model = artifact
    path = tmp_path / "fresh"
    path.mkdir()
    for name in (WEIGHTS_FILE, SPEC_FILE, REPORT_FILE):
        shutil.copy(src / name, path / name)
    return path, model


def test_onnx_file_is_self_contained(fresh_artifact, tmp_path: Path) -> None:
    """The downloaded .onnx must load on a client, away from the server's directory: weights embedded."""
    path, model = fresh_artifact
    data = export_format(path, "onnx").read_bytes()
    client = tmp_path / "client"
    client.mkdir()
    (client / "model.onnx").write_bytes(data)
    assert not [t.name for t in onnx.load(str(client / "model.onnx")).graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    session = ort.InferenceSession(str(client / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)  # not the traced batch size
    got = session.run(["logits"], {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert sorted(p.name for p in path.iterdir()) == sorted([FILES["onnx"], WEIGHTS_FILE, SPEC_FILE, REPORT_FILE])


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_concurrent_first_exports_run_once(fresh_artifact, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent first downloads: one export, the others wait for it and get the same valid file."""
    path, model = fresh_artifact
    calls: list[int] = []
    inner = artifacts._export_to

    def slow_export(*args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        calls.append(threading.get_ident())
        time.sleep(0.5)  # widens the race window: every thread is past the "already exported?" check
        inner(*args, **kwargs)

    monkeypatch.setattr(artifacts, "_export_to", slow_export)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: export_format(path, fmt), range(4)))
    assert len(calls) == 1
    assert set(results) == {path / FILES[fmt]}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x).numpy()
    if fmt == "pt2":
        got = torch.export.load(str(results[0])).module()(x).detach().numpy()
    else:
        got = ort.InferenceSession(str(results[0]), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert sorted(p.name for p in path.iterdir()) == sorted([FILES[fmt], WEIGHTS_FILE, SPEC_FILE, REPORT_FILE])


def test_onnx_left_with_external_data_by_older_versions_is_exported_again(fresh_artifact) -> None:
    path, model = fresh_artifact
    target = export_format(path, "onnx")
    # what earlier versions left: weights in a .data file named after the temporary file
    onnx.save_model(onnx.load(str(target)), str(target), save_as_external_data=True,
                    location=target.name + ".tmp4242.data", size_threshold=0)
    again = export_format(path, "onnx")
    assert sorted(p.name for p in path.iterdir()) == sorted([FILES["onnx"], WEIGHTS_FILE, SPEC_FILE, REPORT_FILE])
    x = torch.randn(2, 3, 32, 32)
    got = ort.InferenceSession(again.read_bytes(), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_concurrent_exports_of_different_artifacts(artifact, tmp_path: Path) -> None:
    """torch.export's tracing state is process-wide: two artifacts traced at once used to break each other."""
    src, _ = artifact
    dirs = [tmp_path / f"a{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
        for name in (WEIGHTS_FILE, SPEC_FILE, REPORT_FILE):
            shutil.copy(src / name, d / name)
    with ThreadPoolExecutor(len(dirs)) as pool:
        results = list(pool.map(lambda d: export_format(d, "pt2"), dirs))
    assert results == [d / FILES["pt2"] for d in dirs]
