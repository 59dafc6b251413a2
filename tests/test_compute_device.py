"""The compute device: names resolve or fail in one line, and every model run takes the device it is
given (model and data moved there), on a CPU-only machine.

A CPU-only machine has one real device, so the plumbing is proven with PyTorch's ``meta`` device
(shapes without data): the device resolver is patched to hand it out, and a spy network records the
device of the first tensors it sees, then stops the run. A path that forgot to move the model or
its data shows ``cpu`` there."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from prunepilot.compression import (
    DataSplits,
    Evaluator,
    Fidelity,
    FinetuneConfig,
    ImageSet,
    Pruner,
    finalize,
    finetune,
)
from prunepilot.compression.compute_device import DeviceError, resolve_device
from prunepilot.compression.data import Normalizer

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the refusal on a machine without CUDA")


class _Seen(Exception):
    """The spy stops a run at its first forward pass."""


class Spy(nn.Module):
    """A small prunable CNN that, once armed, records (input device, weight device, dtype) of its first forward."""

    armed = False
    seen: list[tuple[str, str, torch.dtype]] = []

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if Spy.armed:
            if not isinstance(x, torch.Tensor):  # torch.fx tracing it to fold BatchNorm: refuse, so the spy itself runs
                raise TypeError("the spy is not traceable")
            Spy.seen.append((x.device.type, self.conv1.weight.device.type, x.dtype))
            raise _Seen
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _images(n: int, seed: int) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(n) % 10,
                    [str(i) for i in range(10)])


@pytest.fixture()
def tiny() -> tuple[Pruner, DataSplits]:
    Spy.armed, Spy.seen = False, []
    pruner = Pruner(Spy().eval(), "module:Spy", 10, 16)
    pruner.scores  # noqa: B018 - traced once on the CPU (the pruner's own model), before the spy is armed
    return pruner, DataSplits(_images(120, 0), _images(40, 1), _images(40, 2))


@pytest.fixture()
def meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every device resolver of the engine hands out the meta device; the spy is armed."""
    meta_device = torch.device("meta")
    for module in ("compression.evaluate", "compression.finetuning", "compression.finalizing", "agents.netadapt"):
        monkeypatch.setattr(importlib.import_module(f"prunepilot.{module}"), "resolve_device", lambda _=None: meta_device)
    # the size model serializes the dense model's weights, which meta tensors do not have
    monkeypatch.setattr("prunepilot.compression.evaluate.SizeModel.of", classmethod(lambda cls, model, params: cls(1, 1)))
    Spy.armed = True


def test_device_names_resolve_and_a_missing_gpu_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(DeviceError, match="CUDA is not available in this process.*use device 'cpu' or 'auto'"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device 'tpu': use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"sees 2 GPU\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


@needs_no_cuda
def test_every_entry_point_refuses_cuda_without_cuda_before_any_work(tiny) -> None:
    pruner, splits = tiny
    model = pruner.prune({}).model
    norm = Normalizer(splits.mean, splits.std)
    for run in (lambda: Evaluator(pruner, splits, device="cuda"),
                lambda: finetune(model, splits.train, norm, FinetuneConfig(steps=1), device="cuda"),
                lambda: finalize(pruner, splits, {}, FinetuneConfig(), device="cuda")):
        with pytest.raises(DeviceError, match="CUDA is not available"):
            run()


@pytest.mark.parametrize("method", ["none", "adaptive-bn", "reconstruct", "short-finetune"])
def test_the_evaluator_runs_the_candidate_and_its_images_on_its_device(tiny, meta, method: str) -> None:
    pruner, splits = tiny
    fidelity = Fidelity(method=method, val_images=20, calib_images=16, finetune_steps=2, batch_size=8)
    ev = Evaluator(pruner, splits, fidelity, device="cuda")  # resolved to meta by the fixture
    with pytest.raises(_Seen):
        ev.evaluate(dict.fromkeys(pruner.layer_names, 0.25))
    assert Spy.seen == [("meta", "meta", torch.float32)]


def test_finetune_and_finalize_run_on_their_device(tiny, meta) -> None:
    pruner, splits = tiny
    model = pruner.prune({}).model
    with pytest.raises(_Seen):
        finetune(model, splits.train, Normalizer(splits.mean, splits.std), FinetuneConfig(steps=2, batch_size=8), device="cuda")
    with pytest.raises(_Seen):
        finalize(pruner, splits, dict.fromkeys(pruner.layer_names, 0.25), FinetuneConfig(steps=2, batch_size=8), device="cuda")
    assert Spy.seen == [("meta", "meta", torch.float32)] * 2


def test_netadapt_proposals_run_on_the_jobs_device(tiny, meta, monkeypatch: pytest.MonkeyPatch) -> None:
    """A proposal (possibly a Ray task elsewhere) rebuilds its network and moves it and the shipped
    (CPU) data to the device it was given; its first model run is the BN re-estimation."""
    from prunepilot.agents import netadapt
    from prunepilot.compression import build_model
    from prunepilot.compression.evaluate import EvalData

    def spy_recalibrate(model: nn.Module, images: torch.Tensor, *args: object) -> None:
        Spy.seen.append((images.device.type, next(model.parameters()).device.type, images.dtype))
        raise _Seen

    monkeypatch.setattr(netadapt, "recalibrate_batchnorm", spy_recalibrate)
    _, splits = tiny
    dense = build_model("resnet20")
    pruner = Pruner(dense, "resnet20", 10, 16)
    shared = netadapt._Shared(pruner.spec_of(dense).to_dict(), dense.state_dict(), [int(c) for c in pruner.graph.channels],
                              EvalData.from_splits(splits, 20, 16), steps=1, lr=0.01, batch_size=8, seed=0, device="cuda")
    kept = [int(c) for c in pruner.graph.channels]
    kept[1] -= 4
    with pytest.raises(_Seen):
        netadapt.run_proposal(shared, netadapt._Proposal((1,), kept))
    assert Spy.seen == [("meta", "meta", torch.float32)]


def test_a_cpu_job_runs_in_float32_without_autocast_and_ends_on_the_cpu(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole pipeline with an explicit device='cpu': every forward pass sees CPU float32 tensors,
    autocast is never entered (the CPU figures stay those recorded), the report names the device
    and the final model is on the CPU."""
    from prunepilot.agents import SearchLimits
    from prunepilot.agents.pipeline import FinalConfig, PipelineConfig, PipelineHooks, run_pipeline
    from prunepilot.compression import Budget, parse_constraint

    def no_autocast(*args: object, **kwargs: object) -> None:
        raise AssertionError("autocast entered on the CPU")

    monkeypatch.setattr(torch, "autocast", no_autocast)
    pruner, splits = tiny
    seen: set[tuple[str, torch.dtype]] = set()
    original = Spy.forward

    def recording(self: Spy, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            seen.add((x.device.type, x.dtype))
        return original(self, x)

    monkeypatch.setattr(Spy, "forward", recording)
    config = PipelineConfig(agent="random", budget=Budget(constraints=[parse_constraint("flops=0.6")]),
                            search=SearchLimits(max_evaluations=2), fidelity=Fidelity(val_images=20, calib_images=16, batch_size=8),
                            final=FinalConfig(finetune=FinetuneConfig(steps=3, batch_size=8), test_images=20, latency_batches=(1,)))
    result = run_pipeline(pruner, splits, config, PipelineHooks(device="cpu", threads=1), pruner.arch)
    assert seen == {("cpu", torch.float32)}
    assert result.report["compute_device"] == "cpu"
    assert {p.device.type for p in result.final.pruned.model.parameters()} == {"cpu"}


def test_compress_takes_its_device_or_the_setting(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    from prunepilot.service import compress as api
    from prunepilot.service.settings import get_settings

    class Handed(Exception):
        pass

    def capture(pruner: Pruner, splits: DataSplits, config: object, hooks: object, arch: str) -> None:
        raise Handed(hooks.device)  # type: ignore[attr-defined]

    monkeypatch.setattr(api, "run_pipeline", capture)
    model, data = Spy().eval(), (_images(60, 3).images, _images(60, 3).labels)
    monkeypatch.setenv("PRUNEPILOT_DEVICE", "cpu")
    get_settings.cache_clear()
    try:
        with pytest.raises(Handed) as handed:
            api.compress(model, torch.zeros(1, 3, 16, 16), "flops=0.6", data, evaluations=1)
        assert handed.value.args[0] == torch.device("cpu")
        if not torch.cuda.is_available():
            with pytest.raises(DeviceError, match="CUDA is not available"):
                api.compress(model, torch.zeros(1, 3, 16, 16), "flops=0.6", data, evaluations=1, device="cuda")
    finally:
        get_settings.cache_clear()


def test_job_gpus_follow_the_setting_and_the_cluster(tmp_path: Path) -> None:
    from prunepilot.service.dispatcher import job_gpus
    from prunepilot.service.settings import Settings

    auto = Settings(data_dir=tmp_path)
    assert job_gpus(auto, 0.0) == 0.0  # a CPU-only cluster: jobs reserve no GPU
    assert job_gpus(auto, 4.0) == 1.0  # one job per GPU
    assert job_gpus(Settings(data_dir=tmp_path, device="cpu"), 4.0) == 0.0
    assert job_gpus(Settings(data_dir=tmp_path, gpus_per_job=0.5), 4.0) == 0.5
    assert Settings(data_dir=tmp_path, gpus_per_job="auto").gpus_per_job is None
    with pytest.raises(ValueError, match="device"):
        Settings(data_dir=tmp_path, device="tpu")


@needs_no_cuda
def test_the_cli_refuses_a_device_it_cannot_use_in_one_line(capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from test_cli import run_cli_here

    env = {"PRUNEPILOT_DATA_DIR": str(tmp_path)}
    r = run_cli_here(capsys, monkeypatch, "prune", "--model", "resnet20", "--out", str(tmp_path / "o"), "--uniform", "0.5",
                     "--device", "cuda", env_extra=env)
    assert r.returncode == 2 and "CUDA is not available" in r.stderr and "Traceback" not in r.stderr + r.stdout, r
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli_here(capsys, monkeypatch, "prune", "--model", "resnet20", "--out", str(tmp_path / "o"), "--uniform", "0.5",
                     env_extra={**env, "PRUNEPILOT_DEVICE": "tpu"})
    assert r.returncode == 2 and "PRUNEPILOT_DEVICE" in r.stderr and "Traceback" not in r.stderr + r.stdout, r


def test_augmentation_is_the_same_on_every_device_for_a_seed() -> None:
    """The crops and flips come from the CPU generator whatever the images' device: the meta device
    cannot hold values, so this checks the values against a reference gather on the CPU."""
    from prunepilot.compression.data import augment

    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = augment(images, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the same draws, in the same order: dy, dx, flip
    dy, dx = torch.randint(0, 9, (6,), generator=g), torch.randint(0, 9, (6,), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for b in range(6):
        crop = padded[b, :, dy[b]: dy[b] + 8, dx[b]: dx[b] + 8]
        assert torch.equal(out[b], crop.flip(-1) if flip[b] else crop)
    assert augment(images.to("meta"), torch.Generator().manual_seed(7)).device.type == "meta"
    assert np.array_equal(out.shape, images.shape)
