"""Strategies: per-layer sparsity ratios ``{layer_name: ratio}``, the one currency of the project.

A ratio is the share of a layer's output channels to remove. The constraints below turn ratios
into channel counts the same way everywhere (agents' budget checks, the pruner, the cost model),
so a strategy always means exactly one pruned architecture.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from .errors import StrategyError

Strategy = dict[str, float]
# How channels are ranked for removal (compression/importance.py scores them); here, without
# torch, so the CLI and the API's schemas can name them cheaply.
Criterion = Literal["l1", "l2", "bn-scale", "taylor"]
CRITERIA: tuple[str, ...] = get_args(Criterion)


@dataclass(frozen=True)
class PruningConstraints:
    """Limits every strategy is held to.

    ``max_ratio`` 0.8 follows AMC (keep ratio >= 0.2); the first prunable layer is held to 50 %
    because early features are shared by everything after them; ``round_to`` rounds kept channel
    counts to a multiple (hardware-friendly widths), off by default; at least one channel stays.
    ``exclude`` names layers to leave whole (any conv/linear of their channel group); they drop
    out of the prunable layers altogether, so strategies and agents never see them.

    ``round_to="measured"`` snaps each layer's kept count down to a count the latency table
    measured as worth its latency (the layer's *efficient* counts, ``steps``; see
    ``LatencyTable.channel_steps``): the count itself when it is one, else the largest efficient
    count below it; a count under every efficient count goes up to the smallest. ``steps`` holds
    those counts per prunable layer, set once the table is built (the pipeline does it); until then
    counts are not snapped. Agents check budgets on the snapped counts (``kept_vector``), so the
    snap up never takes a chosen network out of its budget.
    """

    max_ratio: float = 0.8
    first_layer_max_ratio: float = 0.5
    round_to: int | Literal["measured"] | None = None
    min_channels: int = 1
    exclude: tuple[str, ...] = ()
    steps: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))  # lists arrive from JSON
        if self.round_to == "measured" or self.steps is not None:
            if self.round_to != "measured":
                raise StrategyError("channel steps are only used with round_to='measured'")
            if self.steps is not None:
                object.__setattr__(self, "steps", tuple(tuple(sorted(int(c) for c in layer)) for layer in self.steps))
        elif isinstance(self.round_to, str) or (self.round_to is not None and self.round_to < 1):
            raise StrategyError("round_to must be a positive integer or 'measured'")
        if not 0.0 <= self.max_ratio < 1.0:
            raise StrategyError(f"max_ratio must be in [0, 1), got {self.max_ratio}")
        if not 0.0 <= self.first_layer_max_ratio < 1.0:
            raise StrategyError(f"first_layer_max_ratio must be in [0, 1), got {self.first_layer_max_ratio}")
        if self.min_channels < 1:
            raise StrategyError("min_channels must be at least 1")

    def layer_max(self, index: int) -> float:
        return min(self.max_ratio, self.first_layer_max_ratio) if index == 0 else self.max_ratio

    def max_ratios(self, n_layers: int) -> np.ndarray:
        return np.array([self.layer_max(i) for i in range(n_layers)])

    def kept_vector(self, channels: np.ndarray, ratios: np.ndarray) -> np.ndarray:
        """:meth:`kept` for every layer at once (agents call this thousands of times per search)."""
        channels = np.asarray(channels, dtype=np.int64)
        limit = self.max_ratios(len(channels))
        ratios = np.minimum(np.maximum(np.asarray(ratios, dtype=np.float64), 0.0), limit)
        keep = channels - np.floor(ratios * channels + 1e-9).astype(np.int64)
        if isinstance(self.round_to, int) and self.round_to > 1:
            rounded = np.maximum(self.round_to, np.round(keep / self.round_to).astype(np.int64) * self.round_to)
            keep = np.where(channels > self.round_to, rounded, keep)
        elif self.steps is not None:
            keep = np.array([self._snap(i, int(k)) for i, k in enumerate(keep)], dtype=np.int64)
        return np.minimum(channels, np.maximum(np.maximum(keep, self.lowest_vector(channels)), 1))

    def lowest_vector(self, channels: np.ndarray) -> np.ndarray:
        """The fewest channels each layer may keep (its largest ratio, ``min_channels``)."""
        channels = np.asarray(channels, dtype=np.int64)
        limit = self.max_ratios(len(channels))
        return np.minimum(channels, np.maximum(self.min_channels, np.ceil((1.0 - limit) * channels - 1e-9).astype(np.int64)))

    def _snap(self, index: int, keep: int) -> int:
        """The largest efficient count of layer ``index`` at or below ``keep``; below the smallest, the
        smallest: a count under every step would run off the runtime's channel block (the steps of
        a table with an alignment are its multiples), which can cost more than the channels saved."""
        assert self.steps is not None
        if index >= len(self.steps):
            raise StrategyError(f"channel steps cover {len(self.steps)} layers, not layer {index}")
        efficient = self.steps[index]
        if not efficient:
            return keep
        j = bisect.bisect_right(efficient, keep)
        return efficient[j - 1] if j > 0 else efficient[0]

    def allowed_counts(self, channels: int, index: int) -> list[int]:
        """Every count layer ``index`` (of ``channels``) can keep under these constraints, ascending:
        what :meth:`kept` gives over all ratios. Agents that choose counts themselves (NetAdapt)
        choose among these."""
        return sorted({self.kept(channels, 1.0 - k / channels, index) for k in range(1, channels + 1)})

    def kept(self, channels: int, ratio: float, index: int) -> int:
        """Channels kept when ``ratio`` of ``channels`` is removed from layer ``index``."""
        ratio = min(max(ratio, 0.0), self.layer_max(index))
        keep = channels - math.floor(ratio * channels + 1e-9)
        if isinstance(self.round_to, int) and self.round_to > 1 and channels > self.round_to:
            keep = max(self.round_to, int(round(keep / self.round_to)) * self.round_to)
        elif self.steps is not None:
            keep = self._snap(index, keep)
        lowest = max(self.min_channels, math.ceil((1.0 - self.layer_max(index)) * channels - 1e-9))
        return int(min(channels, max(keep, lowest, 1)))


def validate_strategy(strategy: Mapping[str, float], layer_names: Sequence[str]) -> Strategy:
    """Check names and ranges; return the strategy over all layers in depth order (missing = 0)."""
    known = set(layer_names)
    unknown = [k for k in strategy if k not in known]
    if unknown:
        shown = ", ".join(unknown[:5])
        raise StrategyError(f"unknown layer(s) in strategy: {shown}; prunable layers are e.g. {', '.join(layer_names[:3])}")
    out: Strategy = {}
    for name in layer_names:
        r = float(strategy.get(name, 0.0))
        if not (0.0 <= r < 1.0) or math.isnan(r):
            raise StrategyError(f"ratio for {name} must be in [0, 1), got {r}")
        out[name] = r
    return out


def uniform_strategy(layer_names: Sequence[str], ratio: float) -> Strategy:
    if not 0.0 <= ratio < 1.0:
        raise StrategyError(f"ratio must be in [0, 1), got {ratio}")
    return {name: float(ratio) for name in layer_names}


def to_vector(strategy: Mapping[str, float], layer_names: Sequence[str]) -> np.ndarray:
    return np.array([float(strategy.get(n, 0.0)) for n in layer_names], dtype=np.float64)


def from_vector(ratios: Sequence[float] | np.ndarray, layer_names: Sequence[str]) -> Strategy:
    if len(ratios) != len(layer_names):
        raise StrategyError(f"expected {len(layer_names)} ratios, got {len(ratios)}")
    return {n: float(r) for n, r in zip(layer_names, ratios, strict=True)}
