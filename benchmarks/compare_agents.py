"""Agents side by side on ResNet-56 / CIFAR-10-JPEG: the project's headline comparison.

Every agent searches with the same evaluator (adaptive-BN accuracy on a fixed 1,000-image
validation subset carved from the training split, 1,024 calibration images) and the same number
of evaluations; each best strategy then gets the identical fine-tune budget, as does the dense
model, and final accuracy is measured on the full 10,000-image test split.

Resumable and runs in pieces: trials are appended to JSONL files and every finished piece is a
JSON file under benchmarks/results/compare/<problem>/, which later runs skip.

    python benchmarks/compare_agents.py search   --problem flops   [--agents ...] [--evals 200] [--seeds 0 1 2]
    python benchmarks/compare_agents.py verify   # latency problem: measured-latency check on older searches
    python benchmarks/compare_agents.py match    # latency problem: uniform at NetAdapt's measured latency
    python benchmarks/compare_agents.py finetune --problem flops   [--epochs 3] [--ft-seed 0]
    python benchmarks/compare_agents.py topk     --problem flops   --agents amc [--seeds 0] [--top 5]
    python benchmarks/compare_agents.py report   # docs/benchmarks.md section + JSON + PNG plots

Problem ``flops``: 50 % of dense MACs. Problem ``latency``: 70 % of dense latency at batch 1 on
this CPU (latency lookup table, measured at the end). 70 %, not 60 %: with ResNet-56's prunable
convs (each block's first) at the 80 % layer limit, the measured latency floor at batch 1 here is
about 61 % of dense, so a 60 % budget is infeasible and would leave no room to search.
Both searched only those block-first convs (the space at the time; kept so the results reproduce).
Problem ``flops-all``: 50 % of dense MACs with every layer prunable, the residual channels of each
stage (stem and block outputs, one ratio per stage) included.

The latency problem's table and calibration are kept with its results (latency_table.json,
latency_calibration.json), so every agent predicts with one latency model; every agent is judged
on latency measured at fine-tune time, interleaved with dense. An earlier run of uniform and
netadapt, on another machine with a table lost with it, is kept for the record in latency/first-table/.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunepilot.agents import SearchContext, SearchLimits, SearchResult, TrialRecord, check_measured_latency
from prunepilot.agents.pipeline import FinalConfig, PipelineConfig, PipelineHooks, Prepared, finish, prepare
from prunepilot.agents.pipeline import search as pipeline_search
from prunepilot.compression import Budget, Constraint, Fidelity, FinetuneConfig
from prunepilot.compression.cifar_resnet import RESIDUAL_ROOTS
from prunepilot.compression.latency import FileLatencyStore, LatencyTable
from prunepilot.compression.measure import measure_pair
from prunepilot.compression.strategy import PruningConstraints, uniform_strategy
from prunepilot.service.settings import get_settings
from prunepilot.service.workspace import open_session

ROOT = Path(__file__).parent / "results" / "compare"
ALL_AGENTS = ["uniform", "global", "random", "sensitivity", "optuna-tpe", "optuna-nsga2", "amc", "amc-paper", "amc-bound", "netadapt",
              "uniform-matched"]
CHEAP = {"uniform", "global", "random"}
LIMITS = {"flops": {"flops": 0.5}, "latency": {"latency": 0.7}, "flops-all": {"flops": 0.5}}
# The problems flops and latency were run when the residual channels could not be pruned; they keep
# that search space so their results stay reproducible. flops-all is the FLOPs problem with every
# layer prunable.
EXCLUDE: dict[str, tuple[str, ...]] = {"flops": RESIDUAL_ROOTS, "latency": RESIDUAL_ROOTS, "flops-all": ()}
# Agent options for this benchmark (documented in docs/benchmarks.md).
AGENT_OPTIONS: dict[str, dict[str, Any]] = {"netadapt": {"initial_reduction": 0.03, "decay": 0.98, "short_steps": 20}}
# NetAdapt's schedule, not a count, decides how many proposals it scores (each with a short
# fine-tune): it gets a wall-time limit instead, and the report states its evaluations and time.
NETADAPT_SECONDS = 3 * 3600
# Named variants of an agent: (agent, options). "amc" itself runs its defaults: projection onto the
# budget and the tuned recipe; amc-paper is AMC's published recipe (it was amc's default until the
# tuned recipe replaced it, and its runs were renamed), amc-bound the published recipe with AMC's
# per-step action bounding.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"amc-paper": ("amc", {"recipe": "paper"}),
                                                   "amc-bound": ("amc", {"budget_mode": "bound", "recipe": "paper"})}
# Reported elsewhere (AMC paper, Table 3, original CIFAR-10 test set), not measured here.
AMC_PAPER = {"resnet56_dense_top1": 92.8, "resnet56_50pct_flops_top1_after_ft": 91.9, "drop_pt": 0.9,
             "uniform_50pct_flops_drop_pt": "not reported for ResNet-56"}


class JsonlRecorder:
    """Trials appended to a file, so an interrupted search resumes where it stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, trial: TrialRecord) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps({**asdict(trial), "created_at": trial.created_at.isoformat()}) + "\n")

    def existing(self) -> list[TrialRecord]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                d["created_at"] = datetime.fromisoformat(d["created_at"])
                out.append(TrialRecord(**d))
        return out

    def should_stop(self) -> bool:
        return False


def problem_dir(problem: str) -> Path:
    return ROOT / problem


def problem_config(problem: str, **over: Any) -> PipelineConfig:
    """The problem as a pipeline job: its budget and the comparison's evaluator (1,000 validation
    images, 1,024 calibration images); ``over`` sets the agent, seed, limits or fine-tune."""
    budget = Budget(constraints=[Constraint(resource=r, ratio=v) for r, v in LIMITS[problem].items()])  # type: ignore[arg-type]
    fields: dict[str, Any] = {"agent": "uniform", "budget": budget, "fidelity": Fidelity(val_images=1000, calib_images=1024), **over}
    return PipelineConfig(**fields)


def hooks(**over: Any) -> PipelineHooks:
    return PipelineHooks(threads=get_settings().threads, **over)


def setup(problem: str) -> tuple[Any, Prepared]:
    s = get_settings()
    torch.set_num_threads(s.threads)
    session = open_session("resnet56", s.shared_weights_dir / "resnet56-cifar10.th", "cifar10-jpeg", s,
                           PruningConstraints(exclude=EXCLUDE[problem]), progress=True)
    table = None
    if problem == "latency":
        # The problem's latency model is part of its results: table entries and calibration are kept
        # next to them, so every agent of the problem, on any later day, predicts with the same model.
        table = LatencyTable(session.pruner.graph, session.pruner.model, FileLatencyStore(problem_dir(problem) / "latency_table.json"),
                             1, s.threads)
        table.build()
        calib = problem_dir(problem) / "latency_calibration.json"
        if calib.is_file():
            table.restore_calibration(json.loads(calib.read_text()))
        else:
            table.calibrate(repeats=60)
            calib.parent.mkdir(parents=True, exist_ok=True)
            calib.write_text(json.dumps({**table.calibration, "dense_ms": table.dense_ms}))
    return session, prepare(session.pruner, session.splits, problem_config(problem), hooks(latency_table=table))


def run_search(problem: str, agents: list[str], evals: int, seeds: list[int], netadapt_seconds: float = NETADAPT_SECONDS) -> None:
    session, prepared = setup(problem)
    evaluator = prepared.evaluator
    for agent in agents:
        if agent == "uniform-matched":
            continue  # not a search: the match phase derives it from NetAdapt's measured latency
        # several seeds for the cheap agents; uniform and global are deterministic, one run is every run
        runs = seeds[:1] if agent not in CHEAP or agent in ("uniform", "global") else seeds
        for seed in runs:
            out = problem_dir(problem) / f"search-{agent}-s{seed}.json"
            if out.is_file():
                print(f"skip {out.name} (done)")
                continue
            rec = JsonlRecorder(problem_dir(problem) / f"trials-{agent}-s{seed}.jsonl")
            state = problem_dir(problem) / "state" / f"{agent}-s{seed}"
            evaluator._cache.clear()
            fwd0, tot0 = evaluator.forward_seconds, evaluator.total_seconds
            limits = (SearchLimits(max_evaluations=None, max_seconds=netadapt_seconds) if agent == "netadapt"
                      else SearchLimits(max_evaluations=evals))
            base, options = VARIANTS.get(agent, (agent, AGENT_OPTIONS.get(agent, {})))
            config = problem_config(problem, agent=base, agent_options=options, search=limits, seed=seed)
            wiring = hooks(recorder=rec, state_dir=state, on_trial=lambda t: print(f"  {t.agent} step {t.step}: acc {t.accuracy:.3f}",
                                                                                       flush=True) if t.step % 25 == 0 else None)
            t0 = time.perf_counter()
            _, result = pipeline_search(prepared, config, wiring, agent_name=agent)
            wall = time.perf_counter() - t0
            trials = rec.existing()
            best = result.best
            data = {
                "agent": agent, "seed": seed, "problem": problem, "limits": LIMITS[problem], "evaluations": len(trials),
                "search_seconds_this_run": wall, "search_seconds_total": sum(t.wall_time_s for t in trials),
                # NetAdapt trains and scores its proposals itself, outside the evaluator's timer
                "forward_share": (evaluator.forward_seconds - fwd0) / wall if wall > 0 and evaluator.forward_seconds > fwd0 else None,
                "evaluation_share": (evaluator.total_seconds - tot0) / wall if wall > 0 else None,
                "best": {"step": best.step, "accuracy": best.accuracy, "strategy": best.strategy, "metrics": best.metrics},
                "pareto_steps": [t.step for t in result.pareto], "info": {k: v for k, v in result.info.items() if k != "history"},
                # NetAdapt's measured-latency checks (predicted vs measured at each)
                "latency_checks": [h for h in result.info.get("history", []) if "measured_latency" in h],
                "latency_model": evaluator.latency_model.summary() if isinstance(evaluator.latency_model, LatencyTable) else None,
            }
            if result.model is not None:  # NetAdapt ends with its own fine-tuned network
                from prunepilot.compression import save_artifact
                from prunepilot.compression.spec import spec_of

                save_artifact(result.model, spec_of(result.model, "resnet56", 10, 32), state / "final-model")
                data["model_dir"] = str(state / "final-model")
            out.write_text(json.dumps(data, indent=2, default=str))
            print(f"{agent} seed {seed}: best search acc {best.accuracy:.3f} at step {best.step}, {len(trials)} evaluations, "
                  f"{wall:.0f} s, forward share " + (f"{data['forward_share']:.0%}" if data["forward_share"] is not None else "-"),
                  flush=True)


def run_verify(problem: str) -> None:
    """The latency check (see prunepilot.agents.latency_check) on searches recorded before it existed.

    It works on the recorded trials alone, as it does at the end of a search. Where it picks
    another network, the old choice is kept as ``searched_best`` and its fine-tune result is moved
    to ``unverified/``, so the next finetune phase fine-tunes the new one.
    """
    session, prepared = setup(problem)
    evaluator = prepared.evaluator
    for path in sorted(problem_dir(problem).glob("search-*.json")):
        data = json.loads(path.read_text())
        if "latency_check" in data["info"] or data["agent"] in ("netadapt", "uniform-matched"):
            continue
        rec = JsonlRecorder(problem_dir(problem) / f"trials-{data['agent']}-s{data['seed']}.jsonl")
        ctx = SearchContext(evaluator, LIMITS[problem], SearchLimits(max_evaluations=data["evaluations"]), rec,
                            seed=data["seed"], agent=data["agent"])
        ctx.fast_forward()  # the check's own evaluations follow the recorded ones, as after a search
        trials = {t.step: t for t in ctx.trials()}
        result = check_measured_latency(ctx, SearchResult(trials[data["best"]["step"]], len(trials), 0.0))
        check = result.info.get("latency_check")
        if check is None:
            continue
        data["info"]["latency_check"] = check
        data["evaluations"] = len(ctx.trials())  # the check's own evaluations included
        best = result.best
        assert best is not None
        if best.step != data["best"]["step"]:
            data["searched_best"] = data["best"]
            data["best"] = {"step": best.step, "accuracy": best.accuracy, "strategy": best.strategy, "metrics": best.metrics}
            for final in problem_dir(problem).glob(f"final-{data['agent']}-s{data['seed']}-e*.json"):
                (final.parent / "unverified").mkdir(exist_ok=True)
                final.rename(final.parent / "unverified" / final.name)
        path.write_text(json.dumps(data, indent=2, default=str))
        print(f"{data['agent']} s{data['seed']}: " + ", ".join(f"step {c['step']} {c['measured_latency']:.1%}" for c in check["checks"])
              + f" -> step {best.step} ({'within' if check['within_budget_measured'] else 'NOT within'} the budget as measured)",
              flush=True)


def run_matched_uniform(problem: str, reference: str = "netadapt") -> None:
    """Uniform pruning at the *measured* latency ``reference``'s network ended with.

    The latency budget is met by prediction, and two networks at the same predicted latency can
    differ by a few percent when measured; "beats uniform at equal latency" is judged here. The
    uniform ratio is bisected on measured latency (dense and pruned interleaved, median ratio of
    three rounds) until it is at or just under the reference's measured share of dense.
    """
    out = problem_dir(problem) / "search-uniform-matched-s0.json"
    # the reference's batch-1 latency as its fine-tune report measured it (interleaved with dense)
    finals = sorted(problem_dir(problem).glob(f"final-{reference}-s0-e*.json"))
    if out.is_file() or not finals:
        print(f"skip {out.name} ({'done' if out.is_file() else 'fine-tune ' + reference + ' first'})")
        return
    lat = json.loads(finals[0].read_text())["figures"]
    target = lat["pruned"]["latency_ms"]["1"] / lat["dense"]["latency_ms"]["1"]
    session, prepared = setup(problem)
    evaluator = prepared.evaluator
    pruner, names = session.pruner, session.pruner.layer_names
    threads = get_settings().threads

    def measured(ratio: float) -> float:
        net = pruner.prune(uniform_strategy(names, ratio)).model
        dense, mine = measure_pair(pruner.model, net, pruner.input_size, 1, threads, warmup=5, repeats=60)
        return mine.median_ms / dense.median_ms

    t0 = time.perf_counter()
    lo, hi = 0.0, float(np.max(pruner.max_ratios()))  # ratio lo is too slow, hi fast enough (or the floor)
    probes = []
    for _ in range(7):
        mid = (lo + hi) / 2
        m = measured(mid)
        probes.append({"ratio": mid, "measured_latency": m})
        lo, hi = (lo, mid) if m <= target else (mid, hi)
    strategy = uniform_strategy(names, hi)
    metrics = evaluator.evaluate(strategy)
    data = {"agent": "uniform-matched", "seed": 0, "problem": problem, "limits": LIMITS[problem], "evaluations": 1,
            "search_seconds_this_run": time.perf_counter() - t0, "search_seconds_total": metrics.wall_time_s,
            "forward_share": None, "evaluation_share": None, "matched_to": reference, "target_measured_latency": target,
            "bisection": probes, "best": {"step": 0, "accuracy": metrics.accuracy, "strategy": metrics.strategy,
                                          "metrics": metrics.to_dict()},
            "pareto_steps": [0], "info": {"uniform_ratio": hi}, "latency_checks": []}
    out.write_text(json.dumps(data, indent=2, default=str))
    print(f"uniform matched to {reference}'s measured {target:.1%}: ratio {hi:.3f}, search acc {metrics.accuracy:.3f}", flush=True)


def run_finetune(problem: str, epochs: float, agents: list[str], seeds: list[int] | None = None, ft_seed: int = 0) -> None:
    """Fine-tune each searched best strategy (and, once, the dense model) and measure it.

    ``ft_seed`` other than 0 repeats a fine-tune with another data order and augmentation: its
    results go to ``ft-seeds/`` (not into the main table) and show how far the fine-tune alone moves
    one strategy's accuracy, the yardstick for differences between agents.
    """
    session, prepared = setup(problem)
    config = FinetuneConfig(epochs=epochs, lr=0.01, seed=ft_seed)
    todo = sorted(problem_dir(problem).glob("search-*.json"))
    out_dir = problem_dir(problem) / "ft-seeds" if ft_seed else problem_dir(problem)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"-f{ft_seed}" if ft_seed else ""
    dense_done = out_dir / f"final-dense-e{epochs:g}{suffix}.json"
    for path in todo:
        search = json.loads(path.read_text())
        if search["agent"] not in agents or (seeds is not None and search["seed"] not in seeds):
            continue
        out = out_dir / f"final-{search['agent']}-s{search['seed']}-e{epochs:g}{suffix}.json"
        if out.is_file():
            continue
        init_model = None
        if search.get("model_dir"):
            from prunepilot.compression import load_artifact

            init_model = load_artifact(search["model_dir"])
        result = finish(session.pruner, session.splits, search["best"]["strategy"],
                        FinalConfig(finetune=config, finetune_dense=not dense_done.is_file()), hooks(), initial_model=init_model)
        report = result.report()
        if "dense_finetuned" in report["figures"]:
            dense_done.write_text(json.dumps({"figures": {k: report["figures"][k] for k in ("dense", "dense_finetuned")}}, indent=2))
        out.write_text(json.dumps({"agent": search["agent"], "seed": search["seed"], "epochs": epochs, "ft_seed": ft_seed, **report},
                                  indent=2, default=str))
        p = report["figures"]["pruned"]
        print(f"{search['agent']} s{search['seed']}: test acc {p['accuracy']:.2%} after {epochs:g} epochs, MACs {report['macs_ratio']:.1%}",
              flush=True)


def run_topk(problem: str, agents: list[str], seeds: list[int], top: int, epochs: float = 1.0) -> None:
    """Fine-tune a search's ``top`` most accurate distinct strategies, not only its best.

    Does search accuracy still order strategies this close once they are fine-tuned? Each is also
    re-scored on the whole validation split (5,000 images against the search's 1,000), which
    takes out most of the subset's sampling noise. The best (rank 1) is the main table's run.
    """
    session, prepared = setup(problem)
    evaluator = prepared.evaluator
    config = FinalConfig(finetune=FinetuneConfig(epochs=epochs, lr=0.01))
    whole = Fidelity(val_images=None, calib_images=1024)
    out_dir = problem_dir(problem) / "topk"
    out_dir.mkdir(parents=True, exist_ok=True)
    for agent in agents:
        for seed in seeds:
            trials = JsonlRecorder(problem_dir(problem) / f"trials-{agent}-s{seed}.jsonl").existing()
            ranked: dict[tuple[int, ...], TrialRecord] = {}
            for t in sorted((t for t in trials if t.feasible), key=lambda t: -t.accuracy):
                ranked.setdefault(tuple(t.metrics["kept"]), t)
            for rank, (kept, trial) in enumerate(list(ranked.items())[:top], start=1):
                out = out_dir / f"final-{agent}-s{seed}-r{rank}-e{epochs:g}.json"
                if out.is_file():
                    continue
                rescored = evaluator.evaluate_kept(np.asarray(kept), whole).accuracy
                main = problem_dir(problem) / f"final-{agent}-s{seed}-e{epochs:g}.json"
                if rank == 1 and main.is_file():
                    report = json.loads(main.read_text())
                else:
                    report = finish(session.pruner, session.splits, trial.strategy, config, hooks()).report()
                out.write_text(json.dumps({"agent": agent, "seed": seed, "rank": rank, "step": trial.step, "epochs": epochs,
                                           "search_accuracy": trial.accuracy, "whole_val_accuracy": rescored,
                                           "test_accuracy": report["figures"]["pruned"]["accuracy"],
                                           "macs_ratio": report["macs_ratio"], "params_ratio": report["params_ratio"]}, indent=2))
                print(f"{agent} s{seed} rank {rank} (step {trial.step}): search {trial.accuracy:.3f}, whole validation "
                      f"{rescored:.3f}, test after {epochs:g} epochs {report['figures']['pruned']['accuracy']:.2%}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["search", "verify", "match", "finetune", "topk", "report"],
                        help="verify: the measured-latency check on searches recorded without it; "
                             "match: uniform pruning at NetAdapt's measured latency (latency problem)")
    parser.add_argument("--problem", choices=list(LIMITS), default="flops")
    parser.add_argument("--agents", nargs="*", default=ALL_AGENTS)
    parser.add_argument("--evals", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="search: default 0 1 2, of which agents other than random run only the first given; "
                        "finetune: default every seed searched")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--top", type=int, default=5, help="topk: how many of a search's most accurate strategies to fine-tune")
    parser.add_argument("--ft-seed", type=int, default=0, help="finetune: seed of the fine-tune's data order and augmentation; "
                        "other than 0, a repeat kept apart in ft-seeds/ to measure the fine-tune's own spread")
    parser.add_argument("--netadapt-minutes", type=float, default=NETADAPT_SECONDS / 60, help="NetAdapt's wall-time limit")
    args = parser.parse_args()
    if args.phase == "search":
        run_search(args.problem, args.agents, args.evals, args.seeds if args.seeds is not None else [0, 1, 2], args.netadapt_minutes * 60)
    elif args.phase == "verify":
        run_verify("latency")
    elif args.phase == "match":
        run_matched_uniform("latency")
    elif args.phase == "topk":
        run_topk(args.problem, args.agents, args.seeds if args.seeds is not None else [0], args.top)
    elif args.phase == "finetune":
        run_finetune(args.problem, args.epochs, args.agents, args.seeds, args.ft_seed)
    else:
        from compare_report import write_report

        write_report(ROOT, AMC_PAPER)


if __name__ == "__main__":
    main()

