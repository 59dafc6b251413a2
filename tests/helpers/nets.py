"""Small generated CNNs for latency-table tests (random weights: accuracy is not the point)."""

from __future__ import annotations

import torch
from torch import nn


class TwoConvs(nn.Module):
    """conv-BN-ReLU ``a`` (3 -> first), conv-BN-ReLU ``b`` (first -> second), pooling, a classifier."""

    def __init__(self, first: int = 8, second: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, first, 3, padding=1, bias=False), nn.BatchNorm2d(first), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(first, second, 3, padding=1, bias=False), nn.BatchNorm2d(second), nn.ReLU())
        self.fc = nn.Linear(second, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.b(self.a(x)), 1), 1))
