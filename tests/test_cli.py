from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunepilot.compression import count_macs, load_artifact
from prunepilot.compression.data import load_splits
from prunepilot.compression.evaluate import accuracy
from prunepilot.compression.finalizing import heldout_tensors


def run_cli(*args: str, env_extra: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "prunepilot.service.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_cli_here(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str,
                 env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI's entry point in this process (argument and input errors: no need to pay for a new
    interpreter and torch import each time); the same exit code and output as ``run_cli``."""
    from prunepilot.service.cli import main
    from prunepilot.service.settings import get_settings

    for key, value in (env_extra or {}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["prunepilot", *args])
    get_settings.cache_clear()
    capsys.readouterr()
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        get_settings.cache_clear()
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


@pytest.fixture()
def cli_env(tmp_path: Path) -> dict[str, str]:
    # one torch thread: two threads on a loaded two-core machine wait on each other (a ResNet-20
    # forward went from 3 ms to 940 ms here), which made the prune and latency tests take minutes
    return {"PRUNEPILOT_DATA_DIR": str(tmp_path / "data"), "PRUNEPILOT_THREADS": "1"}


def test_profile_lists_prunable_layers(resnet20_weights: Path, cli_env) -> None:
    r = run_cli("profile", "--arch", "resnet20", "--weights", str(resnet20_weights), "--json", env_extra=cli_env)
    assert r.returncode == 0, r.stderr
    layers = json.loads(r.stdout)
    assert [x["name"] for x in layers][:2] == ["conv1", "layer1.0.conv1"]
    stem, first = layers[0], layers[1]
    assert (stem["c_in"], stem["c_out"], stem["kernel"]) == (3, 16, 3)
    assert set(stem["coupled"]) == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}  # the stage's residual channels
    assert (first["c_in"], first["c_out"], first["h"], first["w"], first["kernel"], first["stride"]) == (16, 16, 32, 32, 3, 1)
    assert first["flops"] == 16 * 16 * 9 * 32 * 32


def test_prune_an_onnx_model_to_a_budget(mini_zip: Path, tmp_path: Path, cli_env, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`prune --model net.onnx --budget flops=0.5` writes OUT/model.onnx beside the artifact: the least
    uniform pruning that meets the budget, as counted in the written ONNX graph itself."""
    import onnxruntime as ort
    from helpers.onnx_models import export_net, make_net

    from prunepilot.compression.onnx_io import onnx_macs

    net = export_net(make_net(), tmp_path / "net.onnx")
    out = tmp_path / "out"
    r = run_cli_here(capsys, monkeypatch, "prune", "--model", str(net), "--data", str(mini_zip), "--input-size", "32",
                     "--budget", "flops=0.5", "--test-images", "100", "--out", str(out), env_extra=cli_env)
    assert r.returncode == 0, r.stderr
    assert "budget flops <= 50% of dense: every prunable layer pruned by" in r.stdout
    assert "no fine-tuning (--finetune-epochs 0)" in r.stdout and "ONNX:" in r.stdout
    kept = onnx_macs(out / "model.onnx") / onnx_macs(net)
    assert 0.45 < kept <= 0.5
    report = json.loads((out / "report.json").read_text())
    assert report["arch"].startswith("onnx:") and report["macs_ratio"] == pytest.approx(kept, abs=1e-6)
    check = report["budget_check"]["flops"]  # the budget held to the final network, as a job's report does
    assert check["limit"] == 0.5 and check["measured"] == pytest.approx(kept, abs=1e-6) and check["met"] is True
    assert f"budget flops: {kept:.1%} of dense as measured, limit 50.0%" in r.stdout
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: torch.randn(2, 3, 32, 32).numpy()})[0].shape == (2, 10)

    r = run_cli_here(capsys, monkeypatch, "inspect", "--model", str(net), "--budget", "flops=0.01", "--json", env_extra=cli_env)
    assert r.returncode == 1 and "flops 0.01 is below the reachable floor" in r.stderr
    body = json.loads(r.stdout)
    assert body["verified"] and body["groups"] and body["blocked"][-1]["reason"] == "output layer (the classifier)"


def test_prune_end_to_end(mini_zip: Path, resnet20_weights: Path, tmp_path: Path, cli_env) -> None:
    out = tmp_path / "out"
    # residual channels left whole: uniform 0.5 on the block-internal convs halves the MACs
    streams = ["--exclude", "conv1", "--exclude", "layer2.0.conv2", "--exclude", "layer3.0.conv2"]
    r = run_cli("prune", "--arch", "resnet20", "--weights", str(resnet20_weights), "--data", str(mini_zip), "--uniform", "0.5",
                *streams, "--finetune-epochs", "0.2", "--test-images", "100", "--out", str(out), env_extra=cli_env)
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout and "latency b1" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["macs_ratio"] == pytest.approx(0.505, abs=0.01)
    model = load_artifact(out)
    assert count_macs(model, 32) == report["figures"]["pruned"]["macs"]
    x, y = heldout_tensors(load_splits(mini_zip, val_size=300), 100)
    assert accuracy(model.to(memory_format=torch.channels_last), x, y) == pytest.approx(report["figures"]["pruned"]["accuracy"], abs=1e-6)
    assert report["figures"]["pruned"]["accuracy"] > 0.3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "resnet21", "--uniform", "0.5"], "unknown architecture 'resnet21'"),
        (["--arch", "resnet20", "--uniform", "1.0"], "--uniform must be in [0, 1)"),
        (["--arch", "resnet20", "--uniform", "-0.2"], "--uniform must be in [0, 1)"),
        (["--arch", "resnet20", "--uniform", "0.5", "--data", "/no/such/data"], "data not found"),
        (["--arch", "resnet20", "--uniform", "0.5", "--criterion", "random"], "unknown --criterion"),
        (["--arch", "resnet20", "--uniform", "0.5", "--exclude", "layer9.conv"], "cannot exclude layer9.conv: not a prunable layer"),
        (["--arch", "resnet20"], "give exactly one of --budget, --uniform or --strategy"),
        (["--arch", "resnet20", "--budget", "flops=0.5", "--uniform", "0.5"], "give exactly one of --budget, --uniform or --strategy"),
        (["--arch", "resnet20", "--budget", "flops=0.01"], "the budget is below what the layer limits reach: flops can go down to"),
        (["--arch", "resnet20", "--budget", "latency=2ms"], "a latency budget needs a latency table"),
        (["--arch", "resnet20", "--uniform", "0.5", "--mean", "0.5,0.5"], "mean needs 3 values (R, G, B), got 2"),
        (["--arch", "mynet.onnx", "--uniform", "0.5"], "ONNX file not found: mynet.onnx"),
        (["--arch", "resnet20", "--uniform", "0.5", "--round-to", "fastest"], "--round-to must be a positive integer or 'measured'"),
        (["--arch", "resnet20", "--uniform", "0.5", "--round-to", "measured", "--latency-backend", "tvm"],
         "unknown latency backend 'tvm'; known: torch, onnxruntime, cuda"),
    ],
)
def test_bad_input_exits_with_one_clear_line(args: list[str], message: str, resnet20_weights: Path, tmp_path: Path, cli_env,
                                              capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    r = run_cli_here(capsys, monkeypatch, "prune", "--weights", str(resnet20_weights), "--out", str(tmp_path / "o"), *args,
                     env_extra=cli_env)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_wrong_and_missing_weights(resnet56_weights: Path, tmp_path: Path, cli_env, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    r = run_cli_here(capsys, monkeypatch, "prune", "--arch", "resnet20", "--weights", str(resnet56_weights), "--uniform", "0.5",
                     "--out", str(tmp_path / "o"), env_extra=cli_env)
    assert r.returncode == 2 and "unexpected keys" in r.stderr and "Traceback" not in r.stderr
    r = run_cli_here(capsys, monkeypatch, "prune", "--arch", "resnet20", "--weights", str(tmp_path / "none.th"), "--uniform", "0.5",
                     "--out", str(tmp_path / "o"), env_extra=cli_env)
    assert r.returncode == 2 and "weights file not found" in r.stderr


def test_serve_refuses_an_unmigrated_database(tmp_path: Path, cli_env) -> None:
    r = run_cli("serve", "--no-migrate", env_extra=cli_env)
    assert r.returncode == 2 and "not migrated" in r.stderr and "prunepilot db upgrade" in r.stderr
    assert "Traceback" not in r.stderr


def test_latency_table_cli_measures_what_is_missing_then_reuses(tmp_path: Path, cli_env) -> None:
    """`latency build` times the entries this machine's table lacks and stores them, and the model's
    calibration; the next build (another architecture with the same layer signatures) times no
    entry but calibrates its own network; `inspect` of the first model reuses its calibration. All but five entries are
    stored beforehand, so the real timing stays short."""
    from prunepilot.compression import PruningGraph, build_model
    from prunepilot.compression.latency import LatencyTable
    from prunepilot.service.db.store import JobStore
    from prunepilot.service.latency_store import SqlLatencyStore
    from prunepilot.service.settings import Settings

    assert run_cli("db", "upgrade", env_extra=cli_env).returncode == 0
    settings = Settings(data_dir=tmp_path / "data", threads=int(cli_env["PRUNEPILOT_THREADS"]))
    model = build_model("resnet20")
    table = LatencyTable(PruningGraph(model, 32), model, SqlLatencyStore(JobStore(settings.db_url)), 1, settings.threads)
    todo = table.missing()
    # stand-ins that scale with each entry's multiply-adds, as real timings do: flat ones left the five
    # measured entries (conv1's) alone to decide whether pruning pays, and on a loaded machine
    # their noise sometimes said it did not (floor 1.0)
    table.store.put(table.device, {sig: (0.01 + 1e-7 * cin * cout * e.h * e.w * e.kernel**2 / e.groups, 1)
                                   for e, cin, cout, sig in todo[5:]})
    first = run_cli("latency", "build", "--arch", "resnet20", env_extra=cli_env)
    assert first.returncode == 0, first.stderr
    assert "(5 measured now); calibration measured" in first.stdout
    assert table.missing() == []
    measured = SqlLatencyStore(JobStore(settings.db_url)).get(table.device)
    assert all(measured[sig] > 0 for *_, sig in todo[:5])
    again = run_cli("latency", "build", "--arch", "resnet32", env_extra=cli_env)  # same layer signatures
    assert again.returncode == 0 and "(0 measured now); calibration measured" in again.stdout  # another network
    report = run_cli("inspect", "--model", "resnet20", "--latency", "--json", env_extra=cli_env)  # the stored table gives the floor
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["latency"]["calibration"] == "stored"  # the first build's fit of resnet20
    floors = json.loads(report.stdout)["floors"]
    assert 0 < floors["latency"] < 1 and set(floors) == {"flops", "params", "size", "latency"}


class FakeClient:
    """A stand-in for the API client `prunepilot submit` opens: it records each spec submitted."""

    base_url = "http://test"

    def __init__(self) -> None:
        self.specs: list[dict] = []

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, spec: dict, *files: object, **kw: object) -> dict:
        self.specs.append(spec)
        return {"id": "j1", "status": "queued", "links": {"dashboard": "/dashboard"}}


@pytest.mark.parametrize(("args", "sent", "accepted"), [
    ([], None, None),  # torch: no rounding
    (["--latency-backend", "onnxruntime"], None, "measured"),  # the server applies ONNX Runtime's default
    (["--latency-backend", "onnxruntime", "--round-to", "1"], 1, 1),  # turned off
    (["--round-to", "measured"], "measured", "measured"),
])
def test_submit_leaves_the_rounding_to_the_target_unless_told(args: list[str], sent, accepted, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`prunepilot submit` without --round-to sends no round_to, so the service gives the job its
    target's default (measured steps on ONNX Runtime); given, it is sent as given."""
    import prunepilot.service.cli as cli
    from prunepilot.service.schemas import JobCreate

    client = FakeClient()
    specs = client.specs
    monkeypatch.setattr(cli, "_client", lambda url, key: client)
    r = run_cli_here(capsys, monkeypatch, "submit", "--model", "resnet20", "--budget", "flops=0.5", *args)
    assert r.returncode == 0, r.stderr
    assert specs[0]["constraints"].get("round_to", None) == sent and ("round_to" in specs[0]["constraints"]) == (sent is not None)
    assert JobCreate.model_validate(specs[0]).constraints.round_to == accepted


@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_submit_wait_prints_the_final_report_with_its_budget_check(status: str, capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`submit --wait` ends with the job's final figures and, per budgeted resource, whether the
    final network met the budget as measured; a job that did not succeed has no report to print."""
    import prunepilot.service.cli as cli

    fig = {"accuracy": 0.85, "macs": 100, "params": 10, "size_bytes": 40, "latency_ms": {"1": 3.0}}
    report = {"figures": {"dense": fig, "pruned": {**fig, "macs": 45, "latency_ms": {"1": 2.103}}}, "test_images": 100,
              "macs_ratio": 0.45, "params_ratio": 1.0, "accuracy_drop": 0.0, "latency_speedup": {"1": 1.43},
              "budget_check": {"latency": {"limit": 0.66, "measured": 0.701, "tolerance": 0.005, "met": False},
                               "flops": {"limit": 0.5, "measured": 0.45, "tolerance": 0.005, "met": True}}}
    asked: list[str] = []

    class Done(FakeClient):
        def wait(self, job_id: str, poll_s: float, on_update) -> dict:  # type: ignore[no-untyped-def]
            return {"id": job_id, "status": status, "error": None if status == "succeeded" else "boom"}

        def report(self, job_id: str) -> dict:
            asked.append(job_id)
            return report

    monkeypatch.setattr(cli, "_client", lambda url, key: Done())
    r = run_cli_here(capsys, monkeypatch, "submit", "--model", "resnet20", "--budget", "latency=0.66", "--budget", "flops=0.5", "--wait")
    out = " ".join(r.stdout.split())  # rich wraps long lines
    if status == "succeeded":
        assert r.returncode == 0 and asked == ["j1"]
        assert "budget latency: 70.1% of dense as measured, limit 66.0% (tolerance 0.5%): over the budget" in out
        assert "budget flops: 45.0% of dense as measured, limit 50.0% (tolerance 0.5%): met" in out
    else:
        assert r.returncode == 1 and asked == [] and "budget" not in out.replace("--budget", "")
