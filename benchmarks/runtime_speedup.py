"""Does pruning to 50 % MACs make a network faster where it runs? Batch-1 speedup over the dense
model in PyTorch eager and in ONNX Runtime (CPU), with and without measured channel steps.

For each model and each backend (torch, onnxruntime):

* the backend's latency table is built (or reused; a file store under the cache directory) and
  calibrated, and its measured channel steps derived (``LatencyTable.channel_steps``: each layer's
  counts snapped down to the efficient counts of that backend, on the channel alignment the
  calibration found);
* two profiles at ``flops=0.5``: uniform (the least uniform pruning meeting it) and searched (the
  ``global`` agent: channels of all layers ranked on normalized importance, one threshold), each
  plain and with the backend's measured steps (``round_to="measured"``), and plain again at the
  MACs the stepped network kept ("equal"): snapping goes down, so at one budget the stepped network
  can keep far fewer MACs than the plain one, and only "equal" compares speedups at equal MACs;
* every network is timed against the dense model on that backend, interleaved, median of three
  rounds (``measure_pair``); torch-steps networks are timed in torch, ONNX Runtime-steps networks
  in ONNX Runtime, plain ones in both.

Models: ResNet-56 with its CIFAR-10 weights (../shared/data; block-internal convs only, the space
the other ResNet benchmarks use) at 32 px, torchvision mobilenet_v2 (weights=None, 10 classes) at
``--mobilenet-size`` px. Target of the issue: measured steps give >= 10 % more speedup at equal MACs (column "gain eq").

    python benchmarks/runtime_speedup.py [--models resnet56 mobilenet_v2] [--threads 2] [--repeats 60]
    python benchmarks/runtime_speedup.py --max-points 3 --repeats 5 --models resnet20   # a quick try, not for the record
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from prunepilot.agents import SearchContext, SearchLimits, create_agent
from prunepilot.compression import Budget, FormulaEvaluator, Pruner, PruningConstraints, build_model, load_model, parse_constraint
from prunepilot.compression.backends import local_backend, measure_pair
from prunepilot.compression.budget import analytic_checker, uniform_within
from prunepilot.compression.cifar_resnet import CIFAR_RESNET_DEPTHS, RESIDUAL_ROOTS
from prunepilot.compression.latency import FileLatencyStore, LatencyTable
from prunepilot.service.settings import get_settings

RESULTS = Path(__file__).parent / "results" / "runtime_speedup.json"
BACKENDS = ("torch", "onnxruntime")
TARGET = 0.5


def make_pruner(arch: str, mobilenet_size: int) -> Pruner:
    if arch in CIFAR_RESNET_DEPTHS:
        weights = get_settings().shared_weights_dir / f"{arch}-cifar10.th"
        model = load_model(arch, weights) if weights.is_file() else build_model(arch)
        return Pruner(model, arch, 10, 32, PruningConstraints(exclude=RESIDUAL_ROOTS))
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10).eval()
    return Pruner(model, arch, 10, mobilenet_size)


def uniform_kept(pruner: Pruner, constraints: PruningConstraints, flops: float = TARGET) -> np.ndarray:
    """The least uniform pruning whose network keeps at most ``flops`` of the dense MACs."""
    budget = Budget(constraints=[parse_constraint(f"flops={flops!r}")])
    checker = analytic_checker(pruner.model, pruner.graph, constraints, budget)
    return checker.kept(uniform_within(checker))


def global_kept(pruner: Pruner, constraints: PruningConstraints, flops: float = TARGET) -> np.ndarray:
    """The global agent's network at ``flops`` (accuracy is not needed to rank channels: a formula stands in)."""
    pruner.constraints = constraints
    evaluator = FormulaEvaluator(pruner, lambda kept_share: float(np.mean(kept_share)), "benchmark")
    ctx = SearchContext(evaluator, {"flops": flops}, SearchLimits(max_evaluations=5), seed=0, agent="global")
    result = create_agent("global").search(ctx)
    assert result.best is not None
    return np.asarray(result.best.metrics["kept"], dtype=np.int64)


PROFILES = {"uniform": uniform_kept, "global": global_kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["resnet56", "mobilenet_v2"])
    parser.add_argument("--mobilenet-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=60, help="timed runs per network per round (three rounds)")
    parser.add_argument("--max-points", type=int, default=12, help="latency-table grid points per layer")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = FileLatencyStore(get_settings().cache_dir / "latency_tables.json")
    rows: list[dict[str, Any]] = []
    for arch in args.models:
        pruner = make_pruner(arch, args.mobilenet_size)
        base = pruner.constraints
        plain = {profile: make(pruner, base) for profile, make in PROFILES.items()}
        pruner.constraints = base
        for name in BACKENDS:
            backend = local_backend(name, args.threads)
            table = LatencyTable(pruner.graph, pruner.model, store, 1, args.threads, max_points=args.max_points, backend=backend)
            start = time.perf_counter()
            measured_now = table.build()
            build_s = time.perf_counter() - start
            table.calibrate()  # the measured steps keep the channel alignment the calibration finds
            stepped = dataclasses.replace(base, round_to="measured", steps=table.channel_steps(base.lowest_vector(pruner.graph.channels)))
            snapped_layers = int(sum(len(s) < c - lo + 1 for s, c, lo in
                                     zip(stepped.steps or (), pruner.graph.channels, base.lowest_vector(pruner.graph.channels), strict=True)))
            steps = {profile: make(pruner, stepped) for profile, make in PROFILES.items()}
            # the same agent without steps at the MACs the stepped network kept: steps snap counts
            # down, so at one budget the stepped network often keeps fewer MACs than the plain one
            equal = {profile: make(pruner, base, pruner.cost_of_kept(steps[profile]).macs / pruner.graph.dense_macs)
                     for profile, make in PROFILES.items()}
            pruner.constraints = base
            for profile in ("uniform", "global"):
                row: dict[str, Any] = {"model": arch, "input_size": pruner.input_size, "backend": name, "profile": profile,
                                       "table_entries": len(table.values), "table_measured_now": measured_now, "table_build_s": build_s,
                                       "layers_with_steps": snapped_layers, "alignment": table.alignment,
                                       "penalty_ms": table.penalty_ms, "table_dense_ms": table.dense_ms}
                for tag, kept in (("plain", plain[profile]), ("steps", steps[profile]), ("equal", equal[profile])):
                    net = pruner.prune_kept(kept).model
                    dense, small = measure_pair(backend, pruner.model, net, pruner.input_size, 1, args.threads, warmup=5,
                                                repeats=args.repeats)
                    row |= {f"macs_{tag}": pruner.cost_of_kept(kept).macs / pruner.graph.dense_macs,
                            f"dense_ms_{tag}": dense.median_ms, f"ms_{tag}": small.median_ms,
                            f"speedup_{tag}": dense.median_ms / small.median_ms, f"kept_{tag}": [int(k) for k in kept]}
                row["steps_gain"] = row["speedup_steps"] / row["speedup_plain"] - 1.0  # at one budget
                row["steps_gain_equal_macs"] = row["speedup_steps"] / row["speedup_equal"] - 1.0
                rows.append(row)
                print(f"{arch}@{pruner.input_size} {name:11s} {profile:7s} alignment {table.alignment:2d} MACs {row['macs_plain']:.1%} -> {row['speedup_plain']:.2f}x; "
                      f"with steps MACs {row['macs_steps']:.1%} -> {row['speedup_steps']:.2f}x ({row['steps_gain']:+.1%}); "
                      f"without at MACs {row['macs_equal']:.1%} -> {row['speedup_equal']:.2f}x ({row['steps_gain_equal_macs']:+.1%})", flush=True)
    head = (f"{'model':<16} {'backend':<11} {'profile':<7} {'MACs':>6} {'speedup':>8} {'MACs st':>7} {'speedup st':>10} {'gain':>7}"
            f" {'MACs eq':>7} {'speedup eq':>10} {'gain eq':>7}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['model'] + '@' + str(r['input_size']):<16} {r['backend']:<11} {r['profile']:<7} {r['macs_plain']:>6.1%} "
              f"{r['speedup_plain']:>7.2f}x {r['macs_steps']:>7.1%} {r['speedup_steps']:>9.2f}x {r['steps_gain']:>+7.1%}"
              f" {r['macs_equal']:>7.1%} {r['speedup_equal']:>9.2f}x {r['steps_gain_equal_macs']:>+7.1%}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"settings": {"threads": args.threads, "repeats": args.repeats, "max_points": args.max_points,
                                                     "target_flops": TARGET, "torch": torch.__version__}, "rows": rows}, indent=2))
    print(f"\nwritten: {args.results}")


if __name__ == "__main__":
    main()
