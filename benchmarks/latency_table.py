"""Latency lookup table: build cost and prediction error against measured end-to-end latency.

For each model, builds (or reuses) the table on a latency backend (torch eager by default, or ONNX
Runtime), then for 20 random strategies compares predicted latency with the pruned model's measured
latency on the same backend (median of repeats, interleaved with the dense model in the same run).
Target: median error of latency as a share of dense <= 5 %. The first ``--aligned`` of those
strategies are also scored with every count rounded down to a multiple of 8 (at least 8, or the
layer's own count where it has fewer): what measured channel steps give on runtimes with blocked channel layouts, reported
apart.

    python benchmarks/latency_table.py [--models resnet20 resnet56 mobilenet_v2] [--strategies 20]
                                       [--backend torch|onnxruntime]

Results: benchmarks/results/latency_table.json (torch), latency_table_<backend>.json (others).
``--max-points`` / ``--repeats`` shrink the grid and the timing for a quick try (not for the record).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from prunepilot.compression import Pruner, PruningConstraints, build_model, load_model
from prunepilot.compression.backends import local_backend, measure_pair
from prunepilot.compression.cifar_resnet import CIFAR_RESNET_DEPTHS, RESIDUAL_ROOTS
from prunepilot.compression.latency import FileLatencyStore, LatencyTable, on_block
from prunepilot.service.settings import get_settings

RESULTS = Path(__file__).parent / "results" / "latency_table.json"


def model_for(arch: str):  # type: ignore[no-untyped-def]
    weights = get_settings().shared_weights_dir / f"{arch}-cifar10.th"
    return load_model(arch, weights) if weights.is_file() else build_model(arch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["resnet20", "resnet56", "mobilenet_v2"])
    parser.add_argument("--strategies", type=int, default=20)
    parser.add_argument("--aligned", type=int, default=10, help="of those, how many to score again rounded to multiples of 8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="torch", help="latency backend: torch, onnxruntime or cuda")
    parser.add_argument("--max-points", type=int, default=12, help="channel grid points per layer (the table's default: 12)")
    parser.add_argument("--repeats", type=int, default=40, help="timed runs per network per round of the measured check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = RESULTS if args.backend == "torch" else RESULTS.with_name(f"latency_table_{args.backend}.json")
    store = FileLatencyStore(get_settings().cache_dir / "latency_tables.json")
    out = {}
    for arch in args.models:
        model = model_for(arch)
        # CIFAR ResNets: block-internal convs only, the space the recorded results were measured in
        pruner = Pruner(model, arch, 10, 32, PruningConstraints(exclude=RESIDUAL_ROOTS if arch in CIFAR_RESNET_DEPTHS else ()))
        table = LatencyTable(pruner.graph, pruner.model, store, args.batch, args.threads, max_points=args.max_points,
                             backend=local_backend(args.backend, args.threads))
        t0 = time.perf_counter()
        measured_entries = table.build()
        build_s = time.perf_counter() - t0
        table.calibrate(repeats=100)
        # The same measurements scored by two predictors, each with its own fit to the same
        # calibration runs (refit() is cheap and deterministic): the default lookup (plain bilinear
        # interpolation, quantum 1) and one that rounds channel counts up to multiples of 4 first
        # (latency as a staircase in channels).
        default_quantum = table.quantum
        alt_quantum = 4 if default_quantum == 1 else 1
        rng = np.random.default_rng(0)
        rows = []
        profiles = [pruner.kept_from_vector(rng.uniform(0.0, 0.8, len(pruner.layers))) for _ in range(args.strategies)]
        aligned = [on_block(k, pruner.graph.channels, 8) for k in profiles[:args.aligned]]
        for kind, kept in [("random", k) for k in profiles] + [("aligned", k) for k in aligned]:
            pruned = pruner.prune_kept(kept).model
            # three interleaved rounds, median ratio: the machine's speed drifts over minutes
            dense, small = measure_pair(table.backend, model, pruned, 32, args.batch, args.threads, warmup=5, repeats=args.repeats)
            measured_ratio = small.median_ms / dense.median_ms
            row = {"kind": kind, "measured_ms": small.median_ms, "dense_ms": dense.median_ms, "measured_ratio": measured_ratio}
            for quantum, tag in ((default_quantum, ""), (alt_quantum, "_alt")):
                table.quantum = quantum
                table.refit()
                predicted_ratio = table.predict(kept) / table.dense_ms
                row |= {f"predicted_ms{tag}": table.predict(kept), f"predicted_ratio{tag}": predicted_ratio,
                        f"abs_ms_error{tag}": abs(table.predict(kept) - small.median_ms) / small.median_ms,
                        f"ratio_error{tag}": abs(predicted_ratio - measured_ratio) / measured_ratio}
            rows.append(row)
        table.quantum = default_quantum
        table.refit()
        scored, rounded = [r for r in rows if r["kind"] == "random"], [r for r in rows if r["kind"] == "aligned"]
        ms_err = statistics.median(r["abs_ms_error"] for r in scored)
        ratio_err = statistics.median(r["ratio_error"] for r in scored)
        alt_err = statistics.median(r["ratio_error_alt"] for r in scored)
        aligned_err = statistics.median(r["ratio_error"] for r in rounded) if rounded else None
        out[arch] = {"entries": len(table.values), "measured_now": measured_entries, "build_s": build_s, "quantum": default_quantum,
                     "dense_ms": table.dense_ms, "remainder_ms": table.remainder_ms, "median_error_ms": ms_err,
                     "median_error_ratio": ratio_err, "max_error_ratio": max(r["ratio_error"] for r in scored),
                     "median_error_ratio_aligned": aligned_err,
                     "alt_quantum": alt_quantum, "median_error_ratio_alt": alt_err,
                     "max_error_ratio_alt": max(r["ratio_error_alt"] for r in scored), "strategies": rows}
        out[arch]["backend"] = args.backend
        out[arch] |= {"alignment": table.alignment, "penalty_ms": table.penalty_ms,
                      "fit_errors": table.calibration.get("fit_errors")}
        out[arch]["predicted_over_dense"] = sum(r["predicted_ratio"] > 1.0 + 1e-9 for r in scored)
        print(f"{arch:14s} [{args.backend}] entries {len(table.values):5d} (measured now {measured_entries}, {build_s:5.1f} s)  dense {table.dense_ms:6.2f} ms  "
              f"alignment {table.alignment}  median error: absolute {ms_err:6.1%}, as ratio of dense {ratio_err:6.1%} (target <= 5 %); "
              f"rounded up to {alt_quantum} channels {alt_err:6.1%}; aligned profiles "
              + (f"{aligned_err:6.1%}" if aligned_err is not None else "-"), flush=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"batch": args.batch, "threads": args.threads, "backend": args.backend, "max_points": args.max_points,
                                   "repeats": args.repeats, "models": out}, indent=2))
    print(f"written: {results}")


if __name__ == "__main__":
    main()
