"""The SQL trial recorder: agents write trials through it; the job row follows progress and best."""

from __future__ import annotations

import time

from sqlalchemy import or_, update

from prunepilot.agents import TrialRecord

from .db import repo
from .db.engine import session_scope
from .db.models import Job, utcnow


class SqlTrialRecorder:
    def __init__(self, url: str, job_id: str, max_evaluations: int | None = None, cancel_poll_s: float = 0.5) -> None:
        self.url = url
        self.job_id = job_id
        self.max_evaluations = max_evaluations
        self.cancel_poll_s = cancel_poll_s
        self._last_poll = 0.0
        self._cancelled = False

    def record(self, trial: TrialRecord) -> None:
        with session_scope(self.url) as s:
            repo.record_trial(s, job_id=self.job_id, trial=trial)
            count = trial.step + 1
            values = {"evaluations": count, "heartbeat_at": utcnow(), "updated_at": utcnow()}
            if self.max_evaluations:
                values["progress"] = min(1.0, count / self.max_evaluations)
            s.execute(update(Job).where(Job.id == self.job_id, Job.evaluations < count).values(**values))
            if trial.feasible and trial.kind != "sensitivity":
                # Conditional update: concurrent writers can only ever raise the best.
                s.execute(update(Job).where(Job.id == self.job_id,
                                            or_(Job.best_accuracy.is_(None), Job.best_accuracy < trial.accuracy))
                          .values(best_accuracy=trial.accuracy, best_step=trial.step, best_metrics=trial.metrics))

    def existing(self) -> list[TrialRecord]:
        with session_scope(self.url) as s:
            return repo.trial_records(s, job_id=self.job_id)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._last_poll >= self.cancel_poll_s:
            self._last_poll = now
            with session_scope(self.url) as s:
                job = repo.get_job(s, job_id=self.job_id)
                self._cancelled = job is None or job.cancel_requested
        return self._cancelled
