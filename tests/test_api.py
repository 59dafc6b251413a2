"""End to end through a real uvicorn server in a subprocess, with embedded Ray and SQLite."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers.specs import quick_spec
from server import Server

from prunepilot.compression import count_macs, load_artifact
from prunepilot.compression.evaluate import accuracy
from prunepilot.compression.finalizing import heldout_tensors
from prunepilot.service.client import ApiError, Client

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    # a short device lease: a dead device agent's tasks go to the next one quickly
    srv = Server(tmp_path_factory.mktemp("srv"), {"PRUNEPILOT_AUTH_CACHE_S": "2", "PRUNEPILOT_DEVICE_LEASE_S": "3"})
    srv.keys = srv.prepare("alice", "bob")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture()
def alice(server) -> Client:
    with Client(server.url, server.keys["alice"]) as c:
        yield c


def wait_for(predicate, timeout: float = 180, every: float = 0.3):  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def test_submit_poll_download_and_load(server, alice: Client, mini_zip: Path, resnet20_weights: Path, mini_splits, tmp_path: Path) -> None:
    job = alice.submit(quick_spec(finetune={"epochs": 0.2}), resnet20_weights, mini_zip)
    assert job["status"] == "queued" and job["links"]["self"] == f"/v1/jobs/{job['id']}"
    assert httpx.get(f"{server.url}/healthz").json()["ray"] == "embedded"
    seen = set()
    done = alice.wait(job["id"], poll_s=0.3, timeout_s=300, on_update=lambda j: seen.add(j["status"]))
    assert done["status"] == "succeeded", done["error"]
    assert {"running", "finetuning"} & seen and done["evaluations"] == 3 and done["attempts"] == 1
    assert done["started_at"] and done["finetune_started_at"] and done["finished_at"]
    trials = alice.trials(job["id"])
    assert trials["total"] == 3 and [t["step"] for t in trials["items"]] == [0, 1, 2]
    out = alice.download(job["id"], tmp_path / "model")
    model = load_artifact(out)
    report = alice.report(job["id"])
    assert count_macs(model, 32) == report["figures"]["pruned"]["macs"]
    assert report["macs_ratio"] <= 0.5
    x, y = heldout_tensors(mini_splits, 100)
    assert accuracy(model.to(memory_format=torch.channels_last), x, y) == pytest.approx(report["figures"]["pruned"]["accuracy"])
    onnx_file = alice.download(job["id"], tmp_path / "onnx", "onnx")
    # loaded from the downloaded bytes alone, as a client elsewhere would: the weights are inside
    session = ort.InferenceSession(onnx_file.read_bytes(), providers=["CPUExecutionProvider"])
    probe = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = model(probe).numpy()
    got = session.run(["logits"], {"input": probe.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_an_onnx_model_end_to_end(server, alice: Client, mini_zip: Path, tmp_path: Path) -> None:
    """The user's own network as an ONNX file with their data set: searched, fine-tuned, and handed
    back as ONNX that ONNX Runtime runs, agreeing with the artifact rebuilt from the download."""
    from helpers.onnx_models import export_net, make_net

    net = export_net(make_net(), tmp_path / "my-net.onnx")
    job = alice.submit(quick_spec(arch="onnx", finetune={"epochs": 0.1}), None, mini_zip, model=net)
    done = alice.wait(job["id"], poll_s=0.3, timeout_s=300)
    assert done["status"] == "succeeded", done["error"]
    assert done["arch"].startswith("onnx:") and done["result"]["macs_ratio"] <= 0.5
    onnx_file = alice.download(job["id"], tmp_path / "out")  # an ONNX source's default download is ONNX
    assert onnx_file.name == "model.onnx"
    bundle = alice.download(job["id"], tmp_path / "bundle", "state_dict")
    assert (bundle / "source.onnx").read_bytes() == net.read_bytes()
    model = load_artifact(bundle)
    session = ort.InferenceSession(onnx_file.read_bytes(), providers=["CPUExecutionProvider"])
    probe = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(probe).numpy()
    got = session.run(None, {session.get_inputs()[0].name: probe.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert count_macs(model, 32) == alice.report(job["id"])["figures"]["pruned"]["macs"]


def test_latency_budget_is_checked_by_measurement(server, alice: Client, mini_zip: Path, resnet20_weights: Path) -> None:
    """A latency job builds its table, searches by prediction, then times its best candidates
    against the dense model; the report says which it kept and what each measured."""
    job = alice.submit(quick_spec(budget={"constraints": [{"resource": "latency", "ratio": 0.85, "batch_size": 2}]},
                                  search={"max_evaluations": 4}), resnet20_weights, mini_zip)
    done = alice.wait(job["id"], poll_s=0.3, timeout_s=300)
    assert done["status"] == "succeeded", done["error"]
    report = alice.report(job["id"])
    check = report["search"]["latency_check"]
    assert check["limit"] == pytest.approx(0.85) and check["checks"]
    assert report["search"]["best_step"] == check["chosen_step"]
    chosen = next(c for c in check["checks"] if c["step"] == check["chosen_step"])
    if check["within_budget_measured"]:
        assert chosen["measured_latency"] <= 0.85 * 1.005  # the constraint's default tolerance
    assert report["latency_table"]["entries"] > 0
    # the final figures are timed at the budget's batch size too, and held to the budget
    figs = report["figures"]
    assert set(figs["pruned"]["latency_ms"]) == {"1", "2"}
    final = report["budget_check"]["latency"]
    assert final["measured"] == pytest.approx(figs["pruned"]["latency_ms"]["2"] / figs["dense"]["latency_ms"]["2"])
    assert final["limit"] == pytest.approx(0.85) and isinstance(final["met"], bool)


def test_infeasible_latency_budget_fails_the_job_with_a_clear_message(server, alice: Client, mini_zip: Path,
                                                                    resnet20_weights: Path) -> None:
    """Unlike a FLOPs budget (refused at submission), a latency budget's floor is known only
    once the table is built: the job fails then, saying why."""
    job = alice.submit(quick_spec(budget={"constraints": [{"resource": "latency", "ratio": 0.2}]}), resnet20_weights, mini_zip)
    done = alice.wait(job["id"], poll_s=0.3, timeout_s=120)
    assert done["status"] == "failed" and "below the reachable floor" in done["error"] and "Traceback" not in done["error"]


def test_cancel_stops_a_running_search(server, alice: Client, mini_zip: Path, resnet20_weights: Path) -> None:
    job = alice.submit(quick_spec(search={"max_evaluations": 500}), resnet20_weights, mini_zip)
    wait_for(lambda: alice.job(job["id"])["evaluations"] >= 1)
    alice.cancel(job["id"])
    t0 = time.time()
    done = alice.wait(job["id"], poll_s=0.2, timeout_s=60)
    assert done["status"] == "cancelled" and time.time() - t0 < 20
    assert done["evaluations"] < 500
    with pytest.raises(ApiError) as err:
        alice.cancel(job["id"])
    assert err.value.status == 409


def test_a_killed_worker_is_retried_and_resumes(server, alice: Client, mini_zip: Path, resnet20_weights: Path) -> None:
    job = alice.submit(quick_spec(search={"max_evaluations": 12}), resnet20_weights, mini_zip)
    first = wait_for(lambda: (j := alice.job(job["id"]))["evaluations"] >= 3 and j)
    from datetime import UTC, datetime

    def utc(stamp: str) -> datetime:
        t = datetime.fromisoformat(stamp)
        return t if t.tzinfo else t.replace(tzinfo=UTC)

    pid = int(server_job_worker(server, job["id"]).split(":")[-1])
    killed = datetime.now(UTC)
    os.kill(pid, signal.SIGKILL)
    done = alice.wait(job["id"], poll_s=0.5, timeout_s=300)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    trials = alice.trials(job["id"])["items"]
    # nothing lost. (Rows cannot show a step evaluated twice: an insert of a step recorded before is
    # ignored. tests/test_store.py counts the evaluations and recorder calls of a resumed search.)
    assert [t["step"] for t in trials] == list(range(12))
    # resumed, not restarted: the first attempt's trials stay as it recorded them, the retry made the rest
    created = [utc(t["created_at"]) for t in trials]
    killed_at = first["evaluations"]
    assert all(c < killed for c in created[:killed_at]) and created[-1] > killed


def server_job_worker(server: Server, job_id: str) -> str:
    from prunepilot.service.db import repo
    from prunepilot.service.db.engine import session_scope

    with session_scope(f"sqlite:///{server.data_dir / 'prunepilot.db'}") as s:
        return repo.get_job(s, job_id=job_id).worker_id


def test_api_restart_mid_job_resumes(server, alice: Client, mini_zip: Path, resnet20_weights: Path) -> None:
    # 24 evaluations: the stop lands after the second, with seconds of search left on a loaded machine
    job = alice.submit(quick_spec(search={"max_evaluations": 24}), resnet20_weights, mini_zip)
    wait_for(lambda: alice.job(job["id"])["evaluations"] >= 2, every=0.1)
    log_start = server.log.stat().st_size
    session = server.proc.pid  # the server leads its session; Ray's processes stay in it
    server.stop(signal.SIGTERM)
    # stopped mid-search, handed back to the queue (a shutdown is not a failed attempt)...
    assert server_job_status(server, job["id"]) == "queued"
    wait_for(lambda: not running_job_workers(session), timeout=20)  # ...and its worker went down with the embedded Ray
    shutdown_log = server.log.read_bytes()[log_start:].decode(errors="replace")
    assert "Traceback" not in shutdown_log, shutdown_log[-3000:]
    server.start()
    with Client(server.url, server.keys["alice"]) as again:
        done = again.wait(job["id"], poll_s=0.5, timeout_s=300)
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 1
        assert [t["step"] for t in again.trials(job["id"])["items"]] == list(range(24))


def running_job_workers(session: int) -> list[str]:
    """Ray job workers in the server's session (another server's, e.g. a parallel test's, do not count)."""
    import subprocess

    out = subprocess.run(["ps", "-eo", "sid=,args="], capture_output=True, text=True).stdout
    rows = [line.strip().split(None, 1) for line in out.splitlines() if line.strip()]
    return [row[1] for row in rows if len(row) == 2 and row[0] == str(session) and row[1].startswith("ray::run_job")]


def server_job_status(server: Server, job_id: str) -> str:
    from prunepilot.service.db import repo
    from prunepilot.service.db.engine import session_scope

    with session_scope(f"sqlite:///{server.data_dir / 'prunepilot.db'}") as s:
        return repo.get_job(s, job_id=job_id).status


def test_twenty_concurrent_submissions_all_finish(server, alice: Client, mini_zip: Path, resnet20_weights: Path) -> None:
    ids: list[str] = []
    errors: list[Exception] = []

    def submit() -> None:
        try:
            with Client(server.url, server.keys["alice"]) as c:
                ids.append(c.submit(quick_spec(agent="uniform", search={"max_evaluations": 1}), resnet20_weights, mini_zip)["id"])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(ids)) == 20
    for job_id in ids:
        assert alice.wait(job_id, poll_s=0.5, timeout_s=600)["status"] == "succeeded"


def test_a_job_is_measured_by_its_device_agent_which_may_die_and_be_replaced(server, alice: Client, mini_zip: Path,
                                                                            tmp_path: Path) -> None:
    """Issue 22: a job whose latency target is a device, measured by `prunepilot device-agent` processes
    (ONNX Runtime) on this machine. The agent dies during the table build without a word: the job waits,
    saying so; a new agent finishes it; nothing recorded is measured again; every number in the job's
    latency table and measured check came from the agents (the worker timed none of them)."""
    from helpers.devices import AgentProcess, Tiny
    from helpers.onnx_models import export_net
    from sqlalchemy import select

    from prunepilot.service.auth import create_key
    from prunepilot.service.db.engine import read_scope
    from prunepilot.service.db.models import DeviceTask, LatencyEntry

    key = create_key(server.db_url, "board agent", device="board")[1]
    net = export_net(Tiny().eval(), tmp_path / "tiny.onnx")
    first = AgentProcess(server.url, key, "board", tmp_path / "agent1", max_tasks=2)
    spec = quick_spec(arch="onnx", budget={"constraints": [{"resource": "latency", "ratio": 0.9}]}, target={"device": "board"})
    job_id = alice.submit(spec, None, mini_zip, model=net)["id"]

    wait_for(lambda: first.count("entries_timed") >= 2, timeout=120, every=0.05)  # the table build is under way
    first.stop(signal.SIGKILL)
    job = wait_for(lambda: (j := alice.job(job_id))["phase"] == "waiting for device board" and j, timeout=60)
    assert job["status"] == "running"
    second = AgentProcess(server.url, key, "board", tmp_path / "agent2")
    done = alice.wait(job_id, poll_s=0.3, timeout_s=240)
    assert done["status"] == "succeeded", done["error"]
    assert second.stop() == 0 and "tasks measured" in second.log.read_text()  # its counters line, on a clean exit
    report = alice.report(job_id)
    board = next(d for d in alice.http.get("/v1/devices").json() if d["name"] == "board")

    ids = (first.state()["agent_id"], second.state()["agent_id"])
    with read_scope(server.db_url) as s:
        tasks = s.execute(select(DeviceTask.id, DeviceTask.kind, DeviceTask.measured_by, DeviceTask.result)).all()
        table_key = report["latency_table"]["device"]
        stored = sorted(s.scalars(select(LatencyEntry.latency_ms).where(LatencyEntry.device == table_key)).all())
    entries = [t for t in tasks if t.kind == "entry"]
    networks = {t.id for t in tasks if t.kind == "network"}
    by = {agent: {t.id for t in tasks if t.measured_by == agent} for agent in ids}
    # every task measured by one of the agents; the first recorded some before it died, none of them measured again
    assert all(t.measured_by in ids for t in tasks) and by[ids[0]] and not second.timed() & by[ids[0]]
    assert (second.count("entries_timed"), second.count("networks_timed"), second.count("rejected")) == (
        len(by[ids[1]] - networks), len(by[ids[1]] & networks), 0)
    # the job's table is the agents' entries (one task each) and the calibration and measured check ran on the device
    assert report["latency_table"]["backend"] == "remote" and table_key.startswith("device=board|backend=onnxruntime|")
    assert report["latency_table"]["entries"] == len(entries) == len(stored)
    assert stored == sorted(t.result["ms"][0] for t in entries)
    assert report["search"]["latency_check"]["checks"] and len(networks) >= 4 and networks <= by[ids[1]]
    assert board["entries"] == len(entries) and job_id in [j["id"] for j in board["jobs"]]
    assert board["tasks"] == {"open": 0, "done": len(tasks)}
