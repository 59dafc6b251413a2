"""The API in-process: ``create_app(settings)`` with the dispatcher off, behind FastAPI's TestClient.

For validation, authentication and error-shape tests, where the wire does not matter: no
subprocess, no Ray. Jobs submitted here stay queued (nothing runs them)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from prunepilot.service.app import create_app
from prunepilot.service.db.migrate import upgrade
from prunepilot.service.settings import Settings


@dataclass
class InProcessApi:
    client: TestClient
    settings: Settings
    keys: dict[str, str] = field(default_factory=dict)

    def headers(self, who: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def submit(self, spec: dict[str, Any], weights: Path | bytes, dataset: Path | bytes | None = None, who: str = "alice",
               weights_name: str = "weights.th", dataset_name: str = "data.zip"):  # type: ignore[no-untyped-def]
        files: dict[str, Any] = {"weights": (weights_name, weights if isinstance(weights, bytes) else weights.read_bytes())}
        if dataset is not None:
            files["dataset"] = (dataset_name, dataset if isinstance(dataset, bytes) else dataset.read_bytes())
        return self.client.post("/v1/jobs", data={"spec": json.dumps(spec)}, files=files, headers=self.headers(who))

    def post_files(self, path: str, spec: dict[str, Any], who: str = "alice", **files: tuple[str, bytes]):  # type: ignore[no-untyped-def]
        """A multipart POST of ``spec`` and any named file parts (``model=("net.onnx", data)``)."""
        return self.client.post(path, data={"spec": json.dumps(spec)}, files=files, headers=self.headers(who))

    @property
    def uploads(self) -> set[Path]:
        d = self.settings.uploads_dir
        return {p for p in d.glob("*") if not p.name.startswith(".")} if d.exists() else set()


def open_api(data_dir: Path, **overrides: Any) -> tuple[TestClient, Settings]:
    settings = Settings(**{"data_dir": data_dir, "run_dispatcher": False, "auth_cache_s": 0, **overrides})
    data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    return TestClient(create_app(settings)), settings
