"""Where does a network's latency live on each backend? Every group of prunable layers with the same
channel count at the same input size (a CIFAR ResNet's three stages) is pruned alone, all its layers
to one count, the rest of the network dense; each such network is timed against the dense model
(``measure_pair``: interleaved, median of three rounds) and put next to its MACs and the latency
table's prediction.

It shows what a MACs budget cannot: a stage whose channels cost little time per MAC is the wrong
place to spend a latency saving, and counts off the runtime's channel block can be slower than the
dense width (the staircase ``round_to="measured"`` steers around).

    python benchmarks/stage_latency.py [--models resnet56] [--backends torch onnxruntime] [--threads 2]

Results: benchmarks/results/stage_latency.json.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from runtime_speedup import make_pruner

from prunepilot.compression.backends import local_backend, measure_pair
from prunepilot.compression.latency import FileLatencyStore, LatencyTable
from prunepilot.service.settings import get_settings

RESULTS = Path(__file__).parent / "results" / "stage_latency.json"
EIGHTHS = tuple(range(1, 9))


def groups(pruner: Any) -> dict[tuple[int, int], list[int]]:
    """Prunable layers by (channels, input size), in network order."""
    out: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, layer in enumerate(pruner.graph.layers):
        out[(int(pruner.graph.channels[i]), int(layer.h))].append(i)
    return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["resnet56"])
    parser.add_argument("--backends", nargs="*", default=["torch", "onnxruntime"])
    parser.add_argument("--mobilenet-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=60, help="timed runs per network per round (three rounds)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = FileLatencyStore(get_settings().cache_dir / "latency_tables.json")
    rows: list[dict[str, Any]] = []
    for arch in args.models:
        pruner = make_pruner(arch, args.mobilenet_size)
        channels = pruner.graph.channels.astype(np.int64)
        for name in args.backends:
            backend = local_backend(name, args.threads)
            table = LatencyTable(pruner.graph, pruner.model, store, 1, args.threads, backend=backend)
            table.build()
            table.calibrated()
            for (width, size), layers in groups(pruner).items():
                for count in sorted({max(1, round(width * e / 8)) for e in EIGHTHS}):
                    kept = channels.copy()
                    kept[layers] = count
                    dense, net = measure_pair(backend, pruner.model, pruner.prune_kept(kept).model, pruner.input_size, 1,
                                              args.threads, warmup=5, repeats=args.repeats)
                    row = {"model": arch, "backend": name, "alignment": table.alignment, "group": f"{width} ch @{size} px",
                           "layers": len(layers), "kept": count, "macs": pruner.cost_of_kept(kept).macs / pruner.graph.dense_macs,
                           "measured": net.median_ms / dense.median_ms, "predicted": table.predict(kept) / table.dense_ms,
                           "dense_ms": dense.median_ms}
                    rows.append(row)
                    print(f"{arch} {name:11s} {row['group']:>14s} x{len(layers)} at {count:4d}: MACs {row['macs']:6.1%}  "
                          f"measured {row['measured']:6.1%}  predicted {row['predicted']:6.1%}", flush=True)
    head = f"{'model':<12} {'backend':<11} {'group':>14} {'kept':>5} {'MACs':>7} {'measured':>9} {'predicted':>9}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['model']:<12} {r['backend']:<11} {r['group']:>14} {r['kept']:>5} {r['macs']:>7.1%} {r['measured']:>9.1%} "
              f"{r['predicted']:>9.1%}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"settings": {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__},
                                        "rows": rows}, indent=2))
    print(f"\nwritten: {args.results}")


if __name__ == "__main__":
    main()
