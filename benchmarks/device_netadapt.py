"""NetAdapt vs uniform at a latency budget measured in ONNX Runtime through a device agent.

The issue-22 loop, end to end on this machine: a real service (uvicorn, embedded Ray, SQLite) and a
`prunepilot device-agent` process (ONNX Runtime, CPU execution provider) registered as device
``bench-board``. Jobs prune the pretrained ResNet-56 on CIFAR-10-JPEG (block-internal convs, the
space of benchmarks/compare_agents.py) to a latency budget on that device, one after the other,
each with the same fine-tune: NetAdapt; uniform at the same budget; then a uniform sweep aimed at
NetAdapt's measured latency: budgets from NetAdapt's measured share up by ``--sweep-step`` (relative)
each, until a uniform job lands at or above NetAdapt's latency (at most ``--sweep-max`` jobs).
Uniform cannot be steered onto one latency (one ratio moves every layer across a channel block at
once, and the measured check prunes further until the network fits), so "equal latency" is read two
ways: a uniform job at *at least* NetAdapt's measured latency with lower accuracy (NetAdapt is then
both faster and more accurate), and uniform's accuracy interpolated at NetAdapt's latency between
the two sweep jobs that bracket it. The latency table, its calibration, the measured checks and the
final dense-vs-pruned figures are all timed by the agent (its counters are recorded).

    python benchmarks/device_netadapt.py [--budget 0.7] [--epochs 1] [--initial-reduction 0.05] [--measured-steps]

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

RESULTS = Path(__file__).parent / "results" / "device_netadapt.json"  # --measured-steps: device_netadapt_steps.json
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
        "constraints": {"exclude": list(RESIDUAL_ROOTS), **({"round_to": "measured"} if args.measured_steps else {})},
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
    parser.add_argument("--sweep-step", type=float, default=0.04, help="uniform sweep: each budget this much (relative) above the last")
    parser.add_argument("--sweep-max", type=int, default=5, help="uniform sweep: at most this many jobs")
    parser.add_argument("--measured-steps", action="store_true", help="every job with round_to='measured' (the device table's steps)")
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
    rows: list[dict[str, Any]] = []
    try:
        with Client(server.url, user_key) as client:

            def run(label: str, agent_name: str, budget: float) -> dict[str, Any]:
                t0 = time.perf_counter()
                job_id = client.submit(job_spec(agent_name, budget, args), weights)["id"]
                print(f"{label}: job {job_id} submitted (budget {budget:.1%})", flush=True)
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
                return row

            netadapt = run("netadapt", "netadapt", args.budget)
            run("uniform", "uniform", args.budget)
            for k in range(args.sweep_max):
                budget = round(min(0.99, netadapt["latency_share"] * (1 + args.sweep_step) ** k), 4)
                if run(f"uniform-sweep{k}", "uniform", budget)["latency_share"] >= netadapt["latency_share"]:
                    break
    finally:
        agent.terminate()
        agent.wait(30)
        server.stop()
    agent_counters = json.loads(counters.read_text()) if counters.is_file() else {}
    share, accuracy = netadapt["latency_share"], netadapt["accuracy"]
    uniforms = [r for r in rows if r["agent"].startswith("uniform")]
    slower = [r for r in uniforms if r["latency_share"] >= share]
    dominated = [r for r in slower if r["accuracy"] < accuracy]
    below = max((r for r in uniforms if r["latency_share"] < share), key=lambda r: r["latency_share"], default=None)
    above = min(slower, key=lambda r: r["latency_share"], default=None)
    interpolated = None
    if below is not None and above is not None:
        t = (share - below["latency_share"]) / (above["latency_share"] - below["latency_share"])
        interpolated = below["accuracy"] + t * (above["accuracy"] - below["accuracy"])
    verdict = bool(dominated) and (interpolated is None or accuracy > interpolated)
    print(f"agent counters: {agent_counters}")
    print(f"NetAdapt {accuracy:.2%} at {share:.1%} of dense; uniform at or above that latency: "
          + (", ".join(f"{r['accuracy']:.2%} at {r['latency_share']:.1%}" for r in slower) or "none reached")
          + (f"; uniform interpolated at {share:.1%}: {interpolated:.2%}" if interpolated is not None else "; no bracket to interpolate in"))
    print(f"NetAdapt beats uniform at equal measured latency: {'met' if verdict else 'NOT met'}")
    results = RESULTS.with_name("device_netadapt_steps.json") if args.measured_steps else RESULTS
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                   "device": DEVICE, "agent_counters": agent_counters, "rows": rows,
                                   "uniform_interpolated_accuracy": interpolated, "netadapt_beats_uniform": verdict},
                                  indent=2))
    print(f"written: {results}")


if __name__ == "__main__":
    main()
