"""GPU scheduling on Ray, on a CPU-only machine: an embedded Ray that declares one GPU (Ray schedules
by the count; no CUDA is needed). The dispatcher reserves a GPU per job, and a GPU job's NetAdapt
proposals ask for the same share without waiting forever for a GPU the job itself holds. (A CPU
job's proposals fan out as before: tests/test_cluster.py runs one on a real cluster.)"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")


def test_the_dispatcher_reserves_a_gpu_per_job_on_a_cluster_with_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prunepilot.service.db import repo
    from prunepilot.service.db.engine import dispose_engines, session_scope
    from prunepilot.service.db.migrate import upgrade
    from prunepilot.service.dispatcher import Dispatcher
    from prunepilot.service.settings import Settings

    settings = Settings(data_dir=tmp_path, run_dispatcher=False)
    upgrade(settings.db_url)
    with session_scope(settings.db_url) as s:
        repo.create_job(s, job_id="j1", agent="random", arch="resnet20", dataset="cifar10-jpeg", problem={}, problem_key="k")
    asked: list[dict[str, float]] = []

    class Remote:
        def options(self, **kw: float) -> Remote:
            asked.append(kw)
            return self

        def remote(self, *args: object) -> str:
            return "ref"

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})  # the cluster's, as Ray reports them
    d = Dispatcher(settings)
    d._remote = Remote()
    try:
        d.tick()
    finally:
        dispose_engines()
    assert asked == [{"num_cpus": settings.job_cpus, "num_gpus": 1.0}]


@pytest.fixture(scope="module")
def one_gpu_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the tasks below travel by value
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    yield
    ray.shutdown()


def _proposal(shared: str, item: int) -> tuple[int, str, int]:
    return os.getpid(), shared, item * 2


def _job(items: list[int]) -> tuple[float, list[tuple[int, str, int]], int]:
    """What a job's task does with its map: NetAdapt's proposals through the worker's Ray map."""
    from prunepilot.service.raymap import assigned_gpus, ray_map

    mapper = ray_map()
    assert mapper is not None
    return assigned_gpus(), list(mapper(_proposal, "shared", items)), os.getpid()


def test_a_gpu_job_finishes_its_proposals_even_when_it_holds_the_only_gpu(one_gpu_ray) -> None:
    """The proposals ask for a GPU like the job; with the only one held by the job, they can never
    start elsewhere: the job runs them itself (waiting for them would hang forever)."""
    gpus, results, pid = ray.get(ray.remote(num_cpus=1, num_gpus=1)(_job).remote([1, 2, 3, 4]), timeout=120)
    assert gpus == 1.0
    assert [r[1:] for r in results] == [("shared", 2), ("shared", 4), ("shared", 6), ("shared", 8)]
    assert {r[0] for r in results} == {pid}
