"""The ``remote`` latency backend: a device's agent times what a job needs, through SQL.

A job whose latency target names a device builds its latency table and runs its measured check
here: each latency-table entry and each set of networks to compare becomes a measurement task
(ONNX bytes, input shapes, warmup / repeats / rounds) in ``device_tasks``; the device's agent
(:mod:`.device_agent`) leases, times and answers it; this backend waits for the answers. The table's
entries are stored under the device's key (:func:`.devices.table_prefix`), so later jobs reuse them.

An entry task's key names what is timed (the probe's structure and input) and the agent's
fingerprint: a table entry recorded once is never measured again, whether a worker is retried, two
jobs build the same table at once, or an agent dies mid-chunk (its leased tasks go to the next
agent after the lease time). While no agent of the device is connected the job's phase says
``waiting for device NAME``; the job waits (cancel still works), it does not fail.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from prunepilot.agents import SearchCancelled
from prunepilot.compression import PrunePilotError
from prunepilot.compression.backends import Probe, onnx_bytes
from prunepilot.compression.measure import Latency, latency_from_times

from .db import repo
from .db.store import JobStore
from .device_agent import pack_models
from .devices import connected, table_prefix

PhaseHook = Callable[[str | None], None]


class RemoteBackend:
    """Times on device ``device`` through its agent; ``should_stop`` (the job's cancel flag) is polled
    while waiting, ``on_phase`` told what the job waits on (None when it no longer waits)."""

    name = "remote"
    threads: int | None = None  # the agent's own thread count is part of its fingerprint

    def __init__(self, store: JobStore, device: str, lease_s: float, job_id: str | None = None,
                 should_stop: Callable[[], bool] | None = None, on_phase: PhaseHook | None = None, poll_s: float = 0.5) -> None:
        self.store, self.device, self.lease_s, self.job_id = store, device, lease_s, job_id
        self.should_stop = should_stop
        self.on_phase = on_phase
        self.poll_s = poll_s
        self._phase: str | None = None
        self._agent_fp: str | None = None
        with store.read() as s:
            row = repo.get_device(s, name=device)
            if row is None:
                raise PrunePilotError(f"no device {device!r}: declare it with `prunepilot keys create --device {device}`")
            self._device_id = row.id

    # ---------------------------------------------------------------- the protocol

    def fingerprint(self, threads: int, batch_size: int) -> str:
        """The device's table key; waits for the device's first registration."""
        try:
            return f"{table_prefix(self.device, self._registered())}batch={batch_size}"
        finally:
            self._set_phase(None)

    def time_entries(self, probes: Sequence[Probe], warmup: int, repeats: int, rounds: int) -> list[float]:
        fp = self._registered()
        keys = [_entry_key(fp, m, x) for m, x in probes]
        with self.store.read() as s:
            known = repo.device_task_results(s, device_id=self._device_id, keys=keys)
        spec = {"warmup": warmup, "repeats": repeats, "rounds": rounds}
        new, seen = [], set(known)
        for key, (m, x) in zip(keys, probes, strict=True):
            if key not in seen:  # one task per entry, even when a chunk holds the same probe twice
                seen.add(key)
                new.append({"kind": "entry", "key": key, "fingerprint": fp, "job_id": self.job_id,
                            "spec": {**spec, "inputs": [list(x.shape)]}, "payload": pack_models([onnx_bytes(m, x)])})
        self._add(new)
        results = self._wait(keys, "latency-table entries")
        return [float(results[k]["ms"][0]) for k in keys]

    def measure(self, models: Sequence[nn.Module], input_size: int, batch_size: int, threads: int | None,
                warmup: int, repeats: int) -> list[Latency]:
        """The networks as one task, timed interleaved by the agent (a fresh task each call: these
        comparisons hold only within one run)."""
        fp = self._registered()
        x = torch.randn(batch_size, 3, input_size, input_size)
        key = uuid.uuid4().hex
        self._add([{"kind": "network", "key": key, "fingerprint": fp, "job_id": self.job_id,
                    "spec": {"warmup": warmup, "repeats": repeats, "rounds": 1, "inputs": [list(x.shape)] * len(models)},
                    "payload": pack_models([onnx_bytes(m, x) for m in models])}])
        try:
            runs = self._wait([key], "networks")[key]["runs_ms"]
        except BaseException:  # cancelled, failed: the agent need not measure what nobody will read
            with self.store.write() as s:
                repo.drop_open_network_tasks(s, device_id=self._device_id, keys=[key])
            raise
        return [latency_from_times(ts, batch_size, 0) for ts in runs]

    # ---------------------------------------------------------------- waiting

    def _add(self, tasks: list[dict[str, Any]]) -> None:
        if tasks:
            with self.store.write() as s:
                repo.add_device_tasks(s, device_id=self._device_id, tasks=tasks)

    def _registered(self) -> str:
        """The agent's fingerprint, once it is known; waits (saying so) until the device registers."""
        while True:
            with self.store.read() as s:
                row = repo.get_device(s, name=self.device)
                fp = row.fingerprint if row is not None else None
            if fp is not None:
                if self._agent_fp is not None and fp != self._agent_fp:
                    raise PrunePilotError(f"device {self.device!r} registered again as another runtime or machine while the job "
                                          f"measured on it ({self._agent_fp} -> {fp}); submit the job again")
                self._agent_fp = fp
                return fp
            self._set_phase(f"waiting for device {self.device}")
            self._pause()

    def _wait(self, keys: Sequence[str], what: str) -> dict[str, dict[str, Any]]:
        """The results of the tasks ``keys``, once all are in; the job's phase says whether an agent
        is measuring them or none is connected."""
        wanted = list(dict.fromkeys(keys))
        try:
            while True:
                with self.store.read() as s:
                    results = repo.device_task_results(s, device_id=self._device_id, keys=wanted)
                    row = repo.get_device(s, name=self.device)
                    online = row is not None and connected(row, self.lease_s)
                failed = [r["error"] for r in results.values() if r is not None and "error" in r]
                if failed:
                    raise PrunePilotError(f"device {self.device!r} could not time the {what}: {failed[0]}")
                done = {k: r for k, r in results.items() if r is not None}
                if len(done) == len(wanted):
                    return done
                if len(results) < len(wanted):  # a task vanished: the device was deleted
                    raise PrunePilotError(f"device {self.device!r} lost its measurement tasks")
                self._registered()  # the same agent fingerprint still
                self._set_phase(f"measuring {what} on device {self.device} ({len(done)}/{len(wanted)})" if online
                                else f"waiting for device {self.device}")
                self._pause()
        finally:
            self._set_phase(None)

    def _pause(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise SearchCancelled(f"cancelled while waiting for device {self.device}")
        time.sleep(self.poll_s)

    def _set_phase(self, phase: str | None) -> None:
        if phase != self._phase:
            self._phase = phase
            if self.on_phase is not None:
                self.on_phase(phase)


def _entry_key(fingerprint: str, module: nn.Module, x: torch.Tensor) -> str:
    """What one entry measures: the probe's structure (its modules and their settings: the weights do
    not change the time), its input shape, and the agent that times it."""
    return hashlib.sha256(f"{fingerprint}|{module!r}|{tuple(x.shape)}".encode()).hexdigest()
