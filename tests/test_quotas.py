"""Quotas (issue 23, "No quotas"): a per-key limit on active jobs, answered 429 before anything is
stored, and the retention sweep that removes the files of long-failed and long-cancelled jobs
(state, artifacts, uploads no other job needs, their decoded caches) while their rows stay."""

from __future__ import annotations

import hashlib
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from inproc import InProcessApi, open_api

from prunepilot.service import retention
from prunepilot.service.auth import create_key
from prunepilot.service.db import repo
from prunepilot.service.db.engine import dispose_engines, read_scope, session_scope
from prunepilot.service.db.lifecycle import JobStatus
from prunepilot.service.db.migrate import upgrade
from prunepilot.service.db.models import DeviceTask, Job, utcnow
from prunepilot.service.settings import Settings

SPEC = {"arch": "resnet20", "dataset": "cifar10-jpeg", "agent": "random",
        "budget": {"constraints": [{"resource": "flops", "ratio": 0.5}]}, "search": {"max_evaluations": 3}}


# ------------------------------------------------------------------ per-key active-job limit


@pytest.fixture()
def limited_api(tmp_path: Path):
    client, settings = open_api(tmp_path / "api", max_active_jobs_per_key=2)
    with client:
        yield InProcessApi(client, settings, {name: create_key(settings.db_url, name)[1] for name in ("alice", "bob")})
    dispose_engines()


def test_a_key_at_its_active_job_limit_gets_429_until_one_ends(limited_api: InProcessApi, resnet20_weights: Path) -> None:
    api = limited_api
    first = api.submit(SPEC, resnet20_weights)
    second = api.submit(SPEC, resnet20_weights)
    assert (first.status_code, second.status_code) == (202, 202), (first.text, second.text)
    with read_scope(api.settings.db_url) as s:
        jobs_before = len(s.query(Job).all())
    uploads_before = api.uploads

    third = api.submit(SPEC, resnet20_weights)
    assert third.status_code == 429, third.text
    detail = third.json()["detail"]
    assert "2" in detail and "PRUNEPILOT_MAX_ACTIVE_JOBS_PER_KEY" in detail, detail
    with read_scope(api.settings.db_url) as s:
        assert len(s.query(Job).all()) == jobs_before  # nothing created
    assert api.uploads == uploads_before
    assert not list(api.settings.uploads_dir.glob(".incoming-*"))  # nothing staged either

    # another key is unaffected
    assert api.submit(SPEC, resnet20_weights, who="bob").status_code == 202

    # once one of alice's jobs has ended, she may submit again
    cancel = api.client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=api.headers())
    assert cancel.status_code == 202, cancel.text
    assert api.submit(SPEC, resnet20_weights).status_code == 202
    assert api.submit(SPEC, resnet20_weights).status_code == 429


def test_429_is_documented_on_the_submit_route(limited_api: InProcessApi) -> None:
    op = limited_api.client.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]
    assert "429" in op["responses"]
    assert "ErrorBody" in str(op["responses"]["429"])


def test_the_limit_can_be_switched_off() -> None:
    assert Settings().max_active_jobs_per_key == 50
    assert Settings(max_active_jobs_per_key=None).max_active_jobs_per_key is None
    assert Settings(max_active_jobs_per_key="none").max_active_jobs_per_key is None  # as from PRUNEPILOT_...=none
    assert Settings(failed_job_retention_days="").failed_job_retention_days is None


# ------------------------------------------------------------------ retention of failed jobs' files


@pytest.fixture()
def rsettings(tmp_path: Path, db_url: str) -> Settings:
    """SQLite and PostgreSQL: the sweep's queries read paths out of the job's JSON problem."""
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, run_dispatcher=False, failed_job_retention_days=7)
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.db_url)
    return settings


def upload(settings: Settings, name: str, suffix: str) -> Path:
    """A content-addressed upload as the API publishes it: uploads_dir/<sha256><suffix>."""
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    path = settings.uploads_dir / f"{hashlib.sha256(name.encode()).hexdigest()}{suffix}"
    path.write_bytes(name.encode())
    return path


def cache_of(settings: Settings, dataset: Path) -> Path:
    """A decoded-data cache as compression/data.py names it: <zip stem>-<16 hex>.pt."""
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    path = settings.cache_dir / f"{dataset.stem}-0123456789abcdef.pt"
    path.write_bytes(b"cache")
    return path


def job(settings: Settings, status: JobStatus, weights: Path, dataset: Path | str = "cifar10-jpeg",
        ended_days_ago: float | None = None) -> str:
    """A job row as the API writes it, moved to ``status`` through the lifecycle, with its state and artifact dirs."""
    job_id = uuid.uuid4().hex
    with session_scope(settings.db_url) as s:
        repo.create_job(s, job_id=job_id, agent="random", arch="resnet20", dataset="upload:x", problem_key="0" * 16,
                        problem={"spec": SPEC, "weights_path": str(weights), "dataset_path": str(dataset)})
        ended = {"finished_at": utcnow() - timedelta(days=ended_days_ago)} if ended_days_ago is not None else {}
        if status is JobStatus.SUCCEEDED:
            assert repo.move_job(s, job_id=job_id, to=JobStatus.RUNNING, allowed_from=frozenset({JobStatus.QUEUED}))
            assert repo.move_job(s, job_id=job_id, to=status, allowed_from=frozenset({JobStatus.RUNNING}), **ended)
        elif status is not JobStatus.QUEUED:
            assert repo.move_job(s, job_id=job_id, to=status, allowed_from=frozenset({JobStatus.QUEUED}), error="x", **ended)
    for d in (settings.data_dir / "jobs" / job_id / "state", settings.artifacts_dir / job_id / "model"):
        d.mkdir(parents=True)
        (d / "file").write_bytes(b"x")
    return job_id


def test_old_failed_and_cancelled_jobs_lose_their_files_recent_ones_keep_them(rsettings: Settings) -> None:
    s = rsettings
    old_w, old_d = upload(s, "w-old", ".pt"), upload(s, "d-old", ".zip")
    old_cache = cache_of(s, old_d)
    old_failed = job(s, JobStatus.FAILED, old_w, old_d, ended_days_ago=10)
    gone_w = upload(s, "w-cancelled", ".safetensors")
    old_cancelled = job(s, JobStatus.CANCELLED, gone_w, ended_days_ago=8)
    new_w, new_d = upload(s, "w-new", ".pt"), upload(s, "d-new", ".zip")
    new_cache = cache_of(s, new_d)
    recent = job(s, JobStatus.FAILED, new_w, new_d, ended_days_ago=6)

    result = retention.sweep(s, upload_grace_s=0)

    for job_id in (old_failed, old_cancelled):
        assert not (s.data_dir / "jobs" / job_id).exists()
        assert not (s.artifacts_dir / job_id).exists()
    assert not old_w.exists() and not old_d.exists() and not gone_w.exists() and not old_cache.exists()
    assert result.jobs == {old_failed, old_cancelled} and result.removed == 8 and result.bytes > 0 and not result.errors

    assert (s.data_dir / "jobs" / recent).is_dir() and (s.artifacts_dir / recent).is_dir()
    assert new_w.exists() and new_d.exists() and new_cache.exists()

    with read_scope(s.db_url) as sess:  # the rows stay: users still see what happened
        rows = {j.id: j.status for j in sess.query(Job).all()}
    assert rows == {old_failed: "failed", old_cancelled: "cancelled", recent: "failed"}

    again = retention.sweep(s, upload_grace_s=0)  # idempotent: nothing left to remove, no error
    assert (again.jobs, again.removed, again.bytes, again.errors) == (set(), 0, 0, 0)


def test_uploads_another_job_still_needs_are_kept(rsettings: Settings) -> None:
    s = rsettings
    shared_w = upload(s, "w-shared", ".pt")
    shared_d = upload(s, "d-shared", ".zip")
    cache = cache_of(s, shared_d)
    old = job(s, JobStatus.FAILED, shared_w, shared_d, ended_days_ago=30)
    job(s, JobStatus.SUCCEEDED, shared_w, ended_days_ago=30)  # a succeeded job keeps its uploads however old
    job(s, JobStatus.QUEUED, upload(s, "w-other", ".pt"), shared_d)  # an active one too

    retention.sweep(s, upload_grace_s=0)

    assert not (s.data_dir / "jobs" / old).exists()  # the swept job's own files go
    assert shared_w.exists() and shared_d.exists() and cache.exists()


def test_a_just_published_upload_is_spared_and_retention_can_be_off(rsettings: Settings) -> None:
    s = rsettings
    w = upload(s, "w-fresh", ".pt")  # (re)published a moment ago, maybe for a job not yet committed
    old = job(s, JobStatus.FAILED, w, ended_days_ago=10)
    off = retention.sweep(s.model_copy(update={"failed_job_retention_days": None}), upload_grace_s=0)
    assert (off.jobs, off.removed) == (set(), 0) and (s.data_dir / "jobs" / old).exists()

    retention.sweep(s)  # the default grace
    assert w.exists()
    assert not (s.data_dir / "jobs" / old).exists()


def test_publishing_kept_content_renews_its_ctime_not_its_mtime(tmp_path: Path) -> None:
    """What the sweep's grace relies on; the mtime is part of a decoded cache's key, so it must not move."""
    import os
    import time

    from prunepilot.service.uploads import StoredUpload, publish

    final = tmp_path / f"{hashlib.sha256(b'x').hexdigest()}.zip"
    final.write_bytes(b"x")
    os.utime(final, ns=(1_000_000_000, 1_000_000_000))  # published long ago
    before = final.stat()
    time.sleep(0.05)  # past the file system's timestamp granularity
    staged = tmp_path / ".incoming-1.zip"
    staged.write_bytes(b"x")
    publish(StoredUpload("x", staged, 1, "data.zip", final))
    after = final.stat()
    assert after.st_mtime_ns == before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns
    assert not staged.exists()

    final.unlink()  # swept meanwhile: the staged copy becomes the content
    staged.write_bytes(b"x")
    publish(StoredUpload("x", staged, 1, "data.zip", final))
    assert final.read_bytes() == b"x" and not staged.exists()


def test_gc_command_prints_one_line(rsettings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from prunepilot.service import cli
    from prunepilot.service.settings import get_settings

    job(rsettings, JobStatus.FAILED, upload(rsettings, "w-cli", ".pt"), ended_days_ago=10)
    monkeypatch.setenv("PRUNEPILOT_DATA_DIR", str(rsettings.data_dir))
    monkeypatch.setenv("PRUNEPILOT_DATABASE_URL", rsettings.db_url)
    get_settings.cache_clear()
    try:
        r = CliRunner().invoke(cli.app, ["gc"])
    finally:
        get_settings.cache_clear()
    assert r.exit_code == 0, r.output
    assert len(r.output.strip().splitlines()) == 1 and "1 job" in r.output, r.output
    assert not (rsettings.data_dir / "jobs").exists() or not any((rsettings.data_dir / "jobs").iterdir())


def test_the_dispatcher_sweeps_now_and_then_and_survives_a_failing_sweep(rsettings: Settings,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from prunepilot.service.dispatcher import Dispatcher

    calls: list[float] = []

    def failing(settings: Settings, **_: object) -> retention.SweepResult:
        calls.append(1.0)
        raise OSError("disk gone")

    monkeypatch.setattr(retention, "sweep", failing)
    d = Dispatcher(rsettings)
    d.sweep_files(now=1000.0)  # due at the first tick; the error is logged, not raised
    d.sweep_files(now=1000.0 + retention.SWEEP_INTERVAL_S / 2)  # not due yet
    d.sweep_files(now=1000.0 + retention.SWEEP_INTERVAL_S + 1)
    assert len(calls) == 2


def test_old_device_network_measurements_are_swept_entries_and_recent_ones_stay(rsettings: Settings) -> None:
    """Whole networks a device timed for a job were read once by it: after the retention they go;
    entry measurements (how the device's table knows an entry was measured) and recent ones stay."""
    s = rsettings
    with session_scope(s.db_url) as sess:
        device = repo.ensure_device(sess, name="board")
        rows = [{"kind": kind, "key": f"{kind}-{age}", "fingerprint": "fp", "job_id": None, "spec": {}, "payload": b"zip"}
                for kind in ("network", "entry") for age in ("old", "new", "open")]
        repo.add_device_tasks(sess, device_id=device.id, tasks=rows)
        for task in sess.query(DeviceTask).all():
            if not task.key.endswith("open"):
                task.finished_at = utcnow() - timedelta(days=10 if task.key.endswith("old") else 1)
    result = retention.sweep(s, upload_grace_s=0)
    assert result.network_tasks == 1 and "1 device network measurements" in result.summary()
    with read_scope(s.db_url) as sess:
        assert sorted(t.key for t in sess.query(DeviceTask).all()) == ["entry-new", "entry-old", "entry-open", "network-new", "network-open"]
    assert retention.sweep(s, upload_grace_s=0).network_tasks == 0
