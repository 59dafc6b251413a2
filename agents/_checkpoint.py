"""One way for an agent to keep resumable state in its job's state directory.

A checkpoint is a JSON state plus data files (weights, buffers). Every file is written under a
temporary name and moved into place, the JSON state last: a state file on disk always names a
complete set, so a worker killed mid-save resumes from the previous checkpoint, never a torn one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"

Writer = Callable[[Path], None]


class Checkpoint:
    def __init__(self, directory: Path | None, state_file: str = STATE_FILE) -> None:
        self.directory = directory
        self.state_file = state_file

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def path(self, name: str) -> Path:
        assert self.directory is not None
        return self.directory / name

    def save(self, state: Mapping[str, Any], files: Mapping[str, Writer] | None = None) -> None:
        """Write ``files`` (name -> writer given a path) and then ``state``; no-op without a directory."""
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        staged: list[tuple[Path, Path]] = []
        for name, write in (files or {}).items():
            final = self.directory / name
            tmp = final.with_name(f"{final.stem}.tmp{final.suffix}")  # keeps the suffix: np.savez adds .npz otherwise
            write(tmp)
            staged.append((tmp, final))
        state_tmp = self.directory / f"{self.state_file}.tmp"
        state_tmp.write_text(json.dumps(dict(state)))
        for tmp, final in staged:
            tmp.replace(final)
        state_tmp.replace(self.directory / self.state_file)

    def load(self) -> dict[str, Any] | None:
        """The last complete state, or None when there is none."""
        if self.directory is None or not (self.directory / self.state_file).is_file():
            return None
        return dict(json.loads((self.directory / self.state_file).read_text()))
