from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys

import optuna
import pytest
from sqlalchemy import inspect

from prunepilot.agents import TrialRecord
from prunepilot.service.db import repo
from prunepilot.service.db.engine import StoreError, dispose_engines, get_engine, session_scope
from prunepilot.service.db.migrate import VERSION_TABLE, current_revision, downgrade, ensure_current, head_revision, upgrade
from prunepilot.service.db.models import Base

OUR_TABLES = {"api_keys", "uploads", "jobs", "job_trials", "artifacts", "latency_entries", "latency_calibrations"}


def tables(url: str) -> set[str]:
    return set(inspect(get_engine(url)).get_table_names())


def test_migrations_upgrade_and_downgrade(db_url: str) -> None:
    assert current_revision(db_url) is None
    with pytest.raises(StoreError, match="not migrated.*prunepilot db upgrade"):
        ensure_current(db_url)
    upgrade(db_url)
    assert OUR_TABLES <= tables(db_url) and VERSION_TABLE in tables(db_url)
    assert current_revision(db_url) == head_revision(db_url)
    ensure_current(db_url)
    downgrade(db_url, "base")
    assert not (OUR_TABLES & tables(db_url))
    upgrade(db_url)
    assert OUR_TABLES <= tables(db_url)


def test_optuna_and_our_migrations_share_one_database(db_url: str) -> None:
    upgrade(db_url)
    storage = optuna.storages.RDBStorage(db_url)  # runs Optuna's own set-up and version check
    study = optuna.create_study(storage=storage, study_name="coexist")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert {"studies", "trials", "alembic_version"} <= tables(db_url)
    # our history lives in its own version table, Optuna's in alembic_version: both stay valid
    upgrade(db_url)
    ensure_current(db_url)
    again = optuna.storages.RDBStorage(db_url)
    assert len(optuna.load_study(study_name="coexist", storage=again).trials) == 2
    # autogenerate sees no difference between our models and our migrations, and never Optuna's tables
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from prunepilot.service.db.migrate import include_object

    with get_engine(db_url).connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"include_object": include_object, "version_table": VERSION_TABLE})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []
    # and downgrading ours leaves Optuna's study intact
    downgrade(db_url, "base")
    assert len(optuna.load_study(study_name="coexist", storage=again).trials) == 2


def _trial(step: int, acc: float = 0.5) -> TrialRecord:
    return TrialRecord(step=step, agent="test", strategy={"a": 0.5},
                       metrics={"accuracy": acc, "macs_ratio": 0.5, "params_ratio": 0.5, "size_ratio": 0.5, "latency_ms": None})


def _make_job(url: str, job_id: str) -> None:
    with session_scope(url) as s:
        repo.create_job(s, job_id=job_id, agent="test", arch="resnet20", dataset="x", problem={}, problem_key="k")


def test_a_stored_calibration_is_replaced_by_the_next_and_kept_apart_per_model_and_device(db_url: str) -> None:
    """Two jobs calibrating one model at once both write; the later write stays, no unique-key error."""
    upgrade(db_url)
    with session_scope(db_url) as s:
        repo.put_latency_calibration(s, device="dev", model_key="m", calibration={"scale": 1.0})
    with session_scope(db_url) as s:
        repo.put_latency_calibration(s, device="dev", model_key="m", calibration={"scale": 2.0})
        repo.put_latency_calibration(s, device="dev", model_key="n", calibration={"scale": 3.0})
    with session_scope(db_url) as s:
        got = [repo.latency_calibration(s, device="dev", model_key=k) for k in ("m", "n")]
        assert got == [{"scale": 2.0}, {"scale": 3.0}]
        assert repo.latency_calibration(s, device="other", model_key="m") is None


def test_trial_steps_are_unique_and_rewrites_are_idempotent(db_url: str) -> None:
    upgrade(db_url)
    _make_job(db_url, "j1")
    with session_scope(db_url) as s:
        assert repo.record_trial(s, job_id="j1", trial=_trial(0, 0.4))
    with session_scope(db_url) as s:
        assert not repo.record_trial(s, job_id="j1", trial=_trial(0, 0.9))  # same step again: ignored
    with session_scope(db_url) as s:
        rows, total = repo.list_trials(s, job_id="j1")
    assert total == 1 and rows[0].accuracy == 0.4


def _writer(url: str, job_id: str, start: int, n: int) -> None:
    from prunepilot.service.db.store import JobStore
    from prunepilot.service.recorder import SqlTrialRecorder

    rec = SqlTrialRecorder(JobStore(url), job_id)
    for step in range(start, start + n):
        rec.record(_trial(step, acc=step / 1000))


def test_two_processes_writing_trials_concurrently_lose_nothing(db_url: str) -> None:
    upgrade(db_url)
    _make_job(db_url, "shared")
    dispose_engines()  # no pooled connections may cross the fork
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(db_url, "shared", k * 100, 100)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with session_scope(db_url) as s:
        rows, total = repo.list_trials(s, job_id="shared")
        job = repo.get_job(s, job_id="shared")
    assert total == 200 and sorted(r.step for r in rows) == list(range(200))
    assert job.best_accuracy == pytest.approx(0.199) and job.best_step == 199 and job.evaluations == 200


def test_a_search_resumed_through_the_sql_recorder_evaluates_each_step_once(db_url: str) -> None:
    """A worker killed mid-search leaves its trials in the database; the retry reads them back and
    goes on. Rows cannot show a step done twice (an insert of a step recorded before is ignored), so
    the recorder's calls and the evaluator's own counter are counted across both runs instead."""
    from helpers.synthetic import SyntheticEvaluator

    from prunepilot.agents import SearchCancelled, SearchContext, SearchLimits, create_agent
    from prunepilot.compression import Pruner, build_model
    from prunepilot.service.db.store import JobStore
    from prunepilot.service.recorder import SqlTrialRecorder

    upgrade(db_url)
    _make_job(db_url, "resumed")
    evaluator = SyntheticEvaluator(Pruner(build_model("resnet20"), "resnet20", 10, 32))
    recorded: list[int] = []

    class CountingRecorder(SqlTrialRecorder):
        def record(self, trial: TrialRecord) -> None:
            recorded.append(trial.step)
            super().record(trial)

    def search(recorder: SqlTrialRecorder) -> None:
        ctx = SearchContext(evaluator, {"flops": 0.5}, SearchLimits(max_evaluations=10), recorder, seed=0, agent="random")
        create_agent("random").search(ctx)

    killed = CountingRecorder(JobStore(db_url), "resumed")
    killed.should_stop = lambda: len(recorded) >= 4  # type: ignore[method-assign]  # the worker dies here
    with pytest.raises(SearchCancelled):
        search(killed)
    assert recorded == [0, 1, 2, 3] and evaluator.evaluations == 4
    search(CountingRecorder(JobStore(db_url), "resumed"))
    assert recorded == list(range(10))  # steps 0-3 came back from the database, not from a second run
    assert evaluator.evaluations == 10
    with session_scope(db_url) as s:
        rows, total = repo.list_trials(s, job_id="resumed")
        assert repo.get_job(s, job_id="resumed").evaluations == 10
    assert total == 10 and [r.step for r in rows] == list(range(10))


def test_cli_db_upgrade(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    r = subprocess.run([sys.executable, "-m", "prunepilot.service.cli", "db", "upgrade"], capture_output=True, text=True,
                       env={"PRUNEPILOT_DATABASE_URL": url, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert current_revision(url) == head_revision(url)
    r = subprocess.run([sys.executable, "-m", "prunepilot.service.cli", "db", "current"], capture_output=True, text=True,
                       env={"PRUNEPILOT_DATABASE_URL": url, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert head_revision(url) in r.stdout
