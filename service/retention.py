"""Retention: the files of failed and cancelled jobs are removed ``failed_job_retention_days`` after
they ended; their rows and trials stay, so users still see what happened.

A swept job loses its state directory (``data_dir/jobs/<id>``), any artifacts (``artifacts_dir/<id>``,
left by a job cancelled while it wrote them), and the uploads it named (weights, data set zip) that no
other job still names: an active or succeeded job, or a failed or cancelled one still within the
retention, keeps them. With a swept zip go its decoded caches: ``cache_dir/<zip stem>-<key>.pt``
(compression/data.py), and an upload's stem is its SHA-256, so the prefix ties a cache to that
content alone. Built-in data sets are never touched (only content-addressed files directly under
``uploads_dir`` are candidates).

No marker column: the sweep is idempotent because it removes only what still exists, so a second
run finds nothing to do. Each run reads three short columns of every expired job and checks a few
paths each; cheap for the tens of thousands of old jobs a server collects (a ``files_removed_at``
column would make it proportional to the newly expired only, at the cost of a migration).

A job being created while the sweep runs may name an upload the sweep has just found unreferenced
(its row is not committed yet). ``uploads.publish`` renews the change time of content it keeps, and
the sweep spares uploads changed within ``UPLOAD_GRACE_S``; what remains is the instant between the
sweep's last look and its unlink, after which such a job fails at its start, naming the missing
file, and can be submitted again.

The same cutoff removes device network measurements (whole networks a device's agent timed for a
job's calibration or measured check) of any job: each was read once by the job that asked for it.
Entry measurements stay: they are how a device's table knows an entry was measured.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from .db import repo
from .db.models import utcnow
from .db.store import JobStore
from .settings import Settings

log = logging.getLogger("prunepilot.retention")

SWEEP_INTERVAL_S = 600.0  # how often the dispatcher sweeps (its first sweep follows its first tick)
UPLOAD_GRACE_S = 3600.0  # an upload (re)published more recently than this is never removed
_CONTENT_ADDRESSED = re.compile(r"^[0-9a-f]{64}\.(pt|safetensors|zip)$")  # uploads.store_stream's names


@dataclass
class SweepResult:
    days: float | None = None  # the retention it ran with (None: off, nothing done)
    jobs: set[str] = field(default_factory=set)  # jobs that had something removed
    removed: int = 0  # files and directories removed
    bytes: int = 0
    errors: int = 0
    network_tasks: int = 0  # device network-measurement rows removed

    def summary(self) -> str:
        if self.days is None:
            return "retention is off (PRUNEPILOT_FAILED_JOB_RETENTION_DAYS=none): nothing removed"
        line = (f"removed {self.removed} files and directories ({self.bytes / 2**20:.1f} MiB) of {len(self.jobs)} "
                f"job{'s' if len(self.jobs) != 1 else ''} failed or cancelled over {self.days:g} days ago")
        if self.network_tasks:
            line += f", and {self.network_tasks} device network measurements as old"
        return line + (f"; {self.errors} could not be removed (see the log)" if self.errors else "")


def sweep(settings: Settings, *, now: datetime | None = None, upload_grace_s: float = UPLOAD_GRACE_S) -> SweepResult:
    """Remove the files of failed and cancelled jobs that ended more than the retention ago (see the module)."""
    result = SweepResult(days=settings.failed_job_retention_days)
    if result.days is None:
        return result
    before = (now or utcnow()) - timedelta(days=result.days)
    store = JobStore(settings.db_url)
    with store.write() as s:
        result.network_tasks = repo.delete_network_tasks_finished_before(s, before=before)
    with store.read() as s:
        expired = repo.expired_jobs(s, before=before)
    uploads_dir = settings.uploads_dir.resolve()
    named_by: dict[str, list[str]] = {}  # candidate upload -> the expired jobs naming it
    for job_id, weights, data in expired:
        for own in (settings.data_dir / "jobs" / job_id, settings.artifacts_dir / job_id):
            if _remove(own, result):
                result.jobs.add(job_id)
        for ref in (weights, data):
            if ref and _is_upload(Path(ref), uploads_dir) and Path(ref).exists():
                named_by.setdefault(ref, []).append(job_id)
    if not named_by:
        return result
    with store.read() as s:
        in_use = repo.upload_paths_in_use(s, paths=named_by, before=before)
    changed_after = time.time() - upload_grace_s
    for ref in sorted(set(named_by) - in_use):
        path = Path(ref)
        try:
            if path.stat().st_ctime > changed_after:
                continue
        except FileNotFoundError:
            continue
        if _remove(path, result):
            result.jobs.update(named_by[ref])
        if path.suffix == ".zip" and settings.cache_dir.is_dir():
            for cache in settings.cache_dir.glob(f"{path.stem}-*"):
                _remove(cache, result)
    return result


def _is_upload(path: Path, uploads_dir: Path) -> bool:
    return bool(_CONTENT_ADDRESSED.match(path.name)) and path.parent.resolve() == uploads_dir


def _remove(path: Path, result: SweepResult) -> bool:
    """Remove a file or a directory tree; False if it was not there. Errors are counted and logged."""
    try:
        if path.is_dir() and not path.is_symlink():
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(path)
        else:
            size = path.lstat().st_size
            path.unlink()
    except FileNotFoundError:  # not there, or another sweep (another API process, the CLI) took it first
        return False
    except OSError as exc:
        log.warning("retention: could not remove %s: %s", path, exc)
        result.errors += 1
        return False
    result.removed += 1
    result.bytes += size
    return True
