"""Devices and their agents, in-process (TestClient, real SQLite, real ONNX Runtime): key scopes, the
lease protocol, and the remote latency backend timing through an agent. The whole loop through a
real server and agent processes is in tests/test_api.py."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from prunepilot.agents import SearchCancelled
from prunepilot.compression.backends import LatencyTarget
from prunepilot.service.auth import create_key
from prunepilot.service.db import repo
from prunepilot.service.db.engine import read_scope, session_scope
from prunepilot.service.db.lifecycle import JobStatus
from prunepilot.service.db.models import LatencyCalibration, LatencyEntry
from prunepilot.service.db.store import JobStore
from prunepilot.service.device_agent import AgentConfig, DeviceAgent, pack_models
from prunepilot.service.remote_backend import RemoteBackend
from prunepilot.service.schemas import JobCreate

REGISTER = {"backend": "onnxruntime", "fingerprint": "backend=onnxruntime|cpu=test|threads=1"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def board(api) -> str:  # type: ignore[no-untyped-def]
    """A device key for device 'board'."""
    return create_key(api.settings.db_url, "board-key", device="board")[1]


def test_a_device_key_reaches_only_its_own_devices_tasks(api, board: str, resnet20_weights: Path) -> None:
    """A device key cannot submit jobs, list or read jobs (its owner's or anyone's), download models,
    inspect, list devices, or act for another device; a user's key cannot act as a device's agent."""
    job = api.submit({"arch": "resnet20", "dataset": "cifar10-jpeg", "agent": "random",
                      "budget": {"constraints": [{"resource": "flops", "ratio": 0.5}]}}, resnet20_weights).json()
    other = create_key(api.settings.db_url, "other-board", device="other")[1]
    dev = bearer(board)
    for method, url in [("get", "/v1/jobs"), ("get", f"/v1/jobs/{job['id']}"), ("get", f"/v1/jobs/{job['id']}/model"),
                        ("get", f"/v1/jobs/{job['id']}/trials"), ("post", f"/v1/jobs/{job['id']}/cancel"), ("get", "/v1/models"),
                        ("get", "/v1/devices"), ("get", f"/v1/problems/{'0' * 16}/compare")]:
        r = getattr(api.client, method)(url, headers=dev)
        assert r.status_code == 403 and "device key" in r.json()["detail"], (url, r.text)
    # refused on the headers, before the upload is read (the middleware's check)
    r = api.client.post("/v1/jobs", headers=dev, data={"spec": "{}"}, files={"weights": ("w.th", resnet20_weights.read_bytes())})
    assert r.status_code == 403
    r = api.client.post("/v1/inspect", headers=dev, data={"spec": '{"arch": "resnet20"}'})
    assert r.status_code == 403
    # another device's routes
    assert api.client.post("/v1/devices/other/register", json=REGISTER, headers=dev).status_code == 403
    assert api.client.post("/v1/devices/board/register", json=REGISTER, headers=bearer(other)).status_code == 403
    # a user's key never answers measurement tasks, for any device
    for url in ["/v1/devices/board/register", "/v1/devices/board/lease", "/v1/devices/board/heartbeat",
                "/v1/devices/board/tasks/1/result"]:
        r = api.client.post(url, json={}, headers=api.headers("alice"))
        assert r.status_code == 403 and "device's own key" in r.json()["detail"], (url, r.text)
    assert api.client.get("/v1/devices/board/tasks/1/payload", headers=api.headers("alice")).status_code == 403
    # what the device key may do
    r = api.client.post("/v1/devices/board/register", json=REGISTER, headers=dev)
    assert r.status_code == 200 and r.json()["fingerprint"] == REGISTER["fingerprint"]
    assert api.client.get(f"/v1/jobs/{job['id']}", headers=api.headers("alice")).status_code == 200  # the user's key still works


def _add_entry_tasks(url: str, keys: list[str]) -> None:
    with session_scope(url) as s:
        device = repo.get_device(s, name="board")
        assert device is not None
        repo.add_device_tasks(s, device_id=device.id, tasks=[
            {"kind": "entry", "key": k, "fingerprint": REGISTER["fingerprint"], "job_id": None,
             "spec": {"inputs": [[1, 4, 8, 8]], "warmup": 1, "repeats": 2, "rounds": 1}, "payload": pack_models([b"onnx"])}
            for k in keys])


def test_a_payload_is_the_same_bytes_whenever_it_is_packed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same models pack to the same bytes at any time of day (a zip member dated by the clock made
    a task's stored payload differ from a later packing of the same models)."""
    import zipfile

    from prunepilot.service.device_agent import unpack_models

    monkeypatch.setattr(zipfile.time, "time", lambda: 1_000_000_000.0)
    morning = pack_models([b"onnx-a", b"onnx-b"])
    monkeypatch.setattr(zipfile.time, "time", lambda: 1_700_000_000.0)
    assert pack_models([b"onnx-a", b"onnx-b"]) == morning
    assert unpack_models(morning, 2) == [b"onnx-a", b"onnx-b"]


def test_leases_expire_and_a_result_is_recorded_once(tmp_path: Path) -> None:
    from inproc import open_api

    client, settings = open_api(tmp_path / "api", device_lease_s=1)
    with client:
        h = bearer(create_key(settings.db_url, "board-key", device="board")[1])
        lease = lambda agent: client.post("/v1/devices/board/lease", json={"agent_id": agent, "wait_s": 0}, headers=h)  # noqa: E731
        r = lease("a")
        assert r.status_code == 409 and "register" in r.json()["detail"]
        assert client.post("/v1/devices/board/register", json=REGISTER, headers=h).status_code == 200
        _add_entry_tasks(settings.db_url, ["k1", "k2"])
        _add_entry_tasks(settings.db_url, ["k1"])  # the same entry again: no second task
        first = lease("a").json()["tasks"]
        assert [t["kind"] for t in first] == ["entry", "entry"]
        assert lease("b").json()["tasks"] == []  # held by a
        assert client.get(first[0]["payload"], headers=h).content == pack_models([b"onnx"])
        time.sleep(1.2)  # a went quiet past the lease time
        again = lease("b").json()["tasks"]
        assert [t["id"] for t in again] == [t["id"] for t in first]
        task = first[0]["id"]
        post = lambda agent, **body: client.post(f"/v1/devices/board/tasks/{task}/result", json={"agent_id": agent, **body},  # noqa: E731
                                                 headers=h)
        r = post("a", ms=[1.5])
        assert r.status_code == 409 and "not leased to agent a" in r.json()["detail"]
        r = post("b", runs_ms=[[1.0, 2.0]])
        assert r.status_code == 422 and "ms:" in r.json()["detail"]
        assert post("b", ms=[1.25]).status_code == 200
        r = post("b", ms=[9.0])
        assert r.status_code == 409 and "measured already" in r.json()["detail"]
        assert client.get(first[0]["payload"], headers=h).status_code == 404  # dropped once measured
        # an agent that stops hands back what it holds: the next agent need not wait for the lease
        assert client.post("/v1/devices/board/heartbeat", json={"agent_id": "b", "release": True}, headers=h).json()["extended"] == 1
        assert [t["id"] for t in lease("c").json()["tasks"]] == [first[1]["id"]]
        with read_scope(settings.db_url) as s:
            device = repo.get_device(s, name="board")
            assert device is not None
            assert repo.device_task_results(s, device_id=device.id, keys=["k1", "k2"]) == {"k1": {"ms": [1.25]}, "k2": None}


def _probe(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)).eval()


def settled(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``condition`` holds: a backend sees a result once the service has recorded it, the
    agent counts it when the service's answer reaches it, a moment later."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_the_remote_backend_times_through_an_agent_and_never_twice(api, board: str) -> None:
    """Real ONNX Runtime in a real agent (in a thread, through the app): entries and networks are
    timed by the agent; an entry once recorded is answered from SQL, never measured again."""
    agent = DeviceAgent(AgentConfig(server="http://testserver", key=board, name="board", wait_s=0.3, threads=1), http=api.client)
    thread = threading.Thread(target=agent.run, daemon=True)
    phases: list[str | None] = []
    backend = RemoteBackend(JobStore(api.settings.db_url), "board", lease_s=30, on_phase=phases.append, poll_s=0.05)
    thread.start()
    try:
        key = backend.fingerprint(1, 1)
        assert key.startswith("device=board|backend=onnxruntime|") and key.endswith("|batch=1")
        x = torch.randn(1, 4, 8, 8)
        probes = [(_probe(4, 8), x), (_probe(4, 8), x), (_probe(4, 16), x)]  # the first two: one entry (weights differ)
        ms = backend.time_entries(probes, warmup=1, repeats=3, rounds=2)
        assert len(ms) == 3 and all(m > 0 for m in ms) and ms[0] == ms[1]
        settled(lambda: agent.counters.entries_timed >= 2)
        assert agent.counters.entries_timed == 2
        assert backend.time_entries([(_probe(4, 16), x)], warmup=1, repeats=3, rounds=2) == [ms[2]]  # from SQL
        nets = backend.measure([_probe(3, 8), _probe(3, 4)], input_size=8, batch_size=2, threads=None, warmup=1, repeats=4)
        assert [n.repeats for n in nets] == [4, 4] and all(n.median_ms > 0 for n in nets)
        settled(lambda: agent.counters.networks_timed >= 1)
        assert (agent.counters.entries_timed, agent.counters.networks_timed, agent.counters.rejected) == (2, 1, 0)
        assert any(p and p.startswith("measuring latency-table entries on device board") for p in phases) and phases[-1] is None
    finally:
        agent.stopping.set()
        thread.join(10)
    assert not thread.is_alive()
    listed = api.client.get("/v1/devices", headers=api.headers()).json()
    assert [(d["name"], d["tasks"]) for d in listed] == [("board", {"open": 0, "done": 3})]


def test_a_job_waiting_for_its_device_says_so_and_can_be_cancelled(api, board: str) -> None:
    polls = []

    def cancelled() -> bool:
        polls.append(1)
        return len(polls) > 2

    phases: list[str | None] = []
    backend = RemoteBackend(JobStore(api.settings.db_url), "board", lease_s=30, should_stop=cancelled, on_phase=phases.append, poll_s=0.01)
    with pytest.raises(SearchCancelled, match="waiting for device board"):
        backend.fingerprint(1, 1)  # no agent has registered
    assert phases == ["waiting for device board", None]  # said while it waited, cleared when it stopped
    # registered, then the agent went quiet (longer ago than the lease): a network measurement waits
    # too, saying so, and a cancel drops its task
    api.client.post("/v1/devices/board/register", json=REGISTER, headers=bearer(board))
    backend.lease_s = 1e-6
    polls.clear()
    with pytest.raises(SearchCancelled):
        backend.measure([_probe(3, 4)], input_size=8, batch_size=1, threads=None, warmup=1, repeats=2)
    assert phases[-2:] == ["waiting for device board", None]
    listed = api.client.get("/v1/devices", headers=api.headers()).json()
    assert listed[0]["tasks"] == {"open": 0, "done": 0}  # the agent will not be asked to time what nobody reads


def test_the_agent_imports_no_torch_ray_or_sql() -> None:
    """`prunepilot device-agent` on a minimal install: the agent, its timing and its command line load
    none of the service's heavy dependencies."""
    code = ("import sys\n"
            "sys.argv = ['prunepilot', 'device-agent', '--help']\n"
            "from prunepilot.service import entry, device_agent\n"
            "try:\n    entry.main()\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "device_agent.load_timing().time_onnx_models\n"
            "device_agent.fingerprint('onnxruntime', 1, ['CPUExecutionProvider'])\n"
            "heavy = {'torch', 'ray', 'sqlalchemy', 'fastapi', 'typer', 'prunepilot.compression'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--server" in r.stdout


def test_keys_create_device_declares_the_device_and_scopes_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`prunepilot keys create --device NAME` (the CLI's entry point, in this process)."""
    from prunepilot.service.auth import authenticate
    from prunepilot.service.cli import main
    from prunepilot.service.db.migrate import upgrade
    from prunepilot.service.settings import get_settings

    monkeypatch.setenv("PRUNEPILOT_DATA_DIR", str(tmp_path))
    url = f"sqlite:///{tmp_path / 'prunepilot.db'}"
    upgrade(url)

    def cli(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["prunepilot", *args])
        get_settings.cache_clear()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = cli("keys", "create", "--name", "board agent", "--device", "board-1")
    assert code == 0 and "device board-1" in out
    principal_secret = out.split()[-1]
    principal = authenticate(url, principal_secret)
    assert principal is not None and (principal.scope, principal.device) == ("device", "board-1")
    with read_scope(url) as s:
        assert [d.name for d in repo.list_devices(s)] == ["board-1"]
    code, out, _ = cli("keys", "list")
    assert "device board-1" in out
    code, _, err = cli("keys", "create", "--device", "no spaces please")
    assert code == 2 and "device name" in err and "Traceback" not in err

    # `prunepilot devices remove`: refused while an unfinished job targets the device; then its
    # tasks, its keys and its table go, and nothing of another device (board-10: a name it prefixes)
    cli("keys", "create", "--device", "board-10")
    with session_scope(url) as s:
        device_id = repo.get_device(s, name="board-1").id  # type: ignore[union-attr]
        repo.add_device_tasks(s, device_id=device_id, tasks=[{"kind": "entry", "key": "k", "fingerprint": "fp", "job_id": None,
                                                              "spec": {}, "payload": b"zip"}])
        for name in ("board-1", "board-10"):
            repo.put_latency_entries(s, device=f"device={name}|fp|batch=1", entries={"sig": (1.0, 3)})
            repo.put_latency_calibration(s, device=f"device={name}|fp|batch=1", model_key="m", calibration={"scale": 1.0})
        repo.create_job(s, job_id="j1", agent="uniform", arch="resnet20", dataset="cifar10-jpeg", problem_key="0" * 16,
                        problem={"spec": {"target": {"device": "board-1"}}})
    code, out, _ = cli("devices", "list")
    assert code == 0 and "board-1 - never registered 0 entries 0 calibrated model(s) 1 open / 0 done tasks 1 job(s)" in " ".join(out.split()), out

    # `prunepilot devices reset-calibrations`: the device's calibrations go (not another device's),
    # its table entries stay, and the unfinished job does not stop it
    code, out, _ = cli("devices", "reset-calibrations", "board-1")
    assert code == 0 and "device board-1: 1 stored calibration deleted" in " ".join(out.split()), out
    with read_scope(url) as s:
        assert [c.device for c in s.query(LatencyCalibration).all()] == ["device=board-10|fp|batch=1"]
        assert {e.device for e in s.query(LatencyEntry).all()} == {"device=board-1|fp|batch=1", "device=board-10|fp|batch=1"}
    code, out, _ = cli("devices", "reset-calibrations", "board-1")
    assert code == 0 and "0 stored calibrations deleted" in out
    code, _, err = cli("devices", "reset-calibrations", "board-2")
    assert code == 2 and "no device 'board-2'" in err and "Traceback" not in err
    with session_scope(url) as s:
        repo.put_latency_calibration(s, device="device=board-1|fp|batch=1", model_key="m", calibration={"scale": 1.0})
    code, _, err = cli("devices", "remove", "board-1")
    assert code == 2 and "latency target of 1 unfinished job(s) (j1)" in " ".join(err.split()) and "Traceback" not in err
    with session_scope(url) as s:
        assert repo.move_job(s, job_id="j1", to=JobStatus.CANCELLED, allowed_from=frozenset({JobStatus.QUEUED}))
    code, out, _ = cli("devices", "remove", "board-1")
    assert code == 0 and "device board-1 removed: 1 task(s), 1 key(s) revoked, 1 latency-table entry, 1 calibration" in out, out
    assert authenticate(url, principal_secret) is None  # its agent can no longer connect
    with read_scope(url) as s:
        assert [d.name for d in repo.list_devices(s)] == ["board-10"]
        assert [e.device for e in s.query(LatencyEntry).all()] == ["device=board-10|fp|batch=1"]
        assert [c.device for c in s.query(LatencyCalibration).all()] == ["device=board-10|fp|batch=1"]
    code, _, err = cli("devices", "remove", "board-1")
    assert code == 2 and "no device 'board-1'" in err
    get_settings.cache_clear()


def test_a_job_may_target_only_a_declared_device(api, board: str, resnet20_weights: Path) -> None:
    spec = {"arch": "resnet20", "dataset": "cifar10-jpeg", "agent": "random", "target": {"device": "nowhere"},
            "budget": {"constraints": [{"resource": "latency", "ratio": 0.8}]}}
    r = api.submit(spec, resnet20_weights)
    assert r.status_code == 422 and r.json()["detail"].startswith("target.device: no device named 'nowhere' (known: board)")
    api.client.post("/v1/devices/board/register", json=REGISTER, headers=bearer(board))
    for backend in ("torch", "cuda"):  # runtimes no device agent runs
        r = api.submit({**spec, "target": {"device": "board", "backend": backend}}, resnet20_weights)
        assert r.status_code == 422 and "target" in r.json()["detail"] and "device agents run onnxruntime" in r.json()["detail"], r.text
    # without a backend a device target measures with the agents' runtime, and a local one in torch
    assert JobCreate.model_validate(spec).target.to_engine() == LatencyTarget("onnxruntime", "nowhere")
    assert JobCreate.model_validate(spec | {"target": {}}).target.to_engine() == LatencyTarget("torch")
    r = api.submit({**spec, "target": {"device": "board", "backend": "onnxruntime"}}, resnet20_weights)
    assert r.status_code == 202, r.text
    devices = api.client.get("/v1/devices", headers=api.headers()).json()
    assert [j["id"] for j in devices[0]["jobs"]] == [r.json()["id"]]  # alice's job on it
    assert api.client.get("/v1/devices", headers=api.headers("bob")).json()[0]["jobs"] == []  # not bob's
