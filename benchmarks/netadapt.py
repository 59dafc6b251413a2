"""NetAdapt on ResNet-56 / CIFAR-10-JPEG, latency budget 70 % of dense at batch 1 on this CPU.

(The issue asked for 60 %; at the 80 % layer limit the latency floor measured here is ~61 % of
dense, see benchmarks/compare_agents.py.)

Builds (or reuses) the latency lookup table, reports its validation error, then compares NetAdapt
with uniform pruning at the latency budget under the same final fine-tune budget: accuracy,
measured latency (interleaved with the dense model), search time.

    python benchmarks/netadapt.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from compare_agents import ROOT, run_finetune, run_search

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--skip-table-validation", action="store_true")
    args = parser.parse_args()
    if not args.skip_table_validation:
        subprocess.run([sys.executable, str(HERE / "latency_table.py"), "--models", "resnet56"], check=True)
    run_search("latency", ["uniform", "netadapt"], 10_000, [0])
    run_finetune("latency", args.epochs, ["uniform", "netadapt"])
    d = ROOT / "latency"
    table = json.loads((HERE / "results" / "latency_table.json").read_text())["models"].get("resnet56", {})
    for agent in ("netadapt", "uniform"):
        s = json.loads((d / f"search-{agent}-s0.json").read_text())
        f = json.loads((d / f"final-{agent}-s0-e{args.epochs:g}.json").read_text())
        p, dn = f["figures"]["pruned"], f["figures"]["dense"]
        print(f"{agent:9s} test acc {p['accuracy']:.2%}  latency b1 {p['latency_ms']['1']:.2f} ms vs dense {dn['latency_ms']['1']:.2f} ms "
              f"({p['latency_ms']['1'] / dn['latency_ms']['1']:.0%}, budget {s['limits']['latency']:.0%})  predicted {s['best']['metrics']['latency_ratio']:.0%}  "
              f"search {s['search_seconds_total'] / 60:.0f} min, {s['evaluations']} evaluations")
    if table:
        print(f"latency table: median error {table['median_error_ratio']:.1%} of the dense-relative latency "
              f"({table['median_error_ms']:.1%} absolute) over {len(table['strategies'])} random strategies")


if __name__ == "__main__":
    main()
