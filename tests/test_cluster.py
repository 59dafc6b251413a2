"""The deployment topology of docker/compose.yaml, without docker: a real PostgreSQL server, a Ray
head started with `ray start --head` on 127.0.0.1 (no CPUs, like the compose head), a separately
started Ray worker node, and the API pointed at both through settings. A job runs end to end."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pg import postgres_server

from prunepilot.service.client import Client
from prunepilot.service.pgserver import free_port
from prunepilot.service.process import ServiceProcess

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


class RayNode:
    """`ray start --block` in its own process group: killing the group stops the node's processes."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as fh:
            self.proc = subprocess.Popen([_ray_bin(), "start", "--block", *args], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def stop(self) -> None:
        # A node winds down on SIGTERM in up to half a minute; nothing of it is asserted on, so the
        # test gives it a few seconds and then kills the group.
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cluster")
    token = secrets.token_hex(32)
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    with postgres_server() as db_url:
        head = RayNode(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0", "--include-dashboard=false"],
                       env, root / "head.log")
        time.sleep(3)
        worker = RayNode([f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=2"], env, root / "worker.log")
        api = ServiceProcess(root / "api", {**{k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")},
                                            "PRUNEPILOT_DATABASE_URL": db_url, "PRUNEPILOT_RAY_ADDRESS": f"127.0.0.1:{port}",
                                            "PRUNEPILOT_JOB_CPUS": "1", "PRUNEPILOT_DISPATCH_INTERVAL_S": "0.3"})
        try:
            api.cli("db", "upgrade")
            key = api.cli("keys", "create", "--name", "cluster").split()[-1]
            api.start(timeout=240)
            yield api, key, db_url
        finally:
            api.stop()
            # in parallel, not one after the other
            stoppers = [threading.Thread(target=node.stop) for node in (worker, head)]
            for t in stoppers:
                t.start()
            for t in stoppers:
                t.join()


def test_job_runs_on_postgres_and_a_separate_ray_cluster(cluster, mini_zip: Path, resnet20_weights: Path) -> None:
    api, key, db_url = cluster
    with Client(api.url, key) as c:
        health = c.http.get("/healthz").json()
        assert health["database"] == "postgresql" and health["ray"].startswith("cluster")
        spec = {"arch": "resnet20", "dataset": "upload", "agent": "random", "budget": {"constraints": [{"resource": "flops", "ratio": 0.5}]},
                "search": {"max_evaluations": 3}, "fidelity": {"val_images": 100, "calib_images": 128}, "finetune": {"epochs": 0.0},
                "measure": {"test_images": 100, "latency_batches": [1]}}
        job = c.submit(spec, resnet20_weights, mini_zip)
        done = c.wait(job["id"], poll_s=0.5, timeout_s=600)
        assert done["status"] == "succeeded", done["error"]
        assert c.trials(job["id"])["total"] == 3
        out = c.download(job["id"], api.data_dir / "dl")
        assert (out / "model.safetensors").is_file()
    # the trials live in PostgreSQL, beside Optuna's tables when an Optuna agent ran
    import psycopg

    with psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        n = conn.execute("SELECT count(*) FROM job_trials WHERE job_id = %s", (job["id"],)).fetchone()[0]
    assert n == 3
    assert shutil.which(_ray_bin()) or Path(_ray_bin()).exists()
