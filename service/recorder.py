"""The SQL trial recorder: agents write trials through it; the job row follows progress and best."""

from __future__ import annotations

import time

from prunepilot.agents import TrialRecord

from .db.store import JobStore


class SqlTrialRecorder:
    def __init__(self, store: JobStore, job_id: str, max_evaluations: int | None = None, cancel_poll_s: float = 0.5) -> None:
        self.store = store
        self.job_id = job_id
        self.max_evaluations = max_evaluations
        self.cancel_poll_s = cancel_poll_s
        self._last_poll = 0.0
        self._cancelled = False

    def record(self, trial: TrialRecord) -> None:
        self.store.record_trial(self.job_id, trial, self.max_evaluations)

    def existing(self) -> list[TrialRecord]:
        return self.store.trials(self.job_id)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._last_poll >= self.cancel_poll_s:
            self._last_poll = now
            # a job that is gone stops the search too
            self._cancelled = self.store.status(self.job_id) is None or self.store.cancel_requested(self.job_id)
        return self._cancelled
