"""A small Python client for the prunepilot HTTP API.

    client = Client("http://127.0.0.1:8000", api_key="pp_...")
    job = client.submit({"arch": "resnet20", "budget": {"constraints": [{"resource": "flops", "ratio": 0.5}]}}, "w.th")
    job = client.wait(job["id"])
    client.download(job["id"], "out/")          # unpacked: model.safetensors, spec.json, report.json
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, detail if isinstance(detail, str) else str(detail))
        return r

    def submit(self, spec: dict[str, Any], weights: str | Path | None, dataset: str | Path | None = None,
               model: str | Path | None = None) -> dict[str, Any]:
        """``model``: an ONNX file (spec arch 'onnx'), sent instead of ``weights``."""
        import json

        files: dict[str, Any] = {}
        if weights is not None:
            files["weights"] = (Path(weights).name, Path(weights).read_bytes())
        if model is not None:
            files["model"] = (Path(model).name, Path(model).read_bytes())
        if dataset is not None:
            files["dataset"] = (Path(dataset).name, Path(dataset).read_bytes())
        return self._check(self.http.post("/v1/jobs", data={"spec": json.dumps(spec)}, files=files)).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}")).json()

    def jobs(self, **filters: Any) -> dict[str, Any]:
        return self._check(self.http.get("/v1/jobs", params={k: v for k, v in filters.items() if v is not None})).json()

    def trials(self, job_id: str, limit: int = 1000, offset: int = 0) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}/trials", params={"limit": limit, "offset": offset})).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.post(f"/v1/jobs/{job_id}/cancel")).json()

    def report(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}/report")).json()

    def wait(self, job_id: str, poll_s: float = 1.0, timeout_s: float | None = None,
             on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        start = time.monotonic()
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(poll_s)

    def download(self, job_id: str, out: str | Path, format: str | None = None) -> Path:  # noqa: A002
        """The pruned model into ``out``: a directory for ``state_dict``, else a file. ``format`` None:
        the server's default for the job (ONNX for an ONNX-sourced job, else ``state_dict``)."""
        r = self._check(self.http.get(f"/v1/jobs/{job_id}/model", params={"format": format} if format else {}))
        out = Path(out)
        if r.headers.get("content-type", "").startswith("application/zip"):
            out.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(io.BytesIO(r.content)) as z:
                for name in z.namelist():
                    if "/" in name or name.startswith(".."):
                        raise ApiError(500, f"unexpected entry {name!r} in the model bundle")
                    (out / name).write_bytes(z.read(name))
            return out
        suffix = format or "onnx"  # the only file format a default download has
        target = out / f"model.{suffix}" if out.is_dir() or not out.suffix else out
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(r.content)
        return target
