"""A real prunepilot server in a subprocess (uvicorn + embedded Ray + SQLite), for API tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from prunepilot.service.pgserver import free_port


class Server:
    def __init__(self, data_dir: Path, env_extra: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PRUNEPILOT_DATA_DIR": str(data_dir), "PRUNEPILOT_PORT": str(self.port),
                    "PRUNEPILOT_DISPATCH_INTERVAL_S": "0.3", "PRUNEPILOT_JOB_CPUS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                    **(env_extra or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir / "server.log"

    def cli(self, *args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "prunepilot.service.cli", *args], env=self.env, capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        return r.stdout

    def start(self, timeout: float = 120) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "prunepilot.service.cli", "serve"], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server did not start: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None
