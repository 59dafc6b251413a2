"""Gymnasium environment for AMC-style pruning (He et al., ECCV 2018).

An episode walks the prunable layers in depth order; each step chooses one layer's sparsity
ratio. After the last layer the strategy is evaluated through the shared evaluator (adaptive-BN
accuracy on the validation subset by default, no fine-tuning) and the episode's reward is given.

Observation (11 features, each in [0, 1]), AMC's layer embedding
``(t, n, c, h, w, stride, k, FLOPs[t], reduced, rest, a_{t-1})``:

====  ===========  ===================================================================
 0    index        t / (L - 1)
 1    n            output channels (filters) of the layer, min-max over layers
 2    c            input channels, min-max over layers
 3    h            input height, min-max over layers
 4    w            input width, min-max over layers
 5    stride       min-max over layers
 6    kernel       kernel size, min-max over layers
 7    flops        MACs the layer's channel group touches / the largest group's
 8    reduced      MACs removed by the layers decided so far / dense MACs
 9    rest         MACs of the groups still to decide / dense MACs
10    prev_action  the previous layer's ratio (0 at t = 0)
====  ===========  ===================================================================

Static columns are min-max normalized over the network's layers as in AMC's reference code; a
column that is constant across layers is 0.

Action: ``Box(0, max_ratio)``, the share of the layer's output channels to remove. **Action
bounding** (AMC): before it is applied, the action is raised to the least ratio that keeps every
budget reachable with all later layers at their maximum ratio, so every episode ends within budget
for FLOPs, params, size, and latency when a latency model is present. Optionally (``fill``,
default on, our addition) the finished strategy is topped up with the channels rounding left
unused before it is evaluated.

``budget_mode="project"`` (our extension) replaces the per-step bound: the agent's actions are
taken as a pruning *profile*, and at the end of the episode the least pruning along that profile
that meets every budget is applied (the projection the Optuna agents use). Early layers then no
longer decide, through the bound, how hard the last layers are forced.

Rewards (``reward`` argument), with ``error = 1 - accuracy``:

- ``error``: ``-error`` (AMC's resource-constrained reward; the budget is enforced by bounding);
- ``error-log-flops``: ``-error * log(MACs)`` (AMC's accuracy-guaranteed/FLOPs-aware reward);
- ``combined``: ``-error - sum_r w_r * usage_r`` over ``weights`` such as
  ``{"flops": 0.1, "latency": 0.1, "size": 0.05}``, ``usage_r`` being the resource as a ratio of
  dense; it rewards savings beyond the budget at a stated accuracy price.

Intermediate steps give reward 0; the agent spreads the final reward over the episode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from prunepilot.compression.budget import BudgetChecker
from prunepilot.compression.resources import Resource

REWARDS = ("error", "error-log-flops", "combined")
BUDGET_MODES = ("bound", "project")
FEATURES = ("index", "n", "c", "h", "w", "stride", "kernel", "flops", "reduced", "rest", "prev_action")

EvaluateFn = Callable[[np.ndarray], Mapping[str, Any]]


def _minmax(col: np.ndarray) -> np.ndarray:
    span = col.max() - col.min()
    return (col - col.min()) / span if span > 0 else np.zeros_like(col)


class PruningEnv(gym.Env[np.ndarray, np.ndarray]):
    metadata = {"render_modes": []}

    def __init__(
        self,
        evaluator,  # compression.Evaluator (or a compatible stand-in)
        limits: Mapping[str, float],
        reward: str = "error",
        weights: Mapping[str, float] | None = None,
        evaluate: EvaluateFn | None = None,
        fill: bool = True,
        budget_mode: str = "bound",
    ) -> None:
        if reward not in REWARDS:
            raise ValueError(f"unknown reward {reward!r}; choose one of {', '.join(REWARDS)}")
        if budget_mode not in BUDGET_MODES:
            raise ValueError(f"unknown budget mode {budget_mode!r}; choose one of {', '.join(BUDGET_MODES)}")
        self.budget_mode = budget_mode
        self.evaluator = evaluator
        self.pruner = evaluator.pruner
        self.budget = BudgetChecker(evaluator, limits)
        if not self.budget.reachable():
            raise ValueError("budget is infeasible even with every layer at its maximum ratio")
        self.reward_kind = reward
        self.weights = dict(weights or {"flops": 0.1})
        self._evaluate = evaluate or (lambda ratios: evaluator.evaluate_vector(ratios).to_dict())
        self.fill = fill
        layers = self.pruner.layers
        self.n_layers = len(layers)
        self.max_ratios = self.budget.max_ratios.astype(np.float32)
        static = np.array([[x.c_out, x.c_in, x.h, x.w, x.stride, x.kernel] for x in layers], dtype=np.float64)
        self._static = np.stack([_minmax(static[:, j]) for j in range(static.shape[1])], axis=1)
        self._group_flops = np.array([x.group_flops for x in layers], dtype=np.float64)
        self._dense_macs = float(self.pruner.graph.dense_macs)
        self._layer_flops = self._group_flops / max(self._group_flops.max(), 1.0)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(len(FEATURES),), dtype=np.float32)
        self.action_space = spaces.Box(0.0, float(self.max_ratios.max()), shape=(1,), dtype=np.float32)
        self._t = 0
        self._ratios = np.zeros(self.n_layers)
        self.last_outcome: dict[str, Any] | None = None

    # ------------------------------------------------------------------ gym API

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._t = 0
        self._ratios = np.zeros(self.n_layers)
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        t = self._t
        wanted = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], 0.0, self.max_ratios[t]))
        bound = self.budget.min_ratio(self._ratios, t) if self.budget_mode == "bound" else 0.0
        applied = max(wanted, bound)
        self._ratios[t] = applied
        self._t += 1
        info: dict[str, Any] = {"layer": self.pruner.layers[t].name, "wanted": wanted, "applied": applied, "bound": bound}
        if self._t < self.n_layers:
            return self._obs(), 0.0, False, False, info
        if self.budget_mode == "project":
            # a profile with zeros cannot carry budget on those layers; give every layer a little
            ratios = self.budget.project(np.maximum(self._ratios, 0.02), fill=self.fill)
            if ratios is None:
                ratios = self.budget.project(np.ones(self.n_layers), fill=self.fill)
            assert ratios is not None  # __init__ refused a budget that the maximal ratios miss
        else:
            ratios = self.budget.fill(self._ratios) if self.fill else self._ratios.copy()
        outcome = dict(self._evaluate(ratios))
        reward = self.reward(outcome)
        self.last_outcome = outcome
        info.update({"ratios": ratios, "outcome": outcome, "episode_reward": reward})
        return self._terminal_obs(), reward, True, False, info

    # ------------------------------------------------------------------ pieces

    def reward(self, outcome: Mapping[str, Any]) -> float:
        error = 1.0 - float(outcome["accuracy"])
        if self.reward_kind == "error":
            return -error
        if self.reward_kind == "error-log-flops":
            return -error * math.log(max(float(outcome["macs"]), 2.0))
        penalty = 0.0
        for resource, w in self.weights.items():
            usage = Resource(resource).usage(outcome)
            if usage is None:
                raise ValueError(f"combined reward weighs {resource}, which the evaluator does not measure")
            penalty += w * usage
        return -error - penalty

    def _macs_of_layers(self, ratios: np.ndarray) -> float:
        return float(self.evaluator.resources(self.pruner.kept_from_vector(ratios))["flops"]) * self._dense_macs

    def _obs(self) -> np.ndarray:
        t = self._t
        decided = self._ratios.copy()
        decided[t:] = 0.0
        reduced = self._dense_macs - self._macs_of_layers(decided)
        rest = float(self._group_flops[t + 1:].sum()) if t + 1 < self.n_layers else 0.0
        prev = self._ratios[t - 1] if t > 0 else 0.0
        feats = [t / max(1, self.n_layers - 1), *self._static[t], self._layer_flops[t], reduced / self._dense_macs,
                 min(1.0, rest / self._dense_macs), prev]
        return np.clip(np.array(feats, dtype=np.float32), 0.0, 1.0)

    def _terminal_obs(self) -> np.ndarray:
        obs = np.zeros(len(FEATURES), dtype=np.float32)
        obs[0] = 1.0
        obs[-1] = self._ratios[-1]
        return obs

    @property
    def ratios(self) -> np.ndarray:
        return self._ratios.copy()
