"""The evaluator: ``evaluate(strategy, fidelity) -> Metrics``, shared by every agent.

Search accuracy must rank candidates the way fine-tuning would. A pruned net's BatchNorm
statistics are those of the dense net and no longer match its features, which makes raw accuracy
almost noise (ResNet-56 uniform 50 % MACs: 26 %); re-estimating them on ~1k training images
(adaptive BN, EagleEye 2020) brings it to 67 %, and that is the default fidelity.

Forward passes dominate the cost, so they run in channels-last layout, with BatchNorm folded
into the convolutions for inference, on pre-normalized tensors. They run on the evaluator's compute
device (``compression/compute_device.py``): the dense model, the calibration and validation images are
moved there once, each candidate once; metrics come back as Python numbers.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .compute_device import GPU_EVAL_BATCH, exact_float32, inference_batch, model_device, place, resolve_device
from .data import DataSplits, ImageSource, Normalizer
from .errors import PrunePilotError
from .finetuning import FinetuneConfig, finetune
from .measure import measure_latency, size_on_disk
from .pruning import Pruner
from .resources import Resource, SizeModel
from .strategy import Strategy

FidelityMethod = Literal["none", "adaptive-bn", "reconstruct", "short-finetune"]
FIDELITY_METHODS: tuple[str, ...] = ("none", "adaptive-bn", "reconstruct", "short-finetune")


@dataclass(frozen=True)
class Fidelity:
    """How a candidate's search accuracy is measured.

    ``val_images``: size of the fixed, class-stratified validation subset (None: the whole
    validation split). ``calib_images``: training images for BatchNorm re-estimation (also used
    by ``reconstruct``). ``finetune_steps``: SGD steps for ``short-finetune``.
    """

    method: FidelityMethod = "adaptive-bn"
    val_images: int | None = 1000
    calib_images: int = 1024
    finetune_steps: int = 50
    finetune_lr: float = 0.01
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.method not in FIDELITY_METHODS:
            raise PrunePilotError(f"unknown fidelity {self.method!r}; choose one of {', '.join(FIDELITY_METHODS)}")
        if self.val_images is not None and self.val_images < 10:
            raise PrunePilotError("fidelity val_images must be >= 10")
        if self.calib_images < 1 or self.batch_size < 1:
            raise PrunePilotError("fidelity calib_images and batch_size must be >= 1")

    @property
    def tag(self) -> str:
        return self.tag_with(self.val_images, self.calib_images)

    def tag_with(self, val_images: int | None, calib_images: int) -> str:
        """The label with the image counts actually used (a small data set has fewer than asked for)."""
        return f"{self.method}/val={val_images}/calib={calib_images}" + (
            f"/ft={self.finetune_steps}" if self.method == "short-finetune" else ""
        )


@dataclass
class Metrics:
    accuracy: float
    macs: int
    params: int
    size_bytes: int
    macs_ratio: float
    params_ratio: float
    size_ratio: float
    latency_ms: float | None
    latency_ratio: float | None
    latency_source: str | None  # "predicted", "measured" or None
    strategy: Strategy
    kept: list[int]
    fidelity: str
    wall_time_s: float
    forward_time_s: float
    prune_time_s: float
    cached: bool = False
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def resource(self, name: str) -> float | None:
        """Usage of a budgeted resource as a ratio of the dense model."""
        value = getattr(self, Resource(name).metric)
        return None if value is None else float(value)


class LatencyModel(Protocol):
    """Predicts a pruned model's latency (ms) from its kept channels, e.g. a lookup table."""

    def predict(self, kept: np.ndarray) -> float: ...

    @property
    def dense_ms(self) -> float: ...


# --------------------------------------------------------------------------- forward helpers


class ForwardTimer:
    """Accumulates the wall time spent inside model forward (and backward) passes."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def run(self, fn: Callable[..., torch.Tensor]) -> torch.Tensor:  # called with no arguments (callers bind i=i)
        t0 = time.perf_counter()
        try:
            return fn()
        finally:  # a pass stopped early by an exception still counts
            self.seconds += time.perf_counter() - t0


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Inference copy with every Conv->BN pair folded (via torch.fx); the model itself if tracing fails."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model, inplace=False)
    except Exception:  # noqa: BLE001 - untraceable models are evaluated unfused, just slower
        return model


def accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 128,
    timer: ForwardTimer | None = None,
    fold: bool = True,
) -> float:
    """Top-1 accuracy of ``model`` on normalized ``images`` (channels-last float tensors on the model's device)."""
    batches = ((images[i: i + batch_size], labels[i: i + batch_size]) for i in range(0, len(images), batch_size))
    return _top1(model, batches, len(images), timer, fold)


def accuracy_on(
    model: nn.Module,
    data: ImageSource,
    normalizer: Normalizer,
    batch_size: int = 128,
    timer: ForwardTimer | None = None,
    fold: bool = True,
) -> float:
    """Top-1 accuracy of ``model`` on an image set (in memory or streamed), each batch normalized on
    the model's device."""
    device = model_device(model)
    batches = ((normalizer(x).contiguous(memory_format=torch.channels_last), y) for x, y in data.batches(batch_size, device=device))
    return _top1(model, batches, len(data), timer, fold)


def _top1(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n: int, timer: ForwardTimer | None,
          fold: bool) -> float:
    model.eval()
    net = fold_batchnorm(model) if fold else model
    timer = timer or ForwardTimer()
    correct = 0
    with torch.inference_mode():
        for x, y in batches:
            logits = timer.run(lambda x=x: net(x))
            correct += int((logits.argmax(1) == y).sum())
    return correct / max(1, n)


def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 128, timer: ForwardTimer | None = None) -> None:
    """Adaptive BN: re-estimate running statistics as an exact average over ``images``."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    timer = timer or ForwardTimer()
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            timer.run(lambda i=i: model(images[i: i + batch_size]))
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.eval()


class _Captured(Exception):
    """Stops a forward pass once the layer being refitted has seen its input."""


def _positions(cols: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(N, F, L) features at ``idx`` (N, S) positions -> (N * S, F) rows."""
    sel = torch.gather(cols, 2, idx.unsqueeze(1).expand(-1, cols.shape[1], -1))
    return sel.permute(0, 2, 1).reshape(-1, cols.shape[1])


def reconstruct_next_layers(
    pruned: nn.Module,
    dense: nn.Module,
    images: torch.Tensor,
    timer: ForwardTimer | None = None,
    samples_per_image: int = 10,
    ridge: float = 1e-3,
    kept_outputs: Mapping[str, np.ndarray] | None = None,
    batch_size: int = 128,
) -> int:
    """Least-squares reconstruction (He et al., ICCV 2017; AMC's channel pruning).

    For every conv whose *input* channels were pruned, refit its weights so its output on the pruned
    net's features matches the dense net's output, from ``samples_per_image`` random positions per
    image. A conv that lost outputs too is fitted to the dense outputs it kept, which
    ``kept_outputs`` names (:attr:`PrunedModel.kept_outputs`); without them it is left as it is.

    Layers are refitted one at a time in forward order, each on the features of the net refitted
    so far (a pass per layer, stopped at that layer). Fitting all of them to the features of the
    un-refitted net in one pass is cheaper but compounds: with the residual channels pruned it
    measured worse than adaptive BN alone. Returns the number of layers rebuilt.
    """
    timer = timer or ForwardTimer()
    kept_outputs = kept_outputs or {}
    dense_mods = dict(dense.named_modules())
    candidates = {
        name: m for name, m in pruned.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups == 1 and name in dense_mods
        and m.in_channels < dense_mods[name].in_channels
        and (m.out_channels == dense_mods[name].out_channels or name in kept_outputs)
    }
    if not candidates:
        return 0
    gen = torch.Generator().manual_seed(0)
    order: list[str] = []
    picks: dict[str, torch.Tensor] = {}  # name -> (images, samples) output positions, shared by both nets
    ys: dict[str, list[torch.Tensor]] = {name: [] for name in candidates}
    offset = [0]

    def grab_output(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            flat = out.flatten(2)  # (N, C, L)
            if name not in picks:
                order.append(name)
                # drawn on the CPU generator (the same positions on every device), kept on the features' device
                picks[name] = torch.randint(0, flat.shape[2], (len(images), samples_per_image), generator=gen).to(flat.device)
            y = _positions(flat, picks[name][offset[0]: offset[0] + flat.shape[0]])
            if name in kept_outputs:
                y = y[:, torch.as_tensor(kept_outputs[name], device=y.device)]
            ys[name].append(y)
        return hook

    def run(model: nn.Module) -> None:
        for i in range(0, len(images), batch_size):
            offset[0] = i
            try:
                timer.run(lambda i=i: model(images[i: i + batch_size]))
            except _Captured:
                pass

    dense.eval()
    pruned.eval()
    handles = [dense_mods[name].register_forward_hook(grab_output(name)) for name in candidates]
    try:
        with torch.no_grad():
            run(dense)
    finally:
        for h in handles:
            h.remove()
    for name in order:
        m = candidates[name]
        xs: list[torch.Tensor] = []

        def grab_input(mod: nn.Module, inp: tuple[torch.Tensor, ...], m: nn.Conv2d = m, name: str = name,
                       xs: list[torch.Tensor] = xs) -> None:
            padding = cast(tuple[int, ...], m.padding)  # numeric: a string padding ("same") has no fixed unfold
            cols = F.unfold(inp[0], m.kernel_size, m.dilation, padding, m.stride)  # (N, C*k*k, L)
            xs.append(_positions(cols, picks[name][offset[0]: offset[0] + cols.shape[0]]))
            raise _Captured

        handle = m.register_forward_pre_hook(grab_input)
        try:
            with torch.no_grad():
                run(pruned)
        finally:
            handle.remove()
        with torch.no_grad():
            x, y = torch.cat(xs), torch.cat(ys[name])
            if m.bias is not None:
                y = y - m.bias
            gram = x.T @ x
            gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], device=gram.device)
            w = torch.linalg.solve(gram, x.T @ y)  # (C*k*k, O)
            m.weight.copy_(w.T.reshape_as(m.weight))
    return len(order)


# --------------------------------------------------------------------------- evaluator


@dataclass
class EvalData:
    """What an evaluator reads: the fixed validation subset (in memory on the device, or streamed
    when it is over the cache limit), the calibration images (normalized, channels-last, on the
    device; ``calib_images`` of them, always in memory) and the training set (short fine-tunes)."""

    val: ImageSource
    calib_x: torch.Tensor
    train: ImageSource
    normalizer: Normalizer

    @classmethod
    def from_splits(cls, splits: DataSplits, val_images: int | None, calib_images: int, seed: int = 0,
                    device: torch.device | None = None) -> EvalData:
        device = device or torch.device("cpu")
        norm = Normalizer(splits.mean, splits.std)
        val = splits.val.subset(val_images, seed).resident().on(device)
        calib = splits.train.subset(calib_images, seed + 1).load().on(device)
        return cls(val, norm(calib.images).contiguous(memory_format=torch.channels_last), splits.train.on(device), norm)

    def on(self, device: torch.device) -> EvalData:
        """The same data on ``device`` (the CPU for the object store: NetAdapt ships it to its proposals)."""
        return EvalData(self.val.on(device), self.calib_x.to(device), self.train.on(device), self.normalizer)


class Evaluator:
    """Prunes a copy of the model per strategy and measures it; results are cached by architecture."""

    def __init__(
        self,
        pruner: Pruner,
        splits: DataSplits | None,
        fidelity: Fidelity | None = None,
        latency_model: LatencyModel | None = None,
        latency_mode: Literal["off", "predict", "measure"] = "predict",
        latency_batch: int = 1,
        cache_size: int = 4096,
        metric: Callable[[nn.Module], float] | None = None,
        device: str | torch.device = "cpu",
        gpu_eval_batch: int = GPU_EVAL_BATCH,
    ) -> None:
        """``metric``: the user's own metric of a candidate (higher is better), measured after the
        fidelity step instead of top-1 accuracy on the validation split (``prunepilot.compress``); it
        gets the candidate on ``device``, the compute device (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""
        self.device = resolve_device(device)
        self.gpu_eval_batch = gpu_eval_batch  # validation batch on a GPU (the CPU keeps the fidelity's)
        self.pruner = pruner
        self.metric = metric
        self.splits = splits
        self.fidelity = fidelity or Fidelity()
        self.latency_model = latency_model
        self.latency_mode = latency_mode if (latency_mode != "predict" or latency_model is not None) else "off"
        self.latency_batch = latency_batch
        self._data: dict[tuple[int | None, int], EvalData] = {}
        self._cache: OrderedDict[tuple[object, ...], Metrics] = OrderedDict()
        self._cache_size = cache_size
        # a channels-last copy for fast forward passes; the pruner's model stays as the user gave it
        self.dense_model = place(copy.deepcopy(pruner.model), self.device)
        self.size_model = SizeModel.of(self.dense_model, pruner.graph.dense_params)
        self.dense_size = self.size_model.dense_bytes
        self.evaluations = 0  # real (uncached) evaluations
        self.forward_seconds = 0.0
        self.total_seconds = 0.0

    # ------------------------------------------------------------------ data & costs

    def data(self, fidelity: Fidelity) -> EvalData:
        key = (fidelity.val_images, fidelity.calib_images)
        if self.splits is None:
            raise PrunePilotError("this evaluator was made without data: it cannot measure accuracy")
        if key not in self._data:
            self._data[key] = EvalData.from_splits(self.splits, fidelity.val_images, fidelity.calib_images, device=self.device)
        return self._data[key]

    def fidelity_tag(self, fidelity: Fidelity | None = None) -> str:
        """How candidates are scored, with the image counts actually used."""
        fidelity = fidelity or self.fidelity
        if self.splits is None:
            return fidelity.tag
        data = self.data(fidelity)
        return fidelity.tag_with(len(data.val), len(data.calib_x))

    def resources(self, kept: np.ndarray) -> dict[str, float]:
        """Budgeted resources of a candidate as ratios of dense, without pruning it (cheap)."""
        cost = self.pruner.cost_of_kept(kept)
        g = self.pruner.graph
        out = {
            "flops": cost.macs / g.dense_macs,
            "params": cost.params / g.dense_params,
            "size": self.size_model.ratio(cost.params + cost.bn_buffers),
        }
        if self.latency_model is not None:
            out["latency"] = self.latency_model.predict(kept) / self.latency_model.dense_ms
        return out

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, strategy: Mapping[str, float], fidelity: Fidelity | None = None) -> Metrics:
        return self.evaluate_kept(self.pruner.kept_channels(strategy), fidelity)

    def evaluate_vector(self, ratios: np.ndarray, fidelity: Fidelity | None = None) -> Metrics:
        return self.evaluate_kept(self.pruner.kept_from_vector(ratios), fidelity)

    def evaluate_kept(self, kept: np.ndarray, fidelity: Fidelity | None = None) -> Metrics:
        fidelity = fidelity or self.fidelity
        key = (tuple(int(k) for k in kept), fidelity, self.latency_mode)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return Metrics(**{**hit.__dict__, "cached": True})
        start = time.perf_counter()
        timer = ForwardTimer()
        pruned = self.pruner.prune_kept(kept)
        prune_s = time.perf_counter() - start
        model = place(pruned.model, self.device)  # pruned on the CPU, moved once
        data = self.data(fidelity)
        with exact_float32(self.device):
            self._apply_fidelity(model, fidelity, data, timer, pruned.kept_outputs)
            if self.metric is not None:
                metric = self.metric
                acc = float(timer.run(lambda: torch.tensor(metric(model.eval()))))
            else:
                acc = accuracy_on(model, data.val, data.normalizer, self._eval_batch(fidelity), timer)
        metrics = self.metrics_for(pruned.model, kept, acc, self.fidelity_tag(fidelity))
        metrics.prune_time_s = prune_s
        metrics.forward_time_s = timer.seconds
        metrics.wall_time_s = time.perf_counter() - start
        self.evaluations += 1
        self.forward_seconds += timer.seconds
        self.total_seconds += metrics.wall_time_s
        self._cache[key] = metrics
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return metrics

    def _apply_fidelity(self, model: nn.Module, fidelity: Fidelity, data: EvalData, timer: ForwardTimer,
                        kept_outputs: Mapping[str, np.ndarray] | None = None) -> None:
        if fidelity.method == "adaptive-bn":
            recalibrate_batchnorm(model, data.calib_x, fidelity.batch_size, timer)
        elif fidelity.method == "reconstruct":
            reconstruct_next_layers(model, self.dense_model, data.calib_x, timer, kept_outputs=kept_outputs)
            recalibrate_batchnorm(model, data.calib_x, fidelity.batch_size, timer)
        elif fidelity.method == "short-finetune":
            recalibrate_batchnorm(model, data.calib_x, fidelity.batch_size, timer)
            cfg = FinetuneConfig(steps=fidelity.finetune_steps, lr=fidelity.finetune_lr, batch_size=fidelity.batch_size, warmup_fraction=0.1)
            result = finetune(model, data.train, data.normalizer, cfg, device=self.device)
            timer.seconds += result.forward_seconds

    def metrics_for(self, model: nn.Module, kept: np.ndarray, acc: float, fidelity_tag: str) -> Metrics:
        """Metrics of a pruned model with ``kept`` channels (w.r.t. the dense model) and a measured accuracy.

        Public so agents that train their own candidates (NetAdapt) report in the same currency.
        """
        g = self.pruner.graph
        kept = np.asarray(kept)
        cost = self.pruner.cost_of_kept(kept)
        size = size_on_disk(model)
        latency = latency_ratio = source = None
        if self.latency_mode == "predict" and self.latency_model is not None:
            latency, source = self.latency_model.predict(kept), "predicted"
            latency_ratio = latency / self.latency_model.dense_ms
        elif self.latency_mode == "measure":
            # Dense and pruned in one interleaved run: their ratio is robust to machine noise.
            # timed on the CPU, whatever the compute device: latency is the target's (compression/compute_device.py)
            host = [m if self.device.type == "cpu" else copy.deepcopy(m).cpu() for m in (self.dense_model, model)]
            dense, mine = measure_latency(host, self.pruner.input_size, self.latency_batch)
            latency, source = mine.median_ms, "measured"
            latency_ratio = mine.median_ms / dense.median_ms
        return Metrics(
            accuracy=acc, macs=cost.macs, params=cost.params, size_bytes=size,
            macs_ratio=cost.macs / g.dense_macs, params_ratio=cost.params / g.dense_params,
            size_ratio=size / self.dense_size, latency_ms=latency,
            latency_ratio=latency_ratio,
            latency_source=source, strategy=self.pruner.effective(kept), kept=[int(k) for k in kept], fidelity=fidelity_tag,
            wall_time_s=0.0, forward_time_s=0.0, prune_time_s=0.0,
        )

    def dense_accuracy(self, fidelity: Fidelity | None = None) -> float:
        fidelity = fidelity or self.fidelity
        data = self.data(fidelity)
        with exact_float32(self.device):
            return accuracy_on(copy.deepcopy(self.dense_model), data.val, data.normalizer, self._eval_batch(fidelity))

    def _eval_batch(self, fidelity: Fidelity) -> int:
        return inference_batch(self.device, fidelity.batch_size, self.gpu_eval_batch)


class FormulaEvaluator(Evaluator):
    """The evaluator's interface with accuracy from a formula instead of a pruned network.

    Resources come exactly from the pruning graph; nothing is pruned or run, so an evaluation costs
    microseconds. For tuning and testing search agents: a synthetic landscape whose optimum is
    known, or a surrogate fitted to recorded real evaluations. ``score`` maps the kept fraction of
    each prunable layer's channels to an accuracy; ``tag`` names it in the trials' fidelity field.
    """

    def __init__(self, pruner: Pruner, score: Callable[[np.ndarray], float], tag: str) -> None:
        super().__init__(pruner, splits=None)
        self.score = score
        self.tag = tag
        self._channels = np.asarray(pruner.graph.channels, dtype=np.float64)

    def evaluate_kept(self, kept: np.ndarray, fidelity: Fidelity | None = None) -> Metrics:
        self.evaluations += 1
        kept = np.asarray(kept)
        res = self.resources(kept)
        g = self.pruner.graph
        latency = self.latency_model.predict(kept) if self.latency_model is not None else None
        return Metrics(
            accuracy=float(self.score(kept / self._channels)), macs=int(round(res["flops"] * g.dense_macs)),
            params=int(round(res["params"] * g.dense_params)), size_bytes=int(round(res["size"] * self.dense_size)),
            macs_ratio=res["flops"], params_ratio=res["params"], size_ratio=res["size"], latency_ms=latency,
            latency_ratio=res.get("latency"), latency_source="predicted" if latency is not None else None,
            strategy=self.pruner.effective(kept), kept=[int(k) for k in kept], fidelity=self.tag,
            wall_time_s=0.0, forward_time_s=0.0, prune_time_s=0.0,
        )
