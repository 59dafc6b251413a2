"""JobStore: one database (its engine is ``get_engine(url)``'s, one pool per process) and the
operations on it that jobs and workers need: the job lifecycle, trials, latency-table entries.
Callers hold a store instead of threading a URL through; every status change is one of these
methods, each a conditional update in ``repo`` (see ``lifecycle``); SQL lives only in ``repo``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from prunepilot.agents import TrialRecord

from . import repo
from .engine import read_scope, session_scope
from .lifecycle import JobStatus
from .models import Job, utcnow


class JobStore:
    def __init__(self, url: str) -> None:
        self.url = url

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        with session_scope(self.url) as s:
            yield s

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with read_scope(self.url) as s:
            yield s

    # ------------------------------------------------------------------ worker side

    def claim(self, job_id: str, worker_id: str) -> Job | None:
        """The job, now running for ``worker_id``; None if it was not queued (or cancel was asked)."""
        with self.write() as s:
            if not repo.claim_job(s, job_id=job_id, worker_id=worker_id):
                return None
            return repo.get_job(s, job_id=job_id)

    def start_finetune(self, job_id: str, worker_id: str) -> bool:
        with self.write() as s:
            return repo.move_job(s, job_id=job_id, to=JobStatus.FINETUNING, allowed_from=frozenset({JobStatus.RUNNING}),
                                 extra_where=[Job.worker_id == worker_id], finetune_started_at=utcnow(), progress=1.0)

    def finish(self, job_id: str, worker_id: str, status: JobStatus, **values: Any) -> bool:
        with self.write() as s:
            return repo.finish_job(s, job_id=job_id, status=status, worker_id=worker_id, **values)

    def progress(self, job_id: str, **values: Any) -> None:
        with self.write() as s:
            repo.update_job_progress(s, job_id=job_id, **values)

    def heartbeat(self, job_id: str) -> None:
        self.progress(job_id, heartbeat_at=utcnow())

    def cancel_requested(self, job_id: str) -> bool:
        with self.read() as s:
            return repo.cancel_requested(s, job_id=job_id)

    def status(self, job_id: str) -> JobStatus | None:
        with self.read() as s:
            job = repo.get_job(s, job_id=job_id)
            return JobStatus(job.status) if job is not None else None

    # ------------------------------------------------------------------ trials (the worker's recorder)

    def record_trial(self, job_id: str, trial: TrialRecord, max_evaluations: int | None) -> None:
        """The trial, and the job row following it (count, progress, best), in one transaction."""
        with self.write() as s:
            repo.record_trial(s, job_id=job_id, trial=trial)
            repo.note_trial(s, job_id=job_id, trial=trial, max_evaluations=max_evaluations)

    def trials(self, job_id: str) -> list[TrialRecord]:
        with self.read() as s:
            return repo.trial_records(s, job_id=job_id)

    # ------------------------------------------------------------------ latency-table entries (shared by every job)

    def latency_entries(self, device: str) -> dict[str, float]:
        with self.read() as s:
            return repo.latency_entries(s, device=device)

    def put_latency_entries(self, device: str, entries: dict[str, tuple[float, int]]) -> None:
        with self.write() as s:
            repo.put_latency_entries(s, device=device, entries=entries)

    def latency_calibration(self, device: str, model_key: str) -> dict[str, Any] | None:
        with self.read() as s:
            return repo.latency_calibration(s, device=device, model_key=model_key)

    def put_latency_calibration(self, device: str, model_key: str, calibration: dict[str, Any]) -> None:
        with self.write() as s:
            repo.put_latency_calibration(s, device=device, model_key=model_key, calibration=calibration)

    # ------------------------------------------------------------------ dispatcher side

    def active(self) -> list[tuple[str, JobStatus, datetime | None, bool]]:
        with self.read() as s:
            return repo.active_jobs(s)

    def requeue_or_fail(self, job_id: str, reason: str, max_attempts: int, refund: bool = False) -> JobStatus | None:
        with self.write() as s:
            return repo.requeue_or_fail(s, job_id=job_id, reason=reason, max_attempts=max_attempts, refund=refund)

    # ------------------------------------------------------------------ API side

    def request_cancel(self, job_id: str) -> JobStatus | None:
        with self.write() as s:
            return repo.request_cancel(s, job_id=job_id)
