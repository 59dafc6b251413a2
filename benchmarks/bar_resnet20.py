"""The bar to clear: ResNet-20 at 50 % MACs in 60 evaluations (adaptive-BN accuracy, no fine-tuning).

The reference is a 30-line Optuna TPE script with adaptive BN that finds 54 % (uniform: 42 %) on
the JPEG test images. Each agent searches with the shared evaluator (1,000 validation images
carved from the training split); its best strategy is then scored the same way on the full
10,000-image test split. Several seeds each.

    python benchmarks/bar_resnet20.py [--agents ...] [--seeds 0 1 2] [--evals 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from prunepilot.agents import SearchContext, SearchLimits, create_agent
from prunepilot.compression import Evaluator, Fidelity, PruningConstraints
from prunepilot.compression.cifar_resnet import RESIDUAL_ROOTS
from prunepilot.compression.evaluate import accuracy, recalibrate_batchnorm
from prunepilot.compression.finalizing import heldout_tensors
from prunepilot.service.settings import get_settings
from prunepilot.service.workspace import open_session

RESULTS = Path(__file__).parent / "results" / "bar_resnet20.json"
VARIANTS = {"uniform": ("uniform", {}), "random": ("random", {}), "optuna-tpe": ("optuna-tpe", {}),
            "optuna-nsga2": ("optuna-nsga2", {}), "amc": ("amc", {}), "amc-paper": ("amc", {"recipe": "paper"}),
            "amc-bound": ("amc", {"budget_mode": "bound", "recipe": "paper"}),
            "amc-x4": ("amc", {"updates_per_step": 4, "recipe": "paper"})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", nargs="*", default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--evals", type=int, default=60)
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="results file; runs already in it are skipped (another file re-measures them, e.g. to check they reproduce)")
    args = parser.parse_args()
    s = get_settings()
    torch.set_num_threads(s.threads)
    # block-internal convs only: the space the recorded results were measured in
    session = open_session("resnet20", s.shared_weights_dir / "resnet20-cifar10.th", "cifar10-jpeg", s,
                           PruningConstraints(exclude=RESIDUAL_ROOTS), progress=True)
    ev = Evaluator(session.pruner, session.splits, Fidelity(val_images=1000, calib_images=1024))
    x, y = heldout_tensors(session.splits)
    calib = ev.data(ev.fidelity).calib_x
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    for name in args.agents:
        agent, options = VARIANTS[name]
        for seed in ([0] if agent == "uniform" else args.seeds):
            key = f"{name}/s{seed}/e{args.evals}"
            if key in results:
                continue
            ev._cache.clear()
            ctx = SearchContext(ev, {"flops": 0.5}, SearchLimits(max_evaluations=args.evals), seed=seed, agent=agent)
            best = create_agent(agent, **options).search(ctx).best
            model = session.pruner.prune(best.strategy).model.to(memory_format=torch.channels_last)
            recalibrate_batchnorm(model, calib)
            test = accuracy(model, x, y)
            results[key] = {"agent": name, "seed": seed, "search_accuracy": best.accuracy, "test_accuracy_adaptive_bn": test,
                            "macs_ratio": best.metrics["macs_ratio"], "best_step": best.step}
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=2))
            print(f"{name:12s} seed {seed}: val {best.accuracy:.1%}, test {test:.1%} at {best.metrics['macs_ratio']:.1%} MACs "
                  f"(best at evaluation {best.step + 1})", flush=True)
    print(f"\nResNet-20, 50 % MACs, {args.evals} evaluations, adaptive-BN accuracy on 10,000 JPEG test images "
          "(reference script: TPE 54 %, uniform 42 %)")
    for name in args.agents:
        tests = [r["test_accuracy_adaptive_bn"] * 100 for k, r in results.items() if r["agent"] == name and k.endswith(f"e{args.evals}")]
        if tests:
            sd = f" ± {statistics.stdev(tests):.1f}" if len(tests) > 1 else ""
            print(f"  {name:12s} {statistics.fmean(tests):.1f}{sd} % over {len(tests)} run(s)")


if __name__ == "__main__":
    main()
