"""Budgets and problems: what the user asks for, serializable (pydantic) and stored on the job.

A constraint's limit is kept as a *ratio of the dense model* internally; absolute targets
(8 ms, 1 MB, 20 M MACs) are converted with the dense model's measured value, so agents compare
every resource the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import BudgetError
from .resources import MEASURED_TOLERANCE, RESOURCES, Resource, within

__all__ = ["RESOURCES", "Budget", "Constraint", "Resource", "parse_constraint"]

UNITS = {"flops": "MACs", "latency": "ms", "params": "parameters", "size": "bytes"}


class Constraint(BaseModel):
    """One resource limit: ``ratio`` of the dense model's value, or an absolute ``value``.

    Absolute units: MACs for ``flops``, milliseconds for ``latency``, a count for ``params``,
    bytes for ``size``.
    """

    # NaN passes ``value <= 0`` and infinity is no limit: both are refused, naming the field.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    resource: Resource
    ratio: float | None = Field(default=None, description="keep at most this share of the dense model's value, in (0, 1)")
    value: float | None = Field(default=None, description="absolute limit in the resource's unit")
    batch_size: int = Field(default=1, ge=1, le=4096, description="latency only: batch size measured")
    tolerance: float = Field(default=MEASURED_TOLERANCE, ge=0.0, le=0.1,
                             description="relative slack over the limit allowed where a value is measured, not predicted: "
                                         "latency timed on the target during the search, and every final figure (the "
                                         "report's budget_check); the search holds its predictions and counts to the limit itself")

    @model_validator(mode="after")
    def _one_target(self) -> Constraint:
        if (self.ratio is None) == (self.value is None):
            raise ValueError(f"{self.resource}: give exactly one of ratio or value")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ValueError(f"{self.resource}: ratio must be in (0, 1), got {self.ratio}")
        if self.value is not None and self.value <= 0:
            raise ValueError(f"{self.resource}: value must be > 0, got {self.value}")
        return self

    def limit_ratio(self, dense_value: float | None) -> float:
        if self.ratio is not None:
            return self.ratio
        if not dense_value:
            raise BudgetError(f"cannot convert an absolute {self.resource} limit without the dense model's {self.resource}")
        assert self.value is not None  # the validator: exactly one of ratio and value
        r = float(self.value) / dense_value
        if r >= 1.0:
            raise BudgetError(
                f"{self.resource} limit {self.value:g} {UNITS[self.resource]} is not below the dense model's {dense_value:g}; nothing to prune"
            )
        return r

    def describe(self) -> str:
        if self.ratio is not None:
            return f"{self.resource} <= {self.ratio:.0%} of dense"
        return f"{self.resource} <= {self.value:g} {UNITS[self.resource]}"


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    constraints: list[Constraint] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> Budget:
        names = [c.resource for c in self.constraints]
        if len(set(names)) != len(names):
            raise ValueError("each resource may appear once in a budget")
        return self

    @property
    def resources(self) -> list[str]:
        return [c.resource for c in self.constraints]

    def get(self, resource: str) -> Constraint | None:
        return next((c for c in self.constraints if c.resource == resource), None)

    def ratio_limits(self, dense: dict[str, float | None]) -> dict[str, float]:
        return {c.resource: c.limit_ratio(dense.get(c.resource)) for c in self.constraints}

    def tolerances(self) -> dict[str, float]:
        """Each limited resource's slack for measured values (``Constraint.tolerance``)."""
        return {c.resource: c.tolerance for c in self.constraints}

    def check_measured(self, limits: Mapping[str, float], usage: Mapping[str, float | None]) -> dict[str, dict[str, Any]]:
        """Each constraint against the measured ``usage`` (share of dense; None: not measured, so
        not met), by the measured rule: at most ``limits[resource]`` with the constraint's tolerance."""
        return {c.resource: {"limit": limits[c.resource], "measured": usage.get(c.resource), "tolerance": c.tolerance,
                             "met": within(usage.get(c.resource), limits[c.resource], c.tolerance)}
                for c in self.constraints}

    def describe(self) -> str:
        return " and ".join(c.describe() for c in self.constraints)


_BUDGET_RE = re.compile(r"^\s*(flops|macs|latency|params|size)\s*[=<]=?\s*([0-9.]+(?:e-?\d+)?)\s*(%|ms|s|kb|mb|gb|b|k|m|g)?\s*$", re.I)
_SCALE = {"k": 1e3, "m": 1e6, "g": 1e9, "kb": 1e3, "mb": 1e6, "gb": 1e9, "b": 1.0, "ms": 1.0, "s": 1000.0}


def parse_constraint(text: str) -> Constraint:
    """``flops=0.5``, ``flops=50%``, ``latency=8ms``, ``size=1MB``, ``params=0.4``, ``macs=20M``."""
    m = _BUDGET_RE.match(text)
    if not m:
        raise BudgetError(f"cannot parse budget {text!r}; examples: flops=0.5, latency=8ms, size=1MB, params=50%")
    word, number, unit = m.group(1).lower(), float(m.group(2)), (m.group(3) or "").lower()
    resource = Resource("flops" if word == "macs" else word)  # _BUDGET_RE admits only these names
    try:
        if unit == "%":
            return Constraint(resource=resource, ratio=number / 100.0)
        if unit == "" and number < 1.0:
            return Constraint(resource=resource, ratio=number)
        if resource == "latency" and unit not in ("", "ms", "s"):
            raise BudgetError(f"latency takes ms or s, got {unit!r}")
        return Constraint(resource=resource, value=number * _SCALE.get(unit, 1.0))
    except ValueError as exc:
        raise BudgetError(str(exc).splitlines()[-1]) from None
