"""Where artifacts live. The default is a directory; on a cluster it must be one every node sees
(a shared volume or network file system mounted at the same path), see docs/deploy.md.

Workers write an artifact directory through :meth:`put` and record the location it returns; the
API turns that location back into files through :meth:`open_dir`. Another backend (an object
store) implements the same two methods.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Protocol

from prunepilot.compression import PrunePilotError


class ArtifactStore(Protocol):
    def put(self, job_id: str, kind: str, local_dir: Path) -> str: ...

    def open_dir(self, location: str) -> Path: ...


class LocalArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def put(self, job_id: str, kind: str, local_dir: Path) -> str:
        target = self.root / job_id / kind
        if Path(local_dir).resolve() != target.resolve():
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(local_dir, tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        return str(target)

    def open_dir(self, location: str) -> Path:
        path = Path(location)
        if not path.is_dir():
            raise PrunePilotError(f"artifact missing at {location}; on a cluster the artifact directory must be shared storage")
        return path
