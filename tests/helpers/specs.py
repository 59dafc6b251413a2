"""The smallest job spec the API tests submit (ResNet-20, a few evaluations, no fine-tune)."""

from __future__ import annotations

from typing import Any


def quick_spec(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"arch": "resnet20", "dataset": "upload", "agent": "random",
                            "budget": {"constraints": [{"resource": "flops", "ratio": 0.5}]},
                            "search": {"max_evaluations": 3}, "fidelity": {"val_images": 100, "calib_images": 128},
                            "finetune": {"epochs": 0.0}, "measure": {"test_images": 100, "latency_batches": [1]}}
    spec.update(over)
    return spec
