"""A cheap evaluator whose best strategy is known: for testing that search agents learn.

Costs (MACs, params) come from the real pruning graph; accuracy is a formula in which pruning
early layers hurts much more than pruning late ones, so good strategies are non-uniform.
"""

from __future__ import annotations

import numpy as np

from prunepilot.compression import FormulaEvaluator, Pruner


class SyntheticEvaluator(FormulaEvaluator):
    def __init__(self, pruner: Pruner, steepness: float = 20.0) -> None:
        self.weights = np.geomspace(1.0, 1.0 / steepness, len(pruner.layers))
        super().__init__(pruner, self.accuracy_of_kept, tag="synthetic")

    def accuracy_of(self, ratios: np.ndarray) -> float:
        return float(1.0 - np.sum(self.weights * ratios**2) / np.sum(self.weights))

    def accuracy_of_kept(self, kept_fraction: np.ndarray) -> float:
        return self.accuracy_of(1.0 - kept_fraction)
