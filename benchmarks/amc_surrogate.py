"""Tune AMC's recipe on a surrogate of the real ResNet-56 search landscape, cheaply.

A real ResNet-56 evaluation costs ~2 s here, so a 200-episode AMC run costs ~7 minutes and
comparing recipes over several seeds would take hours. The comparison benchmark has already
recorded ~1,800 real evaluations on the 50 % FLOPs problem (every agent, every seed, under
benchmarks/results/compare/flops/trials-*.jsonl). This script fits a kernel ridge regression
(RBF kernel on the kept-channel fractions) to them, checks its rank correlation on held-out trials,
and runs agents against it: far from the recorded data its prediction falls back to the mean
accuracy, so an agent cannot win by exploiting extrapolation. Recipes that look better here are
then confirmed with real evaluations (compare_agents.py); the surrogate only ranks recipes.

    python benchmarks/amc_surrogate.py [--seeds 0 1 2] [--evals 200]

Prints a table and writes benchmarks/results/amc_surrogate.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunepilot.agents import SearchContext, SearchLimits, create_agent
from prunepilot.compression import FormulaEvaluator, Pruner, PruningConstraints, build_model
from prunepilot.compression.cifar_resnet import RESIDUAL_ROOTS

TRIALS = Path(__file__).parent / "results" / "compare" / "flops"
OUT = Path(__file__).parent / "results" / "amc_surrogate.json"
# The surrogate is fitted to the evaluations recorded before the tuned recipe's own runs, so the
# recipe is not judged on data it produced and the table reproduces as the trial files grow.
RECORDED_BEFORE = "2026-11-23T15:00:00"

# (label, agent, options): AMC's paper recipe, one change at a time, then the tuned recipe and changes to it.
RECIPES: list[tuple[str, str, dict[str, Any]]] = [
    ("optuna-tpe", "optuna-tpe", {}),
    ("random", "random", {}),
    ("amc paper recipe", "amc", {"recipe": "paper"}),
    ("paper, warmup 20", "amc", {"recipe": "paper", "warmup": 20}),
    ("paper, updates x4", "amc", {"recipe": "paper", "updates_per_step": 4}),
    ("paper, sigma 0.3", "amc", {"recipe": "paper", "sigma": 0.3}),
    ("paper, actor lr 1e-3", "amc", {"recipe": "paper", "actor_lr": 1e-3}),
    ("paper, warmup 20, updates x4", "amc", {"recipe": "paper", "warmup": 20, "updates_per_step": 4}),
    ("amc tuned (warmup 20, actor lr 1e-3)", "amc", {"recipe": "tuned"}),
    ("tuned, sigma 0.3", "amc", {"recipe": "tuned", "sigma": 0.3}),
    ("tuned, updates x4", "amc", {"recipe": "tuned", "updates_per_step": 4}),
    ("tuned, warmup 10, updates x4", "amc", {"recipe": "tuned", "warmup": 10, "updates_per_step": 4}),
    ("tuned, updates x4, sigma 0.3", "amc", {"recipe": "tuned", "updates_per_step": 4, "sigma": 0.3}),
]


def load_trials() -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for path in sorted(TRIALS.glob("trials-*.jsonl")):
        for line in path.read_text().splitlines():
            t = json.loads(line)
            if t["metrics"].get("kept") is None or t["created_at"] >= RECORDED_BEFORE:
                continue
            xs.append(t["metrics"]["kept"])
            ys.append(t["metrics"]["accuracy"])
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


class KernelRidge:
    def __init__(self, lengthscale: float, alpha: float) -> None:
        self.lengthscale, self.alpha = lengthscale, alpha

    def _k(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return np.exp(-np.maximum(d2, 0) / (2 * self.lengthscale**2))

    def fit(self, x: np.ndarray, y: np.ndarray) -> KernelRidge:
        self.x, self.mean = x, float(y.mean())
        self.coef = np.linalg.solve(self._k(x, x) + self.alpha * np.eye(len(x)), y - self.mean)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.mean + self._k(np.atleast_2d(x), self.x) @ self.coef


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def fit_surrogate(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[KernelRidge, dict[str, float]]:
    """Lengthscale and ridge picked on a 20 % hold-out by rank correlation, then refit on everything."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    cut = len(x) // 5
    test, train = idx[:cut], idx[cut:]
    best = None
    for ls in (0.5, 1.0, 2.0, 3.0, 4.0, 6.0):
        for alpha in (1e-3, 1e-2, 1e-1):
            m = KernelRidge(ls, alpha).fit(x[train], y[train])
            rho = spearman(m.predict(x[test]), y[test])
            if best is None or rho > best[0]:
                best = (rho, ls, alpha, float(np.sqrt(np.mean((m.predict(x[test]) - y[test]) ** 2))))
    assert best is not None
    rho, ls, alpha, rmse = best
    return KernelRidge(ls, alpha).fit(x, y), {"holdout_spearman": rho, "holdout_rmse": rmse, "lengthscale": ls, "alpha": alpha}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--evals", type=int, default=200)
    parser.add_argument("--only", nargs="*", default=None, help="labels of the recipes to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # the recorded trials come from the flops problem, whose space is the block-internal convs
    pruner = Pruner(build_model("resnet56"), "resnet56", 10, 32, PruningConstraints(exclude=RESIDUAL_ROOTS))
    x, y = load_trials()
    model, fit = fit_surrogate(x / np.asarray(pruner.graph.channels, dtype=np.float64), y)
    print(f"surrogate from {len(y)} recorded evaluations: hold-out Spearman {fit['holdout_spearman']:.3f}, "
          f"RMSE {fit['holdout_rmse']:.4f} (lengthscale {fit['lengthscale']}, ridge {fit['alpha']})", flush=True)
    ev = FormulaEvaluator(pruner, lambda kept_fraction: float(model.predict(kept_fraction)[0]), tag="surrogate")
    rows = []
    for label, agent, options in RECIPES:
        if args.only and label not in args.only:
            continue
        bests, lates, secs = [], [], []
        for seed in args.seeds:
            ctx = SearchContext(ev, {"flops": 0.5}, SearchLimits(max_evaluations=args.evals), seed=seed, agent=agent)
            t0 = time.perf_counter()
            create_agent(agent, **options).search(ctx)
            secs.append(time.perf_counter() - t0)
            accs = np.array([t.accuracy for t in ctx.trials()])
            bests.append(float(accs.max()))
            lates.append(float(accs[-args.evals // 4:].mean()))
        rows.append({"recipe": label, "agent": agent, "options": options, "best_mean": float(np.mean(bests)), "best_std": float(np.std(bests)),
                     "last_quarter_mean": float(np.mean(lates)), "bests": bests, "seconds_per_run": float(np.mean(secs))})
        r = rows[-1]
        print(f"{label:28s} best {r['best_mean']:.4f} ± {r['best_std']:.4f}   last-quarter mean {r['last_quarter_mean']:.4f}   "
              f"{r['seconds_per_run']:.0f} s/run", flush=True)
    # rows of recipes not run this time are kept, so a single recipe can be re-run or added
    kept = json.loads(OUT.read_text()) if OUT.is_file() else {}
    labels = {r["recipe"] for r in rows}
    if kept.get("evals") == args.evals and kept.get("seeds") == args.seeds:
        rows = [r for r in kept.get("rows", []) if r["recipe"] not in labels] + rows
    order = [label for label, _, _ in RECIPES]
    rows.sort(key=lambda r: order.index(r["recipe"]) if r["recipe"] in order else len(order))
    OUT.write_text(json.dumps({**kept, "surrogate": {**fit, "trials": len(y)}, "evals": args.evals, "seeds": args.seeds, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
