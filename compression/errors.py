"""Domain errors of the engine. The CLI and the API turn them into one-line messages / 4xx."""

from __future__ import annotations


class PrunePilotError(Exception):
    """Base class: an error caused by the user's input, reported without a traceback."""


class UnknownArchitectureError(PrunePilotError):
    pass


class WeightsError(PrunePilotError):
    pass


class DataError(PrunePilotError):
    pass


class StrategyError(PrunePilotError):
    pass


class BudgetError(PrunePilotError):
    pass
