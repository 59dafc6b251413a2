"""The host's fan-out of independent evaluations (NetAdapt's proposals) as Ray tasks.

Kept apart from the worker, and free of the engine's imports, so a task that only maps is cheap."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prunepilot.agents import Mapper


def ray_map() -> Mapper | None:
    """Fan independent evaluations (NetAdapt proposals) out as Ray tasks when running inside Ray.

    Each task asks for one CPU and the GPU share this job's task holds (none on a CPU job)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
    except ImportError:  # pragma: no cover
        return None
    gpus = assigned_gpus()

    def mapper(fn: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any]) -> list[Any]:
        remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=1)(fn)
        ref = ray.put(shared)
        refs = [remote.remote(ref, item) for item in items]
        if not gpus:
            return ray.get(refs)
        return _share_with_own_gpu(fn, shared, items, refs)

    return mapper


def assigned_gpus() -> float:
    """The GPUs Ray gave the task this runs in (0 outside a task, or in one that asked for none)."""
    import ray

    try:
        return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    except Exception:  # noqa: BLE001 - a driver, not a task: it holds no GPU share
        return 0.0


def _share_with_own_gpu(fn: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any], refs: list[Any]) -> list[Any]:
    """A GPU job's proposals: tasks on the cluster's free GPUs take them from the front while this
    process works through them from the back on the GPU it holds; a task not finished when this
    process reaches its item is cancelled and the item run here.

    A job that only waited would hold its GPU while its tasks wait for one: on a cluster whose GPUs
    are all held by such jobs (one GPU, say) nothing would ever run. This always finishes, at worst
    at the speed of the job's own GPU."""
    import ray

    results: dict[int, Any] = {}
    pending = dict(enumerate(refs))
    for i in reversed(range(len(items))):
        if pending:
            done, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=0)
            finished = set(done)
            for j, ref in list(pending.items()):
                if ref in finished:
                    results[j] = ray.get(ref)
                    del pending[j]
        if i in results:
            continue
        ray.cancel(pending.pop(i))  # not started, or still running elsewhere: done here now
        results[i] = fn(shared, items[i])
    return [results[i] for i in range(len(items))]
