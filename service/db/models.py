"""SQL tables (SQLAlchemy 2.x). Migrations in alembic/ create them; never ``create_all`` in production."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the secret; the secret is never stored
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # 'user': the API; 'device': only the measurement tasks of ``device`` (service/auth.py, check_scope)
    scope: Mapped[str] = mapped_column(String(16), default="user", server_default="user")
    device: Mapped[str | None] = mapped_column(String(64), default=None)


class Upload(Base):
    """Content-addressed uploaded files (weights, data zips): stored once per sha256."""

    __tablename__ = "uploads"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), index=True, default=None)
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    agent: Mapped[str] = mapped_column(String(64))
    arch: Mapped[str] = mapped_column(String(64))
    dataset: Mapped[str] = mapped_column(String(500))
    problem: Mapped[dict[str, Any]] = mapped_column(JSON)  # the full, validated job spec
    problem_key: Mapped[str] = mapped_column(String(64), index=True)  # same model + data + budget -> same key
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    phase: Mapped[str | None] = mapped_column(String(200), default=None)  # what the worker waits on, e.g. 'waiting for device NAME'
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    finetune_progress: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    evaluations: Mapped[int] = mapped_column(Integer, default=0)
    best_accuracy: Mapped[float | None] = mapped_column(Float, default=None)
    best_step: Mapped[int | None] = mapped_column(Integer, default=None)
    best_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(128), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finetune_started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    trials: Mapped[list[Trial]] = relationship(back_populates="job", cascade="all, delete-orphan", passive_deletes=True)


class Trial(Base):
    __tablename__ = "job_trials"  # "trials" is Optuna's table in the same database
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_trials_job_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    agent: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16), default="search")
    strategy: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    accuracy: Mapped[float] = mapped_column(Float)
    macs_ratio: Mapped[float] = mapped_column(Float)
    params_ratio: Mapped[float] = mapped_column(Float)
    size_ratio: Mapped[float] = mapped_column(Float)
    latency_ms: Mapped[float | None] = mapped_column(Float, default=None)
    reward: Mapped[float | None] = mapped_column(Float, default=None)
    feasible: Mapped[bool] = mapped_column(Boolean, default=True)
    wall_time_s: Mapped[float] = mapped_column(Float, default=0.0)
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="trials")


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # model | checkpoint
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LatencyEntry(Base):
    """One measured layer latency, shared by every model and job on the same device."""

    __tablename__ = "latency_entries"
    __table_args__ = (UniqueConstraint("device", "signature", name="uq_latency_device_signature"),
                      Index("ix_latency_device", "device"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device: Mapped[str] = mapped_column(String(300))
    signature: Mapped[str] = mapped_column(String(300))
    latency_ms: Mapped[float] = mapped_column(Float)
    repeats: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LatencyCalibration(Base):
    """A latency table's fit to whole-network timings (LatencyTable.calibration) for one model
    structure on one device, reused by later jobs and inspections of that model there."""

    __tablename__ = "latency_calibrations"
    __table_args__ = (UniqueConstraint("device", "model_key", name="uq_latency_calibration_device_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device: Mapped[str] = mapped_column(String(300))
    model_key: Mapped[str] = mapped_column(String(64))
    calibration: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Device(Base):
    """A latency target reached through a device agent. Declared with its first key
    (``prunepilot keys create --device NAME``); the agent registers its fingerprint and backend."""

    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    backend: Mapped[str | None] = mapped_column(String(32), default=None)
    fingerprint: Mapped[str | None] = mapped_column(String(300), default=None)  # the latency table's key; None until registered
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # what the agent said about itself (runtime, threads, host)
    registered_by: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    registered_at: Mapped[datetime | None] = mapped_column(default=None)
    last_seen: Mapped[datetime | None] = mapped_column(default=None)


class DeviceTask(Base):
    """One measurement for a device's agent: a latency-table entry or a set of networks timed together.

    ``key`` makes a task idempotent: an entry's key names its structure, input and the device's
    fingerprint, so a recorded entry is never measured again (by a retried worker or another job).
    A lease (owner + expiry) hands the task to one agent; an expired lease hands it to the next."""

    __tablename__ = "device_tasks"
    __table_args__ = (UniqueConstraint("device_id", "key", name="uq_device_tasks_device_key"),
                      Index("ix_device_tasks_device_finished", "device_id", "finished_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # entry | network
    key: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(300))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # input shapes, warmup, repeats, rounds
    payload: Mapped[bytes | None] = mapped_column(LargeBinary, default=None, deferred=True)  # ONNX models (zip); dropped once measured
    payload_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    leases: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    measured_by: Mapped[str | None] = mapped_column(String(128), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
