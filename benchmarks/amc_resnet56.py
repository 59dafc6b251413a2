"""AMC on ResNet-56 / CIFAR-10-JPEG at 50 % FLOPs, against uniform pruning and the dense model.

A focused view of the agent comparison (same files, same evaluator, same fine-tune budget):
search with AMC and uniform, fine-tune each best strategy and the dense model identically,
report final test accuracy, search wall time and the share of search time in forward passes.
Targets: AMC >= uniform + 1.0 pt after fine-tuning; search < 1 hour; >= 85 % in forward passes.

``--problem flops-all`` (default) searches every prunable layer, the residual channels included (the
engine's default space); ``--problem flops`` only the block-internal convs (the space of the
comparison's first runs).

    python benchmarks/amc_resnet56.py [--problem flops-all] [--episodes 200] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json

from compare_agents import ROOT, run_finetune, run_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--problem", choices=["flops-all", "flops"], default="flops-all")
    args = parser.parse_args()
    run_search(args.problem, ["uniform", "amc"], args.episodes, [0])
    run_finetune(args.problem, args.epochs, ["uniform", "amc"])
    d = ROOT / args.problem
    amc_s = json.loads((d / "search-amc-s0.json").read_text())
    amc_f = json.loads((d / f"final-amc-s0-e{args.epochs:g}.json").read_text())
    uni_f = json.loads((d / f"final-uniform-s0-e{args.epochs:g}.json").read_text())
    dense = json.loads((d / f"final-dense-e{args.epochs:g}.json").read_text())
    a, u = amc_f["figures"]["pruned"]["accuracy"], uni_f["figures"]["pruned"]["accuracy"]
    dn = dense["figures"]["dense_finetuned"]["accuracy"]
    minutes = amc_s["search_seconds_total"] / 60
    print(f"AMC: {amc_s['evaluations']} episodes, search {minutes:.0f} min (target < 60), forward share {amc_s['forward_share']:.0%} "
          f"(target >= 85 %)")
    print(f"test accuracy after {args.epochs:g} epochs: AMC {a:.2%}, uniform {u:.2%} (AMC - uniform {100 * (a - u):+.2f} pt, "
          f"target >= +1.0), dense {dn:.2%} (AMC drop {100 * (dn - a):.2f} pt)")


if __name__ == "__main__":
    main()
