"""Engine benchmark: evaluator throughput, prune time, latency speedup, fine-tuning, fidelity ranking.

Prints a table per section and writes benchmarks/results/engine.json (sections merge into it, so
they can run in pieces):

    python benchmarks/engine.py                       # everything (about 30 min on 2 cores)
    python benchmarks/engine.py --only throughput prune latency
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau

from prunepilot.compression import (
    Evaluator,
    Fidelity,
    FinetuneConfig,
    Pruner,
    PruningConstraints,
    finetune,
    measure_latency,
    uniform_strategy,
)
from prunepilot.compression.cifar_resnet import RESIDUAL_ROOTS
from prunepilot.compression.data import Normalizer
from prunepilot.compression.evaluate import accuracy
from prunepilot.compression.finalizing import heldout_tensors
from prunepilot.compression.strategy import from_vector
from prunepilot.service.settings import get_settings
from prunepilot.service.workspace import open_session

RESULTS = Path(__file__).parent / "results" / "engine.json"
SECTIONS = ("throughput", "prune", "latency", "finetune", "fidelity", "store")


def save(section: str, data: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    blob = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    blob[section] = data
    blob["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    RESULTS.write_text(json.dumps(blob, indent=2))


def table(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n== {title}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def session(arch: str):
    s = get_settings()
    # block-internal convs only: the space the recorded results were measured in
    return open_session(arch, s.shared_weights_dir / f"{arch}-cifar10.th", "cifar10-jpeg", s,
                        PruningConstraints(exclude=RESIDUAL_ROOTS), progress=True)


def bench_throughput() -> None:
    """Evaluator vs a plain PyTorch loop doing the same work (BN re-estimation + validation)."""
    out = {}
    for arch in ("resnet20", "resnet56"):
        sess = session(arch)
        fid = Fidelity(val_images=2000, calib_images=1024)
        ev = Evaluator(sess.pruner, sess.splits, fid)
        data = ev.data(fid)
        rng = np.random.default_rng(0)
        strategies = [from_vector(rng.uniform(0.2, 0.6, len(sess.pruner.layers)), sess.pruner.layer_names) for _ in range(5)]
        ev.evaluate(strategies[0])  # warm-up (importance scores, allocator)
        ev._cache.clear()
        t0 = time.perf_counter()
        for s in strategies:
            ev.evaluate(s)
        t_eval = time.perf_counter() - t0
        val = data.val.load()
        plain_val, val_y = data.normalizer(val.images).contiguous(), val.labels
        plain_cal = data.calib_x.contiguous()
        t0 = time.perf_counter()
        for s in strategies:
            model = sess.pruner.prune(s).model.to(memory_format=torch.contiguous_format)
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.reset_running_stats()
                    m.momentum = None
            model.train()
            with torch.no_grad():
                for i in range(0, len(plain_cal), 128):
                    model(plain_cal[i:i + 128])
            model.eval()
            correct = 0
            with torch.no_grad():
                for i in range(0, len(plain_val), 128):
                    correct += int((model(plain_val[i:i + 128]).argmax(1) == val_y[i:i + 128]).sum())
        t_plain = time.perf_counter() - t0
        images = len(strategies) * (len(plain_val) + len(plain_cal))
        out[arch] = {"evaluator_s_per_eval": t_eval / 5, "plain_s_per_eval": t_plain / 5,
                     "evaluator_img_per_s": images / t_eval, "plain_img_per_s": images / t_plain,
                     "throughput_ratio": t_plain / t_eval, "forward_share": ev.forward_seconds / ev.total_seconds}
        table(f"evaluator throughput, {arch} (2,000 val + 1,024 calibration images per evaluation)", [
            ("evaluator s/eval", f"{t_eval / 5:.2f}"), ("plain loop s/eval", f"{t_plain / 5:.2f}"),
            ("throughput ratio (target >= 0.9)", f"{t_plain / t_eval:.2f}"),
            ("share of eval time in forward passes", f"{ev.forward_seconds / ev.total_seconds:.1%}")])
    save("throughput", out)


def bench_prune() -> None:
    sess = session("resnet56")
    rng = np.random.default_rng(0)
    sess.pruner.scores  # noqa: B018 - computed once per model, not per strategy
    times = []
    for _ in range(20):
        s = from_vector(rng.uniform(0, 0.8, len(sess.pruner.layers)), sess.pruner.layer_names)
        t0 = time.perf_counter()
        sess.pruner.prune(s)
        times.append(time.perf_counter() - t0)
    res = {"median_s": statistics.median(times), "max_s": max(times), "n": len(times)}
    table("time to prune ResNet-56 with a random strategy (target < 0.5 s)", [
        ("median", f"{res['median_s'] * 1000:.1f} ms"), ("max", f"{res['max_s'] * 1000:.1f} ms")])
    save("prune", res)


def bench_latency() -> None:
    sess = session("resnet56")
    pruned = sess.pruner.prune(uniform_strategy(sess.pruner.layer_names, 0.5))
    macs_ratio = sess.pruner.cost(pruned.strategy).macs / sess.pruner.graph.dense_macs
    res: dict[str, Any] = {"macs_ratio": macs_ratio}
    rows = [("MACs kept", f"{macs_ratio:.1%}")]
    for bs in (1, 64):
        dense, small = measure_latency([copy.deepcopy(sess.model), pruned.model], 32, bs, threads=2, warmup=5,
                                       repeats=100 if bs == 1 else 20)
        res[f"b{bs}"] = {"dense_ms": dense.median_ms, "pruned_ms": small.median_ms, "speedup": dense.median_ms / small.median_ms,
                         "dense_p10_p90": [dense.p10_ms, dense.p90_ms], "pruned_p10_p90": [small.p10_ms, small.p90_ms]}
        rows.append((f"batch {bs}", f"dense {dense.median_ms:.2f} ms, pruned {small.median_ms:.2f} ms, "
                                    f"speedup {dense.median_ms / small.median_ms:.2f}x"))
    table("latency, ResNet-56 dense vs uniform 50 % MACs (interleaved, median, 2 threads)", rows)
    save("latency", res)


def bench_finetune() -> None:
    sess = session("resnet56")
    x, y = heldout_tensors(sess.splits)
    model = copy.deepcopy(sess.model).to(memory_format=torch.channels_last)
    before = accuracy(model, x, y)
    norm = Normalizer(sess.splits.mean, sess.splits.std)
    result = finetune(model, sess.splits.train, norm, FinetuneConfig(epochs=1.0, lr=0.01))
    after = accuracy(model, x, y)
    res = {"before": before, "after_1_epoch": after, "finetune_s": result.seconds, "steps": result.steps}
    table("dense ResNet-56, full JPEG test split (10,000 images)", [
        ("before fine-tuning", f"{before:.2%}"), ("after 1 epoch (lr 0.01, cosine)", f"{after:.2%}"),
        ("fine-tune time", f"{result.seconds:.0f} s for {result.steps} steps")])
    save("finetune", res)


def fidelity_strategies(pruner: Pruner, n: int, seed: int = 0) -> list[dict[str, float]]:
    """Uniform, random and skewed strategies between 40 % and 60 % MACs kept."""
    rng = np.random.default_rng(seed)
    names = pruner.layer_names
    L = len(names)
    out = []
    depth = np.linspace(0, 1, L)
    shapes = [lambda: np.full(L, 1.0), lambda: rng.uniform(0.2, 1.0, L), lambda: 0.3 + depth, lambda: 1.3 - depth,
              lambda: 0.2 + (np.arange(L) % 3 == 0) * 0.8]
    i = 0
    while len(out) < n:
        shape = shapes[i % len(shapes)]()
        i += 1
        target = rng.uniform(0.4, 0.6)
        lo, hi = 0.0, 2.0  # scale the shape until MACs hit the target
        for _ in range(40):
            mid = (lo + hi) / 2
            ratios = np.clip(shape * mid, 0, 0.8)
            kept = pruner.cost(from_vector(ratios, names)).macs / pruner.graph.dense_macs
            lo, hi = (mid, hi) if kept > target else (lo, mid)
        ratios = np.clip(shape * hi, 0, 0.8)
        macs = pruner.cost(from_vector(ratios, names)).macs / pruner.graph.dense_macs
        if 0.4 <= macs <= 0.6:
            out.append(from_vector(ratios, names))
    return out


def bench_fidelity(n: int = 12, epochs: float = 1.0) -> None:
    sess = session("resnet20")
    ev = Evaluator(sess.pruner, sess.splits)
    strategies = fidelity_strategies(sess.pruner, n)
    fids = {"none": Fidelity(method="none"), "adaptive-bn": Fidelity(), "reconstruct": Fidelity(method="reconstruct"),
            "short-finetune": Fidelity(method="short-finetune", finetune_steps=50)}
    scores: dict[str, list[float]] = {k: [] for k in fids}
    cost: dict[str, float] = {k: 0.0 for k in fids}
    truth: list[float] = []
    x, y = heldout_tensors(sess.splits)
    norm = Normalizer(sess.splits.mean, sess.splits.std)
    ft_seconds = 0.0
    for i, s in enumerate(strategies):
        for name, f in fids.items():
            m = ev.evaluate(s, f)
            scores[name].append(m.accuracy)
            cost[name] += m.wall_time_s
        model = sess.pruner.prune(s).model.to(memory_format=torch.channels_last)
        ev_data = ev.data(fids["adaptive-bn"])
        from prunepilot.compression.evaluate import recalibrate_batchnorm

        recalibrate_batchnorm(model, ev_data.calib_x)
        r = finetune(model, sess.splits.train, norm, FinetuneConfig(epochs=epochs, lr=0.01, seed=i))
        ft_seconds += r.seconds
        truth.append(accuracy(model, x, y))
        print(f"  strategy {i + 1}/{n}: MACs {m.macs_ratio:.0%}, " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in scores.items())
              + f", after {epochs:g} epoch FT {truth[-1]:.3f}", flush=True)
    res: dict[str, Any] = {"strategies": len(strategies), "finetune_epochs": epochs, "finetuned_test_acc": truth,
                           "finetune_s_mean": ft_seconds / n, "fidelities": {}}
    rows = []
    for name in fids:
        tau = kendalltau(scores[name], truth).statistic
        share = (cost[name] / n) / (ft_seconds / n)
        res["fidelities"][name] = {"kendall_tau": tau, "scores": scores[name], "s_per_eval": cost[name] / n, "cost_vs_finetune": share}
        rows.append((name, f"tau {tau:+.2f}, {cost[name] / n:.2f} s/eval = {share:.1%} of a {epochs:g}-epoch fine-tune"))
    table(f"fidelity ranking: Kendall tau vs test accuracy after {epochs:g} epoch fine-tune, ResNet-20, {n} strategies at 40-60 % MACs "
          "(target: adaptive-bn >= 0.6 at < 5 % of the cost)", rows)
    save("fidelity", res)


def _store_writer(url: str, job_id: str, n: int, out) -> None:  # type: ignore[no-untyped-def]
    from prunepilot.agents import TrialRecord
    from prunepilot.service.db.store import JobStore
    from prunepilot.service.recorder import SqlTrialRecorder

    rec = SqlTrialRecorder(JobStore(url), job_id)
    strategy = {f"layer{i}.conv1": 0.5 for i in range(27)}
    metrics = {"accuracy": 0.5, "macs_ratio": 0.5, "params_ratio": 0.5, "size_ratio": 0.5, "latency_ms": None,
               "kept": [16] * 27, "fidelity": "adaptive-bn", "wall_time_s": 1.0}
    times = []
    for step in range(n):
        t0 = time.perf_counter()
        rec.record(TrialRecord(step=step, agent="bench", strategy=strategy, metrics=metrics))
        times.append(time.perf_counter() - t0)
    out.put(times)


def bench_store(n: int = 300) -> None:
    """Cost of recording one trial (insert + job progress/best update), SQLite and PostgreSQL."""
    import multiprocessing as mp
    import tempfile

    from prunepilot.service.db import repo
    from prunepilot.service.db.engine import dispose_engines, session_scope
    from prunepilot.service.db.migrate import upgrade
    from prunepilot.service.pgserver import postgres_server

    blob = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    eval_s = blob.get("throughput", {}).get("resnet20", {}).get("evaluator_s_per_eval", 1.0)
    res: dict[str, Any] = {"reference_eval_s": eval_s}
    rows = []

    def run(kind: str, url: str) -> None:
        upgrade(url)
        with session_scope(url) as s:
            for w in range(3):
                repo.create_job(s, job_id=f"bench{w}", agent="bench", arch="resnet56", dataset="x", problem={}, problem_key="k")
        dispose_engines()  # no pooled connection may cross into the writer processes
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        single = ctx.Process(target=_store_writer, args=(url, "bench0", n, q))
        single.start()
        one = q.get()
        single.join()
        procs = [ctx.Process(target=_store_writer, args=(url, f"bench{w}", n, q)) for w in (1, 2)]
        for p in procs:
            p.start()
        both = [q.get() for _ in procs]
        for p in procs:
            p.join()
        # throughput from the writers' own write times (process start-up, i.e. importing torch, excluded)
        busy = max(sum(ts) for ts in both)
        ms = sorted(t * 1000 for t in one)
        res[kind] = {"p50_ms": statistics.median(ms), "p99_ms": ms[int(0.99 * (len(ms) - 1))], "mean_ms": statistics.fmean(ms),
                     "two_writers_trials_per_s": 2 * n / busy, "share_of_eval": statistics.fmean(ms) / 1000 / eval_s,
                     "two_writers_p99_ms": sorted(t * 1000 for ts in both for t in ts)[int(0.99 * (2 * n - 1))]}
        rows.append((kind, f"p50 {res[kind]['p50_ms']:.2f} ms, p99 {res[kind]['p99_ms']:.2f} ms, "
                           f"{res[kind]['share_of_eval']:.3%} of a {eval_s:.2f} s evaluation; "
                           f"2 writer processes: {res[kind]['two_writers_trials_per_s']:.0f} trials/s, "
                           f"p99 {res[kind]['two_writers_p99_ms']:.1f} ms"))

    with tempfile.TemporaryDirectory() as tmp:
        run("sqlite", f"sqlite:///{tmp}/bench.db")
    with postgres_server() as url:
        run("postgres", url)
        dispose_engines()
    table("recording a trial (target < 1 % of an evaluation)", rows)
    save("store", res)


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--fidelity-strategies", type=int, default=12)
    parser.add_argument("--fidelity-epochs", type=float, default=1.0)
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="results file the sections merge into (another file: re-measure without replacing the record)")
    args = parser.parse_args()
    RESULTS = args.results
    torch.set_num_threads(get_settings().threads)
    for section in args.only:
        if section == "fidelity":
            bench_fidelity(args.fidelity_strategies, args.fidelity_epochs)
        else:
            globals()[f"bench_{section}"]()
    print(f"\nwritten: {RESULTS}")


if __name__ == "__main__":
    main()
