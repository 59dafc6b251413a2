"""The engine on a GPU: one script, sized to finish in under 8 minutes on one H200 (16 CPU cores).

1. parity: the same 5 ResNet-56 strategies scored (adaptive BN, 1,000 validation and 1,024
   calibration images) on the CPU and on the GPU; target: within 0.2 pt of each other.
2. speed: evaluations per second on the GPU and on the CPU; fine-tune images per second on the GPU
   next to a plain PyTorch AMP training loop on the same GPU (target >= 0.8x of it) and to the CPU.
3. the AMC paper's headline problem: ResNet-56 on CIFAR-10-JPEG at 50 % FLOPs (every layer
   prunable), AMC 400 episodes, Optuna TPE 400 trials and uniform pruning, searched on the GPU;
   each best strategy and the dense model fine-tuned with the same long schedule (as many epochs as
   the time left allows, computed from the measured fine-tune speed), accuracy drop against the
   dense model next to the paper's 0.9 pt (92.8 -> 91.9 on the original CIFAR-10).

    python benchmarks/gpu.py [--data DIR] [--budget-s 450] [--out FILE]
    python benchmarks/gpu.py --smoke            # the same code on tiny settings (CPU without CUDA): < 2 min

The data (cifar10-jpeg.zip, resnet56-cifar10.th) is looked for in --data, ./shared/data,
../shared/data, .gpu/data and PRUNEPILOT_SHARED_WEIGHTS_DIR. Writes benchmarks/results/gpu.json (not
with --smoke) and --out when given, and prints a table. On a lent device: benchmarks/gpu_prepare.sh
here, then benchmarks/gpu_run.sh there (docs/benchmarks.md says how).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PAPER = {"dense_top1": 92.8, "pruned_top1": 91.9, "drop_pt": 0.9, "note": "AMC paper, ResNet-56, 50 % FLOPs, original CIFAR-10"}


def find_data(given: Path | None) -> Path:
    """The folder holding cifar10-jpeg.zip and resnet56-cifar10.th (the device machine runs a copy of the
    repository, with shared/ inside it or data carried in .gpu/data)."""
    candidates = [given] if given is not None else []
    candidates += [Path.cwd() / "shared" / "data", Path.cwd().parent / "shared" / "data", REPO / "shared" / "data",
                   REPO.parent / "shared" / "data", REPO / ".gpu" / "data"]
    if os.environ.get("PRUNEPILOT_SHARED_WEIGHTS_DIR"):
        candidates.append(Path(os.environ["PRUNEPILOT_SHARED_WEIGHTS_DIR"]))
    for c in candidates:
        if c is not None and (c / "cifar10-jpeg.zip").is_file() and (c / "resnet56-cifar10.th").is_file():
            return c
    sys.exit(f"error: cifar10-jpeg.zip and resnet56-cifar10.th not found in any of {[str(c) for c in candidates if c]}; pass --data")


def mini_zip(src: Path, dst: Path, train_per_class: int, test_per_class: int) -> Path:
    """The first images of each class (a byte copy of the stored members): the smoke run's data."""
    import zipfile

    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            parts = info.filename.split("/")
            if len(parts) == 4 and int(Path(parts[3]).stem) < (train_per_class if parts[1] == "train" else test_per_class):
                zout.writestr(info.filename, zin.read(info))
    return dst


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def strategies(names: list[str], n: int, seed: int) -> list[dict[str, float]]:
    from prunepilot.compression import uniform_strategy

    rng = np.random.default_rng(seed)
    out = [uniform_strategy(names, 0.3), uniform_strategy(names, 0.5)]
    out += [dict(zip(names, rng.uniform(0.1, 0.7, len(names)).tolist(), strict=True)) for _ in range(n - 2)]
    return out[:n]


def parity(pruner: Any, splits: Any, gpu: torch.device, fid: Any) -> dict[str, Any]:
    from prunepilot.compression import Evaluator

    cpu_ev, gpu_ev = Evaluator(pruner, splits, fid, device="cpu"), Evaluator(pruner, splits, fid, device=gpu)
    rows = []
    for s in strategies(pruner.layer_names, 5, seed=1):
        c, g = cpu_ev.evaluate(s), gpu_ev.evaluate(s)
        rows.append({"macs_ratio": c.macs_ratio, "cpu": c.accuracy, "gpu": g.accuracy, "diff_pt": 100 * (g.accuracy - c.accuracy),
                     "cpu_s": c.wall_time_s, "gpu_s": g.wall_time_s})
    worst = max(abs(r["diff_pt"]) for r in rows)
    return {"strategies": rows, "max_abs_diff_pt": worst, "target_pt": 0.2, "met": worst <= 0.2,
            "cpu_evals_per_s": (len(rows) - 1) / sum(r["cpu_s"] for r in rows[1:])}  # the first pays for warm-up


def evals_per_second(pruner: Any, splits: Any, gpu: torch.device, fid: Any, n: int) -> float:
    from prunepilot.compression import Evaluator

    ev = Evaluator(pruner, splits, fid, device=gpu)
    todo = strategies(pruner.layer_names, n + 2, seed=2)
    for s in todo[:2]:  # warm-up: cuDNN autotuning, allocator, data on the device
        ev.evaluate(s)
    sync(gpu)
    t0 = time.perf_counter()
    for s in todo[2:]:
        ev.evaluate(s)
    sync(gpu)
    return n / (time.perf_counter() - t0)


def finetune_speed(model: torch.nn.Module, splits: Any, device: torch.device, steps: int, warmup: int) -> float:
    """Images per second of the engine's fine-tune (batch 128) on ``device``, after ``warmup`` steps."""
    from prunepilot.compression import FinetuneConfig, finetune
    from prunepilot.compression.data import Normalizer

    norm = Normalizer(splits.mean, splits.std)
    train = splits.train.on(device)
    net = copy.deepcopy(model)
    finetune(net, train, norm, FinetuneConfig(steps=warmup, batch_size=128), device=device)
    sync(device)
    t0 = time.perf_counter()
    finetune(net, train, norm, FinetuneConfig(steps=steps, batch_size=128, seed=1), device=device)
    sync(device)
    return steps * 128 / (time.perf_counter() - t0)


def plain_amp_loop(model: torch.nn.Module, splits: Any, device: torch.device, steps: int, warmup: int) -> float:
    """Images per second of a plain PyTorch training loop as a user writes it for this model on this
    GPU: data on the GPU, random crop and flip there, bf16 autocast, channels-last, SGD with Nesterov
    momentum, no host synchronization inside the loop."""
    net = copy.deepcopy(model).to(device).to(memory_format=torch.channels_last).train()
    x_all, y_all = splits.train.images.to(device), splits.train.labels.to(device)
    mean = torch.tensor(splits.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(splits.std, device=device).view(1, 3, 1, 1) * 255
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    n, size = len(y_all), x_all.shape[-1]
    base = torch.arange(size, device=device)

    def step() -> None:
        idx = torch.randint(0, n, (128,), device=device)
        padded = F.pad(x_all[idx], (4, 4, 4, 4))
        dy, dx = torch.randint(0, 9, (128, 1), device=device), torch.randint(0, 9, (128, 1), device=device)
        cols = torch.where(torch.rand(128, 1, device=device) < 0.5, dx + size - 1 - base, dx + base)
        xb = padded[torch.arange(128, device=device).view(128, 1, 1), :, (dy + base).view(128, size, 1), cols.view(128, 1, size)]
        xb = ((xb.permute(0, 3, 1, 2).float() - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(net(xb), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * 128 / (time.perf_counter() - t0)


def headline(pruner: Any, splits: Any, gpu: torch.device, fid: Any, clock: Clock, episodes: int, ft_img_s: float,
             max_epochs: float, smoke: bool) -> dict[str, Any]:
    from prunepilot.agents import MemoryRecorder, SearchLimits
    from prunepilot.agents.pipeline import FinalConfig, PipelineConfig, PipelineHooks, finish, prepare, search
    from prunepilot.compression import Budget, Constraint, FinetuneConfig

    budget = Budget(constraints=[Constraint(resource="flops", ratio=0.5)])
    hooks = PipelineHooks(device=gpu)
    prepared = prepare(pruner, splits, PipelineConfig(agent="uniform", budget=budget, fidelity=fid), hooks)
    searches: dict[str, Any] = {}
    for agent, n, share in (("uniform", 1, 0.05), ("amc", episodes, 0.22), ("optuna-tpe", episodes, 0.22)):
        config = PipelineConfig(agent=agent, budget=budget, fidelity=fid, seed=0,
                                search=SearchLimits(max_evaluations=n, max_seconds=max(10.0, share * clock.budget_s)))
        t0 = time.perf_counter()
        _, result = search(prepared, config, PipelineHooks(device=gpu, recorder=MemoryRecorder()))
        assert result.best is not None
        searches[agent] = {"evaluations": result.trials, "asked": n, "seconds": time.perf_counter() - t0,
                           "best_search_accuracy": result.best.accuracy, "macs_ratio": result.best.metrics["macs_ratio"],
                           "strategy": result.best.strategy}
        print(f"  {agent}: {result.trials} evaluations in {searches[agent]['seconds']:.0f} s, best search accuracy "
              f"{result.best.accuracy:.3f}", flush=True)
    # as many epochs as fit: four fine-tunes (dense, uniform, AMC, TPE), each at most the dense model's cost
    # per epoch, plus BN re-estimation and test passes per network (CPU latency is not measured here: the
    # latency target is another matter); 10 % and 20 s kept in hand
    epoch_s = len(splits.train) / ft_img_s
    fixed_s = 5.0 * 3
    epochs = max(0.05, min(max_epochs, math.floor((0.9 * clock.left() - 20 - fixed_s) / (4 * epoch_s * 1.15))))
    if smoke:
        epochs = 0.05
    print(f"  fine-tuning every network {epochs:g} epoch(s) (about {epoch_s:.1f} s an epoch on the dense model)", flush=True)
    finals: dict[str, Any] = {}
    dense_ft = None
    for agent in ("uniform", "amc", "optuna-tpe"):
        t0 = time.perf_counter()
        res = finish(pruner, splits, searches[agent]["strategy"],
                     FinalConfig(finetune=FinetuneConfig(epochs=epochs, lr=0.01), finetune_dense=dense_ft is None, latency_batches=()),
                     hooks)
        rep = res.report()
        if "dense_finetuned" in rep["figures"]:
            dense_ft = rep["figures"]["dense_finetuned"]["accuracy"]
        finals[agent] = {"test_accuracy": rep["figures"]["pruned"]["accuracy"], "macs_ratio": rep["macs_ratio"],
                         "params_ratio": rep["params_ratio"], "seconds": time.perf_counter() - t0}
        print(f"  {agent}: test accuracy {finals[agent]['test_accuracy']:.2%} after {epochs:g} epochs "
              f"({finals[agent]['seconds']:.0f} s)", flush=True)
    assert dense_ft is not None
    for f in finals.values():
        f["drop_pt"] = 100 * (dense_ft - f["test_accuracy"])
    return {"budget": "flops <= 50 % of dense, every layer prunable", "searches": searches, "epochs": epochs,
            "dense_finetuned_accuracy": dense_ft, "dense_accuracy": rep["figures"]["dense"]["accuracy"], "finals": finals,
            "test_images": rep["test_images"], "paper": PAPER}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-time budget of the whole run (sizes the long fine-tune)")
    parser.add_argument("--episodes", type=int, default=400, help="AMC episodes and TPE trials")
    parser.add_argument("--max-epochs", type=float, default=30.0)
    parser.add_argument("--smoke", action="store_true", help="tiny settings, the same code (CPU without CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/prunepilot-gpu-cache"))
    args = parser.parse_args()
    clock = Clock(args.budget_s)

    from prunepilot.compression import Fidelity, Pruner, PruningConstraints, load_model, load_splits
    from prunepilot.compression.compute_device import describe, resolve_device

    data = find_data(args.data)
    if args.smoke:  # ResNet-20 (same family, a third of the work) on a few hundred images
        gpu, arch = resolve_device("auto"), "resnet20"
        zip_path = mini_zip(data / "cifar10-jpeg.zip", args.cache / "mini.zip", 40, 20)
        fid = Fidelity(val_images=100, calib_images=64)
        episodes, n_evals, ft_steps, warmup = 4, 3, 4, 1
    else:
        gpu, arch = resolve_device("cuda"), "resnet56"  # the point of this script: no GPU is one clear error
        zip_path, fid = data / "cifar10-jpeg.zip", Fidelity(val_images=1000, calib_images=1024)
        episodes, n_evals, ft_steps, warmup = args.episodes, 20, 300, 30
    print(f"data {data}, GPU {describe(gpu)}, {os.cpu_count()} CPU cores, torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    splits = load_splits(zip_path, cache_dir=args.cache, image_size=32, val_size=100 if args.smoke else None)
    model = load_model(arch, data / f"{arch}-cifar10.th")
    pruner = Pruner(model, arch, 10, 32, PruningConstraints())
    pruner.scores  # noqa: B018 - importance scores, once
    print(f"data decoded and model traced in {time.perf_counter() - t0:.0f} s ({len(splits.train)} train, {len(splits.val)} val, "
          f"{len(splits.test)} test images)", flush=True)
    out: dict[str, Any] = {"arch": arch, "machine": {"gpu": describe(gpu), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
                                       "cuda": torch.version.cuda, "python": platform.python_version(),
                                       "date": time.strftime("%Y-%m-%d %H:%M")}, "smoke": args.smoke}
    print("1. CPU vs GPU accuracy of the same 5 strategies", flush=True)
    out["parity"] = parity(pruner, splits, gpu, fid)
    for r in out["parity"]["strategies"]:
        print(f"  MACs {r['macs_ratio']:.1%}: CPU {r['cpu']:.3f}, GPU {r['gpu']:.3f} ({r['diff_pt']:+.2f} pt)", flush=True)
    print("2. speed", flush=True)
    dense = pruner.model
    speed = {"gpu_evals_per_s": evals_per_second(pruner, splits, gpu, fid, n_evals), "cpu_evals_per_s": out["parity"]["cpu_evals_per_s"],
             "finetune_img_per_s_gpu": finetune_speed(dense, splits, gpu, ft_steps, warmup),
             "finetune_img_per_s_cpu": finetune_speed(dense, splits, torch.device("cpu"), max(2, ft_steps // 30), 1)}
    speed["plain_amp_img_per_s_gpu"] = plain_amp_loop(dense, splits, gpu, ft_steps, warmup) if gpu.type == "cuda" else None
    if speed["plain_amp_img_per_s_gpu"]:
        speed["finetune_vs_plain"] = speed["finetune_img_per_s_gpu"] / speed["plain_amp_img_per_s_gpu"]
    speed["target_vs_plain"] = 0.8
    out["speed"] = speed
    for k, v in speed.items():
        print(f"  {k}: {v:.3g}" if isinstance(v, float) else f"  {k}: {v}", flush=True)
    print(f"3. {arch}, 50 % FLOPs: AMC {episodes} episodes, TPE {episodes} trials, uniform ({clock.left():.0f} s left)", flush=True)
    out["headline"] = headline(pruner, splits, gpu, fid, clock, episodes, speed["finetune_img_per_s_gpu"], args.max_epochs, args.smoke)
    out["seconds"] = clock.elapsed()
    h = out["headline"]
    print(f"\n| network | MACs | test accuracy after {h['epochs']:g} epochs | drop vs dense fine-tuned (pt) |")
    print("|---|---|---|---|")
    print(f"| dense | 100 % | {h['dense_finetuned_accuracy']:.2%} | - |")
    for agent, f in h["finals"].items():
        print(f"| {agent} | {f['macs_ratio']:.1%} | {f['test_accuracy']:.2%} | {f['drop_pt']:.2f} |")
    print(f"| AMC paper (original CIFAR-10) | 50 % | {PAPER['pruned_top1']} % | {PAPER['drop_pt']} |")
    print(f"total {out['seconds']:.0f} s")
    blob = json.dumps(out, indent=2, default=str)
    if not args.smoke:  # a smoke run's figures mean nothing: only --out gets them
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "gpu.json").write_text(blob)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(blob)


if __name__ == "__main__":
    main()
