"""Latency outlooks from tables already stored: what ``POST /v1/inspect`` with a ``target`` shows, and
the refusal at submission of a latency budget that pruning cannot reach on the job's target.

Building a table takes minutes (hundreds of layer entries, each timed), far too long for an HTTP
request, and would run on the API server's CPUs. So both use only a table whose entries are all
stored (built by an earlier job on the same target, or by ``prunepilot latency build``); without one,
inspect says so and a job finds out in its prepare phase, before any search, with the same sentence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from prunepilot.compression import Budget, PrunePilotError, Pruner
from prunepilot.compression.backends import LatencyTarget, local_backend
from prunepilot.compression.inspect import MIN_SPEEDUP, NO_SPEEDUP, latency_outlook, latency_problems
from prunepilot.compression.latency import LatencyTable

from .db.store import JobStore
from .latency_store import SqlLatencyStore
from .settings import Settings

# An inspection's outlook calibrates within a request when no calibration is stored: half the runs
# of a job's, and not kept (the job's own, at full precision, is what later jobs reuse).
OUTLOOK_REPEATS = 20


def worker_threads(settings: Settings) -> int:
    """The intra-op threads a worker times with (what its tables are keyed by)."""
    return settings.job_threads


def stored_table(pruner: Pruner, target: LatencyTarget, batch_size: int, settings: Settings) -> tuple[LatencyTable | None, str | None]:
    """The target's table for ``pruner``'s model if every entry is stored, else (None, why not)."""
    if target.device is not None:
        return None, f"device {target.device!r} is measured through its agent; its table is not read here"
    threads = worker_threads(settings)
    try:
        backend = local_backend(target.backend, threads)
    except PrunePilotError as exc:
        return None, f"latency backend {target.backend!r} is not available on this server: {exc}"
    table = LatencyTable(pruner.graph, pruner.model, SqlLatencyStore(JobStore(settings.db_url)), batch_size, threads, backend=backend)
    missing = len(table.missing())
    if missing:
        return None, (f"no complete latency table for this model on {target.backend} yet ({missing} of "
                      f"{len({s for *_, s in table.signatures()})} entries missing): a job with this target builds it, "
                      "or `prunepilot latency build`")
    table.load()
    return table, None


def outlook(pruner: Pruner, target: LatencyTarget, budget: Budget | None, settings: Settings) -> tuple[dict[str, Any] | None, str | None, list[str]]:
    """(the latency outlook as JSON, why it is missing, the budget's latency problems) from a stored table.

    The table's stored calibration for the model is used; without one it is calibrated here (a few
    seconds of whole-network timing, as the dense latency figure of the report already takes)."""
    latency = budget.get("latency") if budget is not None else None
    table, note = stored_table(pruner, target, latency.batch_size if latency is not None else 1, settings)
    if table is None:
        return None, note, []
    table.calibrated(repeats=settings.calibration_repeats or OUTLOOK_REPEATS, keep=False)
    problems = latency_problems(pruner, table, budget) if budget is not None else []
    return latency_outlook(pruner, table, budget).to_dict(), None, problems


def submission_refusal(pruner: Pruner, budget: Budget, target: LatencyTarget, settings: Settings) -> str | None:
    """The sentence a latency budget is refused with at submission, or None.

    Only from a stored table, and without calibrating (no model is timed in a request): the figure
    is the layer entries' own speedup at the layer limits, dense entry sum over floor entry sum.
    The calibrated prediction the job's prepare phase checks scales the entries' savings by the
    fitted share ``b`` of dense latency they explain; the time outside them (pooling, adds, the
    classifier) makes ``b <= 1`` and the calibrated speedup no larger than this figure. Where ops
    beside the convs shrink with the channels too (squeeze-excitation), the fit can find ``b > 1``
    and the job would have been predicted slightly faster than this figure says."""
    latency = budget.get("latency")
    if latency is None or not pruner.graph.layers:
        return None
    table, _ = stored_table(pruner, target, latency.batch_size, settings)
    if table is None:
        return None
    base = pruner.constraints
    floor = base.kept_vector(pruner.graph.channels, base.max_ratios(len(pruner.graph.layers)))
    dense = table.layers_ms(np.zeros(len(pruner.graph.layers)))
    bound = dense / table.layers_ms(pruner.graph.channels - floor)
    if bound < MIN_SPEEDUP:
        return (f"{NO_SPEEDUP}: its latency table ({target.backend}, batch {latency.batch_size}) predicts at most "
                f"{bound:.3f}x at the layer limits (under {MIN_SPEEDUP:g}x)")
    return None
