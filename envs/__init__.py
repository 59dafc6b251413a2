"""Gymnasium environments over the shared evaluator, for RL agents."""

from .pruning_env import FEATURES, REWARDS, PruningEnv

__all__ = ["FEATURES", "REWARDS", "PruningEnv"]
