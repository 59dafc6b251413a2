"""CIFAR ResNets (He et al. 2016) with option-A shortcuts.

The module and parameter names match ``akamaster/pytorch_resnet_cifar10`` so its
checkpoints load after stripping the ``module.`` prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

CIFAR_RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
# The prunable layers that carry each stage's residual channels (the stem and the stage's block
# outputs, one ratio per stage). Excluding them gives the space of block-internal convs only, the
# only space before the option-A shortcut became prunable; benchmarks run then keep it.
RESIDUAL_ROOTS = ("conv1", "layer2.0.conv2", "layer3.0.conv2")


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample spatially, place the input channels among zero channels.

    The original pads ``planes // 4`` zero channels on each side (``F.pad``). That arithmetic is
    invisible to the dependency graph, so block outputs could not be pruned. Here the placement is
    an explicit map, ``index[j]`` = the input channel feeding output channel j, or ``in_channels``
    for a zero channel; the same numbers, computed by a gather the graph can follow, and
    :class:`ShortcutAPruner` keeps the map consistent when either side loses channels.

    A named module (not a lambda) so models stay picklable for Ray and traceable by ``torch.export``.
    The map is a buffer, so a pruned model's map travels with its weights; checkpoints of the dense
    model have no such entry and get the default (``index`` is in :data:`DEFAULT_BUFFERS`).
    """

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        pad = planes // 4
        index = torch.full((planes,), in_planes, dtype=torch.long)
        index[pad:pad + in_planes] = torch.arange(in_planes)
        self.in_channels = in_planes
        self.register_buffer("index", index)

    @property
    def out_channels(self) -> int:
        return int(self.index.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sub = x[:, :, ::2, ::2]
        zero = sub.new_zeros(sub.shape[0], 1, sub.shape[2], sub.shape[3])
        return torch.cat([sub, zero], 1).index_select(1, self.index)

    def resize(self, in_channels: int, out_channels: int) -> None:
        """Shape the map for a pruned spec; its values come from the pruned model's weights."""
        self.in_channels = in_channels
        self.index = torch.full((out_channels,), in_channels, dtype=torch.long)


class ShortcutAPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning handler for :class:`ShortcutA`: output and input channels prune independently."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        assert isinstance(layer, ShortcutA)
        keep = torch.ones(layer.out_channels, dtype=torch.bool)
        keep[list(idxs)] = False
        layer.index = layer.index[keep].clone()
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        assert isinstance(layer, ShortcutA)
        keep = torch.ones(layer.in_channels, dtype=torch.bool)
        keep[list(idxs)] = False
        kept = int(keep.sum())
        # Old input channel -> new one; removed channels and the zero channel map to the new zero.
        remap = torch.full((layer.in_channels + 1,), kept, dtype=torch.long)
        remap[:-1][keep] = torch.arange(kept)
        layer.index = remap[layer.index]
        layer.in_channels = kept
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        assert isinstance(layer, ShortcutA)
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        assert isinstance(layer, ShortcutA)
        return layer.in_channels


# Module type -> Torch-Pruning handler, for layers the dependency graph cannot handle by itself.
CUSTOM_PRUNERS: dict[type[nn.Module], tp.pruner.BasePruningFunc] = {ShortcutA: ShortcutAPruner()}
# Module type -> buffers that dense checkpoints may lack (they are derived from the architecture).
DEFAULT_BUFFERS: dict[type[nn.Module], tuple[str, ...]] = {ShortcutA: ("index",)}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(in_planes, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, num_blocks: int, num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks, stride=1)
        self.layer2 = self._make_layer(32, num_blocks, stride=2)
        self.layer3 = self._make_layer(64, num_blocks, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes)
