"""Data at real scale: peak memory while a generated ImageFolder tree is streamed.

Generates trees of small JPEGs under /tmp (ten tiny JPEGs' bytes written under many names, one per
file: every file is still opened, read and decoded on its own), laid out as ImageNet is
(``train/<class>/``, ``val/<class>/``, 5 % of the images in val). Then, in a fresh process per
tree, with the cache limit forcing the streamed path: list the tree and carve its splits, stream
one epoch of the whole validation split through the evaluator (adaptive BN + validation) and a few
fine-tune steps of a small CNN (the data path is measured, not the network), and read the process's peak RSS (VmHWM) and its DataLoader workers'.
Peak memory must not grow with the number of images beyond the file list.

    nice python benchmarks/data_scale.py                      # 20,000 vs 200,000 images (about 2 minutes)
    python benchmarks/data_scale.py --sizes 2000 20000 --workers 2

Writes benchmarks/results/data_scale.json and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "data_scale.json"
CLASSES = 10


def _jpegs() -> list[bytes]:
    """Ten distinct 32x32 JPEGs (about a CIFAR image's size), one per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(CLASSES):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def generate(root: Path, n: int) -> float:
    """The tree of ``n`` images; returns the seconds it took."""
    t0 = time.perf_counter()
    jpegs = _jpegs()
    per_class = n // CLASSES
    n_val = per_class // 20
    for c in range(CLASSES):
        for split, count, offset in (("train", per_class - n_val, 0), ("val", n_val, per_class - n_val)):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(offset, offset + count):
                with open(folder / f"{i:07d}.jpg", "wb") as f:
                    f.write(jpegs[c])
    return time.perf_counter() - t0


def _mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(root: Path, workers: int, steps: int) -> dict[str, float]:
    """In this (fresh) process: the streamed path over ``root``, with memory read at each phase."""
    import torch
    from torch import nn

    from prunepilot.compression import Evaluator, Fidelity, FinetuneConfig, Pruner, finetune, load_splits
    from prunepilot.compression.data import Normalizer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                          nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES)).eval()
    pruner = Pruner(model, "module:Small", CLASSES, 32)
    pruner.scores  # noqa: B018 - traced before the baseline
    out: dict[str, float] = {"after_import_mb": _mb("VmRSS")}
    t0 = time.perf_counter()
    splits = load_splits(root, image_size=32, max_decoded_bytes=1, loader_workers=workers)  # every split streamed
    out["list_s"] = time.perf_counter() - t0
    out["images"] = len(splits.train) + len(splits.val) + len(splits.test)
    out["file_list_mb"] = sum(s.files.nbytes + s.labels.numel() * 8 for s in (splits.train, splits.val, splits.test)) / 2**20  # type: ignore[attr-defined]
    out["after_listing_mb"], out["peak_listing_mb"] = _mb("VmRSS"), _mb("VmHWM")
    ev = Evaluator(pruner, splits, Fidelity(val_images=None, calib_images=1024))
    t0 = time.perf_counter()
    ev.evaluate(dict.fromkeys(pruner.layer_names, 0.5))
    out["val_images"] = len(splits.val)
    out["val_epoch_s"] = time.perf_counter() - t0
    out["peak_after_val_mb"] = _mb("VmHWM")
    t0 = time.perf_counter()
    finetune(pruner.prune(dict.fromkeys(pruner.layer_names, 0.5)).model, splits.train, Normalizer(splits.mean, splits.std),
             FinetuneConfig(steps=steps, batch_size=128))
    out["finetune_steps"] = steps
    out["finetune_s"] = time.perf_counter() - t0
    out["peak_mb"] = _mb("VmHWM")
    out["workers_peak_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--steps", type=int, default=20, help="fine-tune steps (batch 128)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/prunepilot-data-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the generated trees")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process's part
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.workers, args.steps)))
        return
    rows = {}
    for n in args.sizes:
        tree = args.root / f"n{n}"
        shutil.rmtree(tree, ignore_errors=True)
        gen_s = generate(tree, n)
        try:
            proc = subprocess.run([sys.executable, __file__, "--measure", str(tree), "--workers", str(args.workers),
                                   "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        finally:
            if not args.keep:
                shutil.rmtree(tree, ignore_errors=True)
        rows[str(n)] = {"generate_s": gen_s, **json.loads(proc.stdout.strip().splitlines()[-1])}
    sizes = [str(n) for n in args.sizes]
    small, large = rows[sizes[0]], rows[sizes[-1]]
    growth = {"peak_mb": large["peak_mb"] - small["peak_mb"], "file_list_mb": large["file_list_mb"] - small["file_list_mb"],
              "bytes_per_extra_image": (large["peak_mb"] - small["peak_mb"]) * 2**20 / max(1, large["images"] - small["images"])}
    blob = {"sizes": rows, "growth": growth, "workers": args.workers,
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(blob, indent=2))
    print(f"{'images':>9} {'list s':>7} {'file list MB':>12} {'RSS after import':>16} {'after listing':>13} {'peak':>7} "
          f"{'workers peak':>12} {'val epoch':>16} {'fine-tune':>14}")
    for n, r in rows.items():
        print(f"{int(n):>9,} {r['list_s']:>7.1f} {r['file_list_mb']:>12.1f} {r['after_import_mb']:>13.0f} MB {r['after_listing_mb']:>10.0f} MB "
              f"{r['peak_mb']:>4.0f} MB {r['workers_peak_mb']:>9.0f} MB {r['val_images']:>7,} in {r['val_epoch_s']:>4.1f} s "
              f"{r['finetune_steps']:>3} steps {r['finetune_s']:>4.1f} s")
    print(f"peak RSS grew {growth['peak_mb']:+.1f} MB from {sizes[0]} to {sizes[-1]} images ({growth['bytes_per_extra_image']:.0f} bytes "
          f"per extra image; the file list itself grew {growth['file_list_mb']:+.1f} MB)")


if __name__ == "__main__":
    main()
