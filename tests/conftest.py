"""Shared fixtures: real data (a deterministic CIFAR-10-JPEG subset) and the real pretrained weights."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from prunepilot.service.settings import Settings

# The suite runs in two pytest-xdist workers on two cores ([tool.pytest.ini_options] addopts): one
# intra-op thread each, or the workers' thread pools oversubscribe the cores and spin against each
# other (a NetAdapt test went from 9 s alone to 66 s beside another worker). Run alone, two threads.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _threads_stay_as_set() -> Iterator[None]:
    """A test (or code it calls in this process) that changes torch's thread count must put it back:
    a worker left at two threads beside the other worker spins, and every later test file in it ran
    two to three times slower (a whole minute of the suite)."""
    yield
    leaked = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    assert leaked == THREADS, f"the test left torch at {leaked} intra-op threads (the suite runs at {THREADS})"


def _shared_dir() -> Path:
    return Settings().shared_weights_dir


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    d = _shared_dir()
    assert (d / "cifar10-jpeg.zip").is_file(), f"shared data missing at {d}"
    return d


@pytest.fixture(scope="session")
def resnet20_weights(shared_dir: Path) -> Path:
    return shared_dir / "resnet20-cifar10.th"


@pytest.fixture(scope="session")
def resnet56_weights(shared_dir: Path) -> Path:
    return shared_dir / "resnet56-cifar10.th"


def make_mini_zip(src: Path, dst: Path, train_per_class: int, test_per_class: int) -> Path:
    """Copy the first N images per class of each split (stored members, so this is a byte copy)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            parts = info.filename.split("/")
            if len(parts) != 4:
                continue
            limit = train_per_class if parts[1] == "train" else test_per_class
            if int(Path(parts[3]).stem) < limit:
                zout.writestr(info.filename, zin.read(info))
    return dst


@pytest.fixture(scope="session")
def mini_zip(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,500 training and 500 test images (the first 150 / 50 of each class), fixed."""
    return make_mini_zip(shared_dir / "cifar10-jpeg.zip", tmp_path_factory.mktemp("data") / "cifar-mini.zip", 150, 50)


@pytest.fixture(scope="session")
def mini_splits(mini_zip: Path):
    from prunepilot.compression import load_splits

    return load_splits(mini_zip, val_size=300)


@pytest.fixture(scope="session")
def resnet20(resnet20_weights: Path):
    from prunepilot.compression import load_model

    return load_model("resnet20", resnet20_weights)


@pytest.fixture()
def settings(tmp_path: Path, shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("PRUNEPILOT_DATA_DIR", str(tmp_path / "data"))
    from prunepilot.service.settings import get_settings

    get_settings.cache_clear()
    s = get_settings()
    yield s
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def postgres_base():
    from pg import postgres_server

    with postgres_server() as url:
        yield url


_db_counter = [0]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind: a SQLite file, or a new database on the real PostgreSQL server."""
    from prunepilot.service.db.engine import dispose_engines

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'pp.db'}"
    else:
        from pg import create_database

        _db_counter[0] += 1
        url = create_database(request.getfixturevalue("postgres_base"), f"t{os.getpid()}_{_db_counter[0]}")
    yield url
    dispose_engines()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Few whole-network runs per latency calibration, in every server, worker and CLI the tests
    # start: they check what is measured, stored and reused, not the fit's precision (the
    # calibration's logic is tested on fake clocks with explicit repeats).
    os.environ.setdefault("PRUNEPILOT_CALIBRATION_REPEATS", "3")


@pytest.fixture()
def api(tmp_path: Path):
    """The API in-process (no dispatcher, no Ray) with two users' keys; see tests/inproc.py."""
    from inproc import InProcessApi, open_api

    from prunepilot.service.auth import create_key
    from prunepilot.service.db.engine import dispose_engines

    client, settings = open_api(tmp_path / "api")
    with client:
        harness = InProcessApi(client, settings, {name: create_key(settings.db_url, name)[1] for name in ("alice", "bob")})
        yield harness
    dispose_engines()
