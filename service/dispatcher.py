"""Hands queued jobs to Ray and watches them; the database decides what runs.

A thread in the API process. Each tick it (1) collects finished Ray tasks, re-queueing jobs whose
worker died (bounded by ``job_max_attempts``), (2) re-queues jobs that are marked running but
have no live worker (after an API restart, or a stale heartbeat on a cluster), and (3) submits
queued jobs. Retried jobs resume from their recorded trials. Every few minutes, after a tick, it
also sweeps the files of long-failed and long-cancelled jobs (``retention``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from . import retention
from .db.lifecycle import IN_WORKER, JobStatus
from .db.store import JobStore
from .settings import Settings
from .worker import HEARTBEAT_S, run_job, stale

log = logging.getLogger("prunepilot.dispatcher")


def init_ray(settings: Settings) -> str:
    """Start or join Ray for this process, keeping the process's own SIGTERM / SIGINT handling."""
    if threading.current_thread() is not threading.main_thread():
        return _init_ray(settings)
    # ray.init installs a SIGTERM handler that calls sys.exit() wherever the process happens to be:
    # inside uvicorn's event loop that raised SystemExit in a request (a traceback in the log) and
    # skipped the graceful shutdown, so running jobs were not handed back. The server's handlers
    # (uvicorn's: finish requests, run the lifespan's shutdown) are put back.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _init_ray(settings)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _init_ray(settings: Settings) -> str:
    import ray

    if ray.is_initialized():
        return "connected"
    env = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}}
    if settings.worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(settings.worker_niceness)  # read by the raylet ray.init starts
    if settings.ray_address:
        ray.init(address=settings.ray_address, runtime_env=env, logging_level=logging.WARNING, log_to_driver=False)
        return f"cluster {settings.ray_address}"
    # address="local": always a fresh embedded instance, never a cluster that `ray start` left
    # recorded in /tmp/ray (it may be gone, or belong to someone else)
    ray.init(address="local", include_dashboard=False, runtime_env=env, logging_level=logging.WARNING, log_to_driver=False,
             num_cpus=settings.ray_num_cpus)
    return "embedded"


def job_gpus(settings: Settings, cluster_gpus: float) -> float:
    """GPUs a job's Ray task reserves: PRUNEPILOT_GPUS_PER_JOB, or (auto) one GPU when the cluster has
    any and jobs may use them (DEVICE is not cpu), else none. A job's task that holds no GPU sees none
    (Ray hides them), so ``auto`` then runs it on the CPU: reservation and device agree."""
    if settings.gpus_per_job is not None:
        if settings.gpus_per_job > cluster_gpus:
            log.warning("jobs reserve %g GPU(s) (PRUNEPILOT_GPUS_PER_JOB) but the Ray cluster has %g: they wait for a GPU node",
                        settings.gpus_per_job, cluster_gpus)
        return settings.gpus_per_job
    return 1.0 if cluster_gpus > 0 and settings.device != "cpu" else 0.0


class Dispatcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = JobStore(settings.db_url)
        self.running: dict[str, Any] = {}  # job id -> Ray ObjectRef
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="dispatcher")
        self._embedded = not settings.ray_address
        self._first_tick = True
        self._next_sweep = 0.0  # monotonic time of the next retention sweep: the first follows the first tick

    def start(self) -> None:
        import ray

        self._remote = ray.remote(max_retries=0)(run_job)
        self._thread.start()

    def stop(self) -> None:
        """Stop dispatching, end this process's job tasks and hand their jobs back to the queue: the
        next start resumes them from their recorded trials. A shutdown is not the job's failure, so
        the interrupted run is not counted against its attempts (graceful restarts, e.g. an upgrade,
        must never use up a healthy job's retries)."""
        import ray

        self._stop.set()
        self._thread.join(timeout=10)
        for job_id, ref in self.running.items():
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or Ray is going down anyway
                pass
            try:
                state = self.store.requeue_or_fail(job_id, "interrupted by a shutdown", self.settings.job_max_attempts, refund=True)
                if state is None:  # its worker ended it between the last tick and now
                    log.info("job %s had already ended at shutdown", job_id)
                else:
                    log.info("job %s handed back at shutdown: %s", job_id, state)
            except Exception:  # noqa: BLE001 - the database may be gone too; the next start re-queues it then
                log.warning("job %s could not be handed back at shutdown", job_id)
        self.running.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - keep dispatching; the next tick retries
                log.exception("dispatcher tick failed")
            self.sweep_files()
            self._stop.wait(self.settings.dispatch_interval_s)

    def sweep_files(self, now: float | None = None) -> None:
        """The retention sweep (service/retention.py) every ``retention.SWEEP_INTERVAL_S``; a failure is
        logged and never stops dispatching."""
        now = time.monotonic() if now is None else now
        if now < self._next_sweep:
            return
        self._next_sweep = now + retention.SWEEP_INTERVAL_S
        try:
            result = retention.sweep(self.settings)
            if result.removed or result.errors:
                log.info("retention: %s", result.summary())
        except Exception:  # noqa: BLE001 - a full disk or a database hiccup: the next sweep retries
            log.exception("retention sweep failed")

    def tick(self) -> None:
        import ray

        if self.running:
            done, _ = ray.wait(list(self.running.values()), num_returns=len(self.running), timeout=0)
            for job_id, ref in list(self.running.items()):
                if ref in done:
                    del self.running[job_id]
                    try:
                        state = ray.get(ref)
                        log.info("job %s finished: %s", job_id, state)
                    except Exception as exc:  # noqa: BLE001 - worker process died or Ray failed the task
                        log.warning("job %s: worker lost (%s)", job_id, type(exc).__name__)
                        self._requeue_or_fail(job_id, f"worker died ({type(exc).__name__})")
        gpus: float | None = None  # looked up once a tick, when a job is submitted (GPU nodes may join or leave)
        for job_id, status, heartbeat, cancel in self.store.active():
            if job_id in self.running:
                continue
            if status in IN_WORKER:
                # No task of ours runs it: after a restart of an embedded deployment nothing can; on a
                # cluster another API process may own it, so wait until its heartbeat is stale.
                if (self._embedded and self._first_tick) or stale(heartbeat, HEARTBEAT_S * 6):
                    self._requeue_or_fail(job_id, "worker lost")
                continue
            if cancel:
                continue
            cap = self.settings.max_concurrent_jobs
            if cap is not None and len(self.running) >= cap:
                break
            if gpus is None:
                gpus = job_gpus(self.settings, float(ray.cluster_resources().get("GPU", 0.0)))
            self.running[job_id] = self._remote.options(num_cpus=self.settings.job_cpus, num_gpus=gpus).remote(
                job_id, self.settings.model_dump(mode="json"))
        self._first_tick = False

    def _requeue_or_fail(self, job_id: str, reason: str) -> None:
        state = self.store.requeue_or_fail(job_id, reason, self.settings.job_max_attempts)
        if state is JobStatus.QUEUED:
            log.info("job %s re-queued (%s)", job_id, reason)
        elif state is not None:
            log.info("job %s %s (%s)", job_id, state, reason)
