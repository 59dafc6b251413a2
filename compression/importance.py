"""Channel importance criteria (policy), scored once on the dense model per criterion.

Scores are per root channel of each prunable layer; pruning removes the lowest-scored channels.
They come from Torch-Pruning's group importance, so coupled layers (residual partners, the
following BN and the next layer's input weights) all contribute to a channel's score.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from .errors import StrategyError
from .graph import PruningGraph, trace_dependencies
from .strategy import CRITERIA


def _scorer(criterion: str) -> tp.importance.Importance:
    if criterion == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)
    if criterion == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    if criterion == "bn-scale":
        return tp.importance.BNScaleImportance(normalizer=None)
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance(normalizer=None)
    raise StrategyError(f"unknown importance criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


def importance_scores(
    model: nn.Module,
    graph: PruningGraph,
    criterion: str = "l2",
    batch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[np.ndarray]:
    """Per-layer channel scores (higher = keep). Taylor needs a labelled, normalized batch."""
    scorer = _scorer(criterion)
    work = model
    if criterion == "taylor":
        if batch is None:
            raise StrategyError("the taylor criterion needs a batch of training images")
        import copy

        work = copy.deepcopy(model).train()
        images, labels = batch
        work.zero_grad(set_to_none=True)
        F.cross_entropy(work(images), labels).backward()
        work.eval()
    example = torch.randn(1, 3, graph.input_size, graph.input_size)
    dg = trace_dependencies(work, example)
    scores = []
    for layer in graph.layers:
        module = work.get_submodule(layer.name)
        pruner = dg.get_pruner_of_module(module)
        group = dg.get_pruning_group(module, pruner.prune_out_channels, list(range(layer.c_out)))
        with torch.no_grad():
            s = scorer(group)
        if s is None:  # no parameter of a supported type in the group: fall back to order
            s = torch.arange(layer.c_out, 0, -1, dtype=torch.float32)
        scores.append(s.detach().float().cpu().numpy())
    return scores
