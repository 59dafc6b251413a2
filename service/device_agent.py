"""``prunepilot device-agent``: times measurement tasks on the machine a model will run on.

Runs on the target device with a minimal install (httpx, numpy, onnxruntime; no torch, Ray or SQL):
it registers the device's fingerprint with the service, long-polls for measurement tasks (layer
entries of a latency table, candidate networks), times them with ONNX Runtime exactly as the
service's ``onnxruntime`` backend does (``prunepilot.compression.ort_timing``), and posts the results.

    prunepilot device-agent --server https://prunepilot.example --key pp_... --name board-1 --backend onnxruntime

A task's lease is kept alive by a heartbeat while it is timed; an agent that disappears loses its
tasks to the next agent of the device after ``PRUNEPILOT_DEVICE_LEASE_S``. SIGTERM / SIGINT stop it
between requests: tasks it holds are handed back, and its counters are printed (and written to
``--counters``, also after every task).

This module imports only the standard library at import time: the payload format (``pack_models``)
is shared with the service, which must not pull the agent's runtime in, and the agent must not pull
the service's in.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import signal
import socket
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger("prunepilot.device_agent")

BACKENDS = ("onnxruntime",)
MEMBER = "model-{}.onnx"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can hold
MAX_PAYLOAD_BYTES = 1 << 30  # what an agent accepts to unpack (a network task's models together)


# ------------------------------------------------------------------ the payload: ONNX models in one zip


def pack_models(models: Sequence[bytes]) -> bytes:
    """Several ONNX models as one payload: a zip of ``model-0.onnx``, ``model-1.onnx``, ... (stored:
    ONNX weights do not compress). The members carry a fixed date, so the same models always pack to
    the same bytes (a member's default date is the clock's, which made two packings differ)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for i, data in enumerate(models):
            z.writestr(zipfile.ZipInfo(MEMBER.format(i), date_time=ZIP_DATE), data)
    return buf.getvalue()


def unpack_models(blob: bytes, count: int) -> list[bytes]:
    """The ``count`` models of a payload, in order; ValueError for anything else in it."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        names = [info.filename for info in z.infolist()]
        want = [MEMBER.format(i) for i in range(count)]
        if names != want:
            raise ValueError(f"payload holds {names[:5]}, expected {want[:5]}")
        if sum(info.file_size for info in z.infolist()) > MAX_PAYLOAD_BYTES:
            raise ValueError("payload larger than the agent accepts")
        return [z.read(name) for name in want]


# ------------------------------------------------------------------ timing


def load_timing() -> ModuleType:
    """``prunepilot.compression.ort_timing`` (numpy + onnxruntime only), loaded by its file: importing
    it as a submodule would first import the engine package, and with it torch."""
    import importlib.util

    import prunepilot

    path = Path(prunepilot.__file__).parent / "compression" / "ort_timing.py"
    spec = importlib.util.spec_from_file_location("prunepilot_device_agent_ort_timing", path)
    if spec is None or spec.loader is None:  # pragma: no cover - the file ships with the package
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fingerprint(backend: str, threads: int | None, providers: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """What keys this agent's measurements (with the device's name and the batch size): the runtime,
    its execution providers, the CPU, the thread count and what an entry holds (``entry_method``).
    Plus facts shown on the dashboard."""
    import onnxruntime as ort

    timing = load_timing()
    cpu = timing.cpu_model(("model name", "Hardware", "Model"))  # ARM boards name their CPU differently
    fp = (f"backend={backend}|ort={ort.__version__}|providers={'+'.join(providers)}|cpu={cpu}"
          f"|threads={threads or 'default'}|entries={timing.entry_method(providers)}")
    info = {"host": socket.gethostname(), "machine": platform.machine(), "system": platform.system(),
            "python": platform.python_version(), "onnxruntime": ort.__version__, "cpus": os.cpu_count()}
    return fp, info


def time_task(timing: ModuleType, task: dict[str, Any], models: list[bytes], threads: int | None,
              providers: Sequence[str]) -> dict[str, Any]:
    """One network task's result: every run of each model, interleaved (``time_onnx_models``)."""
    spec = task["spec"]
    pairs = [(data, tuple(shape)) for data, shape in zip(models, spec["inputs"], strict=True)]
    runs = timing.time_onnx_models(pairs, threads, spec["warmup"], spec["repeats"], providers)
    return {"runs_ms": runs}


def time_entries(timing: ModuleType, tasks: Sequence[dict[str, Any]], models: Sequence[bytes], threads: int | None,
                 providers: Sequence[str]) -> list[float]:
    """Entry tasks leased together, timed together: ``rounds`` rounds over all of them, the fastest
    round's median each (``time_onnx_entries``), as the service's ONNX Runtime backend times a chunk."""
    spec = tasks[0]["spec"]
    pairs = [(data, tuple(t["spec"]["inputs"][0])) for t, data in zip(tasks, models, strict=True)]
    return list(timing.time_onnx_entries(pairs, threads, spec["warmup"], spec["repeats"], spec["rounds"], providers))


# ------------------------------------------------------------------ the agent


@dataclass
class Counters:
    """What this agent did: results the service recorded (``tasks_done`` = ``entries_timed`` + ``networks_timed``),
    results it refused (``rejected``: measured already, or leased again after this agent went quiet), and tasks
    that could not be timed (``failed``, reported to the service)."""

    agent_id: str
    device: str
    tasks_done: int = 0
    entries_timed: int = 0
    networks_timed: int = 0
    rejected: int = 0
    failed: int = 0
    started: float = field(default_factory=time.time)

    def line(self) -> str:
        return (f"device-agent {self.device}: {self.tasks_done} tasks measured ({self.entries_timed} table entries, "
                f"{self.networks_timed} network sets), {self.rejected} rejected, {self.failed} failed")


@dataclass(frozen=True)
class AgentConfig:
    server: str
    key: str | None
    name: str
    backend: str = "onnxruntime"
    threads: int | None = None
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    max_tasks: int = 16
    wait_s: float = 10.0
    counters: Path | None = None


class Stop(Exception):
    """SIGTERM / SIGINT arrived: leave the loop between requests."""


class AgentError(Exception):
    """The service refused this agent for good (bad key, undeclared device): one line, exit 2."""


class DeviceAgent:
    def __init__(self, config: AgentConfig, http: Any = None) -> None:
        import httpx

        self.config = config
        self.agent_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"[:128]
        self.counters = Counters(self.agent_id, config.name)
        self.headers = {"Authorization": f"Bearer {config.key}"} if config.key else {}
        self._own_http = http is None
        self.http = http or httpx.Client(base_url=config.server.rstrip("/"), timeout=config.wait_s + 30)
        self.base = f"/v1/devices/{config.name}"
        self.stopping = threading.Event()
        self.interruptible = False  # in a long poll: a stop may break it off
        self.timing: ModuleType | None = None
        self.lease_s = 60.0

    # ---------------------------------------------------------------- HTTP

    def _call(self, method: str, path: str, expect: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        """One request answered with a status in ``expect``; anything transient (no connection, a 5xx)
        is retried until a stop is asked for (then Stop); any other answer (a refused key, an
        undeclared device) ends the agent (AgentError)."""
        import httpx

        delay = 1.0
        while True:
            try:
                r = self.http.request(method, self.base + path, headers=self.headers, **kwargs)
            except httpx.TransportError as exc:
                log.warning("cannot reach %s (%s); retrying in %.0f s", self.config.server, exc, delay)
                self._sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            if r.status_code in expect:
                return r
            if r.status_code >= 500:
                log.warning("service answered %d on %s; retrying in %.0f s", r.status_code, path, delay)
                self._sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            raise AgentError(f"HTTP {r.status_code} on {path}: {_detail(r)}")

    def _sleep(self, seconds: float) -> None:
        if self.stopping.wait(seconds):
            raise Stop

    # ---------------------------------------------------------------- protocol

    def register(self) -> None:
        fp, info = fingerprint(self.config.backend, self.config.threads, self.config.providers)
        self._call("POST", "/register", json={"backend": self.config.backend, "fingerprint": fp, "info": info})
        log.info("registered %s as %s", self.config.name, fp)

    def lease(self) -> list[dict[str, Any]]:
        """Wait for tasks (a long poll). The one request a stop interrupts: one arriving later lets the
        tasks in hand be timed and posted first."""
        if self.stopping.is_set():
            raise Stop
        self.interruptible = True
        try:
            r = self._call("POST", "/lease", json={"agent_id": self.agent_id, "max_tasks": self.config.max_tasks,
                                                   "wait_s": self.config.wait_s})
        finally:
            self.interruptible = False
        body = r.json()
        self.lease_s = float(body.get("lease_s", self.lease_s))
        return list(body["tasks"])

    def payload(self, task: dict[str, Any]) -> list[bytes] | None:
        """The task's models; None when it is no longer waiting (another agent measured it after this
        one's lease lapsed): nothing to do."""
        r = self._call("GET", f"/tasks/{task['id']}/payload", expect=(200, 404))
        if r.status_code == 404:
            log.warning("task %s: %s", task["id"], _detail(r))
            return None
        return unpack_models(r.content, len(task["spec"]["inputs"]))

    def post(self, task: dict[str, Any], result: dict[str, Any]) -> bool:
        r = self._call("POST", f"/tasks/{task['id']}/result", expect=(200, 404, 409), json={"agent_id": self.agent_id, **result})
        if r.status_code != 200:  # measured already, leased again, or no longer wanted (its job ended): not ours to record
            self.counters.rejected += 1
            log.warning("task %s: %s", task["id"], _detail(r))
            return False
        log.info("recorded task %s (%s)", task["id"], task["kind"])  # one line per result the service kept
        if "error" in result:
            self.counters.failed += 1
        else:
            self.counters.tasks_done += 1
            if task["kind"] == "entry":
                self.counters.entries_timed += 1
            else:
                self.counters.networks_timed += 1
        self.save_counters()
        return True

    def release(self) -> None:
        """Hand back what this agent holds, so the next agent need not wait out the lease."""
        try:
            self.http.post(self.base + "/heartbeat", json={"agent_id": self.agent_id, "release": True}, headers=self.headers, timeout=5)
        except Exception:  # noqa: BLE001 - leaving anyway; the lease expires on its own
            log.debug("could not hand back leases", exc_info=True)

    # ---------------------------------------------------------------- work

    def work(self, tasks: list[dict[str, Any]]) -> None:
        """Time leased tasks (entries with the same settings together, networks one by one) and post each."""
        if self.timing is None:
            self.timing = load_timing()
        timing = self.timing
        with _Heartbeat(self, max(0.5, self.lease_s / 3)):
            entries = [t for t in tasks if t["kind"] == "entry"]
            groups: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
            for t in entries:
                s = t["spec"]
                groups.setdefault((s["warmup"], s["repeats"], s["rounds"]), []).append(t)
            for group in groups.values():
                self._guarded(group, partial(self._entries, timing, group))
            for t in tasks:
                if t["kind"] == "network":
                    self._guarded([t], partial(self._network, timing, t))

    def _entries(self, timing: ModuleType, group: list[dict[str, Any]]) -> None:
        fetched = [(t, self.payload(t)) for t in group]
        group = [t for t, models in fetched if models is not None]
        models = [m[0] for _, m in fetched if m is not None]
        if not group:
            return
        medians = time_entries(timing, group, models, self.config.threads, self.config.providers)
        log.info("timed tasks %s (entry)", ",".join(str(t["id"]) for t in group))
        for t, ms in zip(group, medians, strict=True):
            self.post(t, {"ms": [ms]})

    def _network(self, timing: ModuleType, task: dict[str, Any]) -> None:
        models = self.payload(task)
        if models is None:
            return
        result = time_task(timing, task, models, self.config.threads, self.config.providers)
        log.info("timed tasks %s (network)", task["id"])
        self.post(task, result)

    def _guarded(self, tasks: list[dict[str, Any]], run: Callable[[], None]) -> None:
        """A task ONNX Runtime cannot run is reported (the job then fails saying why) instead of
        being leased again and again."""
        try:
            run()
        except (Stop, AgentError):
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the runtime on this input
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:480]
            log.error("tasks %s failed: %s", [t["id"] for t in tasks], message)
            for t in tasks:
                self.post(t, {"error": message})

    def save_counters(self) -> None:
        path = self.config.counters
        if path is None:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(self.counters)))
        os.replace(tmp, path)  # atomic: a reader (or a kill) never sees half a file

    def run(self) -> int:
        """Register, then lease and time tasks until stopped; the exit status."""
        try:
            self.register()
            self.save_counters()
            while not self.stopping.is_set():
                tasks = self.lease()
                if tasks:
                    self.work(tasks)
        except Stop:
            pass
        except AgentError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 2
        finally:
            self.release()
            self.save_counters()
            if self._own_http:
                self.http.close()
        return 0


class _Heartbeat:
    """While tasks are timed: extend their leases every ``every`` seconds (a long network task would
    otherwise be handed to another agent mid-measurement)."""

    def __init__(self, agent: DeviceAgent, every: float) -> None:
        self.agent, self.every = agent, every
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="device-agent-heartbeat")

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        while not self.done.wait(self.every):
            try:
                self.agent.http.post(self.agent.base + "/heartbeat", json={"agent_id": self.agent.agent_id},
                                     headers=self.agent.headers, timeout=10)
            except Exception:  # noqa: BLE001 - the next beat retries; a lost lease shows as a 409 on the result
                log.warning("heartbeat failed", exc_info=True)


def _detail(r: Any) -> str:
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        detail = r.text
    return str(detail)[:300]


# ------------------------------------------------------------------ command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prunepilot device-agent",
        description="Time prunepilot's measurement tasks (latency-table entries, candidate networks) on this machine. "
                    "Needs only httpx, numpy and onnxruntime.")
    p.add_argument("--server", required=True, help="the service's base URL, e.g. http://10.0.0.5:8000")
    p.add_argument("--key", default=os.environ.get("PRUNEPILOT_DEVICE_KEY"),
                   help="the device key from `prunepilot keys create --device NAME` (or PRUNEPILOT_DEVICE_KEY)")
    p.add_argument("--name", required=True, help="the device's name, as the key was created for")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime", help="the runtime to time with")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's, one per core)")
    p.add_argument("--providers", default="CPUExecutionProvider",
                   help="ONNX Runtime execution providers, comma-separated (default: CPUExecutionProvider)")
    p.add_argument("--max-tasks", type=int, default=16, help="tasks to lease at once (1-64)")
    p.add_argument("--wait", type=float, default=10.0, help="seconds one long poll waits for a task (0-30)")
    p.add_argument("--counters", type=Path, default=None, help="keep the agent's counters in this JSON file")
    p.add_argument("-v", "--verbose", action="store_true", help="log every lease and result")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    if not 1 <= args.max_tasks <= 64 or not 0 <= args.wait <= 30 or (args.threads is not None and args.threads < 1):
        print("error: --max-tasks must be 1-64, --wait 0-30 and --threads at least 1", file=sys.stderr)
        return 2
    config = AgentConfig(server=args.server, key=args.key, name=args.name, backend=args.backend, threads=args.threads,
                         providers=tuple(p.strip() for p in args.providers.split(",") if p.strip()),
                         max_tasks=args.max_tasks, wait_s=args.wait, counters=args.counters)
    try:
        import onnxruntime as ort
    except ImportError:
        print("error: the device agent needs onnxruntime (pip install onnxruntime)", file=sys.stderr)
        return 2
    missing = [p for p in config.providers if p not in ort.get_available_providers()]
    if missing:
        print(f"error: execution provider(s) {', '.join(missing)} not installed; available: "
              f"{', '.join(ort.get_available_providers())}", file=sys.stderr)
        return 2
    agent = DeviceAgent(config)

    def stop(signum: int, _frame: object) -> None:
        again = agent.stopping.is_set()
        agent.stopping.set()
        if again or agent.interruptible:  # out of a long poll at once (or a second signal: now); leases are handed back
            raise Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        code = agent.run()
    except Stop:  # a second signal while handing back
        code = 0
    print(agent.counters.line(), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
