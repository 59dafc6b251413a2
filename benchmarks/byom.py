"""Bring your own model: what the ONNX path costs and delivers, per architecture.

Each model (random weights, 10 classes) is exported as users do (torch's legacy exporter, opset 17,
dynamic batch, no constant folding: tests/helpers/onnx_models.py), then:

* conversion: ``onnx_to_torch`` time and ``check_against_onnxruntime``'s relative difference;
* trace: ``Pruner(..., verify=True)`` construction (dependency graph + the correctness check of
  every group's plan), prunable groups, blocked layers (``inspect_model``), and
  ``estimate_evaluation_seconds`` (one search evaluation at the default fidelity);
* 50 % MACs: the least uniform pruning meeting ``flops=0.5`` (``uniform_within``), exported with
  ``export_onnx``; MACs counted by ``onnx_macs`` from that file over an ``export_onnx`` of the dense
  converted model (same exporter, same ops), the cost model's prediction beside it, and
  ``check_against_onnxruntime``'s difference for the pruned file;
* the same at channel counts rounded to multiples of 8 (``round_to=8``: ONNX Runtime's blocked conv
  kernels are much faster on such widths), MACs and latency only;
* latency: batch 1 in ONNX Runtime (CPU, intra_op_num_threads=2), the user's file, the dense
  re-export and the pruned file run interleaved, median of ``--repeats`` runs after warm-up.

A stage that fails ends the model's row with its one-line message (a refusal is a result).
``name@size`` sets a model's input size (default ``--size``); vgg11_bn's AdaptiveAvgPool2d(7)
cannot be exported by the legacy exporter below 224 px.

    python benchmarks/byom.py [--models resnet18 vgg11_bn@224 ...] [--size 32] [--repeats 60]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torchvision

from prunepilot.compression import Budget, PrunePilotError, Pruner, inspect_model, parse_constraint
from prunepilot.compression.budget import analytic_checker, uniform_within
from prunepilot.compression.inspect import estimate_evaluation_seconds
from prunepilot.compression.onnx_io import check_against_onnxruntime, export_onnx, onnx_macs, onnx_to_torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the hand-written CNN of the test suite
from helpers.onnx_models import export_net, make_net  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "byom.json"
MODELS = ["net", "resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "shufflenet_v2_x0_5",
          "densenet121", "convnext_tiny", "vgg11_bn", "vgg11_bn@224"]
CLASSES = 10
TARGET = 0.5
ROUND_TO = 8


@contextlib.contextmanager
def quiet() -> Any:
    """The exporters' warnings and graph dumps (some written by C++ straight to fds 1 and 2) off the table."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with open(os.devnull, "w") as null, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            for fd in saved:
                os.dup2(null.fileno(), fd)
            warnings.simplefilter("ignore")
            yield
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return make_net() if name == "net" else torchvision.models.get_model(name, weights=None, num_classes=CLASSES).eval()


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency(paths: dict[str, Path], size: int, threads: int, warmup: int, repeats: int) -> dict[str, float]:
    """Median batch-1 milliseconds of each file, the files run in turn each repeat (interleaved)."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(repeats):
        order = list(sessions) if i % 2 == 0 else list(reversed(sessions))  # neither always runs first
        for k in order:
            start = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(key: str, size: int, work: Path, threads: int, warmup: int, repeats: int) -> dict[str, Any]:
    name = key.split("@")[0]
    row: dict[str, Any] = {"model": name, "input_size": size, "status": "pruned"}
    stage = "export (legacy exporter)"
    try:
        user = work / f"{key}.onnx"
        with quiet():
            export_net(build(name), user, size=size)
        row["onnx_mb"] = round(user.stat().st_size / 1e6, 1)

        stage = "conversion"
        start = time.perf_counter()
        model, _ = onnx_to_torch(user)
        row["convert_s"] = time.perf_counter() - start
        row["diff_conversion"] = check_against_onnxruntime(model, user, input_size=size)

        stage = "trace (Pruner with verify)"
        start = time.perf_counter()
        with quiet():
            pruner = Pruner(model, key, CLASSES, size, verify=True)
        row["trace_s"] = time.perf_counter() - start
        row["verify_s"] = pruner.verify_seconds
        report = inspect_model(pruner)
        row["groups"] = len(report.groups)
        row["blocked"] = len(report.blocked)
        row["verify_failed"] = len(pruner.verify_failed)
        row["blocked_reasons"] = sorted({b.reason.split(" (")[0] for b in report.blocked})
        if not report.groups:
            row["status"] = "nothing to prune"
            return row
        row["s_per_eval"] = estimate_evaluation_seconds(pruner, threads=threads)

        stage = "uniform pruning at 50 % MACs"
        budget = Budget(constraints=[parse_constraint(f"flops={TARGET}")])
        checker = analytic_checker(model, pruner.graph, pruner.constraints, budget)
        kept = checker.kept(uniform_within(checker))
        pruned = pruner.prune_kept(kept).model
        row["macs_predicted"] = pruner.cost_of_kept(kept).macs / pruner.graph.dense_macs
        # the same, channel counts rounded to multiples of 8 (ONNX Runtime's blocked conv kernels want them)
        by8 = dataclasses.replace(pruner.constraints, round_to=ROUND_TO)
        checker8 = analytic_checker(model, pruner.graph, by8, budget)
        pruned8 = pruner.prune_kept(checker8.kept(uniform_within(checker8))).model

        stage = "export_onnx"
        start = time.perf_counter()
        with quiet():
            small = export_onnx(pruned, work / f"{key}-pruned.onnx", input_size=size)
            row["export_s"] = time.perf_counter() - start
            dense = export_onnx(model, work / f"{key}-dense.onnx", input_size=size)
            small8 = export_onnx(pruned8, work / f"{key}-pruned8.onnx", input_size=size)
        row["diff_pruned"] = check_against_onnxruntime(pruned, small, input_size=size)

        try:  # a graph whose shapes ONNX shape inference cannot resolve still gets its latency measured
            row["dense_mmacs"] = onnx_macs(dense) / 1e6
            row["macs_ratio"] = onnx_macs(small) / onnx_macs(dense)
            row["macs_ratio_round8"] = onnx_macs(small8) / onnx_macs(dense)
        except PrunePilotError as exc:
            row["macs_error"] = str(exc)

        stage = "latency"
        ms = latency({"user": user, "dense": dense, "pruned": small, "pruned8": small8}, size, threads, warmup, repeats)
        row |= {"ms_user": ms["user"], "ms_dense": ms["dense"], "ms_pruned": ms["pruned"], "ms_pruned_round8": ms["pruned8"],
                "speedup": ms["dense"] / ms["pruned"], "speedup_vs_user_file": ms["user"] / ms["pruned"],
                "speedup_round8": ms["dense"] / ms["pruned8"]}
    except Exception as exc:  # noqa: BLE001 - a failing stage is this model's result
        text = " ".join(str(exc).split()) or type(exc).__name__
        row["status"] = f"failed at {stage}: {type(exc).__name__}: {text[:160]}"
        row["traceback"] = traceback.format_exc(limit=-3)
    return row


def fmt(v: Any, spec: str) -> str:
    return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0].rstrip("d%fe") or 0))


def table(rows: dict[str, dict[str, Any]]) -> str:
    head = (f"{'model':<22} {'px':>3} {'conv s':>6} {'diff':>7} {'trace s':>7} {'groups':>6} {'blocked':>7} {'s/eval':>6} "
            f"{'MACs':>6} {'pred':>6} {'diff pr':>7} {'ms dense':>8} {'ms pr':>6} {'speedup':>7} {'MACs/8':>6} {'spd/8':>6}")
    lines = [head, "-" * len(head)]
    for key, r in rows.items():
        lines.append(
            f"{key:<22} {r['input_size']:>3} {fmt(r.get('convert_s'), '6.1f')} {fmt(r.get('diff_conversion'), '7.1e')} "
            f"{fmt(r.get('trace_s'), '7.1f')} {fmt(r.get('groups'), '6d')} {fmt(r.get('blocked'), '7d')} "
            f"{fmt(r.get('s_per_eval'), '6.1f')} {fmt(r.get('macs_ratio'), '6.1%')} {fmt(r.get('macs_predicted'), '6.1%')} "
            f"{fmt(r.get('diff_pruned'), '7.1e')} {fmt(r.get('ms_dense'), '8.2f')} {fmt(r.get('ms_pruned'), '6.2f')} "
            f"{fmt(r.get('speedup'), '6.2f')}x {fmt(r.get('macs_ratio_round8'), '6.1%')} {fmt(r.get('speedup_round8'), '5.2f')}x")
        for note in (r["status"] if r["status"] != "pruned" else None, r.get("macs_error")):
            if note:
                lines.append(f"{'':<22}     -> {note}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=MODELS, help="names, or name@size")
    parser.add_argument("--size", type=int, default=32, help="input size where a model names none")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=60, help="latency runs per file (median)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="results file; rows of the models measured now replace theirs, others are kept")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence")  # onnx2torch's Slice, every forward pass
    blob = json.loads(args.results.read_text()) if args.results.exists() else {}
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="byom-") as tmp:
        for spec in args.models:
            name, _, at = spec.partition("@")
            size = int(at) if at else args.size
            key = f"{name}@{size}"
            start = time.perf_counter()
            rows[key] = measure(key, size, Path(tmp), args.threads, args.warmup, args.repeats)
            rows[key]["wall_s"] = time.perf_counter() - start
            print(f"{key}: {rows[key]['status']} ({rows[key]['wall_s']:.0f} s)", flush=True)
    print()
    print(table(rows))
    blob.setdefault("models", {}).update(rows)
    blob["settings"] = {"threads": args.threads, "warmup": args.warmup, "repeats": args.repeats, "target": TARGET,
                        "torch": torch.__version__, "onnxruntime": ort.__version__}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(blob, indent=2))
    print(f"\nwritten: {args.results}")


if __name__ == "__main__":
    main()
