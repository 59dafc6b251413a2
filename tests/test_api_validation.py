"""Validation and authentication of the API, in-process (the wire does not matter here): bad specs
and uploads are refused with a 422 naming what is wrong, nothing is created, nothing runs; users see
only their own jobs; keys are checked, and a revoked one stops working once its cache entry expires.
(Moved from the end-to-end tests, which paid for a server and Ray for each of these.)"""

from __future__ import annotations

import os
import pickle
import time
import zipfile
from pathlib import Path

import pytest
from helpers.specs import quick_spec

from prunepilot.service.auth import create_key
from prunepilot.service.db import repo
from prunepilot.service.db.engine import session_scope


@pytest.fixture(scope="module")
def small_zip(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_mini_zip

    return make_mini_zip(shared_dir / "cifar10-jpeg.zip", tmp_path_factory.mktemp("v") / "small.zip", 5, 2)


def job_count(api) -> int:  # type: ignore[no-untyped-def]
    return api.client.get("/v1/jobs", headers=api.headers()).json()["total"]


@pytest.mark.parametrize(("spec_over", "message"), [
    ({"arch": "resnet21"}, "unknown architecture 'resnet21'"),
    ({"agent": "nope"}, "unknown agent 'nope'"),
    ({"agent": "amc", "agent_options": {"budget_mod": "bound"}}, "unknown option(s) for agent 'amc': budget_mod"),
    ({"agent": "amc", "agent_options": {"recipe": "fast"}}, "unknown AMC recipe 'fast'"),
    ({"budget": {"constraints": [{"resource": "flops", "ratio": 1.0}]}}, "ratio must be in (0, 1)"),
    ({"budget": {"constraints": [{"resource": "flops", "ratio": 0.0}]}}, "ratio must be in (0, 1)"),
    ({"budget": {"constraints": [{"resource": "energy", "ratio": 0.5}]}}, "budget.constraints.0.resource"),
    ({"budget": {"constraints": [{"resource": "flops", "ratio": 0.05}]}}, "infeasible under the layer limits"),
    ({"budget": {"constraints": [{"resource": "params", "value": 1e9}]}}, "not below the dense model"),
    ({"criterion": "random"}, "unknown criterion"),
    ({"constraints": {"exclude": ["layer9.conv"]}}, "cannot exclude layer9.conv: not a prunable layer"),
    ({"search": {"max_evaluations": 0}}, "search.max_evaluations"),
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
])
def test_bad_specs_are_rejected_with_422_and_nothing_created(api, small_zip: Path, resnet20_weights: Path,
                                                             spec_over: dict, message: str) -> None:
    r = api.submit(quick_spec(**spec_over), resnet20_weights, small_zip if spec_over.get("dataset", "upload") == "upload" else None)
    assert r.status_code == 422 and message in r.json()["detail"], r.text
    assert job_count(api) == 0 and not api.uploads


def test_a_good_spec_is_accepted_as_the_control(api, small_zip: Path, resnet20_weights: Path) -> None:
    """The same request with nothing wrong is accepted: the refusals above are for what they name."""
    r = api.submit(quick_spec(), resnet20_weights, small_zip)
    assert r.status_code == 202, r.text
    assert job_count(api) == 1 and len(api.uploads) == 2


class _Evil:
    marker = ""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_that_runs_code_is_refused(api, small_zip: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    r = api.submit(quick_spec(), pickle.dumps({"state_dict": {"conv1.weight": _Evil()}}), small_zip, weights_name="evil.pt")
    assert r.status_code == 422 and "evil.pt: not a state dict" in r.json()["detail"], r.text
    time.sleep(0.2)
    assert not marker.exists()


def test_wrong_weights_name_the_keys(api, small_zip: Path, resnet56_weights: Path) -> None:
    r = api.submit(quick_spec(), resnet56_weights, small_zip)
    assert r.status_code == 422 and "unexpected keys: layer1.3.conv1.weight" in r.json()["detail"]


def test_spec_that_is_not_json(api, resnet20_weights: Path) -> None:
    r = api.client.post("/v1/jobs", data={"spec": "{not json"}, files={"weights": ("w.th", resnet20_weights.read_bytes())},
                        headers=api.headers())
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]


def test_zip_with_path_traversal_is_refused(api, resnet20_weights: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("train/cat/1.jpg", b"x")
        z.writestr("../../etc/evil.jpg", b"x")
    r = api.submit(quick_spec(), resnet20_weights, bad)
    assert r.status_code == 422 and "outside the archive" in r.json()["detail"]


def test_users_see_only_their_own_jobs(api, small_zip: Path, resnet20_weights: Path) -> None:
    job = api.submit(quick_spec(), resnet20_weights, small_zip).json()
    base = f"/v1/jobs/{job['id']}"
    for method, url in (("get", base), ("get", f"{base}/trials"), ("post", f"{base}/cancel"), ("get", f"{base}/report"),
                        ("get", f"{base}/model")):
        assert getattr(api.client, method)(url, headers=api.headers("bob")).status_code == 404, url
    assert api.client.get("/v1/jobs", headers=api.headers("bob")).json()["total"] == 0
    assert [j["id"] for j in api.client.get("/v1/jobs", headers=api.headers()).json()["items"]] == [job["id"]]
    assert api.client.get(base).status_code == 401
    assert api.client.get("/v1/jobs", headers={"Authorization": "Bearer pp_wrong"}).status_code == 401
    assert api.client.get(base, headers=api.headers()).json()["status"] == "queued"  # bob's cancel did nothing


def test_a_revoked_key_is_refused_once_its_cache_entry_expires(tmp_path: Path) -> None:
    from inproc import open_api

    client, settings = open_api(tmp_path / "cached", auth_cache_s=1.0)
    with client:
        key_id, secret = create_key(settings.db_url, "carol")
        headers = {"Authorization": f"Bearer {secret}"}
        assert client.get("/v1/jobs", headers=headers).status_code == 200  # verified, now cached
        with session_scope(settings.db_url) as s:
            assert repo.revoke_api_key(s, key_id=key_id)
        assert client.get("/v1/jobs", headers=headers).status_code == 200  # still within the cache time
        time.sleep(1.1)
        assert client.get("/v1/jobs", headers=headers).status_code == 401
        # a new key works at once (only successes are cached)
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {create_key(settings.db_url, 'dan')[1]}"}).status_code == 200


def test_models_agents_health_and_openapi(api) -> None:
    models = api.client.get("/v1/models", headers=api.headers()).json()
    assert {"resnet20", "resnet56", "mobilenet_v2"} <= {m["name"] for m in models}
    agents = {a["name"] for a in api.client.get("/v1/agents", headers=api.headers()).json()}
    assert {"amc", "netadapt", "optuna-tpe", "optuna-nsga2", "uniform", "sensitivity", "global", "random"} <= agents
    health = api.client.get("/healthz").json()
    assert health == {**health, "status": "ok", "database": "sqlite", "ray": "off"}
    spec = api.client.get("/openapi.json").json()
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/trials",
                 "/v1/jobs/{job_id}/model", "/v1/jobs/{job_id}/report", "/v1/models", "/v1/agents", "/healthz"):
        assert path in spec["paths"], path
    assert "202" in spec["paths"]["/v1/jobs"]["post"]["responses"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_a_dataset_whose_classes_do_not_match_the_weights_is_refused(api, small_zip: Path, resnet20_weights: Path,
                                                                     tmp_path: Path) -> None:
    three = tmp_path / "three-classes.zip"
    with zipfile.ZipFile(small_zip) as zin, zipfile.ZipFile(three, "w") as zout:
        for info in zin.infolist():
            if info.filename.split("/")[2:3] and info.filename.split("/")[2] in ("airplane", "cat", "dog"):
                zout.writestr(info.filename, zin.read(info))
    r = api.submit(quick_spec(), resnet20_weights, three, dataset_name="three-classes.zip")
    assert r.status_code == 422, r.text
    assert "three-classes.zip has 3 class folder(s) with images (airplane, cat, dog) but the weights" in r.json()["detail"]
    assert "classify 10 classes" in r.json()["detail"] and job_count(api) == 0


def test_a_dataset_without_images_is_refused(api, resnet20_weights: Path, tmp_path: Path) -> None:
    empty = tmp_path / "notes.zip"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("train/cat/readme.txt", b"no images here")
    r = api.submit(quick_spec(), resnet20_weights, empty)
    assert r.status_code == 422 and "no image files found" in r.json()["detail"], r.text
