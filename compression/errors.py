"""Domain errors of the engine. The CLI and the API turn them into one-line messages / 4xx."""

from __future__ import annotations


class PrunePilotError(Exception):
    """Base class: an error caused by the user's input, reported without a traceback."""


class UnknownArchitectureError(PrunePilotError):
    pass


class WeightsError(PrunePilotError):
    pass


class OnnxModelError(WeightsError):
    """An uploaded ONNX model that cannot be read, converted, or reproduced by the converted module."""


class DataError(PrunePilotError):
    pass


class StrategyError(PrunePilotError):
    pass


class BudgetError(PrunePilotError):
    pass
