"""The API's error contract, in-process: every error status a route can answer is documented with
the one error model, and every error body actually sent is that model: ``{"detail": "<message>"}``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SPEC = {"arch": "resnet20", "dataset": "cifar10-jpeg", "agent": "random",
        "budget": {"constraints": [{"resource": "flops", "ratio": 0.5}]}, "search": {"max_evaluations": 3}}


def test_every_documented_error_uses_the_one_error_model(api) -> None:
    spec = api.client.get("/openapi.json").json()
    seen = 0
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for code, response in op["responses"].items():
                if code[0] in "45":
                    seen += 1
                    assert json.dumps(response).count("#/components/schemas/ErrorBody") == 1, (method, path, code, response)
            if path.startswith("/v1/"):
                assert {"401", "503"} <= set(op["responses"]), (method, path)
            if op.get("parameters") or op.get("requestBody"):
                assert "422" in op["responses"], (method, path)
    assert seen > 20
    assert not [name for name in spec["components"]["schemas"] if "ValidationError" in name]


def _is_error_body(r) -> bool:  # type: ignore[no-untyped-def]
    body = r.json()
    return set(body) == {"detail"} and isinstance(body["detail"], str) and body["detail"]


@pytest.mark.parametrize(("method", "url", "status"), [
    ("get", "/v1/jobs/not-a-job-id", 422),  # path parameter pattern (FastAPI's own validation)
    ("get", "/v1/jobs?limit=0", 422),  # query parameter bound
    ("get", "/v1/jobs?status=exploded", 422),  # enum
    ("get", "/v1/problems/nul%00key/compare", 422),  # never reaches SQL
    ("get", "/v1/jobs/" + "0" * 32, 404),
    ("post", "/v1/jobs/" + "0" * 32 + "/cancel", 404),
])
def test_error_bodies_match_the_error_model(api, method: str, url: str, status: int) -> None:
    r = getattr(api.client, method)(url, headers=api.headers())
    assert r.status_code == status, r.text
    assert _is_error_body(r), r.text


def test_validation_errors_name_the_field(api) -> None:
    r = api.client.get("/v1/jobs?limit=0&offset=-1", headers=api.headers())
    assert r.status_code == 422
    assert "limit:" in r.json()["detail"] and "offset:" in r.json()["detail"]


def test_unauthenticated_errors_match_the_error_model(api) -> None:
    r = api.client.get("/v1/jobs")
    assert r.status_code == 401 and _is_error_body(r) and r.headers["www-authenticate"] == "Bearer"
    r = api.client.post("/v1/jobs", headers={"Authorization": "Bearer pp_nope"}, files={"weights": ("w", b"x")}, data={"spec": "{}"})
    assert r.status_code == 401 and _is_error_body(r)


def test_conflicts_match_the_error_model(api, resnet20_weights: Path) -> None:
    job = api.submit(SPEC, resnet20_weights).json()
    for url in (f"/v1/jobs/{job['id']}/report", f"/v1/jobs/{job['id']}/model"):
        r = api.client.get(url, headers=api.headers())
        assert r.status_code == 409 and _is_error_body(r) and "queued" in r.json()["detail"]
    assert api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers()).json()["status"] == "cancelled"
    r = api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers())
    assert r.status_code == 409 and _is_error_body(r) and "already cancelled" in r.json()["detail"]


def test_weights_errors_name_the_users_file_not_the_servers(api, resnet56_weights: Path) -> None:
    r = api.submit(SPEC, resnet56_weights, weights_name="my-resnet56.th")
    assert r.status_code == 422 and _is_error_body(r)
    detail = r.json()["detail"]
    assert "my-resnet56.th does not match the architecture" in detail, detail
    assert ".incoming" not in detail and str(api.settings.data_dir) not in detail


@pytest.mark.parametrize(("method", "url"), [("post", "/v1/jobs"), ("get", "/v1/jobs")])
def test_a_database_failure_during_the_key_check_is_a_503_without_sql(api, monkeypatch: pytest.MonkeyPatch,
                                                                      method: str, url: str) -> None:
    """POSTs are authenticated in the middleware (before the body), GETs in the route: both say 503."""
    from prunepilot.service import auth
    from prunepilot.service.db.engine import StoreError

    def down(*_args: object, **_kw: object) -> None:
        raise StoreError("database error: [SQL: SELECT api_keys.key_hash FROM api_keys]")

    monkeypatch.setattr(auth, "authenticate", down)
    kwargs = {"files": {"weights": ("w.th", b"x")}, "data": {"spec": "{}"}} if method == "post" else {}
    r = getattr(api.client, method)(url, headers=api.headers(), **kwargs)
    assert r.status_code == 503 and _is_error_body(r), r.text
    assert "SQL" not in r.text


def test_a_post_looks_its_key_up_once(api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The middleware verifies a POST's key before the body; the route takes that caller, not a second lookup."""
    from prunepilot.service import auth

    calls: list[str] = []
    real = auth.authenticate

    def counting(url: str, secret: str, cache_s: float = 0.0):  # type: ignore[no-untyped-def]
        calls.append(secret)
        return real(url, secret, cache_s)

    monkeypatch.setattr(auth, "authenticate", counting)
    r = api.client.post("/v1/jobs/" + "0" * 32 + "/cancel", headers=api.headers())
    assert r.status_code == 404 and len(calls) == 1
    r = api.client.get("/v1/jobs/" + "0" * 32, headers=api.headers())
    assert r.status_code == 404 and len(calls) == 2  # GETs have no body: the route checks the key
