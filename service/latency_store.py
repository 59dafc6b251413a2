"""Latency lookup-table entries and calibrations in SQL: shared by every job and worker on the same database."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .db.store import JobStore


class SqlLatencyStore:
    def __init__(self, store: JobStore) -> None:
        self.store = store

    def get(self, device: str) -> dict[str, float]:
        return self.store.latency_entries(device)

    def put(self, device: str, entries: Mapping[str, tuple[float, int]]) -> None:
        self.store.put_latency_entries(device, dict(entries))

    def get_calibration(self, device: str, model_key: str) -> dict[str, Any] | None:
        return self.store.latency_calibration(device, model_key)

    def put_calibration(self, device: str, model_key: str, calibration: Mapping[str, Any]) -> None:
        self.store.put_latency_calibration(device, model_key, dict(calibration))
