"""Search agents behind one interface (:class:`Agent`), registered by name."""

from __future__ import annotations

from ._base import (
    Agent,
    Mapper,
    MemoryRecorder,
    SearchCancelled,
    SearchContext,
    SearchEnv,
    SearchLimits,
    SearchResult,
    TrialLedger,
    TrialRecord,
    TrialRecorder,
)
from .amc import AMCAgent
from .baselines import GlobalAgent, RandomAgent, SensitivityAgent, UniformAgent, solve_uniform
from .latency_check import check_measured_latency
from .netadapt import NetAdaptAgent
from .optuna_agents import OptunaNSGA2Agent, OptunaTPEAgent
from .pipeline import FinalConfig, JobResult, PipelineConfig, PipelineHooks, run_pipeline
from .registry import AGENTS, agent_names, create_agent, describe_agents

__all__ = [
    "AGENTS", "AMCAgent", "Agent", "FinalConfig", "Mapper", "GlobalAgent", "JobResult", "MemoryRecorder", "NetAdaptAgent", "OptunaNSGA2Agent", "OptunaTPEAgent", "PipelineConfig", "PipelineHooks", "RandomAgent",
    "SearchCancelled", "SearchContext", "SearchEnv", "SearchLimits", "SearchResult", "SensitivityAgent", "TrialLedger", "TrialRecord", "TrialRecorder",
    "UniformAgent", "agent_names", "check_measured_latency", "create_agent", "describe_agents", "run_pipeline", "solve_uniform",
]
