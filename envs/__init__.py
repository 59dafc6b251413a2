"""Gymnasium environments over the shared evaluator, for RL agents."""

from .pruning_env import BUDGET_MODES, FEATURES, REWARDS, PruningEnv

__all__ = ["BUDGET_MODES", "FEATURES", "REWARDS", "PruningEnv"]
