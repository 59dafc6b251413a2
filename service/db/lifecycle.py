"""A job's status as a state machine: the states, the allowed moves, and the one guarded point
where a move happens (``repo.move_job``, a conditional UPDATE that names the states it may leave).

Two processes may act on one job at once (the API cancels while the worker finishes, a dispatcher
re-queues while a late worker writes its result). A read-then-write lets the later writer undo
the earlier one; a conditional update lets exactly one of them win and tells the other it lost.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINETUNING = "finetuning"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL: frozenset[JobStatus] = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE: frozenset[JobStatus] = frozenset({JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.FINETUNING})
IN_WORKER: frozenset[JobStatus] = frozenset({JobStatus.RUNNING, JobStatus.FINETUNING})

# Where each state may go. Back to queued from a worker's states: a retry after a lost worker, or a
# job handed back at shutdown. Nothing leaves a terminal state.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset({JobStatus.FINETUNING, JobStatus.QUEUED} | TERMINAL),
    JobStatus.FINETUNING: frozenset({JobStatus.QUEUED} | TERMINAL),
    **{s: frozenset() for s in TERMINAL},
}


class IllegalTransition(ValueError):
    """A programming error: code asked for a move the state machine does not have."""


def sources(to: JobStatus, allowed_from: frozenset[JobStatus] | None = None) -> frozenset[JobStatus]:
    """The states a job may be in for a move to ``to``, narrowed to ``allowed_from`` by the caller."""
    legal = frozenset(s for s, targets in TRANSITIONS.items() if to in targets)
    if allowed_from is None:
        return legal
    illegal = allowed_from - legal
    if illegal:
        raise IllegalTransition(f"a job cannot move from {', '.join(sorted(illegal))} to {to}")
    return allowed_from
