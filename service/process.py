"""A prunepilot service in a child process: for `prunepilot demo`, tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .pgserver import free_port


class ServiceProcess:
    """``prunepilot serve`` in its own process group; ``env`` adds ``PRUNEPILOT_*`` settings."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.env = {**os.environ, "PRUNEPILOT_DATA_DIR": str(data_dir), "PRUNEPILOT_PORT": str(self.port),
                    "PRUNEPILOT_HOST": host, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir / "server.log"

    def cli(self, *args: str, timeout: float = 120) -> str:
        """Run a ``prunepilot`` command with this service's settings; returns its stdout."""
        r = subprocess.run([sys.executable, "-m", "prunepilot.service.cli", *args], env=self.env, capture_output=True,
                           text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(r.stderr.strip() or r.stdout.strip())
        return r.stdout

    def start(self, timeout: float = 180, migrate: bool = True) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "prunepilot.service.cli", "serve"] + ([] if migrate else ["--no-migrate"])
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the service did not start within {timeout:.0f} s: {self.log.read_text()[-2000:]}")

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

    def wait(self) -> None:
        if self.proc is not None:
            self.proc.wait()
