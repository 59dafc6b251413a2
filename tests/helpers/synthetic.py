"""A cheap evaluator whose best strategy is known: for testing that search agents learn.

Costs (MACs, params) come from the real pruning graph; accuracy is a formula in which pruning
early layers hurts much more than pruning late ones, so good strategies are non-uniform.
"""

from __future__ import annotations

import numpy as np

from prunepilot.compression import Evaluator, Metrics, Pruner


class SyntheticEvaluator(Evaluator):
    def __init__(self, pruner: Pruner, steepness: float = 20.0) -> None:
        super().__init__(pruner, splits=None)
        self.weights = np.geomspace(1.0, 1.0 / steepness, len(pruner.layers))

    def accuracy_of(self, ratios: np.ndarray) -> float:
        return float(1.0 - np.sum(self.weights * ratios**2) / np.sum(self.weights))

    def evaluate_kept(self, kept, fidelity=None) -> Metrics:  # type: ignore[no-untyped-def, override]
        self.evaluations += 1
        ratios = 1.0 - np.asarray(kept) / self.pruner.graph.channels
        res = self.resources(np.asarray(kept))
        g = self.pruner.graph
        return Metrics(accuracy=self.accuracy_of(ratios), macs=int(res["flops"] * g.dense_macs), params=int(res["params"] * g.dense_params),
                       size_bytes=0, macs_ratio=res["flops"], params_ratio=res["params"], size_ratio=res["size"],
                       latency_ms=None, latency_ratio=None, latency_source=None, strategy=self.pruner.effective(np.asarray(kept)),
                       kept=[int(k) for k in kept], fidelity="synthetic", wall_time_s=0.0, forward_time_s=0.0, prune_time_s=0.0)
