"""API models: what clients send (Create) and what they get back (Public), apart from the tables."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prunepilot.compression import Budget
from prunepilot.compression.evaluate import FIDELITY_METHODS
from prunepilot.compression.importance import CRITERIA

JobStatus = Literal["queued", "running", "finetuning", "succeeded", "failed", "cancelled"]
TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running", "finetuning")


class SearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_evaluations: int | None = Field(default=60, ge=1, le=100_000, description="evaluations (trials) the agent may use")
    max_seconds: float | None = Field(default=None, gt=0, description="wall-time limit for the search")


class FidelitySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field(default="adaptive-bn", description=f"one of {', '.join(FIDELITY_METHODS)}")
    val_images: int | None = Field(default=1000, ge=10)
    calib_images: int = Field(default=1024, ge=1)
    finetune_steps: int = Field(default=50, ge=1)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in FIDELITY_METHODS:
            raise ValueError(f"unknown fidelity method {v!r}; choose one of {', '.join(FIDELITY_METHODS)}")
        return v


class FinetuneSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: float = Field(default=1.0, ge=0, le=1000)
    lr: float = Field(default=0.01, gt=0, le=10)
    distill: bool = False
    finetune_dense: bool = Field(default=False, description="also fine-tune the dense model with the same budget (honest drop)")
    batch_size: int = Field(default=128, ge=1, le=4096)


class ConstraintsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_ratio: float = Field(default=0.8, ge=0, lt=1)
    first_layer_max_ratio: float = Field(default=0.5, ge=0, lt=1)
    round_to: int | None = Field(default=None, ge=1)
    exclude: list[str] = Field(
        default_factory=list, max_length=1000,
        description="layers to leave whole, named by any conv/linear of their channel group (as `prunepilot profile` lists them)",
    )


class MeasureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    test_images: int | None = Field(default=None, ge=10, description="final figures on a stratified test subset (default: all)")
    latency_batches: list[int] = Field(default=[1, 64], min_length=1, max_length=4)


class JobCreate(BaseModel):
    """The JSON part (``spec``) of ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "arch": "resnet20", "dataset": "cifar10-jpeg", "agent": "optuna-tpe",
        "budget": {"constraints": [{"resource": "flops", "ratio": 0.5}]},
        "search": {"max_evaluations": 60}, "finetune": {"epochs": 1},
    }]})

    arch: str = Field(description="architecture name from GET /v1/models")
    dataset: str = Field(default="cifar10-jpeg", description="cifar10-jpeg, or 'upload' with a dataset zip in the request")
    budget: Budget
    agent: str = Field(default="optuna-tpe", description="agent name from GET /v1/agents")
    agent_options: dict[str, Any] = Field(default_factory=dict, description="agent settings; names per agent from GET /v1/agents")
    search: SearchSpec = Field(default_factory=SearchSpec)
    fidelity: FidelitySpec = Field(default_factory=FidelitySpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    constraints: ConstraintsSpec = Field(default_factory=ConstraintsSpec)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    criterion: str = Field(default="l2", description=f"channel importance: {', '.join(CRITERIA)}")
    image_size: int | None = Field(default=None, ge=8, le=1024, description="resize uploaded images (default: native size)")
    seed: int = Field(default=0, ge=0)
    name: str | None = Field(default=None, max_length=200)

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, v: str) -> str:
        if v not in CRITERIA:
            raise ValueError(f"unknown criterion {v!r}; choose one of {', '.join(CRITERIA)}")
        return v


class Links(BaseModel):
    self: str
    trials: str
    model: str
    report: str
    cancel: str
    dashboard: str


class JobPublic(BaseModel):
    id: str
    name: str | None
    status: JobStatus
    agent: str
    arch: str
    dataset: str
    budget: str
    problem_key: str
    progress: float
    finetune_progress: float
    evaluations: int
    best_accuracy: float | None
    best_step: int | None
    best_metrics: dict[str, Any] | None
    result: dict[str, Any] | None
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finetune_started_at: datetime | None
    finished_at: datetime | None
    links: Links


class JobAccepted(BaseModel):
    id: str
    status: JobStatus
    links: Links


class TrialPublic(BaseModel):
    step: int
    agent: str
    kind: str
    strategy: dict[str, float]
    accuracy: float
    macs_ratio: float
    params_ratio: float
    size_ratio: float
    latency_ms: float | None
    reward: float | None
    feasible: bool
    wall_time_s: float
    metrics: dict[str, Any]
    extra: dict[str, Any]
    created_at: datetime


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class ArchPublic(BaseModel):
    name: str
    family: str
    input_size: int
    description: str


class AgentPublic(BaseModel):
    name: str
    description: str
    options: list[str] = Field(default_factory=list, description="names accepted in a job's agent_options")


class Health(BaseModel):
    status: Literal["ok"]
    database: str
    ray: str
    version: str


class ErrorBody(BaseModel):
    detail: str
