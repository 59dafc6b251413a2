"""Memory bounds on uploads (issue 23, items 6 and 10).

A data set's decoded size is bounded at submission; the engine refuses oversized single files
(uncompressed size or pixel count) as per-file failures without reading them, and never leaves a
partial cache file; weight validation runs at most ``max_concurrent_validations`` at a time."""

from __future__ import annotations

import io
import threading
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from test_submission import spec, tiny_zip  # noqa: F401  (tiny_zip is a fixture)

from prunepilot.compression import DataError, decode_image_folder
from prunepilot.compression import data as data_module
from prunepilot.service import jobs as jobs_module
from prunepilot.service.jobs import JobService, UploadedFile
from prunepilot.service.schemas import JobCreate
from prunepilot.service.settings import Settings
from prunepilot.service.uploads import StoredUpload, validate_dataset_zip


def png(size: tuple[int, int] = (8, 8), color: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (color, 255 - color, 7)).save(buf, format="PNG")
    return buf.getvalue()


def write_zip(path: Path, entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def small_images(n: int = 3, size: tuple[int, int] = (8, 8)) -> dict[str, bytes]:
    return {f"{cls}/{i}.png": png(size, 40 * i) for cls in ("cat", "dog") for i in range(n)}


# ------------------------------------------------------------------ engine: single files


def test_oversized_member_is_skipped_and_reported_without_being_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny-compressed huge member (a zip bomb) is a per-file failure naming the limit; it is never decompressed."""
    cap = 1 << 20
    zpath = write_zip(tmp_path / "bomb.zip", {**small_images(), "cat/bomb.png": b"\0" * (4 * cap)}, zipfile.ZIP_DEFLATED)
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, *a, **k):  # type: ignore[no-untyped-def]
        opened.append(name if isinstance(name, str) else name.filename)
        return real_open(self, name, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    splits, failures = decode_image_folder(zpath, max_image_bytes=cap)
    assert len(splits["train"]) == 6
    assert [f.file for f in failures] == ["cat/bomb.png"]
    assert f"{cap:,}" in failures[0].reason and "limit" in failures[0].reason, failures[0].reason
    assert "cat/bomb.png" not in opened, "the oversized member was decompressed"


def test_oversized_file_in_a_folder_is_skipped_and_reported(tmp_path: Path) -> None:
    for name, blob in {**small_images(), "dog/huge.png": b"\0" * 5000}.items():
        (tmp_path / "ds" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "ds" / name).write_bytes(blob)
    splits, failures = decode_image_folder(tmp_path / "ds", max_image_bytes=4096)
    assert len(splits["train"]) == 6
    assert [f.file for f in failures] == ["dog/huge.png"] and "4,096" in failures[0].reason


def test_image_over_the_pixel_cap_is_skipped_and_reported(tmp_path: Path) -> None:
    zpath = write_zip(tmp_path / "big.zip", {**small_images(), "dog/big.png": png((64, 64))})
    splits, failures = decode_image_folder(zpath, image_size=8, max_image_pixels=1000)
    assert len(splits["train"]) == 6
    assert [f.file for f in failures] == ["dog/big.png"]
    assert "64 x 64" in failures[0].reason and "1,000" in failures[0].reason, failures[0].reason


def test_pil_decompression_bomb_is_a_per_file_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL's own DecompressionBombError (over 2x Image.MAX_IMAGE_PIXELS) is reported like any undecodable file."""
    zpath = write_zip(tmp_path / "big.zip", {**small_images(), "dog/big.png": png((64, 64))})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 > 2 x 1000; 8 x 8 passes
    splits, failures = decode_image_folder(zpath, image_size=8, max_image_pixels=None)
    assert len(splits["train"]) == 6
    assert [f.file for f in failures] == ["dog/big.png"] and "decompression bomb" in failures[0].reason


# ------------------------------------------------------------------ engine: the cache


def test_failed_cache_write_leaves_no_cache_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zpath = write_zip(tmp_path / "d.zip", small_images())
    cache = tmp_path / "cache"

    def disk_full(obj, f, *a, **k):  # type: ignore[no-untyped-def]
        Path(f).write_bytes(b"half a cache")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data_module.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        decode_image_folder(zpath, cache_dir=cache)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    splits, _ = decode_image_folder(zpath, cache_dir=cache)  # the next attempt decodes and caches normally
    assert len(splits["train"]) == 6 and [p.suffix for p in cache.iterdir()] == [".pt"]


def test_failed_decode_midway_leaves_no_cache_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zpath = write_zip(tmp_path / "d.zip", small_images())
    cache = tmp_path / "cache"
    real = data_module._decode
    calls = [0]

    def dies_on_the_fourth(*a, **k):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 4:
            raise MemoryError("worker out of memory")
        return real(*a, **k)

    monkeypatch.setattr(data_module, "_decode", dies_on_the_fourth)
    with pytest.raises(MemoryError):
        decode_image_folder(zpath, cache_dir=cache)
    assert not cache.exists() or list(cache.iterdir()) == []


# ------------------------------------------------------------------ submission: decoded size


@pytest.fixture()
def limited_api(tmp_path: Path, request: pytest.FixtureRequest):
    """The in-process API with the settings given by ``@pytest.mark.parametrize('limited_api', [{...}], indirect=True)``."""
    from inproc import InProcessApi, open_api

    from prunepilot.service.auth import create_key
    from prunepilot.service.db.engine import dispose_engines

    client, settings = open_api(tmp_path / "api", **request.param)
    with client:
        yield InProcessApi(client, settings, {"alice": create_key(settings.db_url, "alice")[1]})
    dispose_engines()


@pytest.mark.parametrize("limited_api", [{"max_decoded_bytes": 1_000_000}], indirect=True)
def test_decoded_size_over_the_limit_is_refused_at_submission(limited_api, resnet20_weights: Path, tiny_zip: Path) -> None:  # noqa: F811
    # 50 images x 3 x 256 x 256 = 9,830,400 bytes decoded, over the 1,000,000 configured
    r = limited_api.submit(spec(image_size=256), resnet20_weights, tiny_zip)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "1,000,000" in detail and "9,830,400" in detail and "PRUNEPILOT_MAX_DECODED_BYTES" in detail, detail
    assert not any(limited_api.settings.uploads_dir.iterdir())
    # at ResNet-20's own 32 x 32 the same data fits (50 x 3,072 = 153,600 bytes)
    assert limited_api.submit(spec(), resnet20_weights, tiny_zip).status_code == 202


@pytest.mark.parametrize("limited_api", [{"max_image_bytes": 65536}], indirect=True)
def test_oversized_member_is_refused_at_submission(limited_api, resnet20_weights: Path, tmp_path: Path) -> None:
    big = (b"\0" * 300 + b"\1") * 1000  # 301,000 bytes, compresses well below the ratio check
    zpath = write_zip(tmp_path / "d.zip", {**small_images(), "dog/big.png": big}, zipfile.ZIP_DEFLATED)
    r = limited_api.submit(spec(), resnet20_weights, zpath)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "dog/big.png" in detail and "65,536" in detail and "301,000" in detail, detail


def staged(path: Path) -> StoredUpload:
    return StoredUpload("0" * 64, path, path.stat().st_size, path.name, path)


def test_native_size_estimate_reads_image_headers(tmp_path: Path) -> None:
    """Without an image size, each image's own width x height from its header counts (PNG and JPEG parsed, BMP through PIL)."""
    entries = {f"{cls}/{i}.png": png((100, 50)) for cls in ("cat", "dog") for i in range(5)}
    buf = io.BytesIO()
    Image.new("RGB", (120, 80)).save(buf, format="JPEG")
    entries["dog/5.jpg"] = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buf, format="BMP")
    entries["dog/6.bmp"] = buf.getvalue()
    zpath = write_zip(tmp_path / "d.zip", entries, zipfile.ZIP_DEFLATED)
    expected = 10 * 3 * 100 * 50 + 3 * 120 * 80 + 3 * 10 * 10  # 179,100
    validate_dataset_zip(staged(zpath), Settings(data_dir=tmp_path, max_decoded_bytes=expected), image_size=None)
    with pytest.raises(DataError, match="179,100") as err:
        validate_dataset_zip(staged(zpath), Settings(data_dir=tmp_path, max_decoded_bytes=expected - 1), image_size=None)
    assert "179,099" in str(err.value) and "PRUNEPILOT_MAX_DECODED_BYTES" in str(err.value)
    # a given image size replaces the headers: 12 x 3 x 32 x 32 = 36,864
    validate_dataset_zip(staged(zpath), Settings(data_dir=tmp_path, max_decoded_bytes=36_864), image_size=32)


def test_image_over_the_pixel_cap_counts_nothing_in_the_estimate(tmp_path: Path) -> None:
    """The worker skips it (and reports it), so it takes no memory there: 6 x 3 x 8 x 8 = 1,152 bytes."""
    zpath = write_zip(tmp_path / "d.zip", {**small_images(), "dog/big.png": png((64, 64))})
    validate_dataset_zip(staged(zpath), Settings(data_dir=tmp_path, max_image_pixels=1000, max_decoded_bytes=1152))
    with pytest.raises(DataError, match="1,152 bytes"):
        validate_dataset_zip(staged(zpath), Settings(data_dir=tmp_path, max_image_pixels=1000, max_decoded_bytes=1151))


# ------------------------------------------------------------------ weight validation concurrency


def test_weight_validations_are_bounded_by_the_setting(tmp_path: Path, resnet20_weights: Path, tiny_zip: Path,  # noqa: F811
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from prunepilot.service.db.engine import dispose_engines
    from prunepilot.service.db.migrate import upgrade

    settings = Settings(data_dir=tmp_path / "d", run_dispatcher=False, max_concurrent_validations=1)
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.db_url)
    service = JobService(settings)
    real = jobs_module.validate_weights
    lock = threading.Lock()
    now, peak = [0], [0]

    def slow_validate(*a, **k):  # type: ignore[no-untyped-def]
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        try:
            time.sleep(0.3)
            return real(*a, **k)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(jobs_module, "validate_weights", slow_validate)
    weights, data = resnet20_weights.read_bytes(), tiny_zip.read_bytes()
    results: list[object] = []

    def submit() -> None:
        try:
            results.append(service.submit(None, JobCreate.model_validate(spec()), UploadedFile(io.BytesIO(weights), "w.th"),
                                          UploadedFile(io.BytesIO(data), "d.zip")))
        except Exception as exc:  # noqa: BLE001  (reported by the assertion below)
            results.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    dispose_engines()
    assert all(not isinstance(r, Exception) for r in results) and len(results) == 4, results
    assert peak[0] == 1, f"{peak[0]} weight validations ran at once; the limit is 1"


def test_concurrent_validations_setting_defaults_to_two() -> None:
    assert Settings().max_concurrent_validations == 2
