"""Submission hardening (issue 23), in-process: shared uploads survive rejections, and malformed specs,
weights and identifiers are refused with a 422 naming what is wrong instead of failing late."""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_mini_zip

from prunepilot.compression import read_state_dict
from prunepilot.service import jobs as jobs_module
from prunepilot.service.db.engine import StoreError, read_scope
from prunepilot.service.db.models import Job
from prunepilot.service.jobs import JobService, UploadedFile
from prunepilot.service.schemas import JobCreate

INFEASIBLE = {"constraints": [{"resource": "flops", "ratio": 0.05}]}


def spec(**over) -> dict:
    s = {"arch": "resnet20", "dataset": "upload", "agent": "random",
         "budget": {"constraints": [{"resource": "flops", "ratio": 0.5}]},
         "search": {"max_evaluations": 3}, "finetune": {"epochs": 0.0}, "measure": {"latency_batches": [1]}}
    s.update(over)
    return s


@pytest.fixture(scope="module")
def tiny_zip(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 training and 2 test images per class: submission only checks the archive, it decodes nothing."""
    return make_mini_zip(shared_dir / "cifar10-jpeg.zip", tmp_path_factory.mktemp("data") / "tiny.zip", 3, 2)


@pytest.fixture(scope="module")
def state(resnet20_weights: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(resnet20_weights)


def saved(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def job_files(api, job_id: str) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    with read_scope(api.settings.db_url) as s:
        problem = s.get(Job, job_id).problem
    return Path(problem["weights_path"]), Path(problem["dataset_path"])


# ------------------------------------------------------------------ shared uploads


def test_rejected_submission_keeps_another_users_upload(api, resnet20_weights: Path, tiny_zip: Path) -> None:
    r = api.submit(spec(), resnet20_weights, tiny_zip, who="alice")
    assert r.status_code == 202, r.text
    weights, data = job_files(api, r.json()["id"])
    r = api.submit(spec(budget=INFEASIBLE), resnet20_weights, tiny_zip, who="bob")
    assert r.status_code == 422 and "infeasible" in r.json()["detail"]
    assert weights.is_file() and data.is_file()
    assert api.uploads == {weights, data}


def test_rejection_racing_an_accepted_job_on_the_same_content_keeps_it(api, resnet20_weights: Path, tiny_zip: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Bob's request stores the content first; Alice's job on the same bytes is accepted while Bob's request is
    still checking its budget; then Bob's is rejected. Its cleanup must not take Alice's files."""
    check_budget = jobs_module.check_budget
    accepted: list[str] = []

    def alice_submits_meanwhile(spec_: JobCreate, *args: Any) -> dict[str, float]:
        if not accepted:
            accepted.append("")  # before the nested submit, which checks its budget through this hook too
            with resnet20_weights.open("rb") as w, tiny_zip.open("rb") as d:
                job = JobService(api.settings).submit(None, JobCreate.model_validate(spec()), UploadedFile(w, "w.th"),
                                                      UploadedFile(d, "d.zip"))
            accepted[0] = job.id
        return check_budget(spec_, *args)

    monkeypatch.setattr(jobs_module, "check_budget", alice_submits_meanwhile)
    r = api.submit(spec(budget=INFEASIBLE), resnet20_weights, tiny_zip, who="bob")
    assert r.status_code == 422 and "infeasible" in r.json()["detail"]
    weights, data = job_files(api, accepted[0])
    assert weights.is_file(), "the rejected request deleted the accepted job's weights"
    assert data.is_file(), "the rejected request deleted the accepted job's dataset"
    assert api.uploads == {weights, data}
    assert not list(api.settings.uploads_dir.glob(".incoming-*"))


def test_rejected_upload_leaves_nothing_behind(api, resnet20_weights: Path, tiny_zip: Path) -> None:
    r = api.submit(spec(budget=INFEASIBLE), resnet20_weights, tiny_zip)
    assert r.status_code == 422
    assert not any(api.settings.uploads_dir.iterdir())


def test_crash_during_validation_leaves_nothing_behind(api, resnet20_weights: Path, tiny_zip: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*_a, **_k):  # type: ignore[no-untyped-def]
        raise RuntimeError("validator bug")

    monkeypatch.setattr(jobs_module, "validate_dataset_zip", crash)
    with pytest.raises(RuntimeError, match="validator bug"):  # TestClient re-raises what became a 500
        api.submit(spec(), resnet20_weights, tiny_zip)
    assert not any(api.settings.uploads_dir.iterdir())


def test_upload_file_names_are_kept_as_short_printable_labels(api, resnet20_weights: Path, tiny_zip: Path) -> None:
    from prunepilot.service.db.models import Upload

    r = api.submit(spec(), resnet20_weights, tiny_zip, weights_name="w\x07" + "x" * 600 + ".th")
    assert r.status_code == 202, r.text
    with read_scope(api.settings.db_url) as s:
        names = [u.filename for u in s.query(Upload).all()]
    assert len(names) == 2 and all(n.isprintable() and len(n) <= 255 for n in names), names


def test_safetensors_upload_is_published_as_safetensors(api, state: dict[str, torch.Tensor], tiny_zip: Path) -> None:
    from safetensors.torch import save

    r = api.submit(spec(), save(state), tiny_zip, weights_name="w.safetensors")
    assert r.status_code == 202, r.text
    weights, data = job_files(api, r.json()["id"])
    assert weights.suffix == ".safetensors" and weights.is_file() and data.suffix == ".zip"


# ------------------------------------------------------------------ spec values


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("raw", [
    '{"arch": ' + nested(100_000) + "}",  # deeper than the parser's recursion limit
    json.dumps(spec(agent_options={"x": json.loads(nested(200))})),  # parses, but no spec is that deep
], ids=["recursion", "deep"])
def test_deeply_nested_spec_is_422(api, resnet20_weights: Path, raw: str) -> None:
    r = api.client.post("/v1/jobs", data={"spec": raw}, files={"weights": ("w.th", resnet20_weights.read_bytes())},
                        headers=api.headers())
    assert r.status_code == 422, r.text
    assert "nested" in r.json()["detail"]


@pytest.mark.parametrize(("over", "field"), [
    ({"budget": {"constraints": [{"resource": "flops", "ratio": math.nan}]}}, "budget.constraints.0.ratio"),
    ({"budget": {"constraints": [{"resource": "latency", "value": math.nan}]}}, "budget.constraints.0.value"),
    ({"budget": {"constraints": [{"resource": "latency", "value": math.inf}]}}, "budget.constraints.0.value"),
    ({"budget": {"constraints": [{"resource": "size", "value": "nan"}]}}, "budget.constraints.0.value"),
    ({"budget": {"constraints": [{"resource": "flops", "ratio": 0.5, "tolerance": math.nan}]}}, "budget.constraints.0.tolerance"),
    ({"search": {"max_seconds": math.inf}}, "search.max_seconds"),
    ({"finetune": {"lr": math.nan}}, "finetune.lr"),
    ({"seed": 2**32}, "seed"),
    ({"seed": 2**70}, "seed"),
    ({"measure": {"latency_batches": [0]}}, "measure.latency_batches.0"),
    ({"measure": {"latency_batches": [1, -4]}}, "measure.latency_batches.1"),
    ({"measure": {"latency_batches": [10**9]}}, "measure.latency_batches.0"),
    ({"name": "job\x00name"}, "name"),
], ids=["ratio-nan", "value-nan", "value-inf", "value-nan-string", "tolerance-nan", "max-seconds-inf", "lr-nan",
        "seed-2**32", "seed-huge", "batch-0", "batch-negative", "batch-huge", "name-nul"])
def test_bad_spec_values_are_422_naming_the_field(api, resnet20_weights: Path, tiny_zip: Path, over: dict, field: str) -> None:
    r = api.submit(spec(**over), resnet20_weights, tiny_zip)  # json.dumps writes NaN / Infinity, as a sloppy client would
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"], r.json()["detail"]
    assert not api.uploads


def test_largest_seed_and_batch_are_accepted(api, resnet20_weights: Path, tiny_zip: Path) -> None:
    r = api.submit(spec(seed=2**32 - 1, measure={"latency_batches": [1, 4096]}, name="ok"), resnet20_weights, tiny_zip)
    assert r.status_code == 202, r.text


# ------------------------------------------------------------------ weights


@pytest.mark.parametrize(("name", "value"), [("layer2.1.conv1.weight", math.nan), ("linear.bias", -math.inf),
                                              ("layer1.0.bn1.running_var", math.nan)])
def test_non_finite_weights_are_refused_naming_the_tensor(api, state: dict[str, torch.Tensor], tiny_zip: Path,
                                                          name: str, value: float) -> None:
    bad = dict(state)
    bad[name] = state[name].clone()
    bad[name].view(-1)[0] = value
    r = api.submit(spec(), saved(bad), tiny_zip)
    assert r.status_code == 422, r.text
    assert name in r.json()["detail"] and "finite" in r.json()["detail"]


def test_integer_weights_are_refused_naming_the_tensor(api, state: dict[str, torch.Tensor], tiny_zip: Path) -> None:
    bad = dict(state)
    bad["linear.weight"] = (state["linear.weight"] * 100).to(torch.int64)
    r = api.submit(spec(), saved(bad), tiny_zip)
    assert r.status_code == 422, r.text
    assert "linear.weight" in r.json()["detail"] and "floating" in r.json()["detail"]


def test_integer_batchnorm_counters_are_fine(api, state: dict[str, torch.Tensor], tiny_zip: Path) -> None:
    ok = dict(state)
    ok["bn1.num_batches_tracked"] = torch.tensor(1000, dtype=torch.int64)
    r = api.submit(spec(), saved(ok), tiny_zip)
    assert r.status_code == 202, r.text


# ------------------------------------------------------------------ identifiers and database errors


@pytest.mark.parametrize("job_id", ["%00", "abc%00def", "0" * 31 + "%00", "G" * 32, "0" * 33, "..%2F..%2Fetc"])
@pytest.mark.parametrize("route", ["", "/trials", "/report", "/model"])
def test_malformed_job_ids_never_reach_the_database(api, monkeypatch: pytest.MonkeyPatch, job_id: str, route: str) -> None:
    def no_lookup(*_a, **_k):  # type: ignore[no-untyped-def]
        raise AssertionError("a malformed job id reached the job service")

    monkeypatch.setattr(JobService, "_job", no_lookup)
    r = api.client.get(f"/v1/jobs/{job_id}{route}", headers=api.headers())
    assert r.status_code in (404, 422), r.text
    r = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers())
    assert r.status_code in (404, 405, 422), r.text


@pytest.mark.parametrize("query", ["agent=%00", "problem_key=k%00", "agent=" + "a" * 65])
def test_malformed_list_filters_are_422(api, query: str) -> None:
    assert api.client.get(f"/v1/jobs?{query}", headers=api.headers()).status_code == 422
    assert api.client.get(f"/v1/jobs/{'0' * 32}/trials?kind=%00", headers=api.headers()).status_code == 422


def test_well_formed_unknown_job_id_is_404(api) -> None:
    r = api.client.get("/v1/jobs/" + "0" * 32, headers=api.headers())
    assert r.status_code == 404


def test_database_errors_answer_503_without_sql(api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    sql = "database error: (psycopg.DataError) PostgreSQL text fields cannot contain NUL (0x00) bytes\n" \
          "[SQL: SELECT jobs.id, jobs.owner_id FROM jobs WHERE jobs.id = %(pk_1)s::VARCHAR]"

    def broken(*_a, **_k):  # type: ignore[no-untyped-def]
        raise StoreError(sql)

    monkeypatch.setattr(JobService, "get", broken)
    with caplog.at_level("ERROR"):
        r = api.client.get("/v1/jobs/" + "0" * 32, headers=api.headers())
    assert r.status_code == 503
    body = r.text
    assert "SELECT" not in body and "SQL" not in body and "psycopg" not in body, body
    assert r.json()["detail"]
    assert "SELECT jobs.id" in caplog.text  # the operator still sees what failed


@pytest.fixture()
def pg_api(postgres_base: str, tmp_path: Path):
    """The in-process API on a fresh database of the real PostgreSQL server."""
    from inproc import InProcessApi, open_api
    from pg import create_database

    from prunepilot.service.auth import create_key
    from prunepilot.service.db.engine import dispose_engines

    url = create_database(postgres_base, f"sub{os.getpid()}_{uuid.uuid4().hex[:8]}")
    client, settings = open_api(tmp_path / "api", database_url=url)
    with client:
        yield InProcessApi(client, settings, {"alice": create_key(settings.db_url, "alice")[1]})
    dispose_engines()


@pytest.mark.postgres
def test_postgres_error_answers_503_without_sql(pg_api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NUL that did reach PostgreSQL (here forced past the route's check) fails there; the body stays generic."""
    get = JobService.get
    monkeypatch.setattr(JobService, "get", lambda self, owner_id, job_id: get(self, owner_id, "\x00" + job_id[1:]))
    r = pg_api.client.get("/v1/jobs/" + "0" * 32, headers=pg_api.headers())
    assert r.status_code == 503, r.text
    assert "SELECT" not in r.text and "NUL" not in r.text, r.text


@pytest.mark.postgres
def test_postgres_nul_in_name_and_id_is_422(pg_api, resnet20_weights: Path, tiny_zip: Path) -> None:
    r = pg_api.submit(spec(name="a\x00b"), resnet20_weights, tiny_zip)
    assert r.status_code == 422 and "name" in r.json()["detail"], r.text
    assert pg_api.client.get("/v1/jobs/%00", headers=pg_api.headers()).status_code == 422
    r = pg_api.submit(spec(name="ok"), resnet20_weights, tiny_zip, weights_name="w" * 600 + ".th")  # longer than the column
    assert r.status_code == 202, r.text
