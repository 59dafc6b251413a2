"""NetAdapt vs uniform at a latency budget measured in ONNX Runtime through a device agent.

The issue-22 loop, end to end on this machine: a real service (uvicorn, embedded Ray, SQLite) and a
`prunepilot device-agent` process (ONNX Runtime, CPU execution provider) registered as device
``bench-board``. Jobs prune the pretrained ResNet-56 on CIFAR-10-JPEG (block-internal convs, the
space of benchmarks/compare_agents.py) to a latency budget on that device, one after the other,
each with the same fine-tune: NetAdapt; uniform at the same budget; uniform with NetAdapt's
measured share as its budget ("uniform-matched", which lands at or below it); and uniform once more
with that budget scaled by how far below it uniform-matched landed ("uniform-equal": the table's
error on uniform networks taken out). The latency table, its calibration, the measured checks and
the final dense-vs-pruned figures are all timed by the agent (its counters are recorded). Target:
NetAdapt beats uniform at equal measured latency (higher test accuracy than both uniform-matched
and uniform-equal).

    python benchmarks/device_netadapt.py [--budget 0.7] [--epochs 1] [--initial-reduction 0.05]

Results: benchmarks/results/device_netadapt.json. The service's data and logs stay in ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prunepilot.compression.cifar_resnet import RESIDUAL_ROOTS
from prunepilot.service.auth import create_key
from prunepilot.service.client import Client
from prunepilot.service.db.migrate import upgrade
from prunepilot.service.process import ServiceProcess
from prunepilot.service.settings import get_settings

RESULTS = Path(__file__).parent / "results" / "device_netadapt.json"
DEVICE = "bench-board"


def start_agent(url: str, key: str, workdir: Path, threads: int) -> tuple[subprocess.Popen[bytes], Path]:
    counters = workdir / "agent-counters.json"
    with (workdir / "agent.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prunepilot.service.device_agent", "--server", url, "--name", DEVICE,
                                 "--backend", "onnxruntime", "--threads", str(threads), "--counters", str(counters)],
                                env={**os.environ, "PRUNEPILOT_DEVICE_KEY": key}, stdout=log, stderr=subprocess.STDOUT)
    return proc, counters


def job_spec(agent: str, budget: float, args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "arch": "resnet56", "dataset": "cifar10-jpeg", "agent": agent, "seed": 0,
        "constraints": {"exclude": list(RESIDUAL_ROOTS)},
        "budget": {"constraints": [{"resource": "latency", "ratio": budget}]},
        "target": {"device": DEVICE},
        "search": {"max_evaluations": args.max_evaluations, "max_seconds": args.max_seconds},
        "fidelity": {"val_images": 1000, "calib_images": 1024},
        "finetune": {"epochs": args.epochs},
        "measure": {"latency_batches": [1]},
    }
    if agent == "netadapt":
        spec["agent_options"] = {"initial_reduction": args.initial_reduction}
    return spec


def summarize(agent: str, job: dict[str, Any], report: dict[str, Any], wall_s: float) -> dict[str, Any]:
    figs = report["figures"]
    dense, pruned = figs["dense"], figs["pruned"]
    return {"agent": agent, "job": job["id"], "wall_s": wall_s, "evaluations": report["search"]["evaluations"],
            "search_s": report["search"]["seconds"], "accuracy": pruned["accuracy"], "dense_accuracy": dense["accuracy"],
            "latency_ms": pruned["latency_ms"]["1"], "dense_latency_ms": dense["latency_ms"]["1"],
            "latency_share": pruned["latency_ms"]["1"] / dense["latency_ms"]["1"], "macs_share": pruned["macs"] / dense["macs"],
            "latency_check": report["search"].get("latency_check"), "latency_table": report.get("latency_table"),
            "latency_target": report.get("latency_target")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.7, help="latency budget as a share of dense on the device")
    parser.add_argument("--epochs", type=float, default=1.0, help="final fine-tune epochs (the same for both jobs)")
    parser.add_argument("--initial-reduction", type=float, default=0.05, help="NetAdapt's first step, a share of dense latency")
    parser.add_argument("--max-evaluations", type=int, default=300)
    parser.add_argument("--max-seconds", type=float, default=2400)
    parser.add_argument("--agent-threads", type=int, default=1, help="ONNX Runtime threads on the device agent")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/prunepilot-device-bench"))
    args = parser.parse_args()
    weights = get_settings().shared_weights_dir / "resnet56-cifar10.th"
    if not weights.is_file():
        sys.exit(f"device_netadapt: pretrained weights not found at {weights}")
    shutil.rmtree(args.workdir, ignore_errors=True)
    server = ServiceProcess(args.workdir / "service", {"PRUNEPILOT_JOB_CPUS": "1"})
    server.data_dir.mkdir(parents=True)
    db_url = f"sqlite:///{server.data_dir / 'prunepilot.db'}"
    upgrade(db_url)
    user_key = create_key(db_url, "bench")[1]
    device_key = create_key(db_url, "bench-board agent", device=DEVICE)[1]
    server.start()
    agent, counters = start_agent(server.url, device_key, args.workdir, args.agent_threads)
    rows = []
    try:
        with Client(server.url, user_key) as client:
            for label in ("netadapt", "uniform", "uniform-matched", "uniform-equal"):
                agent_name, budget = label.split("-")[0], args.budget
                if label == "uniform-matched":
                    budget = round(rows[0]["latency_share"], 4)
                elif label == "uniform-equal":
                    # the table's error on uniform networks, as uniform-matched measured it, taken out
                    budget = round(min(0.99, rows[2]["budget"] * rows[0]["latency_share"] / rows[2]["latency_share"]), 4)
                t0 = time.perf_counter()
                job_id = client.submit(job_spec(agent_name, budget, args), weights)["id"]
                print(f"{label}: job {job_id} submitted", flush=True)
                job = client.wait(job_id, poll_s=5.0, timeout_s=3 * 3600)
                wall = time.perf_counter() - t0
                if job["status"] != "succeeded":
                    sys.exit(f"device_netadapt: {label} job {job_id} {job['status']}: {job.get('error')}")
                row = summarize(label, job, client.report(job_id), wall) | {"budget": budget}
                rows.append(row)
                print(f"{label:15s} test acc {row['accuracy']:.2%} (dense {row['dense_accuracy']:.2%})  latency b1 on {DEVICE} "
                      f"{row['latency_ms']:.3f} ms vs dense {row['dense_latency_ms']:.3f} ms ({row['latency_share']:.1%}, budget "
                      f"{budget:.1%})  MACs {row['macs_share']:.1%}  {row['evaluations']} evaluations, search "
                      f"{row['search_s'] / 60:.1f} min, job {wall / 60:.1f} min", flush=True)
    finally:
        agent.terminate()
        agent.wait(30)
        server.stop()
    agent_counters = json.loads(counters.read_text()) if counters.is_file() else {}
    netadapt, _, matched, equal = rows
    verdict = netadapt["accuracy"] > max(matched["accuracy"], equal["accuracy"])
    print(f"agent counters: {agent_counters}")
    print(f"NetAdapt beats uniform at equal measured latency: {'met' if verdict else 'NOT met'} "
          f"({netadapt['accuracy']:.2%} at {netadapt['latency_share']:.1%} vs uniform-matched {matched['accuracy']:.2%} at "
          f"{matched['latency_share']:.1%}, uniform-equal {equal['accuracy']:.2%} at {equal['latency_share']:.1%})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                   "device": DEVICE, "agent_counters": agent_counters, "rows": rows, "netadapt_beats_uniform": verdict},
                                  indent=2))
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
