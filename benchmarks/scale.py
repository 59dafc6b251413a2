"""Scaling: evaluations per second with 1 and 2 Ray workers on this machine (target >= 0.8x linear).

For each worker count N, starts a real service (embedded Ray with N CPUs, one CPU and one torch
thread per job, SQLite), submits 2N identical random-search jobs on ResNet-20 and measures the
rate at which trials complete over the window where all workers are busy.

    python benchmarks/scale.py [--workers 1 2] [--evaluations 30]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import datetime
from pathlib import Path

from prunepilot.service.client import Client
from prunepilot.service.process import ServiceProcess
from prunepilot.service.settings import get_settings

RESULTS = Path(__file__).parent / "results" / "scale.json"


def rate(trials_per_job: list[list[dict]], workers: int) -> tuple[float, int]:  # type: ignore[type-arg]
    """Trials per second while every worker is busy: from when the last of the first N jobs
    started producing to when the first job of the last N stopped."""
    spans = sorted(((min(t), max(t), len(t)) for t in ([datetime.fromisoformat(x["created_at"]) for x in job]
                                                          for job in trials_per_job)), key=lambda s: s[0])
    start = max(s[0] for s in spans[:workers])
    end = min(s[1] for s in spans[-workers:])
    stamps = sorted(datetime.fromisoformat(x["created_at"]) for job in trials_per_job for x in job)
    inside = [s for s in stamps if start <= s <= end]
    seconds = (end - start).total_seconds()
    return (len(inside) - 1) / seconds if seconds > 0 and len(inside) > 1 else float("nan"), len(inside)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--evaluations", type=int, default=30)
    args = parser.parse_args()
    settings = get_settings()
    weights = settings.shared_weights_dir / "resnet20-cifar10.th"
    out = {}
    for n in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            srv = ServiceProcess(Path(tmp), {"PRUNEPILOT_RAY_NUM_CPUS": str(n), "PRUNEPILOT_JOB_CPUS": "1",
                                             "PRUNEPILOT_WORKER_NICENESS": "0",
                                             "PRUNEPILOT_CIFAR10_ZIP": str(settings.cifar10_zip)})
            srv.cli("db", "upgrade")
            key = srv.cli("keys", "create").split()[-1]
            srv.start()
            try:
                with Client(srv.url, key) as c:
                    spec = {"arch": "resnet20", "dataset": "cifar10-jpeg", "agent": "random",
                            "budget": {"constraints": [{"resource": "flops", "ratio": 0.5}]},
                            "finetune": {"epochs": 0.0}, "measure": {"test_images": 100, "latency_batches": [1]}}
                    warm = c.submit({**spec, "search": {"max_evaluations": 1}}, weights)  # decode the data into the cache
                    c.wait(warm["id"], timeout_s=900)
                    ids = [c.submit({**spec, "search": {"max_evaluations": args.evaluations}, "seed": i}, weights)["id"]
                           for i in range(2 * n)]
                    for job_id in ids:
                        assert c.wait(job_id, timeout_s=3600)["status"] == "succeeded"
                    trials = [c.trials(job_id, limit=5000)["items"] for job_id in ids]
            finally:
                srv.stop()
        per_s, counted = rate(trials, n)
        eval_s = sum(t["wall_time_s"] for job in trials for t in job) / sum(len(job) for job in trials)
        out[str(n)] = {"evaluations_per_s": per_s, "trials_counted": counted, "mean_eval_s": eval_s}
        print(f"{n} worker(s): {per_s:.3f} evaluations/s ({counted} trials in the busy window, {eval_s:.2f} s per evaluation)", flush=True)
    if "1" in out and "2" in out:
        eff = out["2"]["evaluations_per_s"] / (2 * out["1"]["evaluations_per_s"])
        out["efficiency_2_vs_linear"] = eff
        print(f"2 workers reach {eff:.0%} of linear scaling (target >= 80 %)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
