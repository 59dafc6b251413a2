"""Apply a Strategy to a model: constraints -> channel counts -> importance -> pruned copy + spec."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .graph import BlockedLayer, Cost, LayerInfo, PruningGraph
from .importance import importance_scores
from .spec import ArchSpec, module_widths, spec_of
from .strategy import PruningConstraints, Strategy, validate_strategy


@dataclass
class PrunedModel:
    model: nn.Module
    spec: ArchSpec
    strategy: Strategy  # the ratios actually applied, after constraints and rounding
    kept: list[int]  # channels kept per prunable layer
    # dense output channels kept by each conv / linear whose outputs shrank (for reconstruction)
    kept_outputs: dict[str, np.ndarray] = field(default_factory=dict)


class Pruner:
    """Everything needed to prune one dense model repeatedly and cheaply."""

    def __init__(
        self,
        model: nn.Module,
        arch: str,
        num_classes: int,
        input_size: int,
        constraints: PruningConstraints | None = None,
        criterion: str = "l2",
        taylor_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
        source_file: Path | None = None,
        reference_widths: Mapping[str, dict[str, int]] | None = None,
        verify: bool = False,
    ) -> None:
        """``arch``: the model source's reference (``compression/sources.py``); ``source_file``: an ONNX
        source's file, which specs name so a pruned model can be rebuilt; ``reference_widths``: the
        dense model's widths when ``model`` is itself already pruned (NetAdapt's later iterations);
        ``verify``: run :meth:`PruningGraph.verify` and leave the layers it finds inexact whole
        (``verify_failed`` says which and why)."""
        self.model = model.eval()
        self.arch = arch
        self.source_file = source_file
        self.reference_widths = dict(reference_widths) if reference_widths is not None else module_widths(model)
        self.num_classes = num_classes
        self.input_size = input_size
        self.constraints = constraints or PruningConstraints()
        self.graph = PruningGraph(model, input_size, exclude=self.constraints.exclude)
        # verify: a model we did not write (an upload, a plugin, the caller's module) has each layer's
        # pruning plan checked for exactness first; a layer whose plan is not exact is left whole
        self.verified = verify
        self.verify_failed: list[BlockedLayer] = []
        self.verify_seconds: float | None = None
        if verify:
            start = time.perf_counter()
            self.verify_failed = self.graph.verify(self.model)
            self.verify_seconds = time.perf_counter() - start
            if self.verify_failed:
                exclude = tuple(self.constraints.exclude) + tuple(b.name for b in self.verify_failed)
                self.constraints = dataclasses.replace(self.constraints, exclude=exclude)
                self.graph = PruningGraph(model, input_size, exclude=exclude)
        self.criterion = criterion
        self._taylor_batch = taylor_batch
        self._scores: list[np.ndarray] | None = None

    @property
    def layers(self) -> list[LayerInfo]:
        return self.graph.layers

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.graph.layers]

    @property
    def scores(self) -> list[np.ndarray]:
        if self._scores is None:
            self._scores = importance_scores(self.model, self.graph, self.criterion, self._taylor_batch)
        return self._scores

    def max_ratios(self) -> np.ndarray:
        return self.constraints.max_ratios(len(self.layers))

    def kept_channels(self, strategy: Mapping[str, float]) -> np.ndarray:
        full = validate_strategy(strategy, self.layer_names)
        return np.array(
            [self.constraints.kept(layer.c_out, full[layer.name], layer.index) for layer in self.layers], dtype=np.int64
        )

    def kept_from_vector(self, ratios: np.ndarray) -> np.ndarray:
        """Like :meth:`kept_channels` for a ratio vector, without name validation (agents' hot path)."""
        return self.constraints.kept_vector(self.graph.channels, ratios)

    def cost_of_kept(self, kept: np.ndarray) -> Cost:
        return self.graph.cost(self.graph.channels - kept)

    def cost(self, strategy: Mapping[str, float]) -> Cost:
        return self.cost_of_kept(self.kept_channels(strategy))

    def effective(self, kept: np.ndarray) -> Strategy:
        return {layer.name: float(1.0 - k / layer.c_out) for layer, k in zip(self.layers, kept, strict=True)}

    def prune_kept(self, kept: np.ndarray) -> PrunedModel:
        keep = {}
        for i, k in enumerate(kept):
            if k < self.graph.channels[i]:
                order = np.argsort(-self.scores[i], kind="stable")
                keep[i] = np.sort(order[: int(k)])
        pruned = self.graph.prune(self.model, keep)
        spec = self.spec_of(pruned)
        return PrunedModel(pruned.eval(), spec, self.effective(kept), [int(k) for k in kept], self.graph.kept_outputs(keep))

    def spec_of(self, pruned: nn.Module) -> ArchSpec:
        """The spec of a pruned copy of this pruner's dense model."""
        spec = spec_of(pruned, self.arch, self.num_classes, self.input_size, self.reference_widths)
        spec.source_file = str(self.source_file) if self.source_file is not None else None
        return spec

    def prune(self, strategy: Mapping[str, float]) -> PrunedModel:
        return self.prune_kept(self.kept_channels(strategy))
