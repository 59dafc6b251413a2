"""Turn benchmarks/results/compare/ into docs/benchmarks.md's comparison section, JSON and PNG plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from scipy.stats import kendalltau

DOCS = Path(__file__).resolve().parents[1] / "docs"
PLOTS = DOCS / "img"
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"


MAIN_EPOCHS = 1.0  # the fine-tune every agent gets; longer ones, for a few, are reported apart


_BLOCK_INTERNAL = "Searched space: each block's first conv (27 layers); the residual channels stay whole."
SPACES = {
    "flops": _BLOCK_INTERNAL,
    "latency": _BLOCK_INTERNAL,
    "flops-all": ("Searched space: every layer (30): each block's first conv and, one ratio per stage, the residual "
                  "channels (the stem and every block output of the stage, tied by the additions)."),
}


def _epochs_of(path: Path) -> float:
    return float(path.stem.rsplit("-e", 1)[1])


def _load_finals(problem_dir: Path, epochs: float) -> tuple[dict[str, list[dict]], dict[str, Any] | None]:  # type: ignore[type-arg]
    """Fine-tune results of ``epochs`` epochs by agent, and the dense model's."""
    finals: dict[str, list[dict]] = {}  # type: ignore[type-arg]
    dense = None
    for p in sorted(f for f in problem_dir.glob("final-*.json") if _epochs_of(f) == epochs):
        d = json.loads(p.read_text())
        if p.name.startswith("final-dense"):
            dense = d
        else:
            finals.setdefault(d["agent"], []).append(d)
    return finals, dense


def _load(problem_dir: Path) -> tuple[dict[str, list[dict]], dict[str, list[dict]], dict[str, Any] | None]:  # type: ignore[type-arg]
    searches: dict[str, list[dict]] = {}  # type: ignore[type-arg]
    for p in sorted(problem_dir.glob("search-*.json")):
        d = json.loads(p.read_text())
        searches.setdefault(d["agent"], []).append(d)
    return searches, *_load_finals(problem_dir, MAIN_EPOCHS)


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def _plots(problem: str, problem_dir: Path, searches: dict[str, list[dict]]) -> list[str]:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (agent, runs) in enumerate(sorted(searches.items())):
        run = min(runs, key=lambda r: r["seed"])
        trials_file = problem_dir / f"trials-{agent}-s{run['seed']}.jsonl"
        if not trials_file.is_file():
            continue
        best, xs, ys = -1.0, [], []
        for line in trials_file.read_text().splitlines():
            t = json.loads(line)
            if t["feasible"] and t["kind"] in ("search", "proposal") and t["metrics"]["accuracy"] > best:
                best = t["metrics"]["accuracy"]
            if best >= 0:
                xs.append(t["step"] + 1)
                ys.append(best)
        if len(xs) == 1:  # one-shot agents (uniform, global): a level, not a curve
            ax.axhline(ys[0], linestyle="--", linewidth=1, color=f"C{i % 10}", label=f"{agent} (1 evaluation)")
        else:
            ax.step(xs, ys, where="post", color=f"C{i % 10}", label=agent)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best search accuracy within budget")
    ax.set_title(f"ResNet-56, {problem} budget: best so far (validation, adaptive BN)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = PLOTS / f"compare-{problem}-best-so-far.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [str(out.relative_to(DOCS))]


def _final_mean(finals: dict[str, list[dict]], agent: str) -> float | None:  # type: ignore[type-arg]
    accs = [f["figures"]["pruned"]["accuracy"] * 100 for f in finals.get(agent, [])]
    return statistics.fmean(accs) if accs else None


def _search_mean(searches: dict[str, list[dict]], agent: str) -> float | None:  # type: ignore[type-arg]
    accs = [s["best"]["accuracy"] * 100 for s in searches.get(agent, [])]
    return statistics.fmean(accs) if accs else None


def _b1_share(final: dict[str, Any]) -> float:
    """Batch-1 latency as a share of dense, measured interleaved with the dense model in one run."""
    f = final["figures"]
    return f["pruned"]["latency_ms"]["1"] / f["dense"]["latency_ms"]["1"]


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**missed**")


def _targets(problem: str, searches: dict[str, list[dict]], finals: dict[str, list[dict]],  # type: ignore[type-arg]
             dense_acc: float | None) -> list[str]:
    """The issue's targets, checked against whatever has been measured so far."""
    out = ["Targets (computed from the figures above):", ""]
    amc, uni, tpe = _final_mean(finals, "amc"), _final_mean(finals, "uniform"), _final_mean(finals, "optuna-tpe")
    if problem.startswith("flops"):
        ok = None if amc is None or uni is None else amc >= uni + 1.0
        gap = f" (AMC {amc:.2f} % vs uniform {uni:.2f} %)" if amc is not None and uni is not None else ""
        out.append(f"- AMC >= uniform + 1.0 pt after fine-tuning: {_verdict(ok)}{gap}")
        a_s, t_s = _search_mean(searches, "amc"), _search_mean(searches, "optuna-tpe")
        ok = None if a_s is None or t_s is None else a_s >= t_s
        gap = f" (search accuracy {a_s:.1f} % vs {t_s:.1f} %" if a_s is not None and t_s is not None else ""
        if gap and amc is not None and tpe is not None:
            gap += f"; after fine-tuning {amc:.2f} % vs {tpe:.2f} %"
        out.append(f"- AMC >= optuna-tpe at equal evaluations: {_verdict(ok)}{gap + ')' if gap else ''}")
        best = max((a for a in (_final_mean(finals, k) for k in finals) if a is not None), default=None)
        ok = None if best is None or dense_acc is None else dense_acc * 100 - best <= 0.9
        gap = f" (best {best:.2f} % vs dense fine-tuned {dense_acc * 100:.2f} %)" if best is not None and dense_acc is not None else ""
        out.append(f"- best agent's drop vs dense <= 0.9 pt: {_verdict(ok)}{gap}")
    if problem == "latency":
        ok = None if amc is None or tpe is None else amc >= tpe
        gap = f" ({amc:.2f} % vs {tpe:.2f} %)" if amc is not None and tpe is not None else ""
        out.append(f"- AMC >= optuna-tpe after fine-tuning, on this problem: {_verdict(ok)}{gap}")
        ratio = _b1_share(finals["netadapt"][0]) if finals.get("netadapt") else None
        limit = searches["netadapt"][0]["limits"]["latency"] if searches.get("netadapt") else None
        ok = None if ratio is None or limit is None else ratio <= limit
        measured = f" (measured {ratio:.1%} of dense at batch 1, interleaved with the dense model)" if ratio is not None else ""
        budget = f"the {limit:.0%} latency budget" if limit is not None else "the latency budget"
        out.append(f"- NetAdapt meets {budget} as measured: {_verdict(ok)}{measured}")
        nad = _final_mean(finals, "netadapt")
        matched = _final_mean(finals, "uniform-matched")
        ok = None if nad is None or matched is None else nad > matched
        out.append(f"- NetAdapt beats uniform at equal measured latency (uniform-matched: the uniform ratio bisected on "
                   f"measured latency to NetAdapt's): {_verdict(ok)}"
                   + (f" ({nad:.2f} % at {_b1_share(finals['netadapt'][0]):.1%} vs {matched:.2f} % at "
                      f"{_b1_share(finals['uniform-matched'][0]):.1%} of dense)" if ok is not None else ""))
        if limit is not None:
            within = sorted(a for a, runs in finals.items() if all(_b1_share(f) <= limit for f in runs))
            over = sorted(f"{a} ({max(_b1_share(f) for f in runs):.1%})" for a, runs in finals.items() if a not in within)
            out.append(f"- within the {limit:.0%} budget as measured: {', '.join(within) or 'none'}; "
                       f"over it: {', '.join(over) or 'none'}")
        if nad is not None and uni is not None:
            share = _b1_share(finals["uniform"][0])
            out.append(f"- for reference, uniform solved for the budget through the table: {uni:.2f} % at {share:.1%} of "
                       f"dense as measured ({'within' if limit is not None and share <= limit else 'over'} the budget)")
    return out


def _longer_runs(problem_dir: Path) -> list[tuple[float, dict[str, list[dict]], dict[str, Any]]]:  # type: ignore[type-arg]
    """(epochs, finals by agent, dense) for each fine-tune length other than the main one that has a dense run."""
    out = []
    for epochs in sorted({_epochs_of(f) for f in problem_dir.glob("final-*.json")} - {MAIN_EPOCHS}):
        finals, dense = _load_finals(problem_dir, epochs)
        if dense is not None:
            out.append((epochs, finals, dense))
    return out


def _longer_finetunes(longer: list[tuple[float, dict[str, list[dict]], dict[str, Any]]],  # type: ignore[type-arg]
                      short: dict[str, list[dict]]) -> list[str]:  # type: ignore[type-arg]
    """Some strategies and the dense model fine-tuned longer (``short``: the main fine-tune's
    results): do the ranking and the drop hold?"""
    out: list[str] = []
    for epochs, finals, dense in longer:
        if not finals:
            continue
        d = dense["figures"]["dense_finetuned"]["accuracy"] * 100
        out += ["", f"Longer fine-tune, {epochs:g} epochs (same recipe; the dense model fine-tuned the same way: {d:.2f} %):", "",
                f"| agent (seed) | test acc. after {MAIN_EPOCHS:g} epoch | after {epochs:g} epochs | drop vs dense (pt) |",
                "|---|---|---|---|"]
        rows = sorted(((a, f) for a, runs in finals.items() for f in runs), key=lambda r: -r[1]["figures"]["pruned"]["accuracy"])
        for agent, f in rows:
            acc = f["figures"]["pruned"]["accuracy"] * 100
            one = next((g["figures"]["pruned"]["accuracy"] * 100 for g in short.get(agent, []) if g["seed"] == f["seed"]), None)
            out.append(f"| {agent} ({f['seed']}) | {'-' if one is None else f'{one:.2f} %'} | {acc:.2f} % | {d - acc:.2f} |")
    return out


def _longer_drop(longer: list[tuple[float, dict[str, list[dict]], dict[str, Any]]]) -> list[str]:  # type: ignore[type-arg]
    """The drop target checked on the longer fine-tunes too (a few runs, not every agent)."""
    best: tuple[float, str, int, float] | None = None
    for epochs, finals, dense in longer:
        d = dense["figures"]["dense_finetuned"]["accuracy"] * 100
        for agent, runs in finals.items():
            for f in runs:
                drop = d - f["figures"]["pruned"]["accuracy"] * 100
                if best is None or drop < best[0]:
                    best = (drop, agent, f["seed"], epochs)
    if best is None:
        return []
    drop, agent, seed, epochs = best
    return [f"- the same after the longer fine-tunes (a few strategies, one run each): {_verdict(drop <= 0.9)} "
            f"(best drop {drop:.2f} pt: {agent} seed {seed} after {epochs:g} epochs)"]


def _finetune_spread(problem_dir: Path, short: dict[str, list[dict]], dense: dict[str, Any] | None) -> list[str]:  # type: ignore[type-arg]
    """The main fine-tune repeated with other seeds (data order, augmentation) on one strategy per
    agent: how far the fine-tune alone moves a result, the yardstick for the differences above."""
    repeats = sorted((problem_dir / "ft-seeds").glob(f"final-*-e{MAIN_EPOCHS:g}-f*.json"))
    if not repeats:
        return []
    rows: dict[tuple[str, int | None], dict[int, float]] = {}
    if dense is not None:
        rows[("dense", None)] = {0: dense["figures"]["dense_finetuned"]["accuracy"] * 100}
    for p in repeats:
        d = json.loads(p.read_text())
        ft_seed = int(p.stem.rsplit("-f", 1)[1])
        if p.name.startswith("final-dense"):
            rows.setdefault(("dense", None), {})[ft_seed] = d["figures"]["dense_finetuned"]["accuracy"] * 100
            continue
        key = (d["agent"], d["seed"])
        if key not in rows:
            main = next((g for g in short.get(d["agent"], []) if g["seed"] == d["seed"]), None)
            rows[key] = {0: main["figures"]["pruned"]["accuracy"] * 100} if main else {}
        rows[key][ft_seed] = d["figures"]["pruned"]["accuracy"] * 100
    seeds = sorted({k for accs in rows.values() for k in accs})
    out = ["", f"The main {MAIN_EPOCHS:g}-epoch fine-tune repeated with other fine-tune seeds (data order and augmentation; "
                f"seed 0 is the table's run):", "",
           "| model (search seed) | " + " | ".join(f"fine-tune seed {k}" for k in seeds) + " | mean ± sd |",
           "|---|" + "---|" * (len(seeds) + 1)]
    sds = []
    for (agent, seed), accs in sorted(rows.items(), key=lambda r: (r[0][0] != "dense", r[0][0])):
        vals = [accs[k] for k in seeds if k in accs]
        if len(vals) > 1:
            sds.append(statistics.stdev(vals))
        label = agent if seed is None else f"{agent} ({seed})"
        out.append(f"| {label} | " + " | ".join(f"{accs[k]:.2f} %" if k in accs else "-" for k in seeds) + f" | {_mean_sd(vals)} % |")
    if sds:
        sd = statistics.fmean(sds)
        out += ["", f"Same strategy, same budget, another fine-tune seed: sd {sd:.2f} pt on average. The difference of two "
                    f"single fine-tunes then has an sd of {sd * 2**0.5:.2f} pt, so a gap between two agents' single runs below about "
                    f"{2 * sd * 2**0.5:.1f} pt is within the fine-tune's own noise."]
    return out


def _topk(problem_dir: Path) -> list[str]:
    """Several of one search's best strategies fine-tuned: does search accuracy order them?"""
    runs: dict[tuple[str, int], list[dict]] = {}  # type: ignore[type-arg]
    for p in sorted((problem_dir / "topk").glob(f"final-*-e{MAIN_EPOCHS:g}.json")):
        d = json.loads(p.read_text())
        runs.setdefault((d["agent"], d["seed"]), []).append(d)
    if not runs:
        return []
    out = ["", f"A search's most accurate distinct strategies, each fine-tuned the same way ({MAIN_EPOCHS:g} epoch; rank 1 is the "
                "table's run). \"whole val.\": re-scored on the whole 5,000-image validation split, against the search's 1,000:", "",
           "| agent (seed) | rank | step | search acc. | whole val. | test acc. after fine-tune | params |", "|---|---|---|---|---|---|---|"]
    notes = []
    for (agent, seed), rows in sorted(runs.items()):
        rows.sort(key=lambda r: r["rank"])
        for r in rows:
            out.append(f"| {agent} ({seed}) | {r['rank']} | {r['step']} | {r['search_accuracy']:.2%} | {r['whole_val_accuracy']:.2%} "
                       f"| {r['test_accuracy']:.2%} | {r['params_ratio']:.1%} |")
        tests = [r["test_accuracy"] for r in rows]
        if len(rows) > 2:
            notes.append(f"- {agent} ({seed}): fine-tuned accuracy spans {100 * (max(tests) - min(tests)):.2f} pt; Kendall tau against "
                         f"search accuracy {kendalltau([r['search_accuracy'] for r in rows], tests).statistic:+.2f}, against whole-validation "
                         f"accuracy {kendalltau([r['whole_val_accuracy'] for r in rows], tests).statistic:+.2f}; the best fine-tuned is rank "
                         f"{max(rows, key=lambda r: r['test_accuracy'])['rank']}")
    return out + ["", *notes] if notes else out


def section(problem: str, problem_dir: Path, amc_paper: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    searches, finals, dense = _load(problem_dir)
    if not searches:
        return "", {}
    dense_acc = dense["figures"]["dense_finetuned"]["accuracy"] if dense else None
    lines = [f"### Problem: ResNet-56, {problem} budget", ""]
    if problem in SPACES:
        lines += [SPACES[problem], ""]
    if dense:
        d0, d1 = dense["figures"]["dense"], dense["figures"]["dense_finetuned"]
        lines.append(f"Dense ResNet-56 on the 10,000 JPEG test images: {d0['accuracy']:.2%} as downloaded, "
                     f"{d1['accuracy']:.2%} after the same fine-tune budget as the pruned models.")
        lines.append("")
    lines += ["| agent | runs | evaluations | best search acc. | final test acc. | drop vs dense FT (pt) | MACs | params | size "
              "| latency speedup b1 / b64 | search time | forward share |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary: dict[str, Any] = {}
    def rank(agent: str) -> tuple[float, float]:
        f_accs = [f["figures"]["pruned"]["accuracy"] for f in finals.get(agent, [])]
        return (-statistics.fmean(f_accs) if f_accs else 1.0, -max(s["best"]["accuracy"] for s in searches[agent]))

    for agent in sorted(searches, key=rank):
        s_runs = searches[agent]
        f_runs = finals.get(agent, [])
        accs = [f["figures"]["pruned"]["accuracy"] * 100 for f in f_runs]
        drops = [dense_acc * 100 - a for a in accs] if dense_acc is not None else []
        f0 = f_runs[0] if f_runs else None
        spd = (f"{f0['latency_speedup'].get('1', float('nan')):.2f}x / {f0['latency_speedup'].get('64', float('nan')):.2f}x" if f0 else "-")
        if f0 and problem == "latency":  # the budget is on latency: show it against dense, as measured
            spd += f" ({_b1_share(f0):.0%} of dense at b1)"
        search_s = statistics.fmean(s["search_seconds_total"] for s in s_runs)
        share = [s["forward_share"] for s in s_runs if s.get("forward_share")]
        share_text = f"{statistics.fmean(share):.0%}" if share else "-"
        # absolute milliseconds from runs at different times on a shared machine do not compare;
        # the speedup was measured interleaved with the dense model in the same run
        costs = (f"{f0['macs_ratio']:.1%} | {f0['params_ratio']:.1%} | {f0['size_ratio']:.1%} | {spd}" if f0
                 else "- | - | - | -")
        lines.append(
            f"| {agent} | {len(s_runs)} | {s_runs[0]['evaluations']} | {_mean_sd([s['best']['accuracy'] * 100 for s in s_runs])} % "
            f"| {_mean_sd(accs)} {'%' if accs else ''} | {_mean_sd(drops)} | {costs} | {search_s / 60:.0f} min | {share_text} |")
        summary[agent] = {"search": s_runs, "final": f_runs}
    notes = [f"- {agent} (seed {r['seed']}): {r['note']}" for agent in sorted(searches) for r in searches[agent] if r.get("note")]
    if notes:
        lines += ["", "Notes on individual runs:", "", *notes]
    lines += ["", *_targets(problem, searches, finals, dense_acc)]
    longer = _longer_runs(problem_dir)
    if problem == "flops":
        lines += _longer_drop(longer)
        lines += ["", ("Reported elsewhere, not measured here (AMC paper, ResNet-56 on the original CIFAR-10 test set, 50 % FLOPs): "
                       f"dense {amc_paper['resnet56_dense_top1']} %, AMC {amc_paper['resnet56_50pct_flops_top1_after_ft']} % "
                       f"after fine-tuning ({amc_paper['drop_pt']} pt drop).")]
    lines += _longer_finetunes(longer, finals)
    lines += _finetune_spread(problem_dir, finals, dense)
    lines += _topk(problem_dir)
    lines.append("")
    for img in _plots(problem, problem_dir, searches):
        lines.append(f"![best so far, {problem}]({img})")
    lines.append("")
    return "\n".join(lines), summary


def write_report(root: Path, amc_paper: dict[str, Any]) -> None:
    parts, blob = [], {}
    for problem_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        text, summary = section(problem_dir.name, problem_dir, amc_paper)
        if text:
            parts.append(text)
            blob[problem_dir.name] = summary
    (root / "summary.json").write_text(json.dumps(blob, indent=2, default=str))
    doc = DOCS / "benchmarks.md"
    body = doc.read_text() if doc.exists() else "# Benchmarks\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN not in body:
        body += "\n" + BEGIN + "\n" + END + "\n"
    head, rest = body.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(head + BEGIN + "\n" + "\n".join(parts) + "\n" + END + tail)
    print(f"written: {doc}, {root / 'summary.json'}")
