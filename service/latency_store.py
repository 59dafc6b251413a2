"""Latency lookup-table entries in SQL: shared by every job and worker on the same database."""

from __future__ import annotations

from collections.abc import Mapping

from .db import repo
from .db.engine import session_scope


class SqlLatencyStore:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, device: str) -> dict[str, float]:
        with session_scope(self.url) as s:
            return repo.latency_entries(s, device=device)

    def put(self, device: str, entries: Mapping[str, tuple[float, int]]) -> None:
        with session_scope(self.url) as s:
            repo.put_latency_entries(s, device=device, entries=dict(entries))
