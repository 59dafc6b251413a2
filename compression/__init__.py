"""The pruning engine: model zoo, data, pruning, measurement, evaluation and fine-tuning.

Knows nothing of agents, HTTP or SQL.

The names below load on first use (PEP 562): importing the package, or one light submodule such as
``errors`` or ``problem``, does not import torch, timm or Torch-Pruning, so the ``prunepilot``
command starts in well under a second for what needs none of them (``status``, ``submit``,
``db upgrade``, ``--help``). The imports under ``TYPE_CHECKING`` are the one list of what the package
exports: :func:`__getattr__` reads the submodule of a name from them (tests/test_lazy_imports.py
checks that the two agree with ``__all__``).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .artifacts import FORMATS, export_format, load_artifact, save_artifact
    from .data import DataSplits, ImageSet, Normalizer, decode_image_folder, load_splits
    from .errors import (
        BudgetError,
        DataError,
        OnnxModelError,
        PrunePilotError,
        StrategyError,
        UnknownArchitectureError,
        WeightsError,
    )
    from .evaluate import Evaluator, Fidelity, FormulaEvaluator, LatencyModel, Metrics
    from .finalizing import FinalResult, finalize
    from .finetuning import FinetuneConfig, finetune
    from .graph import BlockedLayer, LayerInfo, PruningGraph
    from .inspect import GroupReport, PrunabilityReport, inspect_model
    from .measure import count_macs, count_params, measure_latency, model_cost, size_on_disk
    from .problem import RESOURCES, Budget, Constraint, parse_constraint
    from .pruning import PrunedModel, Pruner
    from .spec import ArchSpec, build_from_spec
    from .strategy import CRITERIA, PruningConstraints, Strategy, from_vector, to_vector, uniform_strategy, validate_strategy
    from .zoo import arch_info, architectures, build_model, load_model, load_weights, read_state_dict

__all__ = [
    "ArchSpec", "BlockedLayer", "Budget", "BudgetError", "CRITERIA", "Constraint", "DataError", "DataSplits", "Evaluator", "FORMATS",
    "Fidelity", "FinalResult", "FinetuneConfig", "FormulaEvaluator", "GroupReport", "ImageSet", "LatencyModel", "LayerInfo", "Metrics", "Normalizer",
    "OnnxModelError", "PrunabilityReport", "PrunePilotError", "PrunedModel", "Pruner", "PruningConstraints", "PruningGraph", "RESOURCES", "Strategy",
    "StrategyError", "UnknownArchitectureError", "WeightsError", "arch_info", "architectures", "build_from_spec",
    "build_model", "count_macs", "count_params", "decode_image_folder", "export_format", "finalize", "finetune",
    "from_vector", "inspect_model", "load_artifact", "load_model", "load_splits", "load_weights", "measure_latency", "model_cost",
    "parse_constraint", "read_state_dict", "save_artifact", "size_on_disk", "to_vector", "uniform_strategy",
    "validate_strategy",
]


def _exports() -> dict[str, str]:
    """Each exported name -> its submodule, read from the ``TYPE_CHECKING`` imports above."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    guard = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    return {alias.asname or alias.name: f".{node.module}" for node in guard.body if isinstance(node, ast.ImportFrom)
            for alias in node.names}


_EXPORTS = _exports()


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
