"""Data at real scale: a directory tree over the cache limit is streamed from its files through the same
``batches`` interface as the uint8 cache, with the same splits, the same batches and so the same
figures; registered data sets are named by jobs, never given as paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from prunepilot.compression import DataError, Evaluator, Fidelity, FinetuneConfig, Pruner, finetune, load_splits
from prunepilot.compression.data import FileImageSet, ImageSet, Normalizer, tree_classes

CLASSES = [f"c{i}" for i in range(10)]  # ten, as ResNet-20's weights classify


def _tree(root: Path, train: int, val: int) -> Path:
    """PNG files (lossless: decoding gives back exactly these pixels), distinct per image."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("val", val)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = torch.randint(0, 256, (12, 12, 3), dtype=torch.uint8, generator=g).numpy()
                Image.fromarray(px).save(root / split / c / f"{i:03d}.png")
    (root / "train" / CLASSES[0] / ".hidden.png").write_bytes(b"not listed")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tree(tmp_path_factory.mktemp("tree"), train=8, val=3)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_a_tree_over_the_limit_streams_the_same_splits_and_batches_as_the_cache(tree: Path) -> None:
    cached = load_splits(tree)
    streamed = load_splits(tree, max_decoded_bytes=1000)  # 110 images x 3 x 12 x 12 bytes is more
    assert isinstance(cached.train, ImageSet) and isinstance(streamed.train, FileImageSet)
    assert streamed.describe()["streamed"] and not cached.describe()["streamed"]
    assert streamed.describe() | {"streamed": False} == cached.describe()
    for name in ("train", "val", "test"):  # the carve (test from train) is chosen from the labels alone: the same rows
        a, b = getattr(cached, name), getattr(streamed, name)
        assert torch.equal(a.labels, b.labels) and a.classes == b.classes == CLASSES
        assert torch.equal(a.images, b.load().images)
    order = torch.randperm(len(cached.train), generator=torch.Generator().manual_seed(1))[:13]
    for (x1, y1), (x2, y2) in zip(cached.train.batches(5, order), streamed.train.batches(5, order), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # a subset within the limit is held in memory; one over it stays streamed
    assert isinstance(streamed.val.subset(2).resident(), ImageSet)
    assert isinstance(streamed.val.resident(), FileImageSet)


def test_fine_tuning_and_evaluation_give_the_same_numbers_streamed_and_cached(tree: Path) -> None:
    """One code path: the same data order and augmentation, the same weights after fine-tuning, the
    same accuracy; with the streamed validation split read through loader worker processes."""
    cached = load_splits(tree)
    streamed = load_splits(tree, max_decoded_bytes=1000, loader_workers=2)
    weights = []
    for splits in (cached, streamed):
        model = Tiny()
        finetune(model, splits.train, Normalizer(splits.mean, splits.std), FinetuneConfig(steps=4, batch_size=16, seed=3))
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    accuracies = []
    for splits in (cached, streamed):
        ev = Evaluator(Pruner(Tiny().eval(), "module:Tiny", 10, 12), splits, Fidelity(val_images=None, calib_images=16, batch_size=8))
        accuracies.append(ev.evaluate({"conv": 0.25}).accuracy)
    assert accuracies[0] == accuracies[1]
    assert isinstance(ev.data(ev.fidelity).val, FileImageSet)  # the whole validation split stayed streamed


def test_a_file_that_does_not_decode_is_named_in_one_line(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t", train=3, val=1)
    (root / "train" / "c3" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    splits = load_splits(root, max_decoded_bytes=1, loader_workers=2)
    with pytest.raises(DataError) as err:
        splits.train.load()
    message = str(err.value)
    assert "train/c3/001.png" in message and "cannot be decoded" in message and "\n" not in message
    assert "Traceback" not in message


def test_tree_classes_reads_folder_names_with_images() -> None:
    with pytest.raises(DataError, match="not a directory"):
        tree_classes("/nonexistent/data")


def test_registered_data_sets_are_parsed_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from prunepilot.service.settings import Settings

    monkeypatch.setenv("PRUNEPILOT_DATASETS", "imagenet=/data/imagenet, pets=/srv/pets")
    assert Settings(data_dir=tmp_path).datasets == {"imagenet": Path("/data/imagenet"), "pets": Path("/srv/pets")}
    for bad, why in (("upload=/x", "not upload or cifar10-jpeg"), ("pets=data/pets", "not an absolute path"),
                     ("Pets=/x", "lower-case"), ("pets", "name=/absolute/path")):
        monkeypatch.setenv("PRUNEPILOT_DATASETS", bad)
        with pytest.raises(ValueError, match=why):
            Settings(data_dir=tmp_path)


@pytest.fixture()
def registry_api(tmp_path: Path, tree: Path):
    from inproc import InProcessApi, open_api

    from prunepilot.service.auth import create_key
    from prunepilot.service.db.engine import dispose_engines

    few = _tree(tmp_path / "few", train=2, val=1)
    for c in CLASSES[3:]:  # three classes left
        for split in ("train", "val"):
            for f in (few / split / c).iterdir():
                f.unlink()
    client, settings = open_api(tmp_path / "api", datasets={"tiny": tree, "few": few, "gone": tmp_path / "not-here"})
    with client:
        yield InProcessApi(client, settings, {"alice": create_key(settings.db_url, "alice")[1]})
    dispose_engines()


def test_a_job_names_a_registered_data_set_and_never_a_path(registry_api, resnet20_weights: Path) -> None:
    from helpers.specs import quick_spec

    api = registry_api
    r = api.submit(quick_spec(dataset="tiny"), resnet20_weights)
    assert r.status_code == 202, r.text
    from prunepilot.service.db import repo
    from prunepilot.service.db.engine import read_scope

    with read_scope(api.settings.db_url) as s:
        job = repo.get_job(s, job_id=r.json()["id"])
        assert job is not None and job.problem["dataset_path"] == "tiny" and job.dataset == "tiny"
    for ref in (str(registry_api.settings.datasets["tiny"]), "../../etc", "/etc/passwd", "tiny/../few"):
        r = api.submit(quick_spec(dataset=ref), resnet20_weights)
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith("dataset: unknown dataset") and "tiny" in r.json()["detail"], r.text
    r = api.submit(quick_spec(dataset="few"), resnet20_weights)
    assert r.status_code == 422 and "dataset few has 3 classes" in r.json()["detail"], r.text
    # registered for the workers but not mounted on the API: accepted, the worker checks it
    assert api.submit(quick_spec(dataset="gone"), resnet20_weights).status_code == 202
    assert json.loads(api.client.get("/v1/jobs", headers=api.headers()).text)["total"] == 2


def test_the_worker_resolves_a_registered_name_on_its_own_machine(tmp_path: Path, tree: Path) -> None:
    from prunepilot.service.settings import Settings
    from prunepilot.service.workspace import dataset_path, open_data

    settings = Settings(data_dir=tmp_path, datasets={"tiny": tree, "gone": tmp_path / "nope"}, max_decoded_bytes=1000,
                        loader_workers=0)
    assert dataset_path("tiny", settings) == tree
    with pytest.raises(DataError, match="registered data set gone is not on this machine"):
        dataset_path("gone", settings)
    assert isinstance(open_data("tiny", settings).train, FileImageSet)
