from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from prunepilot.compression import DataError, decode_image_folder, load_splits
from prunepilot.compression.data import augment, stratified_indices


def test_mini_zip_splits(mini_splits) -> None:
    s = mini_splits
    assert len(s.test) == 500 and len(s.val) == 300 and len(s.train) == 1200
    assert s.train.images.dtype == torch.uint8 and s.train.images.shape[1:] == (3, 32, 32)
    assert s.train.classes[0] == "airplane" and s.num_classes == 10
    # class-stratified validation split
    assert torch.bincount(s.val.labels).tolist() == [30] * 10


def test_validation_split_is_deterministic_and_disjoint(mini_zip: Path) -> None:
    a = load_splits(mini_zip, val_size=300)
    b = load_splits(mini_zip, val_size=300)
    assert torch.equal(a.val.images, b.val.images)
    train_set = {bytes(x.numpy().tobytes()) for x in a.train.images}
    assert not any(bytes(x.numpy().tobytes()) in train_set for x in a.val.images)


def test_cache_is_reused(mini_zip: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first, _ = decode_image_folder(mini_zip, cache)
    files = list(cache.glob("*.pt"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    second, _ = decode_image_folder(mini_zip, cache)
    assert files[0].stat().st_mtime_ns == mtime
    assert torch.equal(first["test"].images, second["test"].images)


def _jpeg(color: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "JPEG")
    return buf.getvalue()


def test_image_folder_directory_with_a_broken_file(tmp_path: Path) -> None:
    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        d = tmp_path / "ds" / cls
        d.mkdir(parents=True)
        for i in range(12):
            (d / f"{i}.jpg").write_bytes(_jpeg(color))
    (tmp_path / "ds" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    splits, failures = decode_image_folder(tmp_path / "ds")
    assert set(splits) == {"train"} and len(splits["train"]) == 24
    assert [f.file for f in failures] == ["dog/broken.jpg"]
    full = load_splits(tmp_path / "ds", val_size=4)
    assert len(full.val) == 4 and len(full.test) > 0 and len(full.train) + len(full.val) + len(full.test) == 24


def test_resize_to_image_size(tmp_path: Path) -> None:
    zpath = tmp_path / "big.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for cls in ("a", "b"):
            for i in range(5):
                z.writestr(f"train/{cls}/{i}.jpg", _jpeg((10, 20, 30), size=48))
    splits, _ = decode_image_folder(zpath, image_size=32)
    assert splits["train"].images.shape == (10, 3, 32, 32)


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_splits(tmp_path / "nope")
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"zzz")
    with pytest.raises(DataError, match="not a zip"):
        load_splits(junk)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_splits(empty)


def test_stratified_indices_balanced() -> None:
    labels = torch.arange(10).repeat_interleave(100)
    idx = stratified_indices(labels, 50, seed=3)
    assert torch.bincount(labels[idx]).tolist() == [5] * 10
    assert torch.equal(idx, stratified_indices(labels, 50, seed=3))


def test_augment_keeps_shape_and_content(mini_splits) -> None:
    batch = mini_splits.train.images[:8]
    out = augment(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.dtype == torch.uint8
    # a zero-padded crop holds a subset of the image's pixels plus zeros
    assert (out.flatten(1).long().sum(1) <= batch.flatten(1).long().sum(1)).all()
    # without padding every output is the image itself or its mirror, and both occur
    flips = augment(batch, torch.Generator().manual_seed(1), pad=0)
    same = [torch.equal(f, b) for f, b in zip(flips, batch, strict=True)]
    mirrored = [torch.equal(f, b.flip(-1)) for f, b in zip(flips, batch, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and any(same) and any(mirrored)
