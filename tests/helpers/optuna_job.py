"""Run optuna-tpe for one job against a database (used by the kill-and-resume test)."""

from __future__ import annotations

import json
import sys

import torch

from prunepilot.agents import SearchContext, SearchEnv, SearchLimits, create_agent
from prunepilot.compression import Evaluator, Fidelity, Pruner, load_model, load_splits
from prunepilot.service.db.store import JobStore
from prunepilot.service.recorder import SqlTrialRecorder


def main() -> None:
    url, job_id, data, weights, evals = sys.argv[1:6]
    torch.set_num_threads(1)
    splits = load_splits(data, val_size=300)
    pruner = Pruner(load_model("resnet20", weights), "resnet20", 10, 32)
    ev = Evaluator(pruner, splits, Fidelity(val_images=100, calib_images=128))
    rec = SqlTrialRecorder(JobStore(url), job_id)
    ctx = SearchContext(ev, {"flops": 0.5}, SearchLimits(max_evaluations=int(evals)), rec, seed=3, agent="optuna-tpe",
                        env=SearchEnv(optuna_storage=url, study_name=f"job-{job_id}"))
    result = create_agent("optuna-tpe").search(ctx)
    print(json.dumps({"evaluated": ev.evaluations, "best_step": result.best.step, "trials": result.trials}), flush=True)


if __name__ == "__main__":
    main()
