"""All settings in one place, from ``PRUNEPILOT_*`` environment variables (or a .env file)."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_REPO = Path(__file__).resolve().parents[1]
DATASET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
RESERVED_DATASETS = ("upload", "cifar10-jpeg")  # the spec's other meanings of `dataset`


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "prunepilot"


def _default_cifar_zip() -> Path:
    # The shared data set sits beside a source checkout; elsewhere set PRUNEPILOT_CIFAR10_ZIP.
    return (_REPO.parent / "shared" / "data" / "cifar10-jpeg.zip").resolve()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRUNEPILOT_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir, description="jobs, uploads, artifacts, caches, SQLite file")
    cifar10_zip: Path = Field(default_factory=_default_cifar_zip, description="CIFAR-10-JPEG zip for the built-in data set")
    shared_weights_dir: Path = Field(default_factory=lambda: (_REPO.parent / "shared" / "data").resolve())
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in data_dir")
    ray_address: str | None = Field(default=None, description="Ray cluster address; default: embedded local Ray")
    threads: int = Field(default=2, ge=1, description="torch intra-op threads per worker")
    job_cpus: float = Field(default=2.0, gt=0, description="CPUs Ray reserves per job (also its torch threads)")
    ray_num_cpus: int | None = Field(default=None, ge=1, description="CPUs of the embedded Ray (default: all)")
    worker_niceness: int | None = Field(default=None, ge=0, le=19,
                                        description="nice value of embedded Ray workers (Ray's default 15 keeps the API responsive)")
    max_concurrent_jobs: int | None = Field(default=None, ge=1,
                                            description="jobs handed to Ray at once (default: no cap, Ray queues by CPUs)")
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, description="largest accepted upload")
    max_zip_files: int = Field(default=200_000)
    max_zip_bytes: int = Field(default=4 * 1024**3, description="cap on a dataset zip's uncompressed size")
    max_decoded_bytes: int = Field(
        default=1024**3, ge=1,
        description="cap on an uploaded data set's decoded size, checked at submission (422 naming it and the estimate): "
                    "images x 3 x image_size^2 bytes (the worker's uint8 cache), or at native size (no image_size) 3 x width "
                    "x height of each image, read from its header. A worker's memory grows by about three times this while "
                    "it decodes. A data set on disk (a registered one, a CLI directory) that decodes to more is streamed "
                    "from its files instead of cached, and its subsets up to this size (the evaluator's validation images) "
                    "are held in memory")
    # (defaults as prunepilot.compression.data.MAX_IMAGE_BYTES / MAX_IMAGE_PIXELS, the engine's own)
    max_image_bytes: int = Field(default=128 * 1024**2, ge=1,
                                 description="largest image file (uncompressed) in a data set: a bigger zip entry is refused "
                                             "at submission, and a worker skips and reports one without reading it")
    max_image_pixels: int = Field(default=40_000_000, ge=1,
                                  description="largest image (width x height) a worker decodes; a bigger one is skipped and "
                                              "reported like an undecodable file (and counts nothing in the decoded size)")
    max_concurrent_validations: int = Field(default=2, ge=1,
                                            description="uploaded weights loaded at once to validate them, per API process "
                                                        "(each loads the whole file into memory); further submissions "
                                                        "wait their turn")
    calibration_repeats: int | None = Field(
        default=None, ge=1,
        description="whole-network runs per network when a latency table is calibrated against the dense model "
                    "(jobs, `prunepilot latency build`, `inspect --latency`); fewer is faster and noisier "
                    "(default: 40, and 20 for an inspection's outlook)")
    job_max_attempts: int = Field(default=3, ge=1, description="runs of a job whose worker died, before it fails")
    max_active_jobs_per_key: int | None = Field(
        default=50, ge=1,
        description="jobs one API key may have queued, running or fine-tuning at once; a submission past it is answered "
                    "429 before its uploads are stored ('none': no limit)")
    failed_job_retention_days: float | None = Field(
        default=7.0, ge=0,
        description="days the files of a failed or cancelled job are kept (its state directory, any artifacts, and the "
                    "uploads and decoded data caches no other job needs); the job's row and trials stay. Device "
                    "network measurements (read once by the job that asked for them) go after as long. Swept by the "
                    "dispatcher every few minutes and by `prunepilot gc` ('none': keep forever)")
    dispatch_interval_s: float = Field(default=1.0, gt=0)
    run_dispatcher: bool = Field(default=True, description="run jobs from this API process (off: an API-only replica)")
    auth_disabled: bool = Field(default=False, description="accept requests without an API key (single-user local use)")
    auth_cache_s: float = Field(default=10.0, ge=0,
                                description="seconds a verified API key is trusted without a database lookup; "
                                            "a revoked key stops working within this time (0: look up every request)")
    device_lease_s: float = Field(
        default=60.0, ge=1, le=3600,
        description="seconds a device agent holds a measurement task without a sign of life (a poll, a heartbeat, a result); "
                    "then the task is leased again, and a device not seen for this long counts as disconnected")
    # the names compression.compute_device.resolve_device takes (checked here too, without importing the engine)
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="compute device of every job's forward and backward passes: auto (CUDA when the worker "
                                    "process sees a GPU, else cpu), cpu, cuda or cuda:N. Not the latency target")
    gpus_per_job: float | None = Field(
        default=None, ge=0,
        description="GPUs Ray reserves for a job's task, and for each NetAdapt proposal task it fans out ('auto': 1 when "
                    "the Ray cluster has GPUs and DEVICE is not cpu, else 0); 1 runs one job per GPU, 0.5 two")
    gpu_eval_batch: int = Field(default=1024, ge=1,
                                description="batch size of inference passes (validation, test) on a GPU; the CPU keeps 128")
    loader_workers: int = Field(default=4, ge=0,
                                description="DataLoader processes that decode a streamed data set, per job (0: in the job's process)")
    datasets: Annotated[dict[str, Path], NoDecode] = Field(
        default_factory=dict,
        description="data sets on the workers' disks, by name: 'imagenet=/data/imagenet,pets=/data/pets' (ImageFolder "
                    "trees with train/ and optionally val/, test/). A job names one as its dataset; never a path")
    host: str = "127.0.0.1"
    port: int = 8000

    @field_validator("datasets", mode="before")
    @classmethod
    def _datasets(cls, value: object) -> object:
        """'name=path,name=path' (an environment variable) or a mapping: names a job may use, absolute paths."""
        if isinstance(value, str):
            pairs = [p.strip() for p in value.split(",") if p.strip()]
            if not all("=" in p for p in pairs):
                raise ValueError("expected name=/absolute/path pairs separated by commas")
            value = dict(p.split("=", 1) for p in pairs)
        if not isinstance(value, dict):
            return value
        out = {}
        for name, path in value.items():
            name = str(name).strip()
            if not DATASET_NAME.match(name) or name in RESERVED_DATASETS:
                raise ValueError(f"data set name {name!r}: use lower-case letters, digits, '.', '_' or '-' (not "
                                 f"{' or '.join(RESERVED_DATASETS)})")
            if not Path(str(path).strip()).is_absolute():
                raise ValueError(f"data set {name}: {path!r} is not an absolute path")
            out[name] = Path(str(path).strip())
        return out

    @field_validator("gpus_per_job", mode="before")
    @classmethod
    def _auto(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "auto") else value

    @field_validator("max_active_jobs_per_key", "failed_job_retention_days", mode="before")
    @classmethod
    def _none_word(cls, value: object) -> object:
        """An environment variable cannot hold None: 'none' or an empty value switches these off."""
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    artifacts_root: Path | None = Field(default=None, description="artifact store (shared storage on a cluster); default data_dir/artifacts")
    uploads_root: Path | None = Field(default=None, description="uploaded weights and data sets (shared on a cluster); default data_dir/uploads")

    @property
    def artifacts_dir(self) -> Path:
        return self.artifacts_root or self.data_dir / "artifacts"

    @property
    def uploads_dir(self) -> Path:
        return self.uploads_root or self.data_dir / "uploads"

    @property
    def job_threads(self) -> int:
        """A job's torch intra-op threads: its reserved CPUs, at least one (what its latency tables are keyed by)."""
        return max(1, int(self.job_cpus))

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'prunepilot.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
