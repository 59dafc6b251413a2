"""A real prunepilot server in a subprocess (uvicorn + embedded Ray + SQLite), tuned for fast tests."""

from __future__ import annotations

from pathlib import Path

from prunepilot.service.process import ServiceProcess


class Server(ServiceProcess):
    def __init__(self, data_dir: Path, env_extra: dict[str, str] | None = None) -> None:
        super().__init__(data_dir, {"PRUNEPILOT_DISPATCH_INTERVAL_S": "0.3", "PRUNEPILOT_JOB_CPUS": "1", **(env_extra or {})})
