"""prunepilot.compress: the job pipeline on the caller's own nn.Module, in process, no server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import prunepilot
from prunepilot.compression import PrunePilotError, count_macs


class SmallNet(nn.Module):
    """A user's model the zoo does not know: a residual add and a concatenation."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 12, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(28, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.a(x)
        return self.head(torch.cat([x, self.b(x)], dim=1))


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(n) % 4


def test_compress_meets_the_budget_on_the_callers_metric_and_stores_the_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallNet()
    example = torch.randn(1, 3, 16, 16)
    calls: list[int] = []

    def metric(candidate: nn.Module) -> float:
        calls.append(1)
        assert not candidate.training
        return float(-count_macs(candidate, 16))  # fewer MACs scores higher: a metric accuracy is not

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    out = prunepilot.compress(model, example, "flops=0.5", _data(96, 0), _data(24, 1), agent="random", evaluations=4,
                              finetune=0, evaluate=metric, storage=url, name="my run")
    dense_macs = count_macs(model, 16)
    assert count_macs(out.model, 16) <= 0.5 * dense_macs * 1.001
    assert len(calls) >= 4 and len(out.trials) == 4
    assert out.report["search"]["best_search_accuracy"] == max(t.accuracy for t in out.trials if t.feasible)
    assert set(out.strategy) and all(0 <= r < 1 for r in out.strategy.values())
    with torch.no_grad():
        assert out.model(example).shape == (1, 4)

    from prunepilot.service.db import repo
    from prunepilot.service.db.engine import read_scope

    with read_scope(url) as s:
        job = repo.get_job(s, job_id=out.job_id)
        assert job is not None and job.status == "succeeded" and job.name == "my run" and job.evaluations == 4
        assert repo.list_trials(s, job_id=out.job_id)[1] == 4


def test_compress_refuses_what_it_cannot_use() -> None:
    model = SmallNet()
    with pytest.raises(PrunePilotError, match=r"example_input must be an \(N, 3, H, H\) image batch, got \(1, 3, 16, 8\)"):
        prunepilot.compress(model, torch.randn(1, 3, 16, 8), "flops=0.5", _data(40, 0))
    with pytest.raises(PrunePilotError, match="the data has 3 classes but the model outputs 4"):
        images, labels = _data(40, 0)
        prunepilot.compress(model, torch.randn(1, 3, 16, 16), "flops=0.5", (images, labels % 3))
    with pytest.raises(PrunePilotError, match="images are 16x16 but example_input is 32x32"):
        prunepilot.compress(model, torch.randn(1, 3, 32, 32), "flops=0.5", _data(40, 0))


def test_the_documented_example_runs(mini_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """docs/examples/compress_example.py as a user runs it (shortened; in this process, as its own __main__)."""
    import runpy
    import sys

    import onnxruntime as ort

    script = Path(__file__).resolve().parents[1] / "docs" / "examples" / "compress_example.py"
    monkeypatch.setenv("PRUNEPILOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(sys, "argv", [str(script), "--data", str(mini_zip), "--out", str(tmp_path), "--agent", "random",
                                      "--evaluations", "2", "--finetune", "0"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "MACs kept" in out and "pruned model:" in out
    session = ort.InferenceSession(str(tmp_path / "pruned.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: torch.randn(1, 3, 32, 32).numpy()})[0].shape == (1, 10)
