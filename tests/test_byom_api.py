"""Bring your own model through the API, in process: ONNX uploads, model sources, POST /v1/inspect."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from helpers.onnx_models import export_net, make_net
from helpers.specs import quick_spec


@pytest.fixture(scope="module")
def net_onnx(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return export_net(make_net(), tmp_path_factory.mktemp("m") / "net.onnx").read_bytes()


@pytest.fixture(scope="module")
def small_zip(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_mini_zip

    return make_mini_zip(shared_dir / "cifar10-jpeg.zip", tmp_path_factory.mktemp("v") / "small.zip", 5, 2)


def onnx_spec(**over: object) -> dict:
    return quick_spec(**{"arch": "onnx", "dataset": "upload", **over})


def test_an_onnx_upload_is_accepted_and_named_by_its_content(api, net_onnx: bytes, small_zip: Path) -> None:
    r = api.post_files("/v1/jobs", onnx_spec(), model=("my net.onnx", net_onnx), dataset=("data.zip", small_zip.read_bytes()))
    assert r.status_code == 202, r.text
    job = api.client.get(r.headers["Location"], headers=api.headers()).json()
    assert job["arch"] == "onnx:" + hashlib.sha256(net_onnx).hexdigest()
    assert len(api.uploads) == 2  # the ONNX file and the data set, published under their content


@pytest.mark.parametrize(("spec", "parts", "message"), [
    ({"arch": "resnet20"}, ("model",), "a model file was sent (form field 'model'): set arch to 'onnx', not 'resnet20'"),
    ({}, (), "arch 'onnx' needs the ONNX file in the request (form field 'model')"),
    ({}, ("model", "weights"), "an ONNX model carries its own weights: send no 'weights' part with it"),
    ({"arch": "resnet20"}, (), "arch 'resnet20' needs its weights in the request"),
    ({"arch": "timm:no_such_net"}, ("weights",), "arch: unknown timm architecture 'no_such_net'"),
    ({"arch": "plugin:nothere"}, ("weights",), "arch: plugin model 'nothere' is not installed here"),
])
def test_the_model_parts_must_match_the_spec(api, net_onnx: bytes, small_zip: Path, resnet20_weights: Path,
                                             spec: dict, parts: tuple[str, ...], message: str) -> None:
    files = {"dataset": ("data.zip", small_zip.read_bytes())}
    if "model" in parts:
        files["model"] = ("net.onnx", net_onnx)
    if "weights" in parts:
        files["weights"] = ("w.th", resnet20_weights.read_bytes())
    r = api.post_files("/v1/jobs", onnx_spec(**spec), **files)
    assert r.status_code == 422 and message in r.json()["detail"], r.text
    assert not api.uploads


def test_a_broken_onnx_file_is_refused_by_its_own_name(api, net_onnx: bytes, small_zip: Path) -> None:
    r = api.post_files("/v1/jobs", onnx_spec(), model=("half.onnx", net_onnx[: len(net_onnx) // 2]),
                       dataset=("data.zip", small_zip.read_bytes()))
    assert r.status_code == 422 and "half.onnx" in r.json()["detail"], r.text
    assert "Traceback" not in r.text and not api.uploads


def test_a_budget_below_the_floor_is_refused_with_the_prunability_report(api, resnet20_weights: Path, small_zip: Path) -> None:
    r = api.submit(quick_spec(budget={"constraints": [{"resource": "flops", "ratio": 0.05}]}), resnet20_weights, small_zip)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "flops can go down to 7.9% of dense" in detail
    assert "Prunability: 12 prunable layers, 1 left whole (linear: output layer (the classifier)); POST /v1/inspect" in detail


def test_inspect_reports_groups_blocked_layers_and_floors(api) -> None:
    r = api.post_files("/v1/inspect", {"arch": "resnet20", "budget": {"constraints": [{"resource": "flops", "ratio": 0.05}]}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["groups"]) == 12 and body["input_size"] == 32 and body["verified"]
    assert [b["reason"] for b in body["blocked"]] == ["output layer (the classifier)"]
    assert 0 < body["floors"]["flops"] < 0.1 and body["dense"]["latency_ms"] > 0
    assert body["time"]["seconds_per_evaluation"] > 0
    assert body["budget_problems"] == [f"flops 0.05 is below the reachable floor {body['floors']['flops']:.3g} for this model "
                                       "at the layer limits (max ratio 0.8, first layer 0.5)"]


def test_inspect_verifies_an_onnx_model_and_keeps_nothing(api, net_onnx: bytes) -> None:
    r = api.post_files("/v1/inspect", {"arch": "onnx", "budget": {"constraints": [{"resource": "flops", "ratio": 0.5}]}},
                       model=("net.onnx", net_onnx))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["verified"] and body["groups"] and body["budget_problems"] == []
    assert body["input_size"] == 32  # the file's fixed image size (its batch is dynamic)
    assert not api.uploads and not list(api.settings.uploads_dir.glob(".incoming-*"))


def test_inspect_without_weights_needs_no_upload(api) -> None:
    r = api.post_files("/v1/inspect", {"arch": "mobilenet_v3_small", "image_size": 64})
    assert r.status_code == 200 and r.json()["input_size"] == 64, r.text


def test_input_settings_are_checked(api, resnet20_weights: Path) -> None:
    r = api.post_files("/v1/jobs", quick_spec(std=[0.2, 0.0, 0.2]), weights=("w.th", resnet20_weights.read_bytes()))
    assert r.status_code == 422 and "std.1" in r.json()["detail"], r.text
    r = api.post_files("/v1/jobs", quick_spec(mean=[0.5, 0.5]), weights=("w.th", resnet20_weights.read_bytes()))
    assert r.status_code == 422 and "mean" in r.json()["detail"], r.text


def test_the_models_list_names_every_source(api) -> None:
    names = [m["name"] for m in api.client.get("/v1/models", headers=api.headers()).json()]
    assert "resnet20" in names and "timm:<name>" in names


def test_a_model_that_is_not_rgb_is_refused_by_its_channel_count(api, tmp_path: Path, small_zip: Path) -> None:
    import torch
    from torch import nn

    gray = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    path = tmp_path / "gray.onnx"
    torch.onnx.export(gray, (torch.randn(2, 1, 32, 32),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}})
    r = api.post_files("/v1/jobs", onnx_spec(), model=("gray.onnx", path.read_bytes()), dataset=("data.zip", small_zip.read_bytes()))
    assert r.status_code == 422, r.text
    assert "the model takes 1-channel images; prunepilot's data sets are RGB (3 channels)" in r.json()["detail"]
