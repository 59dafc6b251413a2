"""The budget contract: which resources a budget may limit, where each one's usage is found in a
candidate's metrics, the one feasibility rule, and the one model of size on disk.

Agents, the Gymnasium environment, the budget checker and the API's submission check all ask
these questions; they ask here, so a change (a new resource, another tolerance) is made once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch-free at run time: the CLI and the API's schemas parse budgets without torch
    from torch import nn

# Relative slack of the feasibility rule for what the search counts and predicts: float noise. A
# measured usage (latency timed on the target, the final figures) is held to its constraint's own
# ``tolerance`` instead, MEASURED_TOLERANCE unless the user names one: timings repeat only so well.
FEASIBILITY_TOLERANCE = 1e-9
MEASURED_TOLERANCE = 0.005


class Resource(StrEnum):
    FLOPS = "flops"
    PARAMS = "params"
    SIZE = "size"
    LATENCY = "latency"

    @property
    def metric(self) -> str:
        """The field of a candidate's metrics (``Metrics``, a trial's ``metrics``) holding its usage
        as a ratio of the dense model."""
        return _METRIC[self]

    def usage(self, metrics: Mapping[str, Any]) -> float | None:
        """This resource's usage (ratio of dense) in a metrics mapping; None if it was not measured."""
        value = metrics.get(self.metric)
        return None if value is None else float(value)


_METRIC = {Resource.FLOPS: "macs_ratio", Resource.PARAMS: "params_ratio", Resource.SIZE: "size_ratio",
           Resource.LATENCY: "latency_ratio"}
RESOURCES: tuple[str, ...] = tuple(r.value for r in Resource)


def within(usage: float | None, limit: float, tolerance: float = FEASIBILITY_TOLERANCE) -> bool:
    """The feasibility rule: a usage at or under its limit, ``tolerance`` (relative) allowed over it;
    an unknown usage (None) is not within."""
    return usage is not None and usage <= limit * (1 + tolerance)


def exceeded(usage: Mapping[str, float | None], limits: Mapping[str, float]) -> dict[str, float | None]:
    """The limited resources whose usage breaks their limit, with that usage."""
    return {r: usage.get(r) for r, lim in limits.items() if not within(usage.get(r), lim)}


def dense_values(dense_macs: float, dense_params: float, size: SizeModel, latency_ms: float | None = None) -> dict[str, float | None]:
    """The dense model's value of each resource, in the units of an absolute budget (what
    ``Budget.ratio_limits`` converts against); latency None while no latency model exists."""
    return {Resource.FLOPS: float(dense_macs), Resource.PARAMS: float(dense_params), Resource.SIZE: float(size.dense_bytes),
            Resource.LATENCY: latency_ms}


@dataclass(frozen=True)
class SizeModel:
    """Size on disk of a pruned model, predicted from its tensor element counts.

    Weights are stored as float32 (4 bytes an element) in a safetensors file whose header barely
    changes with the widths, so a pruned model takes the dense file's size less 4 bytes for every
    element removed. ``dense_elements``: the dense model's parameters plus the BatchNorm buffers
    the pruning graph counts."""

    dense_bytes: int
    dense_elements: int

    @classmethod
    def of(cls, model: nn.Module, dense_params: int) -> SizeModel:
        """For a dense model whose prunable parameters the pruning graph counts as ``dense_params``."""
        from .measure import size_on_disk

        buffers = sum(b.numel() for b in model.buffers() if b.dtype.is_floating_point)
        return cls(size_on_disk(model), int(dense_params) + int(buffers))

    def bytes(self, elements: int) -> int:
        return int(self.dense_bytes - 4 * (self.dense_elements - elements))

    def ratio(self, elements: int) -> float:
        return self.bytes(elements) / self.dense_bytes
