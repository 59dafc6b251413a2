"""The job state machine on a real database (SQLite and PostgreSQL): every move is a conditional
update, so of two processes acting on one job at once exactly one wins."""

from __future__ import annotations

import pytest

from prunepilot.service.db import repo
from prunepilot.service.db.lifecycle import TERMINAL, TRANSITIONS, IllegalTransition, JobStatus, sources
from prunepilot.service.db.migrate import upgrade
from prunepilot.service.db.store import JobStore

Q, R, F, OK, FAIL, C = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.FINETUNING, JobStatus.SUCCEEDED, JobStatus.FAILED,
                        JobStatus.CANCELLED)


@pytest.fixture()
def store(db_url: str) -> JobStore:
    upgrade(db_url)
    return JobStore(db_url)


def new_job(store: JobStore, job_id: str = "j" * 32) -> str:
    with store.write() as s:
        repo.create_job(s, job_id=job_id, agent="uniform", arch="resnet20", dataset="d", problem={}, problem_key="k")
    return job_id


def attempts(store: JobStore, job_id: str) -> int:
    with store.read() as s:
        job = repo.get_job(s, job_id=job_id)
        assert job is not None
        return job.attempts


def test_the_machine_has_no_way_out_of_an_ended_job() -> None:
    for end in TERMINAL:
        assert not TRANSITIONS[end]
        for target in JobStatus:
            assert end not in sources(target)
    with pytest.raises(IllegalTransition, match="from succeeded to running"):
        sources(R, frozenset({OK}))


def test_only_one_worker_claims_a_job(store: JobStore) -> None:
    job = new_job(store)
    assert store.claim(job, "w1") is not None
    assert store.claim(job, "w2") is None
    assert store.status(job) is R and attempts(store, job) == 1


def test_a_worker_that_lost_its_job_cannot_end_it(store: JobStore) -> None:
    """w1 is given up on (stale heartbeat) and the job re-queued and claimed by w2; w1's late
    'failed' must not overwrite w2's run."""
    job = new_job(store)
    store.claim(job, "w1")
    assert store.requeue_or_fail(job, "worker lost", max_attempts=3) is Q
    store.claim(job, "w2")
    assert not store.finish(job, "w1", FAIL, error="late")
    assert store.status(job) is R
    assert store.finish(job, "w2", OK)
    assert store.status(job) is OK


def test_cancel_and_finish_race_one_winner(store: JobStore) -> None:
    job = new_job(store)
    store.claim(job, "w1")
    assert store.request_cancel(job) is R  # flagged for the worker
    assert store.finish(job, "w1", OK)  # the worker got there first: the result stands
    assert store.request_cancel(job) is None  # nothing left to cancel (the API answers 409)
    assert store.status(job) is OK


def test_a_queued_job_is_cancelled_at_once_and_never_claimed(store: JobStore) -> None:
    job = new_job(store)
    assert store.request_cancel(job) is C
    assert store.claim(job, "w1") is None and store.status(job) is C


def test_a_lost_worker_uses_an_attempt_until_none_are_left(store: JobStore) -> None:
    job = new_job(store)
    store.claim(job, "w1")
    assert store.requeue_or_fail(job, "worker lost", max_attempts=2) is Q
    store.claim(job, "w2")
    assert store.requeue_or_fail(job, "worker lost", max_attempts=2) is FAIL
    with store.read() as s:
        ended = repo.get_job(s, job_id=job)
        assert ended is not None and ended.error == "worker lost; gave up after 2 attempts"
    assert store.requeue_or_fail(job, "worker lost", max_attempts=2) is None  # ended jobs stay ended


def test_a_shutdown_does_not_use_up_attempts(store: JobStore) -> None:
    job = new_job(store)
    for i in range(5):  # five graceful restarts with max 3 attempts
        assert store.claim(job, f"w{i}") is not None
        assert store.requeue_or_fail(job, "interrupted by a shutdown", max_attempts=3, refund=True) is Q
        assert attempts(store, job) == 0
    store.claim(job, "last")
    assert store.finish(job, "last", OK) and attempts(store, job) == 1


def test_a_cancelled_job_whose_worker_died_ends_cancelled(store: JobStore) -> None:
    job = new_job(store)
    store.claim(job, "w1")
    store.request_cancel(job)
    assert store.requeue_or_fail(job, "worker lost", max_attempts=3) is C


def test_fine_tuning_starts_only_for_the_holder(store: JobStore) -> None:
    job = new_job(store)
    store.claim(job, "w1")
    assert not store.start_finetune(job, "w2")
    assert store.start_finetune(job, "w1") and store.status(job) is F
    assert store.finish(job, "w1", OK)


def test_progress_updates_cannot_change_the_status(store: JobStore) -> None:
    job = new_job(store)
    with pytest.raises(ValueError, match="only through move_job"):
        store.progress(job, status="succeeded")
