"""Prune your own PyTorch model in Python, without a server (see docs/python_api.md).

    python docs/examples/compress_example.py --data ../shared/data/cifar10-jpeg.zip --out runs/example

The model here is a small CNN with random weights standing in for yours; the data set is any
ImageFolder directory or zip (train/<class>/..., optionally val/ and test/).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import prunepilot
from prunepilot.compression.onnx_io import export_onnx


class MyNet(nn.Module):
    """Your network: any nn.Module whose channels the dependency graph can follow."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(3, 32), block(32, 32), block(32, 64, 2), block(64, 64), block(64, 128, 2))
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="ImageFolder directory or zip")
    parser.add_argument("--out", type=Path, required=True, help="where the pruned ONNX model goes")
    parser.add_argument("--budget", default="flops=0.5")
    parser.add_argument("--agent", default="optuna-tpe")
    parser.add_argument("--evaluations", type=int, default=40)
    parser.add_argument("--finetune", type=float, default=1.0, help="fine-tune epochs for the chosen network")
    args = parser.parse_args()

    model = MyNet().eval()  # load your trained weights here
    result = prunepilot.compress(model, torch.randn(1, 3, 32, 32), args.budget, args.data, agent=args.agent,
                                 evaluations=args.evaluations, finetune=args.finetune)
    figures = result.report["figures"]
    print(f"MACs kept {result.report['macs_ratio']:.1%}; test accuracy {figures['dense']['accuracy']:.2%} dense -> "
          f"{figures['pruned']['accuracy']:.2%} pruned")
    print("per-layer ratios:", {name: round(ratio, 2) for name, ratio in result.strategy.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_file = export_onnx(result.model, args.out / "pruned.onnx", input_size=32)  # checked in ONNX Runtime
    print(f"pruned model: {onnx_file}")


if __name__ == "__main__":
    main()
