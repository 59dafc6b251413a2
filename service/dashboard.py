"""Data behind the dashboard: every job of one problem (same model, data and budget), compactly."""

from __future__ import annotations

import csv
import io
from typing import Any

from .db import repo
from .db.store import JobStore
from .jobs import NotFound, to_public

TRIAL_COLUMNS = ["step", "kind", "accuracy", "macs_ratio", "params_ratio", "size_ratio", "latency_ms", "feasible", "wall_time_s"]


def _limits(problem: dict[str, Any], result: dict[str, Any] | None) -> dict[str, float]:
    if result and result.get("limits"):
        return dict(result["limits"])
    return {c["resource"]: c["ratio"] for c in problem["spec"]["budget"]["constraints"] if c.get("ratio") is not None}


def compare(store: JobStore, owner_id: int | None, problem_key: str) -> dict[str, Any]:
    with store.read() as s:
        jobs, _ = repo.list_jobs(s, owner_id=owner_id, problem_key=problem_key, limit=500)
        if not jobs:
            raise NotFound(f"no jobs for problem {problem_key}")
        trials = repo.trials_for_jobs(s, job_ids=[j.id for j in jobs])
        by_job: dict[str, list[Any]] = {j.id: [] for j in jobs}
        best_strategy: dict[str, dict[str, float]] = {}
        sensitivity: dict[str, list[dict[str, Any]]] = {}
        for t in trials:
            by_job[t.job_id].append([t.step, t.kind, t.accuracy, t.macs_ratio, t.params_ratio, t.size_ratio, t.latency_ms,
                                     t.feasible, t.wall_time_s])
            job = next(j for j in jobs if j.id == t.job_id)
            if job.best_step == t.step:
                best_strategy[t.job_id] = dict(t.strategy)
            if t.kind == "sensitivity" and (t.extra or {}).get("layer"):
                sensitivity.setdefault(t.job_id, []).append({"layer": t.extra["layer"], "ratio": t.extra["ratio"], "accuracy": t.accuracy})
        first = jobs[-1]
        return {
            "problem_key": problem_key,
            "arch": first.arch,
            "dataset": first.dataset,
            "limits": _limits(first.problem, first.result),
            "jobs": [to_public(j).model_dump(mode="json") for j in jobs],
            "columns": TRIAL_COLUMNS,
            "trials": by_job,
            "best_strategy": best_strategy,
            "sensitivity": sensitivity,
        }


def export_csv(data: dict[str, Any]) -> str:
    agents = {j["id"]: j["agent"] for j in data["jobs"]}
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["job_id", "agent", *data["columns"]])
    for job_id, rows in data["trials"].items():
        for row in rows:
            writer.writerow([job_id, agents[job_id], *row])
    return buf.getvalue()
