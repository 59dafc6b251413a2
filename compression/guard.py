"""Bounds on work done for a model we did not write: wall time and memory growth.

Torch-Pruning's dependency search is plain Python; on some graphs it runs for many minutes
(ShuffleNet's channel shuffles converted from ONNX: 644 s) or grows an index list until the
process is killed (a dynamo-exported VGG's Transpose + GatherND into a Reshape: 24 GB). An upload
must not do that to the API server or a worker. :func:`bounded` watches from a second thread and,
past a limit, raises an exception inside the guarded thread (``PyThreadState_SetAsyncExc``, which
takes effect at the next Python bytecode: enough for pure-Python loops like these).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import StrategyError


@dataclass(frozen=True)
class WorkLimits:
    """``seconds`` of wall time and ``extra_bytes`` of resident-memory growth (None: unbounded)."""

    seconds: float | None = 120.0
    extra_bytes: int | None = 4 << 30


class LimitExceeded(StrategyError):
    """A guarded step went past its time or memory bound (the model is refused, the process lives)."""


class _Interrupt(BaseException):
    """Injected into the guarded thread; BaseException, so the library's own ``except Exception`` cannot swallow it."""


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None  # not Linux: only the time bound applies


def _inject(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


@contextlib.contextmanager
def bounded(what: str, limits: WorkLimits | None = None, poll_s: float = 0.05) -> Iterator[None]:
    """Run the block within ``limits``; past one, raise :class:`LimitExceeded` naming ``what``."""
    limits = limits or WorkLimits()
    if limits.seconds is None and limits.extra_bytes is None:
        yield
        return
    target = threading.get_ident()
    start_rss = _rss()
    lock = threading.Lock()
    state = {"done": False, "fired": ""}
    stop = threading.Event()

    def watch() -> None:
        t0 = time.monotonic()
        while not stop.wait(poll_s):
            reason = ""
            if limits.seconds is not None and time.monotonic() - t0 > limits.seconds:
                reason = f"took longer than {limits.seconds:g} s"
            elif limits.extra_bytes is not None and start_rss is not None:
                now = _rss()
                if now is not None and now - start_rss > limits.extra_bytes:
                    reason = f"needed more than {limits.extra_bytes / 2**30:.1f} GiB of memory"
            if reason:
                with lock:
                    if not state["done"]:
                        state["fired"] = reason
                        _inject(target, _Interrupt)
                return

    watcher = threading.Thread(target=watch, name="prunepilot-guard", daemon=True)
    watcher.start()
    try:
        yield
    except _Interrupt:
        raise LimitExceeded(f"{what} {state['fired']}; this model is refused") from None
    finally:
        with lock:
            state["done"] = True
        stop.set()
        watcher.join()
        if state["fired"]:
            _inject(target, None)  # an interrupt that arrived after the block ended is dropped, not raised elsewhere
