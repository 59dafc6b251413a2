"""API under load: 50 concurrent pollers on GET /v1/jobs/{id} while a search runs.

Starts a real server (uvicorn + embedded Ray + SQLite) in a temporary data directory, runs one
search job alone (baseline), then the same job again under each polling pattern, and reports the
pollers' p50/p99 latency (target p99 < 50 ms) and the search's slowdown. Patterns (``--intervals``):
each poller waits that many seconds between requests (1 s: a client with a progress bar; 0: a
closed loop with no pause, a stress test whose latency is queueing on this machine's 2 cores).

    python benchmarks/api_load.py [--pollers 50] [--evaluations 20] [--intervals 1 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from prunepilot.service.process import ServiceProcess
from prunepilot.service.settings import get_settings

RESULTS = Path(__file__).parent / "results" / "api_load.json"


def job_spec(evals: int) -> dict:  # type: ignore[type-arg]
    return {"arch": "resnet20", "dataset": "cifar10-jpeg", "agent": "random", "budget": {"constraints": [{"resource": "flops", "ratio": 0.5}]},
            "search": {"max_evaluations": evals}, "finetune": {"epochs": 0.0}, "measure": {"test_images": 500, "latency_batches": [1]}}


def submit(client: httpx.Client, weights: Path, evals: int) -> str:
    r = client.post("/v1/jobs", data={"spec": json.dumps(job_spec(evals))}, files={"weights": ("w.th", weights.read_bytes())})
    r.raise_for_status()
    return r.json()["id"]


def search_seconds(client: httpx.Client, job_id: str) -> float:
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("finetuning", "succeeded", "failed", "cancelled"):
            trials = client.get(f"/v1/jobs/{job_id}/trials", params={"limit": 5000}).json()["items"]
            return sum(t["wall_time_s"] for t in trials)
        time.sleep(0.5)


async def poll(url: str, key: str, job_id: str, stop: asyncio.Event, latencies: list[float], errors: list[int],
               interval: float, ready: asyncio.Barrier) -> None:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        # Connect first, uncounted: 50 clients opening connections at the same instant measure the
        # load generator's start-up on these 2 shared cores, not polling.
        await c.get(f"/v1/jobs/{job_id}")
        await ready.wait()
        if interval > 0:  # independent clients are not in step with each other
            await asyncio.sleep(random.uniform(0, interval))
        while not stop.is_set():
            t0 = time.perf_counter()
            r = await c.get(f"/v1/jobs/{job_id}")
            latencies.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                errors.append(r.status_code)
            if r.json()["status"] != "running":
                stop.set()
            if interval > 0:
                await asyncio.sleep(interval)


async def loaded_run(url: str, key: str, client: httpx.Client, weights: Path, evals: int, pollers: int,
                     interval: float) -> tuple[list[float], list[int], str]:
    job_id = submit(client, weights, evals)
    while client.get(f"/v1/jobs/{job_id}").json()["status"] != "running":
        await asyncio.sleep(0.2)
    stop = asyncio.Event()
    latencies: list[float] = []
    errors: list[int] = []
    ready = asyncio.Barrier(pollers)  # every client connected before any request is counted
    await asyncio.gather(*(poll(url, key, job_id, stop, latencies, errors, interval, ready) for _ in range(pollers)))
    return latencies, errors, job_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--evaluations", type=int, default=20)
    parser.add_argument("--intervals", type=float, nargs="*", default=[1.0, 0.0])
    args = parser.parse_args()
    weights = get_settings().shared_weights_dir / "resnet20-cifar10.th"
    with tempfile.TemporaryDirectory() as tmp:
        srv = ServiceProcess(Path(tmp), {"PRUNEPILOT_CIFAR10_ZIP": str(get_settings().cifar10_zip)})
        srv.cli("db", "upgrade")
        key = srv.cli("keys", "create").split()[-1]
        srv.start()
        try:
            with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
                warm = submit(client, weights, 2)  # decodes the data set into the cache, starts a worker
                search_seconds(client, warm)
                base_id = submit(client, weights, args.evaluations)
                baseline = search_seconds(client, base_id)
                runs = {}
                for interval in args.intervals:
                    started = time.perf_counter()
                    latencies, errors, loaded_id = asyncio.run(
                        loaded_run(srv.url, key, client, weights, args.evaluations, args.pollers, interval))
                    span = time.perf_counter() - started
                    loaded = search_seconds(client, loaded_id)
                    lat = sorted(latencies)
                    res = {"interval_s": interval, "requests": len(lat), "requests_per_s": len(lat) / span, "errors": len(errors),
                           "p50_ms": statistics.median(lat), "p99_ms": lat[int(0.99 * (len(lat) - 1))], "max_ms": lat[-1],
                           "search_s_alone": baseline, "search_s_loaded": loaded, "slowdown": loaded / baseline - 1.0}
                    runs[f"interval={interval:g}s"] = res
                    print(f"{args.pollers} pollers, {interval:g} s apart: {len(lat)} requests ({res['requests_per_s']:.0f}/s, "
                          f"{len(errors)} errors): p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms (target < 50 ms); "
                          f"search {baseline:.1f} s alone, {loaded:.1f} s under load ({res['slowdown']:+.0%})", flush=True)
        finally:
            srv.stop()
    # runs of other patterns from earlier invocations stay; each run carries its own baseline
    old = json.loads(RESULTS.read_text()).get("runs", {}) if RESULTS.is_file() else {}
    out = {"pollers": args.pollers, "evaluations": args.evaluations, "runs": {**old, **runs}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
