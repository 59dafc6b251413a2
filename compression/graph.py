"""The pruning mechanism: which channel groups can be pruned, and how to prune them.

Torch-Pruning's dependency graph (DepGraph) is traced once per model. From it we keep, for each
prunable channel group, a *plan*: every coupled module with the TP handler that prunes it and the
mapping from the group's root channels to that module's channels. Pruning a strategy then replays
the plans on a copy of the model, which costs a deep copy plus tensor slicing instead of a new
trace, and the same plans give an exact analytic cost model (MACs, params) for any strategy, so
agents can check budgets without pruning anything.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from .cifar_resnet import CUSTOM_PRUNERS
from .errors import StrategyError

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


@dataclass
class _Step:
    module: str
    handler: Callable[[nn.Module, list[int]], nn.Module]
    targets: np.ndarray  # channel index in this module, aligned with ``roots``
    roots: np.ndarray  # root channel index each target follows
    outputs: bool = False  # prunes the output channels of a conv / linear


@dataclass
class _ModuleCost:
    kind: str  # conv, linear, bn
    c_in: int
    c_out: int
    kernel_area: int
    out_hw: int
    groups: int
    bias: bool
    out_group: int | None = None
    in_groups: list[tuple[int, float]] = field(default_factory=list)  # (group, channels pruned per root channel)

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

    def __init__(self, model: nn.Module, input_size: int, batch_size: int = 1, exclude: Collection[str] = ()) -> None:
        """``exclude``: layers to leave whole, named by any conv/linear of their channel group."""
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

        dg = trace_dependencies(model, example)
        output_layers = self._output_layers(order, shapes)
        self.layers: list[LayerInfo] = []
        self._plans: list[list[_Step]] = []
        seen: set[str] = set()
        excludable: set[str] = set()
        roots: list[str] = []
        for name in order:
            m = model.get_submodule(name)
            if name in seen or not isinstance(m, (nn.Conv2d, nn.Linear)) or name in output_layers:
                continue
            pruner = dg.get_pruner_of_module(m)
            channels = pruner.get_out_channels(m) if pruner is not None else None
            if not channels or channels < 2:
                continue
            group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(channels)))
            plan, coupled, safe = self._plan(group, names, dg)
            seen.update(coupled)
            if not safe or any(c in output_layers for c in coupled):
                continue
            excludable.update(coupled)
            roots.append(name)
            if any(c in exclude for c in coupled):
                continue
            gid = len(self.layers)
            for step in plan:
                cost = self.costs.get(step.module)
                if cost is None:
                    continue
                if dg.is_out_channel_pruning_fn(step.handler) or cost.kind == "bn":
                    cost.out_group = gid
                else:
                    cost.in_groups.append((gid, len(step.targets) / channels))
            self._plans.append(plan)
            self.layers.append(self._layer_info(gid, name, coupled, m, shapes[name]))
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
    def _plan(group: tp.Group, names: Mapping[nn.Module, str], dg: tp.DependencyGraph) -> tuple[list[_Step], tuple[str, ...], bool]:
        plan: list[_Step] = []
        coupled: list[str] = []
        safe = True
        for item in group.items:
            dep, idxs = item.dep, item.idxs
            target = dep.target.module
            if isinstance(target, tp.ops._ElementWiseOp):
                if any(bad in repr(target) for bad in _UNSAFE_GRAD_FNS):
                    safe = False
                continue
            if isinstance(target, nn.Parameter):
                safe = False  # unwrapped parameters are outside the replay mechanism
                continue
            if target not in names:
                continue  # TP's virtual ops (concat/split/reshape) carry no parameters
            name = names[target]
            outputs = dg.is_out_channel_pruning_fn(dep.handler) and isinstance(target, (nn.Conv2d, nn.Linear))
            plan.append(_Step(name, dep.handler, np.asarray(idxs, dtype=np.int64), np.asarray(item.root_idxs, dtype=np.int64), outputs))
            if outputs:
                coupled.append(name)
        return plan, tuple(dict.fromkeys(coupled)), safe

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
            if c.kind != "bn" and (c.out_group == gid or any(g == gid for g, _ in c.in_groups))
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
                if c.out_group is not None:
                    out_sel[row, c.out_group] = 1.0
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
        """
        pruned = copy.deepcopy(model)
        for gid, kept in keep.items():
            channels = int(self.channels[gid])
            kept = np.unique(np.asarray(kept, dtype=np.int64))
            if len(kept) == channels:
                continue
            if len(kept) == 0 or kept.min() < 0 or kept.max() >= channels:
                raise StrategyError(f"layer {self.layers[gid].name}: keep between 1 and {channels} valid channels")
            removed = np.setdiff1d(np.arange(channels), kept)
            for step in self._plans[gid]:
                idxs = step.targets[np.isin(step.roots, removed)]
                if len(idxs):
                    step.handler(pruned.get_submodule(step.module), sorted(int(i) for i in idxs))
        return pruned

    def kept_outputs(self, keep: Mapping[int, np.ndarray]) -> dict[str, np.ndarray]:
        """For each conv / linear whose outputs :meth:`prune` shrinks, the dense output channels it keeps."""
        out: dict[str, np.ndarray] = {}
        for gid, kept in keep.items():
            kept = np.asarray(kept, dtype=np.int64)
            for step in self._plans[gid]:
                if step.outputs:
                    out[step.module] = np.sort(step.targets[np.isin(step.roots, kept)])
        return out
