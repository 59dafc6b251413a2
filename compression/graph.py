"""The pruning mechanism: which channel groups can be pruned, and how to prune them.

Torch-Pruning's dependency graph (DepGraph) is traced once per model. From it we keep, for each
prunable channel group, a *plan*: every coupled module with the TP handler that prunes it and the
mapping from the group's root channels to that module's channels. Pruning a strategy then replays
the plans on a copy of the model, which costs a deep copy plus tensor slicing instead of a new
trace, and the same plans give an exact analytic cost model (MACs, params) for any strategy, so
agents can check budgets without pruning anything.

Every conv / linear layer is either the root of a prunable group, a member coupled into one, or
listed in ``PruningGraph.blocked`` with the reason it stays whole. ``PruningGraph.verify`` checks
the plans themselves against the model: pruning must equal silencing the removed channels.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

from .cifar_resnet import CUSTOM_PRUNERS
from .errors import StrategyError
from .guard import WorkLimits, bounded
from .measure import torch_threads

# Ops whose channel arithmetic Torch-Pruning cannot see: a group passing through one of them
# (e.g. channel padding with ``F.pad``) would be pruned inconsistently, so such groups stay whole.
_UNSAFE_GRAD_FNS = ("ConstantPadNd", "Slice", "Pad", "Roll", "Gather", "IndexBackward", "Unfold")

_PARAM_TYPES = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class LayerInfo:
    """One prunable layer: a channel group rooted at a conv/linear, in forward order.

    ``coupled`` lists every module whose output channels are pruned together with the root (the
    layers tied by residual additions); one ratio applies to all of them.
    """

    index: int
    name: str
    type: str  # "conv", "depthwise-conv" or "linear"
    coupled: tuple[str, ...]
    n: int  # batch size the profile was traced with
    c_in: int
    c_out: int
    h: int  # input height / width of the root layer
    w: int
    kernel: int
    stride: int
    flops: int  # MACs of the root layer
    params: int  # parameters of the root layer
    group_flops: int  # MACs of every layer whose input or output channels this group prunes


@dataclass(frozen=True)
class BlockedLayer:
    """A conv / linear layer the pruning graph leaves whole, and why (a short sentence).

    ``group`` names the conv / linear layers whose output channels are tied to this one (its
    channel group, itself included); they are blocked together.
    """

    name: str
    reason: str
    group: tuple[str, ...] = ()


@dataclass
class _Step:
    module: str
    handler: Callable[[nn.Module, list[int]], nn.Module]
    targets: np.ndarray  # channel index in this module, aligned with ``roots``
    roots: np.ndarray  # root channel index each target follows
    outputs: bool = False  # prunes the output channels of a conv / linear
    inputs: bool = False  # prunes the input side only (the module consumes the group's channels)


@dataclass
class _ModuleCost:
    kind: str  # conv, linear, bn
    c_in: int
    c_out: int
    kernel_area: int
    out_hw: int
    groups: int
    bias: bool
    # (group, channels pruned per root channel) on the output side (one group, or several after a
    # concatenation: a batch norm or depthwise conv over two groups' channels) and on the input side
    out_groups: list[tuple[int, float]] = field(default_factory=list)
    in_groups: list[tuple[int, float]] = field(default_factory=list)

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups == self.c_in == self.c_out and self.groups > 1


@dataclass(frozen=True)
class WeightedModule:
    """A conv or linear layer as the cost model sees it: its row in :meth:`PruningGraph.module_widths`,
    its dense widths, and whether pruning reaches its inputs and outputs."""

    row: int
    name: str
    kind: str  # conv, linear
    c_in: int
    c_out: int
    groups: int
    depthwise: bool
    varies_in: bool
    varies_out: bool


@dataclass
class Cost:
    macs: int
    params: int
    bn_buffers: int


def _module_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Conv2d):
        return "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "bn"
    return None


def trace_dependencies(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph, with our handlers for layers it cannot follow by itself."""
    custom = {t: p for t, p in CUSTOM_PRUNERS.items() if any(isinstance(m, t) for m in model.modules())}
    return tp.DependencyGraph().build_dependency(model, example_inputs=example, customized_pruners=custom)


class PruningGraph:
    """Prunable layers, pruning plans and the analytic cost model of one architecture."""

    def __init__(self, model: nn.Module, input_size: int, batch_size: int = 1, exclude: Collection[str] = (),
                 limits: WorkLimits | None = None) -> None:
        """``exclude``: layers to leave whole, named by any conv/linear of their channel group;
        ``limits``: time and memory the dependency search may take (``guard.WorkLimits``' defaults)
        before the model is refused with :class:`guard.LimitExceeded`."""
        model = model.eval()
        self.input_size = input_size
        self.batch_size = batch_size
        names = {m: n for n, m in model.named_modules()}
        order: list[str] = []
        shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            name = names[mod]
            if name not in shapes:
                order.append(name)
                shapes[name] = (tuple(inp[0].shape), tuple(out.shape))

        handles = [m.register_forward_hook(hook) for m in model.modules() if _module_kind(m) is not None]
        example = torch.randn(1, 3, input_size, input_size)
        try:
            with torch.no_grad():
                model(example)
        finally:
            for h in handles:
                h.remove()
        self.forward_order = order
        self.shapes = shapes  # module -> (input shape, output shape) at batch 1
        self.costs: dict[str, _ModuleCost] = {}
        for name in order:
            m = model.get_submodule(name)
            (_, *in_rest), (_, *out_rest) = shapes[name]
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1]
                self.costs[name] = _ModuleCost("conv", m.in_channels, m.out_channels, k, out_rest[-1] * out_rest[-2], m.groups, m.bias is not None)
            elif isinstance(m, nn.Linear):
                rows = int(np.prod(out_rest[:-1])) if len(out_rest) > 1 else 1
                self.costs[name] = _ModuleCost("linear", m.in_features, m.out_features, 1, rows, 1, m.bias is not None)
            else:
                assert isinstance(m, nn.modules.batchnorm._BatchNorm)  # _module_kind: only batch norm is left
                self.costs[name] = _ModuleCost("bn", m.num_features, m.num_features, 0, 0, 1, m.affine)

        with bounded("tracing the model's channel dependencies", limits):
            self._build(model, order, shapes, names, example, exclude)

    def _build(self, model: nn.Module, order: list[str], shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]],
               names: Mapping[nn.Module, str], example: torch.Tensor, exclude: Collection[str]) -> None:
        """The dependency graph, the prunable layers and their plans (bounded: see ``limits``)."""
        try:
            dg = trace_dependencies(model, example)
        except Exception as exc:  # noqa: BLE001 - Torch-Pruning's own failures (e.g. ZeroDivisionError on a channel shuffle)
            raise StrategyError(f"Torch-Pruning cannot trace this model's channel dependencies ({_first_line(exc)})") from None
        output_layers = self._output_layers(order, shapes)
        self.layers: list[LayerInfo] = []
        self._plans: list[list[_Step]] = []
        blocked: dict[str, BlockedLayer] = {}
        seen: set[str] = set()
        excludable: set[str] = set()
        roots: list[str] = []

        def block(members: Collection[str], reason: str) -> None:
            group = tuple(members)
            for member in group:
                if member not in blocked and member not in output_layers:
                    blocked[member] = BlockedLayer(member, reason, group)

        for name in order:
            m = model.get_submodule(name)
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            if name in output_layers:
                blocked[name] = BlockedLayer(name, "output layer (the classifier)", (name,))
                continue
            if name in seen:
                continue
            pruner = dg.get_pruner_of_module(m)
            if pruner is None:
                block([name], f"Torch-Pruning has no handler for {type(m).__name__}")
                continue
            channels = pruner.get_out_channels(m)
            if not channels or channels < 2:
                block([name], "a single channel" if channels == 1 else "no output channels to prune")
                continue
            if m not in dg.module2node:
                block([name], "not in the traced dependency graph (its output does not reach the model output)")
                continue
            group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(channels)))
            plan, coupled, problem = self._plan(group, names, dg, model)
            seen.update(coupled)
            members = coupled or (name,)
            if problem is not None:
                block(members, problem)
                continue
            tied = [c for c in coupled if c in output_layers]
            if tied:
                block(members, f"coupled to the output layer ({tied[0]})")
                continue
            excludable.update(coupled)
            roots.append(name)
            named = [c for c in coupled if c in exclude]
            if named:
                block(members, "excluded by the user" + (f" (as {named[0]})" if named[0] != name else ""))
                continue
            gid = len(self.layers)
            for step in plan:
                cost = self.costs.get(step.module)
                if cost is None:
                    continue
                side = cost.out_groups if dg.is_out_channel_pruning_fn(step.handler) or cost.kind == "bn" else cost.in_groups
                side.append((gid, len(step.targets) / channels))
            self._plans.append(plan)
            self.layers.append(self._layer_info(gid, name, coupled, m, shapes[name]))
        rank = {n: i for i, n in enumerate(order)}
        self.blocked: list[BlockedLayer] = sorted(blocked.values(), key=lambda b: rank[b.name])
        unknown = sorted(set(exclude) - excludable)
        if unknown:
            raise StrategyError(
                f"cannot exclude {', '.join(unknown[:5])}: not a prunable layer; prunable layers are e.g. "
                + ", ".join(roots[:3])
            )
        # Group MACs need every group's in/out assignment, so fill them in a second pass.
        self.layers = [
            LayerInfo(**{**layer.__dict__, "group_flops": self._group_macs(layer.index)}) for layer in self.layers
        ]
        self.by_name = {layer.name: layer for layer in self.layers}
        self._build_cost_arrays()
        self.channels = np.array([layer.c_out for layer in self.layers], dtype=np.int64)
        dense = self.cost(np.zeros(len(self.layers), dtype=np.int64))
        self.dense_macs, self.dense_params = dense.macs, dense.params

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def _output_layers(order: list[str], shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> set[str]:
        """The classifier: the last conv/linear in forward order feeds the output, never prune it."""
        for name in reversed(order):
            if len(shapes[name][1]) == 2 or len(shapes[name][1]) == 4:
                return {name}
        return set()

    @staticmethod
    def _plan(group: tp.Group, names: Mapping[nn.Module, str], dg: tp.DependencyGraph,
              model: nn.Module) -> tuple[list[_Step], tuple[str, ...], str | None]:
        """The group's steps, its coupled conv / linear layers, and why it cannot be pruned (None: it can)."""
        plan: list[_Step] = []
        coupled: list[str] = []
        problem: str | None = None
        params = {p: n for n, p in model.named_parameters()}
        for item in group.items:
            dep, idxs = item.dep, item.idxs
            target = dep.target.module
            if isinstance(target, tp.ops._ElementWiseOp):
                bad = next((b for b in _UNSAFE_GRAD_FNS if b in repr(target)), None)
                if bad is not None and problem is None:
                    problem = ("its channels pass through an op the dependency graph cannot follow "
                               f"(roll / pad / gather: {target._grad_fn})")
                continue
            if isinstance(target, nn.Parameter):
                # unwrapped parameters are outside the replay mechanism
                problem = problem or f"its channels reach a bare nn.Parameter ({params.get(target, 'unnamed')}) the plan cannot prune"
                continue
            if target not in names:
                continue  # TP's virtual ops (concat/split/reshape) carry no parameters
            name = names[target]
            if problem is None:
                problem = PruningGraph._grouping_problem(target)
            out_fn = dg.is_out_channel_pruning_fn(dep.handler)
            outputs = out_fn and isinstance(target, (nn.Conv2d, nn.Linear))
            plan.append(_Step(name, dep.handler, np.asarray(idxs, dtype=np.int64), np.asarray(item.root_idxs, dtype=np.int64),
                              outputs, inputs=not out_fn))
            if outputs:
                coupled.append(name)
        return plan, tuple(dict.fromkeys(coupled)), problem

    @staticmethod
    def _grouping_problem(m: nn.Module) -> str | None:
        """Channel groupings Torch-Pruning slices as if they were not there."""
        if isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups and not (m.groups == m.in_channels == m.out_channels):
            return (f"grouped convolution coupling (groups={m.groups}): channels must be removed group by group, "
                    "which the dependency graph does not model")
        if isinstance(m, nn.GroupNorm) and m.num_groups > 1:
            return (f"its channels feed a GroupNorm (groups={m.num_groups}): the kept channels would have to stay a "
                    "multiple of the group count")
        return None

    def _layer_info(self, gid: int, name: str, coupled: tuple[str, ...], m: nn.Module, shape: tuple[tuple[int, ...], tuple[int, ...]]) -> LayerInfo:
        cost = self.costs[name]
        in_shape = shape[0]
        h, w = (in_shape[2], in_shape[3]) if len(in_shape) == 4 else (1, 1)
        if isinstance(m, nn.Conv2d):
            kind = "depthwise-conv" if cost.depthwise else "conv"
            kernel, stride = m.kernel_size[0], m.stride[0]
        else:
            kind, kernel, stride = "linear", 1, 1
        macs = cost.kernel_area * cost.out_hw * cost.c_out * (cost.c_in // cost.groups)
        params = sum(p.numel() for p in m.parameters(recurse=False))
        return LayerInfo(
            index=gid, name=name, type=kind, coupled=coupled, n=self.batch_size, c_in=cost.c_in, c_out=cost.c_out,
            h=h, w=w, kernel=kernel, stride=stride, flops=macs, params=params, group_flops=0,
        )

    def _group_macs(self, gid: int) -> float:
        return sum(
            self._macs(c, c.c_in, c.c_out)
            for c in self.costs.values()
            if c.kind != "bn" and any(g == gid for g, _ in (*c.out_groups, *c.in_groups))
        )

    # ------------------------------------------------------------------ cost model

    @staticmethod
    def _macs(c: _ModuleCost, cin: float, cout: float) -> float:
        if c.depthwise:
            return c.kernel_area * c.out_hw * cout
        return c.kernel_area * c.out_hw * cout * cin / c.groups

    def _build_cost_arrays(self) -> None:
        """Vectorized form of the per-module costs: agents call :meth:`cost` thousands of times."""
        L = len(self.layers)
        layers = [c for c in self.costs.values() if c.kind != "bn"]
        bns = [c for c in self.costs.values() if c.kind == "bn"]

        def selectors(items: list[_ModuleCost]) -> tuple[np.ndarray, np.ndarray]:
            out_sel = np.zeros((len(items), L))
            in_mat = np.zeros((len(items), L))
            for row, c in enumerate(items):
                for g, mult in c.out_groups:
                    out_sel[row, g] += mult
                for g, mult in c.in_groups:
                    in_mat[row, g] += mult
            return out_sel, in_mat

        self._out_sel, self._in_mat = selectors(layers)
        self._cout = np.array([c.c_out for c in layers], dtype=np.float64)
        self._cin = np.array([c.c_in for c in layers], dtype=np.float64)
        self._coef = np.array([c.kernel_area * c.out_hw for c in layers], dtype=np.float64)
        self._kernel = np.array([max(c.kernel_area, 1) for c in layers], dtype=np.float64)
        self._groups = np.array([c.groups for c in layers], dtype=np.float64)
        self._dw = np.array([c.depthwise for c in layers])
        self._bias = np.array([c.bias for c in layers], dtype=np.float64)
        self._bn_sel, self._bn_in = selectors(bns)
        self._bn_c = np.array([c.c_in for c in bns], dtype=np.float64)
        self._bn_affine = np.array([c.bias for c in bns], dtype=np.float64)

    def weighted_modules(self) -> list[WeightedModule]:
        """Every conv and linear layer, in the row order of :meth:`module_widths`."""
        layers = [(n, c) for n, c in self.costs.items() if c.kind != "bn"]
        return [WeightedModule(row, name, c.kind, c.c_in, c.c_out, c.groups, c.depthwise,
                               bool(self._in_mat[row].any()), bool(self._out_sel[row].any()))
                for row, (name, c) in enumerate(layers)]

    def module_widths(self, pruned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Input and output channels of every conv / linear (rows of :meth:`weighted_modules`) when
        ``pruned[i]`` channels are removed from layer i; a depthwise conv's inputs follow its outputs."""
        p = np.asarray(pruned, dtype=np.float64)
        cout = self._cout - self._out_sel @ p
        cin = np.where(self._dw, cout, self._cin - self._in_mat @ p)
        return cin, cout

    def cost(self, pruned: np.ndarray) -> Cost:
        """MACs, parameters and BN buffers when ``pruned[i]`` channels are removed from layer i."""
        p = np.asarray(pruned, dtype=np.float64)
        cin, cout = self.module_widths(p)
        per_out = np.where(self._dw, 1.0, cin / self._groups)  # input channels each output channel sees
        macs = float(np.sum(self._coef * cout * per_out))
        params = float(np.sum(cout * per_out * self._kernel + self._bias * cout))
        bn_c = self._bn_c - self._bn_sel @ p - self._bn_in @ p
        params += float(np.sum(2.0 * self._bn_affine * bn_c))
        buffers = float(np.sum(2.0 * bn_c))
        return Cost(int(round(macs)), int(round(params)), int(round(buffers)))

    # ------------------------------------------------------------------ pruning

    def prune(self, model: nn.Module, keep: Mapping[int, np.ndarray]) -> nn.Module:
        """Prune ``model`` (a copy is made) keeping ``keep[i]`` root channels of layer i.

        Channel indices refer to the dense model; layers absent from ``keep`` stay whole.

        Plans hold dense indices. Where several groups prune one side of one module (the layer
        after a concatenation of two groups: DenseNet, SqueezeNet's fire modules, Inception), the
        channels an earlier group removed shift the later group's indices, which are translated to
        the module's current channels here.
        """
        pruned = copy.deepcopy(model)
        self._replay(pruned, keep)
        return pruned

    def _replay(self, pruned: nn.Module, keep: Mapping[int, np.ndarray]) -> None:
        """Prune ``pruned`` in place (see :meth:`prune`)."""
        gone: dict[tuple[str, object], np.ndarray] = {}  # (module, pruning function) -> dense indices removed so far
        for gid, kept in keep.items():
            channels = int(self.channels[gid])
            kept = np.unique(np.asarray(kept, dtype=np.int64))
            if len(kept) == channels:
                continue
            if len(kept) == 0 or kept.min() < 0 or kept.max() >= channels:
                raise StrategyError(f"layer {self.layers[gid].name}: keep between 1 and {channels} valid channels")
            removed = np.setdiff1d(np.arange(channels), kept)
            for step in self._plans[gid]:
                idxs = np.unique(step.targets[np.isin(step.roots, removed)])
                key = (step.module, getattr(step.handler, "__func__", step.handler))  # one function: one channel dim
                before = gone.get(key)
                if before is not None:
                    idxs = np.setdiff1d(idxs, before)
                    gone[key] = np.union1d(before, idxs)
                    idxs = idxs - np.searchsorted(before, idxs)  # dense index -> index among the channels left
                else:
                    gone[key] = idxs
                if len(idxs):
                    step.handler(pruned.get_submodule(step.module), [int(i) for i in idxs])

    def kept_outputs(self, keep: Mapping[int, np.ndarray]) -> dict[str, np.ndarray]:
        """For each conv / linear whose outputs :meth:`prune` shrinks, the dense output channels it keeps."""
        out: dict[str, np.ndarray] = {}
        for gid, kept in keep.items():
            kept = np.asarray(kept, dtype=np.int64)
            for step in self._plans[gid]:
                if step.outputs:
                    out[step.module] = np.sort(step.targets[np.isin(step.roots, kept)])
        return out

    # ------------------------------------------------------------------ correctness check

    def verify(self, model: nn.Module, keep: Mapping[int, np.ndarray] | None = None, seed: int = 0,
               tol: float = 1e-4, threads: int | None = 1) -> list[BlockedLayer]:
        """Check that every prunable layer's plan prunes exactly; the layers whose plan does not.

        ``model`` is the dense model this graph was built from. For each prunable layer (channel
        group) on its own, then for all the layers that passed at once, about half the group's
        root channels are removed at random (or all but ``keep[i]``, dense indices), and two
        networks are run on one random input:

        * the pruned model, as :meth:`prune` builds it;
        * the dense model with the removed channels *silenced*: a pre-hook zeroes them in the
          input of every layer the plan prunes on its input side (conv / linear, our custom
          layers), so they reach nothing the plan knows of. Layers the plan prunes on their
          output side (depthwise convs included: Torch-Pruning prunes their inputs and outputs
          together) and batch norms are left as they are; their removed channels only flow on to
          the next silenced input.

        If the plan is exact, the two agree up to float rounding (``tol``, relative to the largest
        output magnitude). Whatever the dependency graph missed (a functional op, a constant
        buffer, a reshape to a fixed shape, a reduction over channels) makes the pruned model
        fail or differ, and the layer is returned blocked, with the exception's first line or
        the difference. When layers pass alone but not together, they are added back one at a
        time and those whose addition breaks the check are returned.

        Normalizations over the channel dimension (LayerNorm, RMSNorm, single-group GroupNorm;
        functional or module) legitimately change when channels go: their statistics are taken
        over fewer channels. Both networks are therefore run with those statistics frozen (mean
        0, variance 1: the norm reduced to its per-channel affine transform), which keeps the
        check exact for the channel mapping through and after the norm while allowing the
        re-normalization; shapes are still checked. Such groups are allowed, not approximate:
        everything but the norm's own statistics is compared exactly. (GroupNorm with several
        groups and grouped convolutions are blocked in the constructor.)

        The forward passes are tiny (batch 1), so they run on ``threads`` intra-op threads (1 by
        default: on a shared machine two threads made ResNet-56's check 12 s instead of 1 s);
        None leaves torch's setting alone.
        """
        with torch_threads(threads):
            return self._verify(model, keep, seed, tol)

    def _verify(self, model: nn.Module, keep: Mapping[int, np.ndarray] | None, seed: int, tol: float) -> list[BlockedLayer]:
        if not self.layers:
            return []
        rng = np.random.default_rng(seed)
        chosen: dict[int, np.ndarray] = {}
        for gid, channels in enumerate(self.channels):
            if keep is not None and gid in keep:
                kept = np.unique(np.asarray(keep[gid], dtype=np.int64))
                if len(kept) == 0 or kept.min() < 0 or kept.max() >= channels:
                    raise StrategyError(f"layer {self.layers[gid].name}: keep between 1 and {channels} valid channels")
                chosen[gid] = kept
            else:
                chosen[gid] = np.sort(rng.choice(int(channels), int(channels) - int(channels) // 2, replace=False))
        x = torch.randn(self.batch_size, 3, self.input_size, self.input_size, generator=torch.Generator().manual_seed(seed))
        dense = copy.deepcopy(model).eval()  # hooks and pruning stay off the caller's model (other threads may use it)
        norms = _FrozenChannelNorms()
        try:
            with torch.no_grad(), norms:
                dense(x)
        except Exception:  # noqa: BLE001, S110 - each check reports the failure itself
            pass
        frozen = norms.seen  # without a norm over channels the checks run without the mode's overhead
        failures: dict[int, str] = {}
        for gid in range(len(self.layers)):
            problem = self._check(dense, {gid: chosen[gid]}, x, tol, frozen=frozen)
            if problem is not None:
                failures[gid] = problem
        passed = [gid for gid in range(len(self.layers)) if gid not in failures]
        if passed and self._check(dense, {g: chosen[g] for g in passed}, x, tol, frozen=frozen) is not None:
            together: dict[int, np.ndarray] = {}
            for gid in passed:
                problem = self._check(dense, {**together, gid: chosen[gid]}, x, tol, frozen=frozen)
                if problem is None:
                    together[gid] = chosen[gid]
                else:
                    failures[gid] = f"pruned together with the layers before it: {problem}"
        return [BlockedLayer(self.layers[gid].name, failures[gid], self.layers[gid].coupled) for gid in sorted(failures)]

    def _check(self, model: nn.Module, keep: Mapping[int, np.ndarray], x: torch.Tensor, tol: float,
               frozen: bool = True) -> str | None:
        """None if pruning ``keep`` equals silencing the removed channels; else what went wrong.
        ``frozen``: run with the statistics of norms over channels frozen."""
        norms = _FrozenChannelNorms if frozen else contextlib.nullcontext
        silence: dict[str, list[tuple[int, np.ndarray]]] = {}
        for gid, kept in keep.items():
            removed = np.setdiff1d(np.arange(int(self.channels[gid])), kept)
            for step in self._plans[gid]:
                if not step.inputs:
                    continue
                idxs = step.targets[np.isin(step.roots, removed)]
                if not len(idxs):
                    continue
                m = model.get_submodule(step.module)
                dim = _input_channel_dim(m)
                if dim is None:
                    return f"its channels feed {type(m).__name__} ({step.module}), whose inputs the check cannot silence"
                silence.setdefault(step.module, []).append((dim, idxs))
        handles = [model.get_submodule(name).register_forward_pre_hook(_silencer(spec)) for name, spec in silence.items()]
        try:
            with torch.no_grad(), norms():
                reference = _tensors(model(x))
        except Exception as exc:  # noqa: BLE001 - any failure of the reference means the check cannot vouch for the plan
            return f"the check could not run: {_first_line(exc)}"
        finally:
            for h in handles:
                h.remove()
        try:
            pruned = self._pruned_copy(model, keep)
            with torch.no_grad(), norms():
                outputs = _tensors(pruned(x))
        except Exception as exc:  # noqa: BLE001 - a user's model can fail in any way once pruned
            return f"the pruned model fails: {_first_line(exc)}"
        if [t.shape for t in outputs] != [t.shape for t in reference]:
            return (f"pruning changes the output shape ({', '.join(str(tuple(t.shape)) for t in reference)} -> "
                    f"{', '.join(str(tuple(t.shape)) for t in outputs)})")
        scale = max((float(t.abs().max()) for t in reference if t.numel()), default=0.0)
        diff = max((float((a.double() - b.double()).abs().max()) for a, b in zip(outputs, reference, strict=True) if a.numel()),
                   default=0.0)
        if not np.isfinite(diff) or diff > tol * max(scale, 1e-12):
            return f"pruning changes the output beyond the removed channels (max diff {diff:.3g}, output scale {scale:.3g})"
        return None

    def _pruned_copy(self, model: nn.Module, keep: Mapping[int, np.ndarray]) -> nn.Module:
        """:meth:`prune`, sharing the tensors of every module the plans leave alone with ``model``
        (pruning assigns new tensors to the modules it touches, and nothing else writes them): the
        copy costs half as much, and the check runs hundreds of them."""
        touched = {step.module for gid in keep for step in self._plans[gid]}
        mine = {id(t) for name in touched for t in (*model.get_submodule(name).parameters(), *model.get_submodule(name).buffers())}
        memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in mine}
        pruned = copy.deepcopy(model, memo)
        self._replay(pruned, keep)
        return pruned.eval()


def _input_channel_dim(m: nn.Module) -> int | None:
    """The input dimension holding a consumer's channels (None: a layer the check cannot silence)."""
    if isinstance(m, nn.Linear):
        return -1
    if isinstance(m, nn.modules.conv._ConvNd) or isinstance(m, tuple(CUSTOM_PRUNERS)):
        return 1
    return None


def _silencer(spec: list[tuple[int, np.ndarray]]) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    index = [(dim, torch.as_tensor(np.unique(idxs), dtype=torch.long)) for dim, idxs in spec]

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0].clone()
        for dim, idx in index:
            x.index_fill_(dim % x.dim(), idx.to(x.device), 0)
        return (x, *args[1:])

    return hook


def _tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _affine(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    if weight is not None:
        x = x * weight.reshape(shape)
    if bias is not None:
        x = x + bias.reshape(shape)
    return x


def _frozen_layer_norm(input: torch.Tensor, normalized_shape: Any, weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, *_: Any, **__: Any) -> torch.Tensor:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise RuntimeError(f"layer_norm: normalized shape {list(shape)} does not match the input's {list(input.shape)}")
    return _affine(input, weight, bias, shape)


def _frozen_rms_norm(input: torch.Tensor, normalized_shape: Any, weight: torch.Tensor | None = None, *_: Any,
                     **__: Any) -> torch.Tensor:
    return _frozen_layer_norm(input, normalized_shape, weight, None)


def _frozen_group_norm(input: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, *_: Any, **__: Any) -> torch.Tensor:
    if input.shape[1] % num_groups:
        raise RuntimeError(f"group_norm: {input.shape[1]} channels do not divide into {num_groups} groups")
    return _affine(input, weight, bias, (1, input.shape[1]) + (1,) * (input.dim() - 2))


class _FrozenChannelNorms(TorchFunctionMode):
    """Normalizations over channels with their statistics frozen at mean 0, variance 1 (see
    :meth:`PruningGraph.verify`). A torch-function mode: it applies to this thread only, and to
    functional calls as well as modules."""

    _FROZEN: dict[Callable[..., Any], Callable[..., torch.Tensor]] = {
        fn: frozen
        for names, frozen in ((("layer_norm",), _frozen_layer_norm), (("group_norm",), _frozen_group_norm),
                              (("rms_norm",), _frozen_rms_norm))
        for space in (F, torch)
        for fn in (getattr(space, n, None) for n in names)
        if fn is not None
    }

    seen = False  # whether a norm was frozen

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        frozen = self._FROZEN.get(func)
        if frozen is not None:
            self.seen = True
            return frozen(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))
