"""Users' own CNNs as ONNX files: read safely, convert to a prunable ``nn.Module``, export back, check.

Reading (:func:`read_onnx`) parses protobuf only (no pickle, no code runs) and refuses, with one
:class:`OnnxModelError` line naming the offending thing: files over a size limit, files that do
not parse or fail ``onnx.checker``, default-domain opset below 13, external data (a file that
references other files), anything but exactly one non-initializer input of rank 4 and type float32
(N x C x H x W, C static), more than one output, or an output whose declared rank is not 2.

Conversion (:func:`onnx_to_torch`) runs in three stages.

1. ONNX-level preparation: constant subgraphs are folded (onnxscript's ``fold_constants``; it
   folds values only, it does not fuse BatchNorm into convolutions), ``Constant`` nodes become
   initializers and ``Identity`` nodes of initializers are bypassed, so every weight, norm
   statistic and bias is an initializer. This matters because onnx2torch 1.5 only builds real
   ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` modules from initializers: BN parameters fed
   through ``Identity`` nodes (seen from torch's legacy exporter without constant folding) become
   its functional ``OnnxBatchNorm`` wrapper, which Torch-Pruning cannot prune, and its ``Conv``
   converter fails outright on non-initializer weights. ``Reshape``'s
   ``allowzero=1`` (written by the dynamo exporter, refused by onnx2torch) is dropped: it only
   differs from 0 for shapes containing 0, i.e. empty tensors. Models above opset 17 (the dynamo
   exporter writes 18+; onnx2torch 1.5.15 lacks e.g. ``ReduceMean``-18) are down-converted to
   opset 17 with ``onnx.version_converter``; if that fails the original is kept.
2. onnx2torch converts to a ``torch.fx.GraphModule``. Operators it has no converter for are
   refused, all of them at once (op type, domain and node names); a converter failing on one
   node's attributes is refused naming that node.
3. Normalization of the fx graph, so that Torch-Pruning's dependency graph sees every weighted
   layer and nothing it prunes leaves a stale constant behind:

   - an ``OnnxBatchNorm`` whose parameters are constants -> ``nn.BatchNorm1d/2d/3d``;
   - ``OnnxGemm`` with a constant B (any transB, alpha, beta; a bias broadcast along the output
     features) -> ``nn.Linear``; ``MatMul`` by a constant 2-D matrix (plus a following ``Add`` of a
     constant bias) -> ``nn.Linear``. A Gemm with ``transA=1`` or a full-matrix bias, and products
     of two activations, stay as they are (their constants fall under the parameter rule below);
   - ``Add`` / ``Sub`` / ``Mul`` / ``Div`` of a rank-4 activation computed by some conv / linear and
     a constant per-channel tensor (``C x 1 x 1`` or ``1 x C x 1 x 1``) -> a 1x1 depthwise
     ``nn.Conv2d`` (weight = scale, bias = shift): prunable with its producer, and exact under BN
     re-estimation (a fake BatchNorm would not be). Affine constants on the raw input (input
     normalization) stay: input channels are never pruned;
   - ``Reshape`` whose output is ``N x prod(rest)`` of its input -> ``flatten(1)``, and one that only
     appends unit dimensions (the ``view(b, c, 1, 1)`` of squeeze-excitation) -> a module that
     appends them to whatever width arrives: both no longer carry channel counts and work at any
     batch size;
   - every other float constant of more than one element consumed by arithmetic (``Add``/``Mul``/
     ..., ``MatMul``, ``Gemm``, ``Concat``) becomes a ``nn.Parameter`` (it was one in the model that
     was exported): Torch-Pruning then sees it as an unwrapped parameter, and ``PruningGraph``
     leaves every channel group that reaches it whole, instead of pruning a group whose constant
     could not follow.

   What remains unchecked are integer shape constants of other ops (a ``Reshape`` to
   ``N x g x C/g x H x W`` for a channel shuffle, ``Split`` sizes, ``Slice`` bounds on the channel
   axis, ``Tile`` repeats): pruning a group through one of them makes the pruned model fail its
   forward pass. :func:`probe_pruning` finds such layers (it prunes each one alone and runs the
   model) so that callers can exclude them; :func:`onnx_to_torch` does not run it.

Layer names are onnx2torch's module names, i.e. the ONNX node names with ``/`` for ``.``
(``stem/stem/0/Conv``, ``node_Conv_105``). Height / width the file leaves dynamic are taken from
``input_size`` (default 224) for the shape-dependent rewrites.

:func:`check_against_onnxruntime` compares a module with ONNX Runtime on random inputs;
:func:`export_onnx` writes a (pruned) module as one self-contained ONNX file and checks it that way;
:func:`onnx_macs` counts multiply-accumulates from an ONNX graph itself (Conv, ConvTranspose, Gemm,
MatMul at batch 1), the independent check of the analytic cost model.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import math
import os
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper
from torch import fx, nn

from .errors import OnnxModelError

MIN_OPSET = 13
# the highest default-domain opset whose operators onnx2torch 1.5.15 converts (ReduceMean-18 is missing)
TORCH_OPSET = 17
RELATIVE_TOLERANCE = 1e-4
DEFAULT_PROBE_SIZE = 224  # spatial size for models whose height / width are dynamic and none is given


@dataclass(frozen=True)
class OnnxModelInfo:
    input_name: str
    channels: int
    height: int | None  # None: dynamic
    width: int | None
    num_classes: int | None  # the output's last dimension, if static
    opset: int  # default domain
    sha256: str  # of the file's bytes
    batch: int | None = None  # None: dynamic batch dimension (the usual case)

    @property
    def input_size(self) -> int | None:
        """The square input size the file fixes, or None (dynamic or not square)."""
        return self.height if self.height is not None and self.height == self.width else None


# ---------------------------------------------------------------------------------------------- reading


def _fail(msg: str) -> OnnxModelError:
    return OnnxModelError(" ".join(msg.split()))


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for g in attr.graphs:
                yield from _all_tensors(g)


def _default_opset(model: onnx.ModelProto) -> int | None:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return max(versions) if versions else None


def _validate(model: onnx.ModelProto, name: str, sha: str) -> OnnxModelInfo:
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == TensorProto.EXTERNAL:
            where = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise _fail(f"{name}: tensor {tensor.name!r} is stored in an external file ({where!r}); "
                        "upload a self-contained ONNX file (torch.onnx.export(..., external_data=False))")
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t") and attr.t.data_location == TensorProto.EXTERNAL:
                    raise _fail(f"{name}: function {function.name!r} references external data")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise _fail(f"{name} is not a valid ONNX model: {_first_line(exc)}") from None
    opset = _default_opset(model)
    if opset is None:
        raise _fail(f"{name} imports no default-domain (ai.onnx) opset")
    if opset < MIN_OPSET:
        raise _fail(f"{name} uses opset {opset}; opset {MIN_OPSET} or newer is needed "
                    f"(re-export with torch.onnx.export(..., opset_version={TORCH_OPSET}) or onnx.version_converter)")
    init_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs) or "none"
        raise _fail(f"{name} has {len(inputs)} inputs ({names}); exactly one image input (N x C x H x W) is supported")
    inp = inputs[0]
    if not inp.type.HasField("tensor_type"):
        raise _fail(f"{name}: input {inp.name!r} is not a tensor")
    ttype = inp.type.tensor_type
    if ttype.elem_type != TensorProto.FLOAT:
        dtype = TensorProto.DataType.Name(ttype.elem_type) if ttype.elem_type else "untyped"
        raise _fail(f"{name}: input {inp.name!r} is {dtype}; only float32 image inputs are supported")
    if not ttype.HasField("shape") or len(ttype.shape.dim) != 4:
        rank = len(ttype.shape.dim) if ttype.HasField("shape") else "unknown"
        raise _fail(f"{name}: input {inp.name!r} has rank {rank}; an image input N x C x H x W (rank 4) is needed")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in ttype.shape.dim]
    if dims[1] is None:
        raise _fail(f"{name}: input {inp.name!r} has a dynamic channel dimension; it must be fixed (e.g. 3)")
    outputs = list(model.graph.output)
    if len(outputs) != 1:
        names = ", ".join(repr(o.name) for o in outputs) or "none"
        raise _fail(f"{name} has {len(outputs)} outputs ({names}); a classifier with one output (N x classes) is supported")
    out = outputs[0].type.tensor_type
    num_classes = None
    if out.HasField("shape"):
        if len(out.shape.dim) != 2:
            raise _fail(f"{name}: output {outputs[0].name!r} has rank {len(out.shape.dim)}; "
                        "a classifier's output is N x classes (rank 2)")
        last = out.shape.dim[-1]
        num_classes = last.dim_value if last.HasField("dim_value") and last.dim_value > 0 else None
    return OnnxModelInfo(inp.name, int(dims[1]), dims[2], dims[3], num_classes, opset, sha, dims[0])


def _parse(data: bytes, name: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)  # protobuf only: parsing runs no code
    except Exception as exc:  # google.protobuf.message.DecodeError and friends
        raise _fail(f"{name} is not an ONNX model (protobuf parse failed: {_first_line(exc, 120)})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise _fail(f"{name} is not an ONNX model (no graph)")
    return model


def _read(path: str | Path, max_bytes: int | None, source: str | None) -> tuple[onnx.ModelProto, OnnxModelInfo]:
    path = Path(path)
    name = source or path.name
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _fail(f"cannot read {name}: {exc.strerror or exc}") from None
    if max_bytes is not None and size > max_bytes:
        raise _fail(f"{name} is {size:,} bytes, over the limit of {max_bytes:,} bytes")
    data = path.read_bytes()
    if max_bytes is not None and len(data) > max_bytes:  # grew since stat
        raise _fail(f"{name} is {len(data):,} bytes, over the limit of {max_bytes:,} bytes")
    model = _parse(data, name)
    return model, _validate(model, name, hashlib.sha256(data).hexdigest())


def read_onnx(path: str | Path, *, max_bytes: int | None = None, source: str | None = None) -> onnx.ModelProto:
    """The model in ``path``, validated (see the module docstring); ``source`` names it in messages."""
    return _read(path, max_bytes, source)[0]


def read_onnx_info(path: str | Path, *, max_bytes: int | None = None, source: str | None = None) -> OnnxModelInfo:
    """What :func:`read_onnx` checked: input name, channels, static sizes, classes, opset, sha256."""
    return _read(path, max_bytes, source)[1]


def _load(path_or_model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, OnnxModelInfo]:
    if isinstance(path_or_model, onnx.ModelProto):
        data = path_or_model.SerializeToString()
        name = path_or_model.graph.name or "the ONNX model"
        return path_or_model, _validate(path_or_model, name, hashlib.sha256(data).hexdigest())
    return _read(path_or_model, None, None)


# ---------------------------------------------------------------------------------------------- preparation


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse or string constants: left to onnx2torch


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """``Constant`` nodes -> initializers; ``Identity`` of an initializer -> the initializer itself."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    inits = {t.name for t in graph.initializer}
    alias: dict[str, str] = {}
    keep: list[onnx.NodeProto] = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
        out = node.output[0] if len(node.output) == 1 else None
        if out is not None and out not in outputs and node.domain in ("", "ai.onnx"):
            if node.op_type == "Constant":
                value = _constant_value(node)
                if value is not None:
                    graph.initializer.append(numpy_helper.from_array(value, out))
                    inits.add(out)
                    continue
            elif node.op_type == "Identity" and node.input[0] in inits:
                alias[out] = node.input[0]
                continue
        keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
        # value_info of removed values is harmless; drop it so shape inference starts clean
        dropped = set(alias) | {t.name for t in graph.initializer}
        kept_vi = [vi for vi in graph.value_info if vi.name not in dropped]
        del graph.value_info[:]
        graph.value_info.extend(kept_vi)


def _drop_allowzero(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if node.op_type == "Reshape":
            for attr in list(node.attribute):
                if attr.name == "allowzero":
                    node.attribute.remove(attr)


def _prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    model = copy.deepcopy(model)
    try:
        import onnxscript.optimizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnxscript.optimizer.fold_constants(model)
    except Exception:  # folding is an aid, not a requirement: onnx2torch names what it cannot take
        pass
    _constants_to_initializers(model)
    opset = _default_opset(model) or TORCH_OPSET
    if opset > TORCH_OPSET:
        try:
            from onnx import version_converter

            down = version_converter.convert_version(model, TORCH_OPSET)
            _constants_to_initializers(down)
            model = down
        except Exception:
            pass  # keep the original: unsupported operators are named below
    _drop_allowzero(model)
    return model


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return repr(node.name) if node.name else f"#{index}"


def _check_converters(model: onnx.ModelProto) -> None:
    """Every node's operator must have an onnx2torch converter; name all that do not."""
    from onnx2torch.node_converters import get_converter

    versions = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    missing: dict[str, list[str]] = {}
    for i, node in enumerate(model.graph.node):
        domain = "" if node.domain == "ai.onnx" else node.domain
        op = f"{domain}.{node.op_type}" if domain else node.op_type
        try:
            if domain not in versions:
                raise NotImplementedError
            get_converter(domain=domain, operation_type=node.op_type, version=versions[domain])
        except NotImplementedError:
            missing.setdefault(f"{op} (opset {versions.get(domain, '?')})", []).append(_node_label(node, i))
    if missing:
        parts = [f"{op} at node{'s' if len(n) > 1 else ''} {', '.join(n[:5])}{' ...' if len(n) > 5 else ''}"
                 for op, n in missing.items()]
        raise _fail(f"unsupported ONNX operators: {'; '.join(parts)}")


def _diagnose(model: onnx.ModelProto) -> str:
    """After onnx2torch failed: which nodes its converters refuse, and why."""
    from onnx2torch.node_converters import get_converter
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.utils.safe_shape_inference import safe_shape_inference

    try:
        graph = OnnxGraph(safe_shape_inference(model).graph)
    except Exception as exc:
        return f"shape inference failed: {_first_line(exc)}"
    versions = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    bad = []
    for name, node in graph.nodes.items():
        try:
            get_converter(domain=node.domain, operation_type=node.operation_type,
                          version=versions[node.domain])(node, graph)
        except Exception as exc:
            reason = f"missing input {exc}" if isinstance(exc, KeyError) else _first_line(exc, 120)
            bad.append(f"{node.operation_type} node {name!r}: {reason}")
    return "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else "") if bad else ""


# ---------------------------------------------------------------------------------------------- normalization


class AppendUnitDims(nn.Module):
    """``x.reshape(*x.shape, 1, ..., 1)``: a Reshape that only adds trailing unit dimensions."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape, *([1] * self.count))


def _cls(gm: fx.GraphModule, node: fx.Node) -> str:
    return type(gm.get_submodule(str(node.target))).__name__ if node.op == "call_module" else ""


def _const(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """The constant tensor ``arg`` stands for (an initializer, possibly through Identity nodes), else None."""
    while isinstance(arg, fx.Node) and _cls(gm, arg) in ("Identity", "OnnxCopyIdentity") and len(arg.args) == 1:
        arg = arg.args[0]
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = gm
        for part in str(arg.target).split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _shape(arg: Any) -> tuple[int, ...] | None:
    meta = arg.meta.get("tensor_meta") if isinstance(arg, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _replace_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module, args: tuple[Any, ...]) -> None:
    """Put ``module`` in place of the call_module ``node`` (same name: layer names stay the ONNX node names)."""
    gm.add_submodule(str(node.target), module)
    node.args, node.kwargs = args, {}


def _after_weights(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a conv or linear layer computes ``node`` (directly or through other ops)."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), (nn.Conv2d, nn.Linear)):
            return True
        stack.extend(n.all_input_nodes)
    return False


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _bias_vector(c: torch.Tensor | None, features: int) -> torch.Tensor | None:
    """A constant that broadcasts along the last (feature) axis only, as a vector, else None."""
    if c is None or not c.is_floating_point():
        return None
    if c.numel() == 1:
        return c.reshape(1).expand(features).clone()
    if c.numel() == features and c.shape[-1] == features:
        return c.reshape(features).clone()
    return None


def _normalize_batchnorm(gm: fx.GraphModule, node: fx.Node) -> None:
    x, *rest = node.args
    params = [_const(gm, a) for a in rest]
    shape = _shape(x)
    if len(params) != 4 or any(p is None for p in params) or shape is None:
        return
    weight, bias, mean, var = (p for p in params if p is not None)
    classes: dict[int, type[nn.modules.batchnorm._BatchNorm]] = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d,
                                                                 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    if len(shape) not in classes:
        return
    old: Any = gm.get_submodule(str(node.target))
    bn = classes[len(shape)](weight.numel(), eps=float(old.epsilon), momentum=float(old.momentum))
    assert bn.weight is not None and bn.bias is not None and bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        bn.weight.copy_(weight.reshape(-1))
        bn.bias.copy_(bias.reshape(-1))
        bn.running_mean.copy_(mean.reshape(-1))
        bn.running_var.copy_(var.reshape(-1))
    _replace_module(gm, node, bn, (x,))


def _normalize_gemm(gm: fx.GraphModule, node: fx.Node) -> None:
    old: Any = gm.get_submodule(str(node.target))
    args = list(node.args) + [node.kwargs.get("input_c")] * (3 - len(node.args))
    a, b_arg, c_arg = args[:3]
    b = _const(gm, b_arg)
    if old.trans_a or b is None or b.dim() != 2 or not b.is_floating_point():
        return  # an activation-by-activation product, or transposed input: left as is (see the module docstring)
    weight = (b if old.trans_b else b.T) * float(old.alpha)
    c = _const(gm, c_arg) if c_arg is not None else None
    bias = _bias_vector(c, weight.shape[0]) if c is not None else None
    if c is not None and bias is None:
        return
    _replace_module(gm, node, _linear(weight, None if bias is None else bias * float(old.beta)), (a,))


def _normalize_matmul(gm: fx.GraphModule, node: fx.Node) -> None:
    a, b_arg = node.args
    b = _const(gm, b_arg)
    if b is None or b.dim() != 2 or not b.is_floating_point():
        return
    weight = b.T
    bias = None
    users = list(node.users)
    add = users[0] if len(users) == 1 else None
    if add is not None and _cls(gm, add) == "OnnxBinaryMathOperation" and len(add.args) == 2:
        op = gm.get_submodule(str(add.target))
        other = add.args[1] if add.args[0] is node else add.args[0]
        if op.math_op_function is torch.add and op.broadcast is None:
            bias = _bias_vector(_const(gm, other), weight.shape[0])
    _replace_module(gm, node, _linear(weight, bias), (a,))
    if bias is not None and add is not None:
        add.replace_all_uses_with(node)
        gm.graph.erase_node(add)


def _normalize_affine(gm: fx.GraphModule, node: fx.Node) -> None:
    """x (+ - * /) per-channel constant, x a rank-4 activation after some conv / linear -> depthwise 1x1 conv."""
    op = gm.get_submodule(str(node.target))
    if len(node.args) != 2 or op.broadcast is not None:
        return
    first, second = node.args
    c_first, c_second = _const(gm, first), _const(gm, second)
    if (c_first is None) == (c_second is None):
        return
    x, c, const_first = (second, c_first, True) if c_first is not None else (first, c_second, False)
    shape = _shape(x)
    if c is None or shape is None or len(shape) != 4 or not c.is_floating_point():
        return
    channels = shape[1]
    if channels < 2 or c.numel() != channels or tuple(c.shape) not in ((channels, 1, 1), (1, channels, 1, 1)):
        return
    if not _after_weights(gm, x):
        return
    v = c.reshape(channels).to(torch.float32)
    fn = op.math_op_function
    ones = torch.ones(channels)
    if fn is torch.add:
        scale, shift = ones, v
    elif fn is torch.sub:
        scale, shift = (-ones, v) if const_first else (ones, -v)
    elif fn is torch.mul:
        scale, shift = v, None
    elif not const_first and bool((v != 0).all()):  # x / c
        scale, shift = 1.0 / v, None
    else:
        return
    conv = nn.Conv2d(channels, channels, 1, groups=channels, bias=shift is not None)
    with torch.no_grad():
        conv.weight.copy_(scale.reshape(channels, 1, 1, 1))
        if shift is not None:
            conv.bias.copy_(shift)
    _replace_module(gm, node, conv, (x,))


def _normalize_reshape(gm: fx.GraphModule, node: fx.Node) -> None:
    x = node.args[0]
    src, dst = _shape(x), _shape(node)
    if src is None or dst is None or len(src) < 2 or dst[0] != src[0]:
        return
    if len(dst) == 2 and len(src) > 2 and dst[1] == math.prod(src[1:]):
        _replace_module(gm, node, nn.Flatten(1), (x,))
    elif len(dst) > len(src) and dst[: len(src)] == src and all(d == 1 for d in dst[len(src):]):
        _replace_module(gm, node, AppendUnitDims(len(dst) - len(src)), (x,))


_ARITHMETIC = {"OnnxBinaryMathOperation", "OnnxMatMul", "OnnxGemm", "OnnxConcat", "OnnxSum", "OnnxMean",
               "OnnxMinMax", "OnnxPow", "OnnxWhere"}


def _constants_to_parameters(gm: fx.GraphModule) -> None:
    """Float constants (> 1 element) that arithmetic consumes -> parameters Torch-Pruning can see."""
    for node in gm.graph.nodes:
        value = _const(gm, node)
        if value is None or not value.is_floating_point() or value.numel() < 2 or isinstance(value, nn.Parameter):
            continue
        if not any(_cls(gm, user) in _ARITHMETIC for user in node.users):
            continue
        owner_name, _, attr = str(node.target).rpartition(".")
        owner = gm.get_submodule(owner_name)
        delattr(owner, attr)
        owner.register_parameter(attr, nn.Parameter(value.detach().clone()))


def _drop_unused_constants(gm: fx.GraphModule) -> None:
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()) + list(gm.named_parameters()):
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name)
        if type(owner).__name__ == "InitializersContainer" and name not in used:
            delattr(owner, attr)


def _normalize(gm: fx.GraphModule, sample: torch.Tensor) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(sample)
    passes = {"OnnxBatchNorm": _normalize_batchnorm, "OnnxGemm": _normalize_gemm, "OnnxMatMul": _normalize_matmul,
              "OnnxBinaryMathOperation": _normalize_affine, "OnnxReshape": _normalize_reshape}
    live = set(gm.graph.nodes)
    for node in list(gm.graph.nodes):
        if node not in live or node.op != "call_module":  # erased by an earlier rewrite (MatMul + Add)
            continue
        rewrite = passes.get(_cls(gm, node))
        if rewrite is not None:
            rewrite(gm, node)
            live = set(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    _drop_unused_constants(gm)
    _constants_to_parameters(gm)
    gm.recompile()


# ---------------------------------------------------------------------------------------------- conversion


def onnx_to_torch(path_or_model: str | Path | onnx.ModelProto, *,
                  input_size: int | None = None) -> tuple[nn.Module, OnnxModelInfo]:
    """The ONNX model as an eval-mode ``torch.fx.GraphModule`` whose convs / norms / linears are real
    torch modules (see the module docstring), and what :func:`read_onnx` learnt about it.

    ``input_size`` is the square spatial size to use where the file leaves height / width dynamic
    (default 224); where the file fixes them, another size is refused.
    """
    import onnx2torch

    model, info = _load(path_or_model)
    if input_size is not None and info.height is not None and info.width is not None and (info.height, info.width) != (input_size, input_size):
        raise _fail(f"input {info.input_name!r} is fixed to {info.height} x {info.width}; input size {input_size} was asked for")
    height = info.height or input_size or DEFAULT_PROBE_SIZE
    width = info.width or input_size or DEFAULT_PROBE_SIZE
    prepared = _prepare(model)
    _check_converters(prepared)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = onnx2torch.convert(prepared)
    except Exception as exc:
        detail = _diagnose(prepared) or _first_line(exc)
        raise _fail(f"cannot convert the ONNX model to torch: {detail}") from None
    gm.eval()
    sample = torch.randn(info.batch or 2, info.channels, height, width, generator=torch.Generator().manual_seed(0))
    try:
        _normalize(gm, sample)
    except Exception as exc:
        raise _fail(f"the converted model does not run on a {tuple(sample.shape)} input: {_first_line(exc)}") from None
    gm.eval()
    try:
        with torch.no_grad():
            out = gm(torch.randn(2, info.channels, height, width))
    except Exception as exc:
        raise _fail(f"the converted model does not run on a batch of 2 ({info.channels} x {height} x {width}); "
                    f"does the file fix the batch size in a Reshape? {_first_line(exc)}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _fail(f"the model's output is {shape}; a classifier's output is N x classes")
    if info.num_classes is None:
        info = replace(info, num_classes=int(out.shape[1]))
    return gm, info


def probe_pruning(model: nn.Module, input_size: int, *, channels: int = 3) -> dict[str, str]:
    """Prunable layers whose pruning (about half the channels, alone) breaks the forward pass, with why.

    Catches shape constants normalization cannot rewrite (see the module docstring); pass the names
    as ``PruningConstraints.exclude``. One pruned copy and forward pass per layer.
    """
    from .graph import PruningGraph

    graph = PruningGraph(model, input_size)
    x = torch.randn(1, channels, input_size, input_size)  # batch-size constants: onnx_to_torch runs batch 2
    broken: dict[str, str] = {}
    for layer in graph.layers:
        keep = {layer.index: np.arange(max(1, layer.c_out // 2))}
        try:
            pruned = graph.prune(model, keep).eval()
            with torch.no_grad():
                pruned(x)
        except Exception as exc:
            broken[layer.name] = _first_line(exc, 160)
    return broken


# ---------------------------------------------------------------------------------------------- checking


def _session(onnx_bytes_or_path: bytes | str | Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.log_severity_level = 3
    source = onnx_bytes_or_path if isinstance(onnx_bytes_or_path, bytes) else str(onnx_bytes_or_path)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise _fail(f"ONNX Runtime cannot load the model: {_first_line(exc)}") from None


def check_against_onnxruntime(model: nn.Module, onnx_bytes_or_path: bytes | str | Path, *, input_size: int,
                              channels: int = 3, samples: int = 2, seed: int = 0) -> float:
    """Max abs difference between ``model`` and ONNX Runtime (CPU) on ``samples`` random images, relative
    to the output scale (max abs of ONNX Runtime's output). Over :data:`RELATIVE_TOLERANCE`: error."""
    session = _session(onnx_bytes_or_path)
    inp = session.get_inputs()[0]
    x = torch.randn(samples, channels, input_size, input_size, generator=torch.Generator().manual_seed(seed))
    fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else samples
    chunks = [x[i: i + fixed_batch] for i in range(0, samples, fixed_batch)]
    try:
        ort_out = np.concatenate([session.run(None, {inp.name: c.numpy()})[0] for c in chunks])
    except Exception as exc:
        raise _fail(f"ONNX Runtime cannot run the model on {tuple(chunks[0].shape)}: {_first_line(exc)}") from None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ours = model(x)
    finally:
        model.train(was_training)
    ours_np = ours.detach().float().cpu().numpy()
    if ours_np.shape != ort_out.shape:
        raise _fail(f"the converted model's output {ours_np.shape} differs from ONNX Runtime's {ort_out.shape}")
    scale = float(np.abs(ort_out).max())
    diff = float(np.abs(ours_np - ort_out).max()) / max(scale, 1e-12)
    if not math.isfinite(diff) or diff > RELATIVE_TOLERANCE:
        raise _fail(f"the converted model differs from ONNX Runtime by {diff:.3g} (relative to output scale {scale:.3g}); "
                    f"tolerance {RELATIVE_TOLERANCE:g}")
    return diff


# ---------------------------------------------------------------------------------------------- export


def _onnx2torch_export_compat() -> None:
    """onnx2torch 1.5 reads the export opset from ``torch.onnx.symbolic_helper.GLOBALS``, which newer
    torch no longer re-exports there: its Shape / Gather / Squeeze / Reduce modules then fail to
    export with an AttributeError. Point onnx2torch at the module that still has it."""
    from onnx2torch.utils import common

    if hasattr(common.symbolic_helper, "GLOBALS") or hasattr(common.symbolic_helper, "_export_onnx_opset_version"):
        return
    with contextlib.suppress(ImportError):
        from torch.onnx._internal.torchscript_exporter import symbolic_helper

        common.symbolic_helper = symbolic_helper


def export_onnx(model: nn.Module, dest: str | Path, *, input_size: int, channels: int = 3) -> Path:
    """``model`` as one self-contained ONNX file (dynamic batch), checked against ONNX Runtime.

    The dynamo exporter first (as artifacts do); a module it cannot trace (onnx2torch's custom-export
    modules in an fx graph) falls back to the legacy TorchScript exporter at opset 17.
    """
    from .artifacts import _TRACE_LOCK, _export_to

    _onnx2torch_export_compat()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = (torch.randn(2, channels, input_size, input_size),)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with _TRACE_LOCK:
            try:
                _export_to(model, example, "onnx", tmp)
            except Exception:
                tmp.unlink(missing_ok=True)
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    torch.onnx.export(model, example, str(tmp), dynamo=False, opset_version=TORCH_OPSET,
                                      input_names=["input"], output_names=["logits"],
                                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        check_against_onnxruntime(model, tmp, input_size=input_size, channels=channels)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
        for extra in tmp.parent.glob(tmp.name + "*.data"):
            extra.unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------------------------------------- MACs


def _static_dims(vi: onnx.ValueInfoProto | None) -> list[int] | None:
    if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return dims


def onnx_macs(path_or_model: str | Path | onnx.ModelProto, *, input_size: int | None = None) -> int:
    """Multiply-accumulates of one image (batch 1), from the ONNX graph itself: Conv (with groups),
    ConvTranspose, Gemm and MatMul, over shapes from ``onnx.shape_inference``. ``input_size`` fixes
    a dynamic height / width."""
    if isinstance(path_or_model, onnx.ModelProto):
        model = copy.deepcopy(path_or_model)
    else:
        model = read_onnx(path_or_model)
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits or not inp.type.tensor_type.HasField("shape"):
            continue
        declared = inp.type.tensor_type.shape.dim
        fixed = {0: 1} if input_size is None else {0: 1, 2: input_size, 3: input_size}
        for axis, value in fixed.items():
            if axis < len(declared) and (axis == 0 or not declared[axis].HasField("dim_value")):
                declared[axis].Clear()
                declared[axis].dim_value = value
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)  # runs no code: shape functions only
    g = inferred.graph
    info: dict[str, onnx.ValueInfoProto] = {vi.name: vi for vi in [*g.value_info, *g.input, *g.output]}
    shapes = {t.name: list(t.dims) for t in g.initializer}

    def dims(name: str, node: onnx.NodeProto) -> list[int]:
        found = shapes.get(name) or _static_dims(info.get(name))
        if found is None:
            raise _fail(f"cannot count MACs: the shape of {name!r} ({node.op_type} node {node.name!r}) is not static")
        return found

    total = 0
    for node in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            w, out = dims(node.input[1], node), dims(node.output[0], node)
            # every output element: (C_in / groups) x kernel multiply-accumulates; w = C_out x C_in/g x k...
            total += math.prod(out) * math.prod(w[1:])
        elif node.op_type == "ConvTranspose":
            x, w = dims(node.input[0], node), dims(node.input[1], node)
            # every input element feeds (C_out / groups) x kernel outputs; w = C_in x C_out/g x k...
            total += math.prod(x) * math.prod(w[1:])
        elif node.op_type == "Gemm":
            a, out = dims(node.input[0], node), dims(node.output[0], node)
            k = a[0] if attrs.get("transA", 0) else a[1]
            total += math.prod(out) * k
        elif node.op_type == "MatMul":
            a, out = dims(node.input[0], node), dims(node.output[0], node)
            total += math.prod(out) * a[-1]
    return int(total)
