"""Uploads: size-limited, content-addressed on disk, validated before anything is created.

Weights are read with ``torch.load(weights_only=True)`` or safetensors, never unpickled, and
must load into the named architecture; a few at a time (:func:`validation_slot`), since each is
loaded whole. Dataset zips are checked entry by entry: no absolute paths or ``..``, no links, a
cap on the number of files, on the uncompressed total and on any one image; and the worker's
decoded cache is estimated and capped (:func:`decoded_bytes`).

An upload is staged in a file private to its request and validated there; only an accepted one is
published under its content address. A rejected request deletes its own staging file and nothing
else, so it can never take content that another request's job references, even one accepted
concurrently on identical bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image
from torch import nn

from prunepilot.compression import DataError, PrunePilotError, WeightsError
from prunepilot.compression.data import class_names, image_dimensions, is_image_name
from prunepilot.compression.sources import ModelSource, SourceKind

from .settings import Settings
from .workspace import load_user_model


class UploadTooLarge(PrunePilotError):
    pass


@dataclass(frozen=True)
class StoredUpload:
    sha256: str
    path: Path  # this request's own staging file, validated before anything else sees it
    size: int
    filename: str
    final: Path  # the content-addressed file once published, possibly shared with other jobs


def file_label(filename: str) -> str:
    """The client's file name, kept only as a label: printable, and shorter than its column (uploads.filename,
    500) and any file system's name limit, so a long or odd name cannot fail the database write."""
    return "".join(c for c in filename if c.isprintable())[:255]


def store_stream(stream: BinaryIO, filename: str, kind: str, settings: Settings) -> StoredUpload:
    """Stage an upload in a private file while hashing it; stop as soon as it passes the size limit."""
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    # The suffix tells readers the format, so the staged file validates exactly as the published one reads.
    suffix = {"dataset": ".zip", "model": ".onnx"}.get(kind, ".safetensors" if filename.endswith(".safetensors") else ".pt")
    fd, tmp_name = tempfile.mkstemp(dir=settings.uploads_dir, prefix=".incoming-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(1 << 20):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise UploadTooLarge(f"{kind} upload exceeds the limit of {settings.max_upload_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise DataError("dataset upload is empty") if kind == "dataset" else WeightsError(f"{kind} upload is empty")
        sha = digest.hexdigest()
        return StoredUpload(sha, Path(tmp_name), size, file_label(filename), settings.uploads_dir / f"{sha}{suffix}")
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


_slots_lock = threading.Lock()
_slots: dict[int, threading.BoundedSemaphore] = {}


def validation_slot(settings: Settings) -> threading.BoundedSemaphore:
    """The process-wide cap on weight validations at once (``max_concurrent_validations``): each
    loads the whole file, so API memory stays bounded however many submissions arrive together."""
    with _slots_lock:
        n = settings.max_concurrent_validations
        return _slots.setdefault(n, threading.BoundedSemaphore(n))


def validate_weights(source: ModelSource, upload: StoredUpload) -> tuple[nn.Module, int]:
    """Load the weights into the architecture (safely); the dense model and its number of classes."""
    return load_user_model(source, upload.path, weights_name=upload.filename)


def validate_onnx(upload: StoredUpload, settings: Settings) -> tuple[ModelSource, nn.Module, int]:
    """Parse (protobuf: no code runs), convert and check an ONNX upload against ONNX Runtime.

    The source names the staged file; its reference (``onnx:<sha256>``) is the same once published."""
    from prunepilot.compression.onnx_io import check_against_onnxruntime, read_onnx

    read_onnx(upload.path, max_bytes=settings.max_upload_bytes, source=upload.filename)
    staged = ModelSource(SourceKind.ONNX, upload.sha256, upload.path)
    dense, num_classes = load_user_model(staged, None)
    size = staged.default_input().size or 32
    check_against_onnxruntime(dense, upload.path, input_size=size)
    return staged, dense, num_classes


def dataset_classes(upload: StoredUpload) -> list[str]:
    """The class folders of a dataset zip, read as the worker will read them (file names only)."""
    with zipfile.ZipFile(upload.path) as zf:
        return class_names(zf.namelist())


def validate_dataset_zip(upload: StoredUpload, settings: Settings, image_size: int | None = None) -> None:
    """Refuse an archive that is unsafe to unpack or too big to decode: ``image_size`` is the size the
    worker will resize to (None: native size, then each image's header is read; see
    :func:`decoded_bytes`)."""
    try:
        zf = zipfile.ZipFile(upload.path)
    except zipfile.BadZipFile:
        raise DataError("dataset upload is not a zip archive") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > settings.max_zip_files:
            raise DataError(f"dataset zip has {len(infos)} entries; the limit is {settings.max_zip_files}")
        total = 0
        for info in infos:
            name = info.filename
            p = PurePosixPath(name)
            if name.startswith("/") or "\\" in name or ".." in p.parts or (len(name) > 1 and name[1] == ":"):
                raise DataError(f"dataset zip entry {name!r} points outside the archive")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise DataError(f"dataset zip entry {name!r} is a symbolic link")
            total += info.file_size
            if total > settings.max_zip_bytes:
                raise DataError(f"dataset zip expands beyond the limit of {settings.max_zip_bytes} bytes")
            if info.compress_size and info.file_size / info.compress_size > 1000:
                raise DataError(f"dataset zip entry {name!r} has a suspicious compression ratio")
            if info.file_size > settings.max_image_bytes and is_image_name(name):
                raise DataError(f"dataset zip entry {name!r} is {info.file_size:,} bytes uncompressed; the limit per image "
                                f"is {settings.max_image_bytes:,} bytes (PRUNEPILOT_MAX_IMAGE_BYTES)")
        images = [i for i in infos if not i.is_dir() and is_image_name(i.filename)]
        estimate = decoded_bytes(zf, images, image_size, settings)
        if estimate > settings.max_decoded_bytes:
            how = f"at {image_size} x {image_size}" if image_size is not None else "at their native sizes"
            raise DataError(f"dataset decodes to {estimate:,} bytes ({len(images):,} images {how}, 3 bytes per pixel), over the "
                            f"limit of {settings.max_decoded_bytes:,} bytes (PRUNEPILOT_MAX_DECODED_BYTES); use a smaller "
                            f"image_size or fewer images")


def decoded_bytes(zf: zipfile.ZipFile, images: list[zipfile.ZipInfo], image_size: int | None, settings: Settings) -> int:
    """Size of the worker's uint8 cache of these images: 3 x ``image_size``^2 each, or at native size
    3 x width x height from each image's header (PNG and JPEG parsed directly, about 23 us an image:
    1.4 s for CIFAR-10's 60,000; other formats through PIL, which also reads only the header). An
    image the worker will skip (unreadable header, over ``max_image_pixels``) counts nothing."""
    if image_size is not None:
        return len(images) * 3 * image_size**2
    total = 0
    for info in images:
        try:
            with zf.open(info) as f:
                dims = image_dimensions(f)
                if dims is None:
                    f.seek(0)
                    with Image.open(f) as im:
                        dims = im.size
        except (OSError, ValueError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile, Image.DecompressionBombError):
            continue  # the worker will report it as undecodable
        pixels = dims[0] * dims[1]
        if pixels <= settings.max_image_pixels:
            total += 3 * pixels
    return total


def publish(upload: StoredUpload) -> None:
    """Move an accepted upload to its content address (``final``); identical content already there is kept.

    Kept rather than replaced: a worker may be reading it, and replacing an open file on a shared
    (NFS) uploads directory breaks the reader's handle. Two requests publishing the same new content
    at once both rename, which is harmless: the bytes are the same.

    Kept content has its change time (ctime) renewed, its modification time untouched (a decoded
    data cache is keyed by it): the retention sweep (service/retention.py) spares an upload changed
    in the last hour, so it cannot take content a job being created now is about to name.
    """
    try:
        st = upload.final.stat()
        os.utime(upload.final, ns=(st.st_atime_ns, st.st_mtime_ns))  # same times; the kernel sets ctime to now
    except FileNotFoundError:  # new content, or swept a moment ago: this copy becomes the content
        os.replace(upload.path, upload.final)
        return
    except OSError:  # e.g. not the file's owner: the sweep's grace then counts from its first publication
        pass
    upload.path.unlink(missing_ok=True)


def discard(upload: StoredUpload) -> None:
    """Drop a rejected upload: only this request's staging file, never published (shared) content."""
    upload.path.unlink(missing_ok=True)
