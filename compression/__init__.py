"""The pruning engine: model zoo, data, pruning, measurement, evaluation and fine-tuning.

Knows nothing of agents, HTTP or SQL.

The names below load on first use (PEP 562): importing the package, or one light submodule such as
``errors`` or ``problem``, does not import torch, timm or Torch-Pruning, so the ``prunepilot``
command starts in well under a second for what needs none of them (``status``, ``submit``,
``db upgrade``, ``--help``). A name is listed three times: imported under ``TYPE_CHECKING`` (for type
checkers), in ``_EXPORTS`` (for :func:`__getattr__`) and in ``__all__``; tests/test_lazy_imports.py
fails when the three disagree.
"""

from __future__ import annotations

import importlib
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


# each exported name -> its submodule: the TYPE_CHECKING imports above, for run time
_EXPORTS: dict[str, str] = {
    "FORMATS": "artifacts", "export_format": "artifacts", "load_artifact": "artifacts", "save_artifact": "artifacts",
    "DataSplits": "data", "ImageSet": "data", "Normalizer": "data", "decode_image_folder": "data", "load_splits": "data",
    "BudgetError": "errors", "DataError": "errors", "OnnxModelError": "errors", "PrunePilotError": "errors", "StrategyError": "errors",
    "UnknownArchitectureError": "errors", "WeightsError": "errors",
    "Evaluator": "evaluate", "Fidelity": "evaluate", "FormulaEvaluator": "evaluate", "LatencyModel": "evaluate", "Metrics": "evaluate",
    "FinalResult": "finalizing", "finalize": "finalizing",
    "FinetuneConfig": "finetuning", "finetune": "finetuning",
    "BlockedLayer": "graph", "LayerInfo": "graph", "PruningGraph": "graph",
    "GroupReport": "inspect", "PrunabilityReport": "inspect", "inspect_model": "inspect",
    "count_macs": "measure", "count_params": "measure", "measure_latency": "measure", "model_cost": "measure", "size_on_disk": "measure",
    "RESOURCES": "problem", "Budget": "problem", "Constraint": "problem", "parse_constraint": "problem",
    "PrunedModel": "pruning", "Pruner": "pruning",
    "ArchSpec": "spec", "build_from_spec": "spec",
    "CRITERIA": "strategy", "PruningConstraints": "strategy", "Strategy": "strategy", "from_vector": "strategy", "to_vector": "strategy",
    "uniform_strategy": "strategy", "validate_strategy": "strategy",
    "arch_info": "zoo", "architectures": "zoo", "build_model": "zoo", "load_model": "zoo", "load_weights": "zoo", "read_state_dict": "zoo",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
