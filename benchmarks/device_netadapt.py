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

One run decides little: at 1 epoch of fine-tune one uniform profile's accuracy moves by about 2
points from job to job, and the agent's timings by several points of dense. So every run is also
appended to a record of runs, and the verdict that counts is pooled over them (:func:`pooled`):
uniform's accuracy against measured latency has one slope, fitted within runs; each run's margin is
NetAdapt's accuracy less the mean of its uniform jobs moved along that slope to NetAdapt's latency;
met when the mean margin is above zero at one-sided 95 % (Student's t over at least three runs,
with the slope anywhere within two standard errors of its fit).

    python benchmarks/device_netadapt.py [--budget 0.7] [--epochs 1] [--initial-reduction 0.05] [--measured-steps]
    python benchmarks/device_netadapt.py --pooled-only [--measured-steps] [--proposals windows]   # the pooled verdict of the recorded runs

Results: benchmarks/results/device_netadapt.json (this run) and device_netadapt_runs.json (every run;
--measured-steps: device_netadapt_steps.json, pooled separately). The service's data and logs stay
in ``--workdir``.
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

import numpy as np
from scipy import stats

from prunepilot.compression.cifar_resnet import RESIDUAL_ROOTS
from prunepilot.service.auth import create_key
from prunepilot.service.client import Client
from prunepilot.service.db.migrate import upgrade
from prunepilot.service.process import ServiceProcess
from prunepilot.service.settings import get_settings

RESULTS = Path(__file__).parent / "results" / "device_netadapt.json"  # --measured-steps: device_netadapt_steps.json
RUNS = RESULTS.with_name("device_netadapt_runs.json")  # every run, both settings (pooled per setting)
DEVICE = "bench-board"
# How NetAdapt proposes when no layer alone meets its step; runs of different proposals are pooled
# apart. "single-layer" (runs recorded without the field, 1-9): the deepest cut any one layer could
# make became the target. "windows" (runs 10-12, commit 235d85a): contiguous windows of layers cut
# together, where a coarse count could cut a layer past half. "capped windows" (c12a2a9 on): never
# past half, except in the one window of every layer. This code records the last.
KINDS = ("single-layer", "windows", "capped windows")
PROPOSALS = KINDS[-1]


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """NetAdapt against uniform at equal measured latency over several runs (see the module doc).

    The slope (uniform accuracy per unit of latency share) is fitted on the uniform jobs' deviations
    from their own run's means, so a run-wide shift (another calibration, a slower agent) does not
    tilt it; runs with one uniform job add nothing to it. A margin compares jobs of one run only.
    The slope is itself uncertain, so the verdict takes the least one-sided 95 % lower bound of the
    mean margin with the slope anywhere within two standard errors of its fit."""
    dx: list[float] = []
    dy: list[float] = []
    for run in runs:
        lat = np.array([u["latency_share"] for u in run["uniform"]])
        acc = np.array([u["accuracy"] for u in run["uniform"]])
        dx += list(lat - lat.mean())
        dy += list(acc - acc.mean())
    x, y = np.array(dx), np.array(dy)
    sxx = float(x @ x)
    slope = float(x @ y) / sxx if sxx > 0 else 0.0
    dof = len(x) - len(runs) - 1
    slope_se = float(np.sqrt(np.sum((y - slope * x) ** 2) / dof / sxx)) if sxx > 0 and dof > 0 else 0.0

    def margins(b: float) -> np.ndarray:
        return np.array([run["netadapt"]["accuracy"] - np.mean([u["accuracy"] + b * (run["netadapt"]["latency_share"] - u["latency_share"])
                                                                for u in run["uniform"]]) for run in runs])

    def lower_bound(m: np.ndarray) -> float:  # one-sided 95 % (Student's t over the runs)
        return float(m.mean() - stats.t.ppf(0.95, len(m) - 1) * m.std(ddof=1) / np.sqrt(len(m)))

    n = len(runs)
    found = margins(slope)
    summary: dict[str, Any] = {"runs": [r["run"] for r in runs], "slope": slope, "slope_se": slope_se, "margins": found.tolist(),
                               "mean_margin": float(found.mean()) if n else None, "lower_95": None, "verdict": "not settled"}
    if n >= 3:
        lower = min(lower_bound(margins(b)) for b in (slope - 2 * slope_se, slope, slope + 2 * slope_se))
        summary["lower_95"] = lower
        summary["verdict"] = "met" if lower > 0 else ("not met" if found.mean() <= 0 else "not settled")
    if n >= 4:  # how much the verdict rests on one run: the bound without each run in turn (same slope)
        summary["lower_95_leave_one_out"] = min(lower_bound(np.delete(found, i)) for i in range(n))
    return summary


def report_pooled(measured_steps: bool, proposals: str = PROPOSALS) -> dict[str, Any]:
    """The pooled verdict over the recorded runs of one setting and one way of proposing."""
    recorded = json.loads(RUNS.read_text())["runs"] if RUNS.is_file() else []
    runs = [r for r in recorded if r["measured_steps"] == measured_steps
            and r.get("netadapt_proposals", KINDS[0]) == proposals]
    summary = pooled(runs) | {"netadapt_proposals": proposals}
    setting = ("measured steps" if measured_steps else "plain counts") + f", NetAdapt proposing {proposals}"
    if not runs:
        print(f"pooled ({setting}): no recorded runs")
        return summary
    print(f"pooled over runs {summary['runs']} ({setting}): uniform gains {summary['slope']:.2f} (standard error "
          f"{summary['slope_se']:.2f}) points of accuracy per point of latency; NetAdapt's margins (points) "
          + ", ".join(f"{100 * m:+.2f}" for m in summary["margins"]) + f"; mean {100 * summary['mean_margin']:+.2f}"
          + ("" if summary["lower_95"] is None else f", one-sided 95 % lower bound {100 * summary['lower_95']:+.2f}")
          + f": {summary['verdict']}" + (" (fewer than three runs)" if len(runs) < 3 else "")
          + (f"; leaving out one run, the bound can fall to {100 * summary['lower_95_leave_one_out']:+.2f}"
             if "lower_95_leave_one_out" in summary else ""))
    return summary


def record_run(args: argparse.Namespace, netadapt: dict[str, Any], uniforms: list[dict[str, Any]]) -> None:
    """Append this run to the record of runs (:data:`RUNS`)."""
    record = json.loads(RUNS.read_text()) if RUNS.is_file() else {"command": "python benchmarks/device_netadapt.py", "runs": []}

    def point(row: dict[str, Any]) -> dict[str, Any]:
        return {"budget": row["budget"], "accuracy": row["accuracy"], "latency_share": row["latency_share"], "macs_share": row["macs_share"]}

    record["runs"].append({"run": 1 + max((r["run"] for r in record["runs"]), default=0), "date": time.strftime("%Y-%m-%d"),
                           "budget": args.budget, "measured_steps": args.measured_steps, "netadapt_proposals": PROPOSALS, "note": "",
                           "netadapt": point(netadapt), "uniform": [point(u) for u in uniforms]})
    RUNS.write_text(json.dumps(record, indent=1))


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
        # explicit both ways: a device target's default is measured steps (LatencyTarget.default_round_to)
        "constraints": {"exclude": list(RESIDUAL_ROOTS), "round_to": "measured" if args.measured_steps else None},
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
    parser.add_argument("--pooled-only", action="store_true", help="print the pooled verdict of the recorded runs and stop")
    parser.add_argument("--proposals", choices=KINDS, default=PROPOSALS,
                        help="--pooled-only: the runs of this NetAdapt (how it proposed when no layer alone met its step)")
    args = parser.parse_args()
    if args.pooled_only:
        report_pooled(args.measured_steps, args.proposals)
        return
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
    print(f"NetAdapt beats uniform at equal measured latency in this run: {'met' if verdict else 'NOT met'}")
    record_run(args, netadapt, uniforms)
    summary = report_pooled(args.measured_steps)
    results = RESULTS.with_name("device_netadapt_steps.json") if args.measured_steps else RESULTS
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                   "device": DEVICE, "agent_counters": agent_counters, "rows": rows,
                                   "uniform_interpolated_accuracy": interpolated, "netadapt_beats_uniform": verdict,
                                   "pooled": summary},
                                  indent=2))
    print(f"written: {results}")


if __name__ == "__main__":
    main()
