"""NetAdapt (Yang et al., ECCV 2018): progressive, platform-aware pruning.

Each iteration asks for a resource reduction that shrinks as the search goes (``initial_reduction``
of the dense model's resource, times ``decay`` per iteration; reference defaults 0.025 and 0.96).
For every prunable layer one proposal removes just enough filters from that layer alone to meet
the iteration's target, found through the latency lookup table (or the analytic FLOPs / params /
size model) among the counts the job's constraints allow (``round_to``, measured channel steps),
choosing the filters with the smallest L2 norm in the *current* network. When no layer alone can
meet the target (a step larger than any one layer's share of the resource), the proposals are
contiguous windows of layers instead, each window cut by one common share of its layers' current
channels (at most ``WINDOW_CUT`` where that suffices), just enough to meet the target; every
proposal still meets the same target, so accuracy alone ranks them. Each
proposal is fine-tuned briefly (``short_steps`` SGD steps) and scored on the validation split;
the best one becomes the current network, fine-tuned weights included. The loop stops when the
budget is met; the long fine-tune happens in the job's final phase.

A latency budget is met by prediction first; then the network is measured against the dense model
(``verify_latency``, on by default). If it is over budget, the internal limit tightens by the
measured overshoot and the loop goes on (at most three checks), so the result holds as measured.

Proposals of one iteration are independent, so they go through ``ctx.map`` (Ray in the service).
An iteration never takes the search past ``max_evaluations``: near the cap it evaluates only as
many proposals as are left (the smallest cuts of their layers).
After every iteration the current network and the iteration number are saved, so a restarted job
resumes from its last completed iteration; proposals already recorded are not evaluated again.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt
from safetensors.torch import load_file, save_file
from torch import nn

from prunepilot.compression import FinetuneConfig, Metrics, PrunePilotError, Pruner, PruningConstraints, finetune
from prunepilot.compression.compute_device import exact_float32, inference_batch, place, resolve_device
from prunepilot.compression.evaluate import EvalData, accuracy_on, recalibrate_batchnorm
from prunepilot.compression.resources import exceeded
from prunepilot.compression.spec import ArchSpec, build_from_spec

from ._base import Agent, SearchContext, SearchResult
from ._checkpoint import Checkpoint
from .latency_check import measured_share

log = logging.getLogger("prunepilot.agents.netadapt")
STATE_FILE = "netadapt_state.json"
MODEL_FILE = "netadapt_model.safetensors"


@dataclass
class _Shared:
    """What every proposal of an iteration reads (placed once in the object store by the service)."""

    spec: dict[str, Any]
    weights: dict[str, torch.Tensor]
    current_kept: list[int]
    data: EvalData
    steps: int
    lr: float
    batch_size: int
    seed: int
    exclude: tuple[str, ...] = ()
    reference_widths: dict[str, dict[str, int]] | None = None  # the dense model's (specs are relative to it)
    device: str = "cpu"  # the job's compute device; under Ray, "cuda" is the GPU the proposal's task was given


@dataclass
class _Proposal:
    layers: tuple[int, ...]  # the layers it cuts: one, or a contiguous window (see _window_proposals)
    kept: list[int]  # w.r.t. the dense model


def run_proposal(shared: _Shared, prop: _Proposal) -> tuple[float, dict[str, torch.Tensor], dict[str, Any], float]:
    """Prune the current network's layer (or window of layers), adapt BN, fine-tune briefly, score.
    Top-level for Ray."""
    t0 = time.perf_counter()
    model = build_from_spec(ArchSpec.from_dict(shared.spec), shared.weights)
    spec = ArchSpec.from_dict(shared.spec)
    pruner = Pruner(model, spec.arch, spec.num_classes, spec.input_size,
                    PruningConstraints(max_ratio=0.999, first_layer_max_ratio=0.999, exclude=shared.exclude), criterion="l2",
                    source_file=Path(spec.source_file) if spec.source_file else None, reference_widths=shared.reference_widths)
    if len(pruner.layers) != len(shared.current_kept):
        raise PrunePilotError("the current network lost a prunable layer; raise the minimum channels per layer")
    kept_here = np.array(shared.current_kept)
    cut = list(prop.layers)
    kept_here[cut] = np.array(prop.kept)[cut]
    pruned = pruner.prune_kept(kept_here)
    device = resolve_device(shared.device)
    net = place(pruned.model, device)
    data = shared.data.on(device)
    with exact_float32(device):
        recalibrate_batchnorm(net, data.calib_x)
    cfg = FinetuneConfig(steps=shared.steps, lr=shared.lr, batch_size=shared.batch_size, warmup_fraction=0.1, seed=shared.seed)
    finetune(net, data.train, data.normalizer, cfg, device=device)
    with exact_float32(device):
        acc = accuracy_on(net, data.val, data.normalizer, inference_batch(device, 128))
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    return acc, weights, pruned.spec.to_dict(), time.perf_counter() - t0


SCAN_COUNTS = 64  # up to this many candidate counts are tried one by one; more are bisected
# A window proposal grows until cutting each of its layers by at most this share of its current
# channels meets the step, so no layer is emptied in one iteration when its neighbours can share the cut.
WINDOW_CUT = 0.5


def _largest_within(counts: list[int], value: Callable[[int], float], target: float) -> int | None:
    """The largest of ``counts`` (ascending) whose ``value`` is at or under ``target``; None if none is.

    A predicted latency need not fall with every channel removed (a count off the runtime's block
    costs more than the block under it), so a few candidates (measured steps, rounding) are tried
    from the top down. Long lists (every count) are bisected, which takes the value as monotone; a
    table with an alignment penalty is then steered through ``round_to="measured"``."""
    if value(counts[0]) > target:
        return None  # this layer alone cannot meet the target
    if len(counts) <= SCAN_COUNTS:
        return next(c for c in reversed(counts) if value(c) <= target)
    lo, hi = 0, len(counts) - 1  # value(counts[lo]) <= target; find the largest such index
    if value(counts[hi]) <= target:
        return counts[hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if value(counts[mid]) <= target else (lo, mid)
    return counts[lo]


class NetAdaptAgent(Agent):
    name = "netadapt"
    option_types = {"initial_reduction": Annotated[float, Field(gt=0, le=1)], "decay": Annotated[float, Field(gt=0, le=1)],
                    "short_steps": NonNegativeInt, "lr": PositiveFloat, "batch_size": PositiveInt, "verify_latency": bool}
    description = "NetAdapt: iterative per-layer proposals from a latency lookup table, short fine-tune each, keep the best"
    no_feasible_hint = "it stops once it reaches the budget, so raise the evaluation or time limit"

    def explore(self, ctx: SearchContext) -> SearchResult:
        opts = self.options
        self.initial = float(opts.get("initial_reduction", 0.025))
        self.decay = float(opts.get("decay", 0.96))
        steps = int(opts.get("short_steps", 20))
        lr = float(opts.get("lr", 0.01))
        batch = int(opts.get("batch_size", 64))
        data = ctx.eval_data()
        # what a host's map puts in its object store travels as CPU tensors; in this process it stays on the device
        shipped = data if ctx.env.map is None else data.on(torch.device("cpu"))
        pruner = ctx.pruner
        dense_channels = pruner.graph.channels
        min_kept = pruner.kept_from_vector(ctx.max_ratios)
        # the counts each layer may keep (rounding, measured steps): fixed for the whole search
        self._allowed = [pruner.constraints.allowed_counts(int(c), i) for i, c in enumerate(dense_channels)]
        state = self._restore(ctx)
        if state is None:
            iteration, kept = 0, dense_channels.copy()
            model = copy.deepcopy(pruner.model)
            spec = pruner.spec_of(pruner.model)
        else:
            iteration, kept, model, spec = state
        started = time.perf_counter()
        history: list[dict[str, Any]] = []
        # The loop steers by the table's prediction; the budget is about real latency. When they
        # disagree at the end, tighten the internal limit by the measured overshoot and go on.
        self._limits = dict(ctx.limits)
        verify = ("latency" in ctx.limits and bool(opts.get("verify_latency", True))
                  and ctx.predicts_latency)
        final = None
        checks = 0
        while True:
            if self._within(ctx, kept):
                if not verify or checks >= 3 or ctx.exhausted():
                    break
                measured = measured_share(ctx, model)
                predicted = ctx.costs(kept)["latency"]
                history.append({"iteration": iteration, "check": checks, "predicted_latency": predicted, "measured_latency": measured})
                checks += 1
                if ctx.within_measured("latency", measured):
                    break
                self._limits["latency"] = predicted * ctx.limits["latency"] / measured
                log.info("NetAdapt: measured latency %.1f%% of dense vs %.1f%% predicted; internal limit now %.1f%%",
                         100 * measured, 100 * predicted, 100 * self._limits["latency"])
            ctx.check_cancel()
            if ctx.exhausted():
                break
            resource, target = self._target(ctx, kept, iteration)
            cuts = self._cuts(kept, min_kept)
            props = self._proposals(ctx, kept, cuts, resource, target) or self._window_proposals(
                ctx, kept, cuts, resource, target)
            if not props:
                raise PrunePilotError("NetAdapt cannot reduce the resource further within the layer limits")
            props = self._within_cap(ctx, kept, props)
            first = ctx.step
            todo = [j for j in range(len(props)) if not ctx.is_recorded(first + j)]
            shared = _Shared(spec.to_dict(), {k: v.detach().clone() for k, v in model.state_dict().items()},
                             [int(k) for k in kept], shipped, steps, lr, batch, ctx.seed + iteration, pruner.constraints.exclude,
                             pruner.reference_widths, str(ctx.device))
            outputs = dict(zip(todo, ctx.map(run_proposal, shared, [props[j] for j in todo]), strict=True))
            trials = []
            for j, prop in enumerate(props):
                out = outputs.get(j)

                def metrics_of(_vec: np.ndarray, out=out, prop=prop) -> Metrics:
                    acc, weights, new_spec, secs = out
                    net = build_from_spec(ArchSpec.from_dict(new_spec), weights)
                    m = ctx.network_metrics(net, np.array(prop.kept), acc, f"netadapt/short-ft={steps}")
                    m.wall_time_s = secs
                    return m

                ratios = 1.0 - np.array(prop.kept) / dense_channels
                trials.append(ctx.evaluate(ratios, kind="proposal", evaluate_fn=metrics_of,
                                           extra={"iteration": iteration, "layer": self._label(ctx, prop),
                                                  "layers": [ctx.layer_names[i] for i in prop.layers],
                                                  "resource": resource, "target": target}))
            best_j = max(range(len(props)), key=lambda j: trials[j].accuracy)
            if best_j not in outputs:  # recorded before a restart: re-derive its fine-tuned weights
                outputs[best_j] = run_proposal(shared, props[best_j])
            acc, weights, new_spec, _ = outputs[best_j]
            spec = ArchSpec.from_dict(new_spec)
            model = build_from_spec(spec, weights)
            kept = np.array(props[best_j].kept)
            final = trials[best_j]
            history.append({"iteration": iteration, "layer": self._label(ctx, props[best_j]), "accuracy": acc,
                            resource: ctx.resources(1.0 - kept / dense_channels)[resource]})
            iteration += 1
            self._save(ctx, iteration, kept, model, spec)
        result = ctx.result(iterations=iteration, history=history, seconds=time.perf_counter() - started,
                            final_within_budget=self._within(ctx, kept, ctx.limits), latency_checks=checks)
        if final is not None and final.feasible:
            # NetAdapt's answer is the network it ended with, not the most accurate network that
            # met the prediction on the way (after a latency check that is a bigger one)
            result.best = final
        if result.best is not None and list(result.best.metrics.get("kept", [])) == [int(k) for k in kept]:
            result.model = model  # the adapted network itself, short fine-tunes included
        return result

    # ------------------------------------------------------------------ pieces

    def _within(self, ctx: SearchContext, kept: np.ndarray, limits: dict[str, float] | None = None) -> bool:
        """Within the internal limits (tightened by latency checks), or within ``limits``."""
        res = ctx.costs(kept)
        return not exceeded(res, limits or self._limits)

    def _target(self, ctx: SearchContext, kept: np.ndarray, iteration: int) -> tuple[str, float]:
        """The most-overshot resource drives this iteration; its target shrinks by a decaying step."""
        res = ctx.costs(kept)
        resource = max(self._limits, key=lambda r: res[r] / self._limits[r])
        reduction = self.initial * self.decay**iteration
        return resource, max(self._limits[resource], res[resource] - reduction)

    @staticmethod
    def _label(ctx: SearchContext, prop: _Proposal) -> str:
        """The layer a proposal cuts, or its window as ``first..last``."""
        first, last = ctx.layer_names[prop.layers[0]], ctx.layer_names[prop.layers[-1]]
        return first if len(prop.layers) == 1 else f"{first}..{last}"

    def _cuts(self, kept: np.ndarray, min_kept: np.ndarray) -> list[list[int]]:
        """Per layer, ascending, the counts it may still drop to: allowed by its constraints
        (rounding, measured steps), at least its least count, below what it keeps now."""
        return [[c for c in allowed if lo <= c < now] for allowed, lo, now in zip(self._allowed, min_kept, kept, strict=True)]

    @staticmethod
    def _proposals(ctx: SearchContext, kept: np.ndarray, cuts: list[list[int]], resource: str, target: float) -> list[_Proposal]:
        """Per layer, the most channels it can keep (among its ``cuts``) with the resource at or
        under ``target``, the other layers as they are."""
        props = []
        for i, below in enumerate(cuts):
            if not below:
                continue

            def value(c: int, i: int = i) -> float:
                k = kept.copy()
                k[i] = c
                return ctx.costs(k)[resource]

            count = _largest_within(below, value, target)
            if count is not None:
                k = kept.copy()
                k[i] = count
                props.append(_Proposal((i,), [int(x) for x in k]))
        return props

    @staticmethod
    def _window_proposals(ctx: SearchContext, kept: np.ndarray, cuts: list[list[int]], resource: str,
                          target: float) -> list[_Proposal]:
        """When no layer alone can meet ``target``: the layers with room left, in order, split into
        contiguous windows, each the fewest layers that a common cut of at most ``WINDOW_CUT`` of
        their current channels takes to ``target``, each cut by the least common share that meets it
        (the least where the resource falls with every channel removed, as MACs do; any share found
        meets ``target``). A tail too small to meet it grows backwards, overlapping its neighbour.
        Only when no window of at most ``WINDOW_CUT`` can, one window of every layer may cut deeper.
        Taking the deepest cut of one layer instead emptied layer after layer, so the table chose
        the network's shape, not the accuracy. Empty when even every layer at its least count
        misses ``target``."""
        room = [i for i, below in enumerate(cuts) if below]

        def cut(window: list[int], share: float, most: float) -> np.ndarray:
            """Each layer of ``window`` at the largest count it may take with at least ``share`` of
            its channels removed, or its deepest allowed cut short of that; never more than ``most``
            removed (a step coarser than that is skipped, not taken)."""
            k = kept.copy()
            for i in window:
                least = int(np.ceil(kept[i] * (1.0 - most) - 1e-9))
                candidates = [c for c in cuts[i] if c >= least] + [int(kept[i])]
                want = int(np.ceil(kept[i] * (1.0 - share) - 1e-9))
                k[i] = max((c for c in candidates if c <= want), default=min(candidates))
            return k

        def fits(window: list[int], share: float, most: float = WINDOW_CUT) -> bool:
            return ctx.costs(cut(window, share, most))[resource] <= target

        windows: list[tuple[list[int], float]] = []
        start = 0
        while start < len(room):
            end = next((e for e in range(start + 1, len(room) + 1) if fits(room[start:e], WINDOW_CUT)), None)
            if end is not None:
                windows.append((room[start:end], WINDOW_CUT))
                start = end
                continue
            begin = next((b for b in range(start - 1, -1, -1) if fits(room[b:], WINDOW_CUT)), None)
            if begin is not None:
                windows.append((room[begin:], WINDOW_CUT))
            elif not windows and room and fits(room, 1.0, 1.0):
                windows.append((room, 1.0))
            break
        props = []
        for window, most in windows:
            lo, hi = 0.0, most  # fits(window, hi); find the least such share
            for _ in range(20):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if fits(window, mid, most) else (mid, hi)
            props.append(_Proposal(tuple(window), [int(x) for x in cut(window, hi, most)]))
        return props

    def _within_cap(self, ctx: SearchContext, kept: np.ndarray, props: list[_Proposal]) -> list[_Proposal]:
        """At most the evaluations left: an iteration near the cap keeps the proposals that cut the
        smallest share of their layers' channels (usually the cheapest in accuracy), in layer order."""
        if ctx.search.max_evaluations is None:
            return props
        left = max(0, ctx.search.max_evaluations - ctx.step)
        if len(props) <= left:
            return props

        def share(p: _Proposal) -> float:
            cut = list(p.layers)
            return float((kept[cut] - np.array(p.kept)[cut]).sum() / kept[cut].sum())

        chosen = sorted(props, key=lambda p: (share(p), p.layers))[:left]
        return sorted(chosen, key=lambda p: p.layers)

    def _save(self, ctx: SearchContext, iteration: int, kept: np.ndarray, model: nn.Module, spec: ArchSpec) -> None:
        weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        state = {"iteration": iteration, "kept": [int(k) for k in kept], "spec": spec.to_dict(), "next_step": ctx.step}
        Checkpoint(ctx.state_dir, STATE_FILE).save(state, {MODEL_FILE: lambda path: save_file(weights, str(path))})

    def _restore(self, ctx: SearchContext) -> tuple[int, np.ndarray, nn.Module, ArchSpec] | None:
        checkpoint = Checkpoint(ctx.state_dir, STATE_FILE)
        state = checkpoint.load()
        if state is None:
            return None
        spec = ArchSpec.from_dict(state["spec"])
        model = build_from_spec(spec, load_file(str(checkpoint.path(MODEL_FILE))))
        ctx.step = int(state["next_step"])  # trials of completed iterations stay as recorded
        log.info("NetAdapt resumed at iteration %d", state["iteration"])
        return int(state["iteration"]), np.array(state["kept"]), model, spec
