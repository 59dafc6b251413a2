"""Uploads: size-limited, content-addressed on disk, validated before anything is created.

Weights are read with ``torch.load(weights_only=True)`` or safetensors, never unpickled, and
must load into the named architecture. Dataset zips are checked entry by entry: no absolute
paths or ``..``, no links, a cap on the number of files and on the uncompressed total.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from prunepilot.compression import DataError, PrunePilotError, WeightsError

from .settings import Settings
from .workspace import load_user_model


class UploadTooLarge(PrunePilotError):
    pass


@dataclass(frozen=True)
class StoredUpload:
    sha256: str
    path: Path
    size: int
    filename: str
    new: bool  # False when identical content was uploaded before (then it may be in use)


def store_stream(stream: BinaryIO, filename: str, kind: str, settings: Settings) -> StoredUpload:
    """Copy an upload to disk while hashing it; stop as soon as it passes the size limit."""
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, tmp_name = tempfile.mkstemp(dir=settings.uploads_dir, prefix=".incoming-")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(1 << 20):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise UploadTooLarge(f"{kind} upload exceeds the limit of {settings.max_upload_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise WeightsError(f"{kind} upload is empty") if kind == "weights" else DataError("dataset upload is empty")
        sha = digest.hexdigest()
        suffix = ".safetensors" if filename.endswith(".safetensors") else (".zip" if kind == "dataset" else ".pt")
        final = settings.uploads_dir / f"{sha}{suffix}"
        new = not final.exists()
        if new:
            os.replace(tmp_name, final)
        else:
            os.unlink(tmp_name)
        return StoredUpload(sha, final, size, filename, new)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def validate_weights(arch: str, upload: StoredUpload) -> int:
    """Load the weights into the architecture (safely); returns the number of classes."""
    _, num_classes = load_user_model(arch, upload.path)
    return num_classes


def validate_dataset_zip(upload: StoredUpload, settings: Settings) -> None:
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


def discard(upload: StoredUpload) -> None:
    """Drop a rejected upload, unless the same content was stored before this request."""
    if upload.new:
        upload.path.unlink(missing_ok=True)
