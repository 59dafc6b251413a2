"""Image data: CIFAR-10-JPEG from its zip, or any ImageFolder directory / zip.

JPEG decoding dominates an evaluation if done per pass (~33 s for 10k CIFAR images plus a
ResNet-56 forward), so a source is decoded once into a uint8 tensor cache on disk
(60,000 x 3 x 32 x 32 = 184 MB for CIFAR-10) and reused. Normalization happens per batch.

A directory tree whose decoded size is over the cache limit (an ImageNet-sized set registered on
the workers) is not decoded whole: its splits are :class:`FileImageSet` lists of files, decoded
batch by batch by DataLoader workers, so memory stays bounded by the file list. Both kinds are an
:class:`ImageSource`; the evaluator and fine-tuning read either through ``batches(...)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Protocol, Self, TypeVar

import numpy as np
import torch
import torch.utils.data
from PIL import Image, UnidentifiedImageError

from .errors import DataError
from .zoo import CIFAR_MEAN, CIFAR_STD

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# Single files a worker will decode: bigger ones are skipped and reported like undecodable files,
# before their bytes are read (a zip member's declared size) or their pixels decoded (the header).
# The service passes its settings (PRUNEPILOT_MAX_IMAGE_BYTES / _PIXELS, same defaults).
MAX_IMAGE_BYTES = 128 * 1024**2
MAX_IMAGE_PIXELS = 40_000_000  # 40 MP: 120 MB as RGB; PIL only warns at 89 MP and refuses at 179 MP
CACHE_VERSION = 1
SMALL_SPLIT = 500  # below this, a split's accuracy has a standard error over about 2 pt
DEFAULT_VAL_SIZE = 5000  # AMC held out 5,000 CIFAR training images for its search reward.
SPLIT_SEED = 20180908  # fixed: the validation split must be the same for every job and agent
# what a broken file raises while it is read and decoded: skipped and reported (cache), or named (streaming)
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, zipfile.BadZipFile)


Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images (B, 3, H, W) and int64 labels (B,), on one device


class ImageSource(Protocol):
    """A labelled image set the engine reads: in memory (:class:`ImageSet`) or streamed from files
    (:class:`FileImageSet`). Labels are always in memory; images come through :meth:`batches`."""

    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int: ...

    @property
    def image_size(self) -> int: ...

    @property
    def streamed(self) -> bool: ...

    def select(self, index: torch.Tensor) -> Self: ...

    def subset(self, n: int | None, seed: int = 0) -> Self: ...

    def decoded_bytes(self) -> int: ...

    def load(self) -> ImageSet:
        """The images decoded into memory (an ImageSet is itself)."""
        ...

    def resident(self) -> ImageSource:
        """The set as an evaluator keeps it between passes: decoded into memory when it fits the
        cache limit (a validation subset of a streamed set, typically), else itself."""
        ...

    def on(self, device: torch.device) -> Self:
        """This set with its images on ``device`` (a streamed set decodes to it batch by batch)."""
        ...

    def batches(self, batch_size: int, order: torch.Tensor | None = None, device: torch.device | None = None) -> Iterator[Batch]:
        """Batches of ``batch_size`` (the last one smaller) in ``order`` (default: as stored), on ``device``."""
        ...


def _subset_index(labels: torch.Tensor, n: int | None, seed: int) -> torch.Tensor | None:
    """The rows of a deterministic, class-stratified subset of ``n`` (None: all of them)."""
    if n is None or n >= len(labels):
        return None
    return stratified_indices(labels, n, seed)


@dataclass
class ImageSet:
    """Decoded images (N, 3, H, W) uint8 and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError("images must be a uint8 tensor of shape (N, 3, H, W)")
        if len(self.images) != len(self.labels):
            raise DataError("images and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def streamed(self) -> bool:
        return False

    def select(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes)

    def subset(self, n: int | None, seed: int = 0) -> ImageSet:
        """A deterministic, class-stratified subset of ``n`` images (all if ``n`` is None or too big)."""
        index = _subset_index(self.labels, n, seed)
        return self if index is None else self.select(index)

    def decoded_bytes(self) -> int:
        return self.images.numel()

    def load(self) -> ImageSet:
        return self

    def resident(self) -> ImageSet:
        return self

    def on(self, device: torch.device) -> ImageSet:
        if self.images.device == device:
            return self
        return ImageSet(self.images.to(device), self.labels.to(device), self.classes)

    def batches(self, batch_size: int, order: torch.Tensor | None = None, device: torch.device | None = None) -> Iterator[Batch]:
        if order is not None:
            order = order.to(self.images.device)
        for i in range(0, len(self) if order is None else len(order), batch_size):
            if order is None:
                x, y = self.images[i: i + batch_size], self.labels[i: i + batch_size]
            else:
                idx = order[i: i + batch_size]
                x, y = self.images[idx], self.labels[idx]
            if device is not None and x.device != device:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            yield x, y


@dataclass
class DecodeFailure:
    file: str
    reason: str


@dataclass
class DataSplits:
    train: ImageSource
    val: ImageSource
    test: ImageSource
    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD
    failures: list[DecodeFailure] = field(default_factory=list)
    carved: tuple[str, ...] = ()  # the splits carved from train ("val", "test"), not read from their own folders

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    def warnings(self) -> list[str]:
        """What a user should know before trusting figures from these splits."""
        out = []
        for key, name, split in (("val", "validation", self.val), ("test", "test", self.test)):
            if len(split) < SMALL_SPLIT:
                origin = "carved from the training images" if key in self.carved else f"from its {key}/ folder"
                # the standard error of an accuracy near 50 % on n images: sqrt(0.25 / n)
                out.append(f"the {name} split has only {len(split)} images ({origin}): accuracy figures on it vary by "
                           f"about {100 * (0.25 / len(split)) ** 0.5:.0f} pt; add images or a larger {key}/ folder")
        return out

    def describe(self) -> dict[str, object]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test), "classes": self.num_classes,
                "image_size": self.image_size, "carved": list(self.carved), "mean": list(self.mean), "std": list(self.std),
                "streamed": self.train.streamed, "warnings": self.warnings()}

    @property
    def image_size(self) -> int:
        return self.train.image_size


S = TypeVar("S", bound=ImageSource)


def stratified_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` indices spread evenly over classes, deterministic for a seed, in ascending order."""
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    picked: list[torch.Tensor] = []
    base, extra = divmod(n, len(classes))
    for i, idx in enumerate(per_class):
        k = min(len(idx), base + (1 if i < extra else 0))
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    out = torch.cat(picked)
    return out.sort().values


def split_train_val(train: S, val_size: int, seed: int = SPLIT_SEED) -> tuple[S, S]:
    """``val_size`` images carved off ``train`` (class-stratified, deterministic): the same carve for
    a decoded set and for the file list of a streamed one, since it is chosen from the labels alone."""
    if not 0 < val_size < len(train):
        raise DataError(f"validation size {val_size} must be between 1 and the training set size {len(train) - 1}")
    val_idx = stratified_indices(train.labels, val_size, seed)
    mask = torch.ones(len(train), dtype=torch.bool)
    mask[val_idx] = False
    return train.select(torch.nonzero(mask).flatten()), train.select(val_idx)


# --------------------------------------------------------------------------- decoding


class ImageTooLarge(ValueError):
    """A single file over the byte or pixel cap: skipped and reported, never read or decoded whole."""


def is_image_name(name: str) -> bool:
    """The files a data set's images are read from: an image suffix, no hidden or ``__MACOSX`` folder."""
    p = PurePosixPath(name)
    return p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") or part == "__MACOSX" for part in p.parts)


def image_dimensions(f: IO[bytes]) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header, reading only up to it; None for other formats
    or a header this does not understand (then ask PIL). ~6x faster than ``Image.open``."""
    head = f.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return int(w), int(h)
    if head[:2] != b"\xff\xd8":
        return None
    buf, pos = head, 2
    while True:  # walk the JPEG segments to the first start-of-frame
        while len(buf) < pos + 9:
            more = f.read(4096)
            if not more:
                return None
            buf = buf[pos:] + more
            pos = 0
        if buf[pos] != 0xFF:
            return None
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            pos += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", buf[pos + 5:pos + 9])
            return (int(w), int(h)) if w and h else None
        if marker == 0xD9:
            return None
        skip = pos + 2 + struct.unpack(">H", buf[pos + 2:pos + 4])[0]
        if skip > len(buf):  # a long segment (EXIF, ICC): read past it in bounded chunks
            left = skip - len(buf)
            while left > 0:
                chunk = f.read(min(left, 1 << 16))
                if not chunk:
                    return None
                left -= len(chunk)
            buf, pos = b"", 0
        else:
            pos = skip


def _decode(data: bytes, size: int | None, max_pixels: int | None = None) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as opened:  # reads the header only; PIL's own bomb check is here
        w, h = opened.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLarge(f"{w} x {h} pixels, over the limit of {max_pixels:,} pixels per image")
        img = opened.convert("RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        buf = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return buf.view(img.size[1], img.size[0], 3).permute(2, 0, 1).contiguous()


@dataclass
class _Member:
    split: str | None
    cls: str
    name: str  # path inside the source


def class_names(names: Sequence[str]) -> list[str]:
    """The classes an archive's or folder's file names hold, as the loader will read them (sorted);
    raises DataError for a layout it cannot read (no images, images at mixed depths)."""
    return sorted({m.cls for m in _index_members(names)})


def _index_members(names: Sequence[str]) -> list[_Member]:
    """Map ``[prefix/]{split/}class/file`` names to members; the layout is inferred."""
    files = [PurePosixPath(n) for n in names if is_image_name(n)]
    if not files:
        raise DataError("no image files found (expected class folders of .jpg/.png files)")
    depth = {len(f.parts) for f in files}
    if len(depth) != 1:
        raise DataError("image files sit at different folder depths; expected [split/]class/image files")
    members = []
    has_split = any(f.parts[-3] in {"train", "test", "val"} for f in files if len(f.parts) >= 3)
    for f in files:
        if has_split:
            if len(f.parts) < 3:
                raise DataError(f"{f}: expected split/class/image")
            members.append(_Member(f.parts[-3], f.parts[-2], str(f)))
        else:
            if len(f.parts) < 2:
                raise DataError(f"{f}: images must sit in one folder per class")
            members.append(_Member(None, f.parts[-2], str(f)))
    return members


def _decode_members(
    read: Callable[[str], bytes],
    members: list[_Member],
    classes: list[str],
    size: int | None,
    failures: list[DecodeFailure],
    progress: bool,
    max_pixels: int | None = None,
) -> ImageSet:
    class_index = {c: i for i, c in enumerate(classes)}
    images: list[torch.Tensor] = []
    labels: list[int] = []
    it: Iterator[_Member] = iter(members)
    if progress:
        from tqdm import tqdm

        it = tqdm(members, desc="decoding images", unit="img", leave=False, mininterval=1.0)
    for m in it:
        try:
            img = _decode(read(m.name), size, max_pixels)
        except DECODE_ERRORS as exc:
            failures.append(DecodeFailure(m.name, str(exc) or type(exc).__name__))
            continue
        if images and img.shape != images[0].shape:
            failures.append(DecodeFailure(m.name, f"size {tuple(img.shape[1:])} differs from {tuple(images[0].shape[1:])}; pass an image size"))
            continue
        images.append(img)
        labels.append(class_index[m.cls])
    if not images:
        raise DataError("no image could be decoded" + (f" (first error: {failures[0].file}: {failures[0].reason})" if failures else ""))
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), classes)


def _source_key(path: Path, size: int | None) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{size}|{CACHE_VERSION}".encode())
    return h.hexdigest()[:16]


def decode_image_folder(
    source: str | Path,
    cache_dir: str | Path | None = None,
    image_size: int | None = None,
    progress: bool = False,
    max_files: int | None = None,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
) -> tuple[dict[str, ImageSet], list[DecodeFailure]]:
    """Decode an ImageFolder directory or zip into {split: ImageSet}, through the on-disk cache.

    Splits come from ``train/``, ``val/`` and ``test/`` folders when present, else everything is
    ``train``. Undecodable files are skipped and reported, not fatal; so are files over
    ``max_image_bytes`` (refused before reading them) or ``max_image_pixels`` (refused from their
    header, before decoding) and PIL's decompression bombs.
    """
    source = Path(source)
    if not source.exists():
        raise DataError(f"data not found: {source}")
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"{source.stem}-{_source_key(source, image_size)}.pt"
        if cache_file.is_file():
            blob = torch.load(cache_file, map_location="cpu", weights_only=True)
            splits = {k: ImageSet(v["images"], v["labels"], list(blob["classes"])) for k, v in blob["splits"].items()}
            failures = [DecodeFailure(f, r) for f, r in blob.get("failures", [])]
            return splits, failures

    zf: zipfile.ZipFile | None = None
    read: Callable[[str], bytes]
    if source.is_file():
        try:
            zf = zipfile.ZipFile(source)
        except zipfile.BadZipFile:
            raise DataError(f"{source.name} is not a zip archive or an image folder") from None
        infos = {i.filename: i for i in zf.infolist() if not i.is_dir()}
        names = list(infos)
        archive = zf

        def read_member(name: str) -> bytes:
            info = infos[name]
            _check_size(info.file_size, max_image_bytes)  # the declared size, before decompressing anything
            with archive.open(info) as f:
                return _read_capped(f, max_image_bytes)

        read = read_member
    else:
        names = sorted(str(p.relative_to(source).as_posix()) for p in source.rglob("*") if p.is_file())

        def read_file(name: str) -> bytes:
            path = source / name
            _check_size(path.stat().st_size, max_image_bytes)
            with path.open("rb") as f:
                return _read_capped(f, max_image_bytes)

        read = read_file

    try:
        if max_files is not None and len(names) > max_files:
            raise DataError(f"{len(names)} files exceed the limit of {max_files}")
        members = sorted(_index_members(names), key=lambda m: (m.split or "", m.cls, m.name))
        classes = sorted({m.cls for m in members})
        if len(classes) < 2:
            raise DataError("need at least two class folders")
        failures = []
        splits = {}
        for split in sorted({m.split or "train" for m in members}):
            chosen = [m for m in members if (m.split or "train") == split]
            splits[split] = _decode_members(read, chosen, classes, image_size, failures, progress, max_image_pixels)
    finally:
        if zf is not None:
            zf.close()

    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        blob = {
            "classes": classes,
            "splits": {k: {"images": v.images, "labels": v.labels} for k, v in splits.items()},
            "failures": [(f.file, f.reason) for f in failures],
        }
        try:
            torch.save(blob, tmp)
            os.replace(tmp, cache_file)  # atomic: concurrent workers never read a half-written cache
        finally:
            tmp.unlink(missing_ok=True)  # a failed write (disk full, interrupted) leaves no partial file
    return splits, failures


def _check_size(size: int, limit: int) -> None:
    if size > limit:
        raise ImageTooLarge(f"{size:,} bytes, over the limit of {limit:,} bytes per image")


def _read_capped(f: IO[bytes], limit: int) -> bytes:
    """The whole file, or ImageTooLarge after reading ``limit + 1`` bytes: memory stays bounded
    even if the declared size was wrong."""
    data = f.read(limit + 1)
    if len(data) > limit:
        raise ImageTooLarge(f"over the limit of {limit:,} bytes per image (more than its declared size)")
    return data


# --------------------------------------------------------------------------- streaming

SPLIT_FOLDERS = ("train", "val", "test")


@dataclass(frozen=True)
class _FileReader:
    """Reads and decodes one file of a streamed set, under the same per-image limits as the cache."""

    root: str
    size: int
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int | None = MAX_IMAGE_PIXELS

    def __call__(self, relative: bytes) -> torch.Tensor:
        path = os.path.join(self.root, os.fsdecode(relative))
        _check_size(os.stat(path).st_size, self.max_image_bytes)
        with open(path, "rb") as f:
            return _decode(_read_capped(f, self.max_image_bytes), self.size, self.max_image_pixels)


class _FileDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """One file of a streamed set per item. A file that fails to decode comes back as label
    ``-1 - index``, so the reading process names it in one line (an exception raised in a DataLoader
    worker arrives wrapped in a traceback)."""

    def __init__(self, reader: _FileReader, files: np.ndarray, labels: np.ndarray) -> None:
        self.reader, self.files, self.labels = reader, files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            return self.reader(self.files[i]), int(self.labels[i])
        except DECODE_ERRORS:
            return torch.zeros(3, self.reader.size, self.reader.size, dtype=torch.uint8), -1 - int(i)


@dataclass
class FileImageSet:
    """Images listed by file under ``root`` and decoded batch by batch at ``size`` x ``size`` by
    ``workers`` DataLoader processes (0: in this process). Memory holds the file list (relative paths
    as one bytes array: no Python object per file, so forked workers share it untouched) and the
    batches in flight, whatever the number of images. A subset that decodes to at most
    ``memory_limit`` bytes is held in memory by :meth:`resident` (None: never)."""

    root: Path
    files: np.ndarray  # relative paths, dtype 'S'
    labels: torch.Tensor
    classes: list[str]
    size: int
    workers: int = 0
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int | None = MAX_IMAGE_PIXELS
    memory_limit: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return self.size

    @property
    def streamed(self) -> bool:
        return True

    def select(self, index: torch.Tensor) -> FileImageSet:
        return dataclasses.replace(self, files=self.files[index.cpu().numpy()], labels=self.labels[index])

    def subset(self, n: int | None, seed: int = 0) -> FileImageSet:
        index = _subset_index(self.labels, n, seed)
        return self if index is None else self.select(index)

    def decoded_bytes(self) -> int:
        return len(self) * 3 * self.size * self.size

    def load(self) -> ImageSet:
        images = torch.empty((len(self), 3, self.size, self.size), dtype=torch.uint8)
        pos = 0
        for x, _ in self.batches(256):
            images[pos: pos + len(x)] = x
            pos += len(x)
        return ImageSet(images, self.labels.clone(), self.classes)

    def resident(self) -> ImageSource:
        if self.memory_limit is not None and self.decoded_bytes() <= self.memory_limit:
            return self.load()
        return self

    def on(self, device: torch.device) -> FileImageSet:
        return self

    def batches(self, batch_size: int, order: torch.Tensor | None = None, device: torch.device | None = None) -> Iterator[Batch]:
        reader = _FileReader(str(self.root), self.size, self.max_image_bytes, self.max_image_pixels)
        dataset = _FileDataset(reader, self.files, self.labels.numpy())
        sampler: Iterable[int] = range(len(self)) if order is None else order.cpu().numpy()
        pin = device is not None and device.type == "cuda"
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.workers,
                                             pin_memory=pin, prefetch_factor=2 if self.workers else None)
        for x, y in loader:
            bad = y < 0
            if bool(bad.any()):
                raise DataError(self._failure(int(-1 - y[bad][0])))
            if device is not None and device.type != "cpu":
                x, y = x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
            yield x, y

    def _failure(self, i: int) -> str:
        name = os.fsdecode(self.files[i])
        try:
            _FileReader(str(self.root), self.size, self.max_image_bytes, self.max_image_pixels)(self.files[i])
            reason = "it decodes in this process but not in a loader worker"
        except DECODE_ERRORS as exc:
            reason = str(exc) or type(exc).__name__
        return (f"{name} in the streamed data set {self.root} cannot be decoded ({reason}): a streamed data set must "
                "decode whole; fix or remove the file")


@dataclass
class ImageTree:
    """The file list of an ImageFolder directory: ``{split/}class/image`` files, in the order the
    cache path decodes them (split, class, file name)."""

    root: Path
    classes: list[str]
    splits: dict[str, tuple[np.ndarray, torch.Tensor]]  # split -> (relative paths, labels)

    @property
    def count(self) -> int:
        return sum(len(files) for files, _ in self.splits.values())

    def native_size(self) -> int:
        """The first image's side (its larger one): what a streamed set decodes every image at
        when no image size is given."""
        for files, _ in self.splits.values():
            if len(files):
                path = self.root / os.fsdecode(files[0])
                with path.open("rb") as f:
                    dims = image_dimensions(f)
                if dims is None:
                    with Image.open(path) as im:
                        dims = im.size
                return max(dims)
        raise DataError(f"no image files found in {self.root}")

    def sets(self, size: int, workers: int, max_image_bytes: int, max_image_pixels: int | None,
             memory_limit: int | None) -> dict[str, FileImageSet]:
        return {split: FileImageSet(self.root, files, labels, self.classes, size, workers, max_image_bytes, max_image_pixels,
                                    memory_limit)
                for split, (files, labels) in self.splits.items()}


def _visible(name: str) -> bool:
    return not name.startswith(".") and name != "__MACOSX"


def scan_image_tree(root: str | Path) -> ImageTree:
    """List a directory laid out as ``train/``, ``val/``, ``test/`` folders of class folders (as
    ImageNet is), or as class folders only (all training data); files in other places are ignored.
    One ``scandir`` per folder: 200,000 files list in about a second."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data not found: {root} is not a directory")
    present = [s for s in SPLIT_FOLDERS if (root / s).is_dir()]
    inner = [Path(e.path) for e in os.scandir(root) if e.is_dir() and _visible(e.name)]
    if not present and len(inner) == 1 and any((inner[0] / s).is_dir() for s in SPLIT_FOLDERS):
        return scan_image_tree(inner[0])  # one folder around the splits (an unpacked archive's name)
    layout = {s: root / s for s in present} if present else {"train": root}
    # one bytes array per class folder as it is read (the Python strings of one folder live at a time)
    found: dict[str, list[tuple[str, np.ndarray]]] = {}
    for split, folder in layout.items():
        prefix = "" if not present else f"{split}/"
        found[split] = []
        for cls in sorted(e.name for e in os.scandir(folder) if e.is_dir() and _visible(e.name)):
            names = sorted(e.name for e in os.scandir(folder / cls) if e.is_file() and _visible(e.name) and is_image_name(e.name))
            if names:
                found[split].append((cls, np.array([os.fsencode(f"{prefix}{cls}/{n}") for n in names], dtype=np.bytes_)))
    classes = sorted({cls for entries in found.values() for cls, _ in entries})
    if not classes:
        raise DataError(f"no image files found in {root} (expected class folders of .jpg/.png files)")
    if len(classes) < 2:
        raise DataError("need at least two class folders")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, entries in found.items():
        if entries:
            files = np.concatenate([paths for _, paths in entries])
            labels = torch.cat([torch.full((len(paths),), index[cls], dtype=torch.int64) for cls, paths in entries])
            splits[split] = (files, labels)
    return ImageTree(root, classes, splits)


def tree_classes(root: str | Path) -> list[str]:
    """The classes of an ImageFolder directory's training images, reading folder names and the first
    image of each class only (cheap on an ImageNet-sized tree)."""
    root = Path(root)
    folder = root / "train" if (root / "train").is_dir() else root
    if not folder.is_dir():
        raise DataError(f"data not found: {root} is not a directory")
    out = []
    for cls in sorted(e.name for e in os.scandir(folder) if e.is_dir() and _visible(e.name)):
        with os.scandir(folder / cls) as entries:
            if any(e.is_file() and _visible(e.name) and is_image_name(e.name) for e in entries):
                out.append(cls)
    return out


def load_splits(
    source: str | Path,
    cache_dir: str | Path | None = None,
    val_size: int | None = None,
    image_size: int | None = None,
    progress: bool = False,
    mean: tuple[float, float, float] = CIFAR_MEAN,
    std: tuple[float, float, float] = CIFAR_STD,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    max_decoded_bytes: int | None = None,
    loader_workers: int = 0,
) -> DataSplits:
    """Train / validation / test splits. Validation is carved from train, deterministically,
    unless the source has its own ``val/`` folder; test stays untouched for final figures.

    A directory whose images decode to more than ``max_decoded_bytes`` (counted at ``image_size``, or
    at the first image's size) is streamed: its splits are :class:`FileImageSet` lists decoded by
    ``loader_workers`` processes batch by batch, every image at one size (subsets within the limit,
    like the evaluator's validation images, are decoded into memory). Anything smaller, and any zip
    (uploads are capped at submission), is decoded once into the uint8 cache."""
    source = Path(source)
    decoded: Mapping[str, ImageSource]
    tree = None
    if max_decoded_bytes is not None and source.is_dir():
        try:
            tree = scan_image_tree(source)
        except DataError:
            tree = None  # a layout only the cache path reads (say, images at mixed depths): decoded, with its messages
    if tree is not None and max_decoded_bytes is not None:
        size = image_size or tree.native_size()
        if tree.count * 3 * size * size > max_decoded_bytes:
            decoded = tree.sets(size, loader_workers, max_image_bytes, max_image_pixels, max_decoded_bytes)
            return _splits_of(decoded, [], val_size, mean, std)
    decoded, failures = decode_image_folder(source, cache_dir, image_size, progress,
                                            max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels)
    return _splits_of(decoded, failures, val_size, mean, std)


def _splits_of(decoded: Mapping[str, ImageSource], failures: list[DecodeFailure], val_size: int | None,
               mean: tuple[float, float, float], std: tuple[float, float, float]) -> DataSplits:
    """The three splits from a source's folders, carving those it lacks from its training images."""
    train = decoded.get("train")
    if train is None:
        raise DataError("data has no training images (expected a train/ folder or class folders)")
    carved = []
    if "val" in decoded:
        val = decoded["val"]
    else:
        n_val = val_size if val_size is not None else min(DEFAULT_VAL_SIZE, max(1, len(train) // 10))
        train, val = split_train_val(train, n_val)
        carved.append("val")
    test = decoded.get("test")
    if test is None:
        # No test folder: carve one off train too, so final figures never reuse search data.
        train, test = split_train_val(train, max(1, len(train) // 10), seed=SPLIT_SEED + 1)
        carved.append("test")
    return DataSplits(train, val, test, mean, std, failures, tuple(carved))


# --------------------------------------------------------------------------- batching


class Normalizer:
    """uint8 (N,3,H,W) -> normalized float32, the same transform the weights were trained with, on
    the images' device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {self.mean.device: (self.mean, self.inv_std)}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        consts = self._on.get(images.device)
        if consts is None:
            consts = self._on[images.device] = (self.mean.to(images.device), self.inv_std.to(images.device))
        mean, inv_std = consts
        return (images.float() - mean).mul_(inv_std)


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a uint8 batch: random crop with zero padding and horizontal flip.

    Runs on the images' device. The random offsets come from ``generator`` (a CPU generator), so a
    seed gives the same crops and flips on every device. Returned in channels-last layout (a view
    of one gather, never an index tensor the size of the batch)."""
    n, c, h, w = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # (n, h+2p, w+2p, c)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev).view(n, 1)
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev).view(n, 1)
    rows = (dy.view(n, 1) + torch.arange(h, device=dev)).view(n, h, 1)
    cols = torch.arange(w, device=dev).view(1, w)
    cols = torch.where(flip, dx + (w - 1) - cols, dx + cols).view(n, 1, w)  # flipped: column j reads dx + w-1-j
    return padded[torch.arange(n, device=dev).view(n, 1, 1), rows, cols].permute(0, 3, 1, 2)
