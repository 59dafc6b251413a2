"""Agents by name."""

from __future__ import annotations

from typing import Any

from prunepilot.compression import PrunePilotError

from ._base import Agent
from .amc import AMCAgent
from .baselines import GlobalAgent, RandomAgent, SensitivityAgent, UniformAgent
from .netadapt import NetAdaptAgent
from .optuna_agents import OptunaNSGA2Agent, OptunaTPEAgent

AGENTS: dict[str, type[Agent]] = {
    cls.name: cls
    for cls in (UniformAgent, RandomAgent, GlobalAgent, SensitivityAgent, OptunaTPEAgent, OptunaNSGA2Agent, AMCAgent, NetAdaptAgent)
}


def agent_names() -> list[str]:
    return list(AGENTS)


def describe_agents() -> list[dict[str, Any]]:
    return [{"name": name, "description": cls.description, "options": sorted(cls.option_names)} for name, cls in AGENTS.items()]


def create_agent(name: str, **options: Any) -> Agent:
    try:
        cls = AGENTS[name]
    except KeyError:
        raise PrunePilotError(f"unknown agent {name!r}; available: {', '.join(AGENTS)}") from None
    return cls(**options)
