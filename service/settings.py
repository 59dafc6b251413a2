"""All settings in one place, from ``PRUNEPILOT_*`` environment variables (or a .env file)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_REPO = Path(__file__).resolve().parents[1]


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
                    "it decodes")
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
    job_max_attempts: int = Field(default=3, ge=1, description="runs of a job whose worker died, before it fails")
    max_active_jobs_per_key: int | None = Field(
        default=50, ge=1,
        description="jobs one API key may have queued, running or fine-tuning at once; a submission past it is answered "
                    "429 before its uploads are stored ('none': no limit)")
    failed_job_retention_days: float | None = Field(
        default=7.0, ge=0,
        description="days the files of a failed or cancelled job are kept (its state directory, any artifacts, and the "
                    "uploads and decoded data caches no other job needs); the job's row and trials stay. Swept by the "
                    "dispatcher every few minutes and by `prunepilot gc` ('none': keep forever)")
    dispatch_interval_s: float = Field(default=1.0, gt=0)
    run_dispatcher: bool = Field(default=True, description="run jobs from this API process (off: an API-only replica)")
    auth_disabled: bool = Field(default=False, description="accept requests without an API key (single-user local use)")
    auth_cache_s: float = Field(default=10.0, ge=0,
                                description="seconds a verified API key is trusted without a database lookup; "
                                            "a revoked key stops working within this time (0: look up every request)")
    host: str = "127.0.0.1"
    port: int = 8000

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
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'prunepilot.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
