"""The pruning engine: model zoo, data, pruning, measurement, evaluation and fine-tuning.

Knows nothing of agents, HTTP or SQL.
"""

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
from .finalize import FinalResult, finalize
from .finetune import FinetuneConfig, finetune
from .graph import BlockedLayer, LayerInfo, PruningGraph
from .importance import CRITERIA
from .inspect import GroupReport, PrunabilityReport, inspect_model
from .measure import count_macs, count_params, measure_latency, model_cost, size_on_disk
from .problem import RESOURCES, Budget, Constraint, parse_constraint
from .pruning import PrunedModel, Pruner
from .spec import ArchSpec, build_from_spec
from .strategy import PruningConstraints, Strategy, from_vector, to_vector, uniform_strategy, validate_strategy
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
