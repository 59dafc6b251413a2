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


from prunepilot.service.auth import create_key
from prunepilot.service.db import repo
from prunepilot.service.db.engine import dispose_engines, read_scope, session_scope
from prunepilot.service.db.lifecycle import JobStatus
from prunepilot.service.db.migrate import upgrade
from prunepilot.service.db.models import Job, utcnow
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


