"""A small CNN for jobs measured on a device, and `prunepilot device-agent` as a process (tests only)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Tiny(nn.Module):
    """Three convs with a small channel grid (79 latency-table entries), pooling, a classifier. The
    first is 32 wide: ONNX Runtime on AVX-512 pads output channels to blocks of 16, so a net of
    16-wide convs barely speeds up when pruned (its floor measured 0.92 of dense here), while
    pruning the first to 16 or fewer saves a whole block at full resolution."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(3, 32, 1), block(32, 16, 2), block(16, 16, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class AgentProcess:
    """`prunepilot device-agent` in its own process (the key in its environment, as docs/deploy.md
    advises); its counters file and its log: one line per set of tasks it timed, one per result the
    service recorded."""

    def __init__(self, url: str, key: str, name: str, workdir: Path, max_tasks: int = 16) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.counters, self.log = workdir / "counters.json", workdir / "agent.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prunepilot.service.device_agent", "--server", url, "--name", name, "--backend", "onnxruntime",
                 "--max-tasks", str(max_tasks), "--wait", "1", "--threads", "1", "--counters", str(self.counters), "-v"],
                env={**os.environ, "PRUNEPILOT_DEVICE_KEY": key}, stdout=log, stderr=subprocess.STDOUT)

    def state(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.counters.read_text()))
        except (OSError, ValueError):
            return {}

    def count(self, name: str) -> int:
        return int(self.state().get(name, 0))

    def timed(self) -> set[int]:
        """Ids of every task this agent timed (whether or not the service kept the result)."""
        ids: set[int] = set()
        for m in re.finditer(r"timed tasks ([\d,]+) \(", self.log.read_text()):
            ids |= {int(i) for i in m.group(1).split(",")}
        return ids

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(30)
