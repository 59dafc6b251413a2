"""API models: what clients send (Create) and what they get back (Public), apart from the tables."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prunepilot.agents import SearchLimits
from prunepilot.agents.pipeline import FinalConfig, PipelineConfig
from prunepilot.compression import Budget, Fidelity, FinetuneConfig, PrunePilotError, PruningConstraints
from prunepilot.compression.backends import DEVICE_BACKENDS, LatencyTarget
from prunepilot.compression.evaluate import FIDELITY_METHODS
from prunepilot.compression.strategy import CRITERIA

from .db.lifecycle import JobStatus

# Every part of a job spec: an unknown key is a typo, and NaN or infinity is never a meaningful setting
# (NaN slips through range checks elsewhere; JSON parsers and pydantic's lax mode both produce it).
SPEC_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)
# The engine's configs hold the defaults; the API's schemas read them from there (one set).
_FIDELITY, _FINETUNE, _CONSTRAINTS = Fidelity(), FinetuneConfig(), PruningConstraints()


class SearchSpec(BaseModel):
    model_config = SPEC_CONFIG
    max_evaluations: int | None = Field(default=60, ge=1, le=100_000, description="evaluations (trials) the agent may use")
    max_seconds: float | None = Field(default=None, gt=0, description="wall-time limit for the search")

    def to_engine(self) -> SearchLimits:
        return SearchLimits(self.max_evaluations, self.max_seconds)


class FidelitySpec(BaseModel):
    model_config = SPEC_CONFIG
    method: str = Field(default=_FIDELITY.method, description=f"one of {', '.join(FIDELITY_METHODS)}")
    val_images: int | None = Field(default=_FIDELITY.val_images, ge=10)
    calib_images: int = Field(default=_FIDELITY.calib_images, ge=1)
    finetune_steps: int = Field(default=_FIDELITY.finetune_steps, ge=1)

    def to_engine(self) -> Fidelity:
        return Fidelity(method=self.method, val_images=self.val_images, calib_images=self.calib_images,  # type: ignore[arg-type]
                        finetune_steps=self.finetune_steps)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in FIDELITY_METHODS:
            raise ValueError(f"unknown fidelity method {v!r}; choose one of {', '.join(FIDELITY_METHODS)}")
        return v


class FinetuneSpec(BaseModel):
    model_config = SPEC_CONFIG
    # A job fine-tunes one epoch unless told otherwise (the engine's own default, 0, means "none").
    epochs: float = Field(default=1.0, ge=0, le=1000)
    lr: float = Field(default=_FINETUNE.lr, gt=0, le=10)
    distill: bool = False
    finetune_dense: bool = Field(default=False, description="also fine-tune the dense model with the same budget (honest drop)")
    batch_size: int = Field(default=_FINETUNE.batch_size, ge=1, le=4096)

    def to_engine(self, seed: int) -> FinetuneConfig:
        return FinetuneConfig(epochs=self.epochs, lr=self.lr, distill=self.distill, batch_size=self.batch_size, seed=seed)


class ConstraintsSpec(BaseModel):
    model_config = SPEC_CONFIG
    max_ratio: float = Field(default=_CONSTRAINTS.max_ratio, ge=0, lt=1)
    first_layer_max_ratio: float = Field(default=_CONSTRAINTS.first_layer_max_ratio, ge=0, lt=1)
    round_to: Annotated[int, Field(ge=1)] | Literal["measured"] | None = Field(
        default=_CONSTRAINTS.round_to, description="round kept channel counts: to a multiple of this integer, or 'measured': down to the latency "
                                  "table's efficient counts on the job's target, up to the smallest from below them "
                                  "(builds that table even for a flops budget). A job that leaves it out gets 'measured' when its "
                                  "target runs ONNX Runtime (target.backend onnxruntime, or a device) and no rounding otherwise; "
                                  "null or 1 turns rounding off")
    exclude: list[str] = Field(
        default_factory=list, max_length=1000,
        description="layers to leave whole, named by any conv/linear of their channel group (as `prunepilot profile` lists them)",
    )

    def to_engine(self) -> PruningConstraints:
        return PruningConstraints(max_ratio=self.max_ratio, first_layer_max_ratio=self.first_layer_max_ratio,
                                  round_to=self.round_to, exclude=tuple(self.exclude))


class TargetSpec(BaseModel):
    """Where the job's latency is measured: its latency table, measured check and measured channel steps."""

    model_config = SPEC_CONFIG
    backend: Literal["torch", "onnxruntime", "cuda"] | None = Field(
        default=None, description="torch (the default without a device): PyTorch eager on the worker's CPU; onnxruntime: "
                                  "ONNX Runtime (CPU execution provider; the default with a device, and the only runtime "
                                  "device agents run); cuda: PyTorch on the worker's GPU")
    device: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                               description="a registered remote device (by name) whose agent measures instead of the worker")

    @model_validator(mode="after")
    def _engine_target(self) -> TargetSpec:
        """The engine's ``LatencyTarget`` decides which backends a device may name."""
        try:
            self.to_engine()
        except PrunePilotError as exc:
            raise ValueError(str(exc)) from None
        return self

    def to_engine(self) -> LatencyTarget:
        default = DEVICE_BACKENDS[0] if self.device is not None else "torch"
        return LatencyTarget(backend=self.backend or default, device=self.device)


class MeasureSpec(BaseModel):
    model_config = SPEC_CONFIG
    test_images: int | None = Field(default=None, ge=10, description="final figures on a stratified test subset (default: all)")
    latency_batches: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default=[1, 64], min_length=1, max_length=4)


class ModelSpec(BaseModel):
    """The model and how it is fed: what ``POST /v1/jobs`` and ``POST /v1/inspect`` share."""

    model_config = SPEC_CONFIG
    arch: str = Field(max_length=200, description="the model: a built-in name from GET /v1/models, `timm:<name>`, `plugin:<name>` "
                      "(each with a `weights` part), or `onnx` with the ONNX file as the `model` part (it carries its own weights)")
    constraints: ConstraintsSpec = Field(default_factory=ConstraintsSpec)
    image_size: int | None = Field(default=None, ge=8, le=1024,
                                   description="input resolution: images are resized to it (default: the model's own fixed size, else the images' native size)")
    mean: list[float] | None = Field(default=None, min_length=3, max_length=3,
                                     description="per-channel (R, G, B) mean of the model's input normalization, on a 0-1 scale (default: the model's own, else ImageNet's)")
    std: list[Annotated[float, Field(gt=0)]] | None = Field(default=None, min_length=3, max_length=3,
                                                            description="per-channel (R, G, B) standard deviation, as `mean`")


class InspectCreate(ModelSpec):
    """The JSON part (``spec``) of ``POST /v1/inspect``."""

    model_config = ConfigDict(**SPEC_CONFIG, json_schema_extra={"examples": [{
        "arch": "resnet20", "budget": {"constraints": [{"resource": "flops", "ratio": 0.5}]}, "evaluations": 60}]})

    budget: Budget | None = Field(default=None, description="say whether this budget is reachable")
    evaluations: int = Field(default=60, ge=1, le=100_000, description="evaluations of the search to estimate the time of")
    target: TargetSpec | None = Field(default=None, description="add the latency outlook on this target (layer latency curves, "
                                      "predicted speedups, whether pruning makes it faster there) from its stored latency table")


class JobCreate(ModelSpec):
    """The JSON part (``spec``) of ``POST /v1/jobs``."""

    model_config = ConfigDict(**SPEC_CONFIG, json_schema_extra={"examples": [{
        "arch": "resnet20", "dataset": "cifar10-jpeg", "agent": "optuna-tpe",
        "budget": {"constraints": [{"resource": "flops", "ratio": 0.5}]},
        "search": {"max_evaluations": 60}, "finetune": {"epochs": 1},
    }]})

    dataset: str = Field(default="cifar10-jpeg", max_length=64,
                         description="cifar10-jpeg, the name of a data set registered on the server (PRUNEPILOT_DATASETS: "
                                     "ImageFolder trees on the workers' disks, streamed when large), or 'upload' with a "
                                     "dataset zip in the request; never a path")
    budget: Budget
    agent: str = Field(default="optuna-tpe", description="agent name from GET /v1/agents")
    agent_options: dict[str, Any] = Field(default_factory=dict, description="agent settings; names per agent from GET /v1/agents")
    search: SearchSpec = Field(default_factory=SearchSpec)
    fidelity: FidelitySpec = Field(default_factory=FidelitySpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    target: TargetSpec = Field(default_factory=TargetSpec, description="where latency is measured (latency budgets, round_to='measured'); "
                                                                      "ONNX Runtime targets default to round_to='measured'")
    criterion: str = Field(default="l2", description=f"channel importance: {', '.join(CRITERIA)}")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="32 bits: Optuna's samplers seed a NumPy RandomState")
    name: str | None = Field(default=None, max_length=200)

    @model_validator(mode="after")
    def _target_rounding(self) -> JobCreate:
        """A job that names no rounding gets its target's (measured channel steps where latency is a
        staircase in the channel count: ``LatencyTarget.default_round_to``). Stored specs carry the
        result, so a job keeps the rounding it was accepted with. A copy: a ``ConstraintsSpec`` the
        caller passed in (pydantic keeps the instance) is not changed under them."""
        if "round_to" not in self.constraints.model_fields_set:
            self.constraints = self.constraints.model_copy(update={"round_to": self.target.to_engine().default_round_to})
        return self

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, v: str) -> str:
        if v not in CRITERIA:
            raise ValueError(f"unknown criterion {v!r}; choose one of {', '.join(CRITERIA)}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and "\x00" in v:  # PostgreSQL text cannot hold NUL: refuse it here, not as a database error
            raise ValueError("must not contain NUL characters")
        return v

    def pipeline_config(self) -> PipelineConfig:
        """The job as the pipeline runs it: parsed once, typed, engine defaults."""
        return PipelineConfig(agent=self.agent, budget=self.budget, agent_options=dict(self.agent_options),
                              search=self.search.to_engine(), fidelity=self.fidelity.to_engine(),
                              final=FinalConfig(finetune=self.finetune.to_engine(self.seed), finetune_dense=self.finetune.finetune_dense,
                                                test_images=self.measure.test_images,
                                                latency_batches=tuple(self.measure.latency_batches),
                                                target=self.target.to_engine()),
                              seed=self.seed, target=self.target.to_engine())


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
    phase: str | None = Field(default=None, description="what a running job is waiting on or doing, where it says "
                              "(e.g. 'waiting for device NAME': no agent of its latency target's device is connected)")
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


class GroupPublic(BaseModel):
    name: str = Field(description="the group's root layer")
    type: str = Field(description="conv, depthwise-conv or linear")
    channels: int
    coupled: list[str] = Field(description="every conv / linear pruned with it")
    macs: int = Field(description="MACs of the layers whose input or output channels the group prunes")
    macs_share: float
    max_ratio: float


class BlockedPublic(BaseModel):
    name: str
    reason: str
    group: list[str] = Field(description="the layers left whole with it")


class InspectPublic(BaseModel):
    """The prunability report (``POST /v1/inspect``, ``prunepilot inspect --json``)."""

    arch: str
    input_size: int
    groups: list[GroupPublic]
    blocked: list[BlockedPublic] = Field(description="layers left whole, and why")
    dense: dict[str, float | None] = Field(description="macs, params, size_bytes, latency_ms (batch 1, timed on the API server)")
    floors: dict[str, float] = Field(description="each resource's least reachable share of dense at the layer limits")
    limits: dict[str, float]
    verified: bool = Field(description="whether each layer's pruning plan was checked for exactness (every source but the built-ins)")
    verify_seconds: float | None
    time: dict[str, float | None] = Field(description="seconds_per_evaluation and search_seconds, estimated on the API server")
    budget_problems: list[str] = Field(description="why the given budget cannot be met (empty: it can, or none was given)")
    latency: dict[str, Any] | None = Field(
        default=None, description="with a `target`: backend, device fingerprint, dense_ms, floor_speedup, will_speed_up, verdict "
                                  "('pruning will not make this faster on this target' under 1.05x), uniform_speedup and "
                                  "stepped_speedup at the budget, calibration ('stored': the fit an earlier job or "
                                  "`latency build` of this model on the target stored; 'measured': timed now) and each "
                                  "layer's latency curve (counts, ms); null without a target")
    latency_note: str | None = Field(default=None, description="why `latency` is missing although a target was given")


# ------------------------------------------------------------------ devices (remote latency targets) and their agents

AGENT_ID = r"^[\w.:-]{1,128}$"
_MS = Annotated[float, Field(gt=0, lt=1e7)]  # one timing in milliseconds: positive and finite


class DeviceRegister(BaseModel):
    """What a device agent says about itself when it connects (``POST /v1/devices/{name}/register``)."""

    model_config = SPEC_CONFIG
    backend: Literal["onnxruntime"] = Field(description="the runtime the agent times with")
    fingerprint: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00]+$",
                             description="runtime, execution providers, CPU and threads: with the device's name, the key "
                                         "its latency-table entries are stored under")
    info: dict[str, str | int | float | bool | None] = Field(default_factory=dict, max_length=32,
                                                              description="anything else worth showing (host, versions)")


class LeaseRequest(BaseModel):
    model_config = SPEC_CONFIG
    agent_id: str = Field(pattern=AGENT_ID, description="this agent process (a new one per start): the lease's owner")
    max_tasks: int = Field(default=16, ge=1, le=64, description="tasks to take at once (entries are timed interleaved)")
    wait_s: float = Field(default=10.0, ge=0, le=30,
                          description="seconds to wait for a task when none is open (bounded by half the lease time)")


class AgentPing(BaseModel):
    model_config = SPEC_CONFIG
    agent_id: str = Field(pattern=AGENT_ID)
    release: bool = Field(default=False, description="hand back this agent's unfinished tasks (it is stopping)")


class TaskSpec(BaseModel):
    inputs: list[list[int]] = Field(description="the input shape of each model in the payload, in order")
    warmup: int
    repeats: int
    rounds: int = Field(description="entries: rounds over all entries, the fastest round's median kept; networks: 1")


class TaskPublic(BaseModel):
    id: int
    kind: Literal["entry", "network"] = Field(description="entry: one latency-table entry (a median, ms); network: whole "
                                              "networks timed interleaved (every run, ms)")
    spec: TaskSpec
    payload: str = Field(description="where to GET the ONNX models: a zip of model-0.onnx, model-1.onnx, ...")
    payload_bytes: int
    lease_expires_at: datetime | None


class Lease(BaseModel):
    tasks: list[TaskPublic]
    lease_s: float = Field(description="how long a task stays this agent's without a heartbeat")


class TaskResult(BaseModel):
    """A task's measurement: ``ms`` for an entry task (its median, one number per model), ``runs_ms`` for
    a network task (every timed run of each model, ``repeats`` per model), or ``error``."""

    model_config = SPEC_CONFIG
    agent_id: str = Field(pattern=AGENT_ID)
    ms: list[_MS] | None = Field(default=None, max_length=64)
    runs_ms: list[Annotated[list[_MS], Field(min_length=1, max_length=100_000)]] | None = Field(default=None, max_length=64)
    error: str | None = Field(default=None, max_length=500, pattern=r"^[^\x00]*$",
                              description="the task could not be timed here (the job that asked for it fails, saying why)")


class Recorded(BaseModel):
    recorded: bool
    extended: int = Field(default=0, description="leases extended (heartbeat)")


class DeviceJob(BaseModel):
    id: str
    name: str | None
    status: JobStatus


class DevicePublic(BaseModel):
    name: str
    backend: str | None
    fingerprint: str | None = Field(description="None until an agent registered")
    info: dict[str, Any]
    registered_at: datetime | None
    last_seen: datetime | None
    connected: bool = Field(description="an agent was seen within the lease time (PRUNEPILOT_DEVICE_LEASE_S)")
    entries: int = Field(description="latency-table entries measured on this device (its current fingerprint)")
    calibrations: int = Field(description="models whose calibration (the fit of the table to whole-network timings) is stored "
                                          "for this device (its current fingerprint) and reused by later jobs and inspections")
    tasks: dict[str, int] = Field(description="measurement tasks: open (waiting or leased) and done")
    jobs: list[DeviceJob] = Field(description="your jobs whose latency target is this device, newest first (at most 20)")
