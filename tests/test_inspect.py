"""What blocks pruning and why (PruningGraph.blocked), the correctness check of every plan
(PruningGraph.verify), and the prunability report (compression.inspect)."""

from __future__ import annotations

import copy
import json
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from prunepilot.compression import (
    Budget,
    Pruner,
    PruningConstraints,
    build_model,
    count_macs,
    count_params,
    parse_constraint,
)
from prunepilot.compression.graph import PruningGraph
from prunepilot.compression.inspect import inspect_model
from prunepilot.compression.measure import size_on_disk
from prunepilot.compression.strategy import from_vector


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*Unwrapped parameters.*")


def _torchvision(name: str) -> nn.Module:
    return torchvision.models.get_model(name, weights=None, num_classes=10).eval()


def _accounted(model: nn.Module, graph: PruningGraph) -> None:
    """Every conv / linear the forward pass runs is a prunable root, a coupled member, or blocked: exactly one."""
    convs = [n for n in graph.forward_order if isinstance(model.get_submodule(n), (nn.Conv2d, nn.Linear))]
    members = [c for layer in graph.layers for c in layer.coupled]
    blocked = [b.name for b in graph.blocked]
    assert len(set(members)) == len(members) and len(set(blocked)) == len(blocked)
    assert not set(members) & set(blocked)
    assert sorted(members + blocked) == sorted(convs)
    assert blocked == [c for c in convs if c in set(blocked)]  # in forward order
    assert all(b.reason and b.name in b.group for b in graph.blocked)


# --------------------------------------------------------------------------- Task 1: blocked layers


@pytest.mark.parametrize("arch", ["resnet20", "mobilenet_v3_small"])
def test_every_conv_and_linear_is_prunable_coupled_or_blocked(arch: str) -> None:
    model = build_model(arch)
    graph = PruningGraph(model, 32)
    _accounted(model, graph)
    classifier = "linear" if arch == "resnet20" else "classifier.3"
    assert [(b.name, b.reason) for b in graph.blocked] == [(classifier, "output layer (the classifier)")]


def test_excluded_layers_are_blocked_with_their_group(resnet20) -> None:
    graph = PruningGraph(resnet20, 32, exclude=("layer1.1.conv2", "layer2.0.conv1"))
    _accounted(resnet20, graph)
    reasons = {b.name: b.reason for b in graph.blocked}
    assert reasons["layer2.0.conv1"] == "excluded by the user"
    for member in ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"):  # the stage-1 residual stream
        assert reasons[member].startswith("excluded by the user")
    assert reasons["conv1"] == "excluded by the user (as layer1.1.conv2)"


class _Blocks(nn.Module):
    """conv c1 -> (a blocking op) -> conv c2 -> mean -> fc [+ aux]."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.c1 = nn.Conv2d(3, 1 if kind == "single" else 8, 3, padding=1)
        self.c2 = nn.Conv2d({"pad": 12, "single": 1}.get(kind, 8), 8, 3, padding=1, groups=2 if kind == "grouped" else 1)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.fc = nn.Linear(8, 10)
        self.aux = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c1(x))
        if self.kind == "pad":
            x = F.pad(x, (0, 0, 0, 0, 2, 2))  # two zero channels on each side, like option-A shortcuts
        if self.kind == "param":
            x = x * self.scale
        x = F.relu(self.c2(x)).mean((2, 3))
        return self.fc(x) + self.aux(x) if self.kind == "aux" else self.fc(x)


@pytest.mark.parametrize(("kind", "blocked"), [
    ("pad", {"c1": "its channels pass through an op the dependency graph cannot follow (roll / pad / gather: ConstantPadNdBackward0)"}),
    ("single", {"c1": "a single channel"}),
    ("grouped", {"c1": "grouped convolution coupling (groups=2)", "c2": "grouped convolution coupling (groups=2)"}),
    ("param", {"c1": "its channels reach a bare nn.Parameter (scale)"}),
    ("aux", {"fc": "coupled to the output layer (aux)", "aux": "output layer (the classifier)"}),
])
def test_blocked_layers_name_their_reason(kind: str, blocked: dict[str, str]) -> None:
    model = _Blocks(kind).eval()
    graph = PruningGraph(model, 16)
    _accounted(model, graph)
    reasons = {b.name: b.reason for b in graph.blocked}
    if kind != "aux":
        assert reasons.pop("fc") == "output layer (the classifier)"
    assert set(reasons) == set(blocked)
    for name, start in blocked.items():
        assert reasons[name].startswith(start)
    assert {b.name for b in graph.blocked if b.name in blocked} == set(blocked)
    assert [layer.name for layer in graph.layers] == [c for c in ("c1", "c2") if c not in blocked]


# --------------------------------------------------------------------------- Task 2: verify


class _BufferAdd(nn.Module):
    """c2's channels meet a constant per-channel buffer Torch-Pruning does not prune."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("buf", torch.randn(1, 8, 1, 1))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c2(F.relu(self.c1(x)))) + self.buf
        return self.fc(F.relu(self.c3(x)).mean((2, 3)))


class _MeanConcat(nn.Module):
    """c2's channels are averaged into an extra channel: pruning them changes that channel."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(9, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c2(F.relu(self.c1(x))))
        x = torch.cat([x, x.mean(dim=1, keepdim=True)], 1)
        return self.fc(F.relu(self.c3(x)).mean((2, 3)))


class _LayerNorm2d(nn.LayerNorm):
    """A LayerNorm over the channels of an image, written as torchvision's ConvNeXt writes it;
    ``literal``: its shape given as a constant, which pruning cannot change."""

    def __init__(self, channels: int, literal: bool = False) -> None:
        super().__init__(channels)
        self.literal = literal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (8,) if self.literal else self.normalized_shape
        return F.layer_norm(x.permute(0, 2, 3, 1), shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class _LayerNorms(nn.Module):
    """Norms over channels: a channels-first LayerNorm, a one-group GroupNorm, a LayerNorm over
    linear features."""

    def __init__(self, literal: bool = False) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1), _LayerNorm2d(8, literal)
        self.c2, self.n2 = nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(1, 16)
        self.c3 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc1, self.ln, self.fc = nn.Linear(8, 12), nn.LayerNorm(12), nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c3(F.relu(self.n2(self.c2(self.n1(self.c1(x)))))))
        return self.fc(self.ln(self.fc1(x.mean((2, 3)))))


@pytest.mark.parametrize("arch", ["resnet20", "resnet56"])
def test_verify_passes_every_cifar_resnet_plan_quickly(arch: str) -> None:
    model = build_model(arch)
    graph = PruningGraph(model, 32)
    start = time.perf_counter()
    assert graph.verify(model) == []
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18"])
def test_verify_passes_torchvision_plans(name: str) -> None:
    model = _torchvision(name)
    graph = PruningGraph(model, 32)
    assert graph.verify(model) == []
    fx = torch.fx.symbolic_trace(model)  # the same network as a GraphModule, as converted models arrive
    assert PruningGraph(fx, 32).verify(fx) == []


@pytest.mark.parametrize(("cls", "reason"), [
    (_BufferAdd, "the pruned model fails: RuntimeError: The size of tensor a"),
    (_MeanConcat, "pruning changes the output beyond the removed channels (max diff"),
])
def test_verify_blocks_groups_the_dependency_graph_gets_wrong(cls: type[nn.Module], reason: str) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    graph = PruningGraph(model, 16)
    assert [layer.name for layer in graph.layers] == ["c1", "c2", "c3"]  # the graph itself sees nothing wrong
    found = graph.verify(model)
    assert [b.name for b in found] == ["c2"]
    assert found[0].reason.startswith(reason)
    assert found[0].group == ("c2",)


class _DenseConcat(nn.Module):
    """Two groups meet in a concatenation, then one batch norm and one conv read both (DenseNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        self.bn, self.c3, self.fc = nn.BatchNorm2d(14), nn.Conv2d(14, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.c1(x))
        x = F.relu(self.bn(torch.cat([a, F.relu(self.c2(a))], 1)))
        return self.fc(F.relu(self.c3(x)).mean((2, 3)))


@pytest.mark.parametrize("name", ["dense-concat", "squeezenet1_0"])
def test_groups_meeting_in_a_concatenation_prune_together_exactly(name: str) -> None:
    """Each group alone was always right; pruned together, the second group's dense indices into
    the layer after the concatenation must be shifted by what the first removed (found by verify's
    joint check on DenseNet and SqueezeNet), and the batch norm over both loses both's channels."""
    torch.manual_seed(0)
    model = _DenseConcat().eval() if name == "dense-concat" else _torchvision(name)
    pruner = Pruner(model, name, 10, 32)
    assert pruner.graph.verify(model) == []
    for seed in range(3):
        strategy = from_vector(np.random.default_rng(seed).uniform(0.1, 0.8, len(pruner.layers)), pruner.layer_names)
        pruned = pruner.prune(strategy).model
        cost = pruner.cost(strategy)
        assert (cost.macs, cost.params) == (count_macs(pruned, 32), count_params(pruned))


def test_verify_catches_a_plan_that_prunes_the_wrong_input_channels(resnet20) -> None:
    """Not only crashes: a consumer losing the right number of the wrong channels is a difference."""
    graph = PruningGraph(resnet20, 32)
    gid = graph.by_name["layer2.1.conv1"].index
    step = next(s for s in graph._plans[gid] if s.inputs)
    assert step.module == "layer2.1.conv2"
    step.targets = (step.targets + 1) % len(step.targets)
    found = graph.verify(resnet20)
    assert [b.name for b in found] == ["layer2.1.conv1"]
    assert "max diff" in found[0].reason


def test_verify_allows_norms_over_channels_with_their_statistics_frozen() -> None:
    torch.manual_seed(0)
    model = _LayerNorms().eval()
    graph = PruningGraph(model, 16)
    assert [layer.name for layer in graph.layers] == ["c1", "c2", "c3", "fc1"]
    assert graph.verify(model) == []
    # the frozen statistics are only for the check: the pruned model still normalizes over what it keeps
    x = torch.randn(1, 3, 16, 16)
    before = model(x)
    pruned = graph.prune(model, {1: np.arange(8)})
    assert pruned.n2.num_channels == 8 and not torch.allclose(pruned(x), before, atol=1e-3)
    # a norm over a constant shape is a fixed shape pruning cannot change
    literal = _LayerNorms(literal=True).eval()
    found = PruningGraph(literal, 16).verify(literal)
    assert [b.name for b in found] == ["c1"] and "normalized shape [8]" in found[0].reason


def test_verify_uses_the_given_channels_and_leaves_the_model_as_it_was(resnet20) -> None:
    graph = PruningGraph(resnet20, 32)
    state = copy.deepcopy(resnet20.state_dict())
    resnet20.train()
    keep = {i: np.arange(1) for i in range(len(graph.layers))}  # one channel left everywhere
    assert graph.verify(resnet20, keep=keep, seed=3) == []
    assert resnet20.training
    resnet20.eval()
    assert all(torch.equal(v, resnet20.state_dict()[k]) for k, v in state.items())
    assert all(not m._forward_pre_hooks for m in resnet20.modules())


# --------------------------------------------------------------------------- Task 3: the report


def _macs_by_hooks(model: nn.Module, size: int) -> int:
    """Count MACs on the real (pruned) layers, independently of the graph's cost model."""
    total = 0

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        w = m.weight
        if isinstance(m, nn.Conv2d):
            total += out[0].numel() * w[0].numel()  # each output element: one filter of C_in/groups x k x k
        else:
            total += out[0].numel() * w.shape[1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return total


def test_report_floors_match_the_model_pruned_at_the_layer_limits(resnet20) -> None:
    pruner = Pruner(resnet20, "resnet20", 10, 32)
    report = inspect_model(pruner, seconds_per_evaluation=0.5, evaluations=400)
    at_limits = pruner.prune_kept(pruner.kept_from_vector(pruner.max_ratios())).model
    macs = _macs_by_hooks(at_limits, 32) / _macs_by_hooks(resnet20, 32)
    params = sum(p.numel() for p in at_limits.parameters()) / sum(p.numel() for p in resnet20.parameters())
    assert report.floor("flops") == pytest.approx(macs, rel=1e-9)
    assert report.floor("params") == pytest.approx(params, rel=1e-9)
    assert report.floor("size") == pytest.approx(size_on_disk(at_limits) / size_on_disk(resnet20), abs=2e-3)
    # (1 - 0.8)^2-ish: both sides of most convs keep 20 %, the first stage's residual stream keeps 50 %
    assert 0.04 < report.floor("flops") < 0.1
    assert all(0.0 < v < 1.0 for v in report.floors.values())
    assert report.dense_macs == _macs_by_hooks(resnet20, 32) and report.dense_size_bytes == size_on_disk(resnet20)
    assert len(report.groups) == 12 and report.groups[0].name == "conv1" and report.groups[0].max_ratio == 0.5
    assert [b.name for b in report.blocked] == ["linear"] and report.verified
    assert report.search_seconds == pytest.approx(200.0)
    with pytest.raises(Exception, match="no latency floor"):
        report.floor("latency")
    blob = json.loads(json.dumps(report.to_dict()))
    assert blob["floors"]["flops"] == report.floor("flops") and blob["time"]["search_seconds"] == 200.0
    text = report.table()
    assert "layer3.0.conv2" in text and "output layer (the classifier)" in text and "400 evaluations" in text


def test_report_names_a_budget_below_the_floor(resnet20) -> None:
    pruner = Pruner(resnet20, "resnet20", 10, 32)
    report = inspect_model(pruner, verify=False)
    floor = report.floor("flops")
    budget = Budget(constraints=[parse_constraint("flops=0.05"), parse_constraint("params=0.5")])
    assert report.below_floor(budget) == [
        f"flops 0.05 is below the reachable floor {floor:.3g} for this model at the layer limits (max ratio 0.8, first layer 0.5)"
    ]
    assert report.below_floor(Budget(constraints=[parse_constraint("flops=0.2")])) == []
    absolute = report.below_floor(Budget(constraints=[parse_constraint("params=1000")]))
    assert len(absolute) == 1 and absolute[0].startswith("params 1000 parameters (0.00371 of dense) is below the reachable floor")


class _StubLatency:
    """A latency model: 1 ms plus 0.01 ms per kept channel."""

    def __init__(self, channels: np.ndarray) -> None:
        self.dense_ms = 1.0 + 0.01 * float(channels.sum())

    def predict(self, kept: np.ndarray) -> float:
        return 1.0 + 0.01 * float(np.sum(kept))


def test_report_latency_floor_comes_from_the_table(resnet20) -> None:
    pruner = Pruner(resnet20, "resnet20", 10, 32)
    table = _StubLatency(pruner.graph.channels)
    report = inspect_model(pruner, latency_table=table, verify=False)
    kept = pruner.kept_from_vector(pruner.max_ratios())
    assert report.floor("latency") == pytest.approx(table.predict(kept) / table.dense_ms)
    assert report.dense_latency_ms == table.dense_ms
    budget = Budget(constraints=[parse_constraint("latency=0.1")])
    assert report.below_floor(budget)[0].startswith("latency 0.1 is below the reachable floor")


def test_report_blocks_what_verify_finds_and_holds_it_whole() -> None:
    torch.manual_seed(0)
    model = _BufferAdd().eval()
    report = inspect_model(Pruner(model, "custom", 10, 16))
    assert [g.name for g in report.groups] == ["c1", "c3"]
    assert [(b.name, b.reason.split(":")[0]) for b in report.blocked] == [("c2", "the pruned model fails"),
                                                                         ("fc", "output layer (the classifier)")]
    held = inspect_model(Pruner(model, "custom", 10, 16, PruningConstraints(exclude=("c2",))), verify=False)
    assert report.floors == pytest.approx(held.floors)


def test_verify_checks_the_layers_that_pass_alone_together_too(resnet20, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers can clash only when pruned together (one op reading two groups); the one whose
    addition breaks the joint check is blocked, and the others stay prunable."""
    graph = PruningGraph(resnet20, 32)
    real = graph._check

    def check(model: nn.Module, keep: dict[int, np.ndarray], x: torch.Tensor, tol: float, **kw: bool) -> str | None:
        return "clash" if {1, 4} <= set(keep) else real(model, keep, x, tol, **kw)

    monkeypatch.setattr(graph, "_check", check)
    assert [(b.name, b.reason) for b in graph.verify(resnet20)] == [
        (graph.layers[4].name, "pruned together with the layers before it: clash")]
