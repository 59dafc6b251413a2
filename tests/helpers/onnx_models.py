"""A hand-written CNN with the patterns users' models have, and its ONNX export (tests only)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SIZE = 32
CLASSES = 10


class SqueezeExcite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, c // 4), nn.Linear(c // 4, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return x * w.view(b, c, 1, 1)  # a Reshape whose constant shape names the channels


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class Net(nn.Module):
    """Depthwise-separable block, squeeze-excitation, concatenation, residual add, BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, 3)
        self.dw = nn.Sequential(conv_bn(16, 16, 3, stride=2, groups=16), conv_bn(16, 32, 1))
        self.se = SqueezeExcite(32)
        self.left, self.right = conv_bn(32, 16, 3), conv_bn(32, 16, 1)
        self.res = conv_bn(32, 32, 3, relu=False)
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se(self.dw(self.stem(x)))
        y = torch.cat([self.left(x), self.right(x)], 1)
        y = F.relu(y + self.res(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so a lost BN shows in the outputs
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net


def export_net(net: nn.Module, path: Path, size: int = SIZE) -> Path:
    """The legacy exporter without constant folding: every BatchNormalization stays a node (the
    dynamo exporter fuses them into the convolutions)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, size, size),), str(path), dynamo=False, opset_version=17,
                          do_constant_folding=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return path
