"""What the corpus readers share: batched reads of many small files, streamed index files, and
face-box crops of whole images turned into shard rows (AffectNet and ExpW).
"""

from __future__ import annotations

import contextlib
import io
import math
import posixpath
from dataclasses import dataclass
from typing import Iterator, Sequence

import fsspec

from pipeline.data import images, retry, storage
from pipeline.data.readers.base import Batch, RowBuffer

# fsspec's `cat` treats these as glob patterns, so a path holding one is read on its own.
GLOB_CHARACTERS = frozenset("*?[")


def read_files(fs: fsspec.AbstractFileSystem, paths: Sequence[str],
               policy: retry.RetryPolicy = retry.DEFAULT_POLICY) -> list[bytes | Exception]:
    """Each file's bytes, or the exception that reading it raised, in the order given.

    One `cat` call per list: on S3 that is one concurrent GET per file instead of a round trip
    each; on local disk it reads one after another. Reads that failed transiently are retried
    together under `policy`; what is left (absent, forbidden, or failing past the policy) comes back
    as its exception, for the caller to skip with its reason.
    """
    contents = _read_files_once(fs, paths)
    contents, _ = retry.retry_failed(list(paths), contents, lambda again: _read_files_once(fs, again),
                                     policy)
    return contents


def _read_files_once(fs: fsspec.AbstractFileSystem, paths: Sequence[str]) -> list[bytes | Exception]:
    literal = [path for path in paths if not GLOB_CHARACTERS.intersection(path)]
    fetched = fs.cat(literal, on_error="return") if literal else {}
    contents: list[bytes | Exception] = []
    for path in paths:
        key = fs._strip_protocol(path)
        if key in fetched:
            contents.append(fetched[key])
            continue
        try:
            contents.append(fs.cat_file(path))
        except Exception as error:  # fsspec backends raise OSError, ClientError...; keep going
            contents.append(error)
    return contents


@contextlib.contextmanager
def open_text(uri: str) -> Iterator[io.TextIOBase]:
    """A text stream over a (possibly remote) file: a BOM is dropped and newlines left to `csv`."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as raw:
        yield io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")


def parse_number(text: str, name: str) -> float:
    """A finite number from an index-file field; a ValueError naming the field otherwise."""
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{name} is not a number: {text!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} is not a finite number: {text!r}")
    return number


def parse_integer(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} is not an integer: {text!r}") from None


def read_failure(error: Exception, missing_reason: str) -> tuple[str, str]:
    """(skip reason, detail) for a file that could not be read: missing or otherwise unreadable."""
    if isinstance(error, FileNotFoundError):
        return missing_reason, "no such file"
    return "unreadable_file", f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class Face:
    """One face box of a source image, and the row it becomes."""

    sample_id: str
    box: tuple[float, float, float, float]  # left, top, right, bottom in source pixels
    label: int  # ABAW id
    split: str


@dataclass(frozen=True)
class FaceImage:
    """A source image and all its face boxes, so the image is read and decoded once."""

    path: str  # relative to the reader's root
    faces: tuple[Face, ...]


def read_face_crops(root: str, source: str, face_images: Sequence[FaceImage], read_batch: int,
                    jpeg_quality: int) -> Iterator[Batch]:
    """Read the images `read_batch` at a time, crop every face box and yield rows and skips.

    A missing image skips its faces as `missing_image`, an undecodable one as `bad_image`, and a
    box left empty once clamped to the image as `degenerate_box`.
    """
    fs, base = storage.filesystem(root)
    rows = RowBuffer()
    for start in range(0, len(face_images), read_batch):
        batch = face_images[start:start + read_batch]
        contents = read_files(fs, [posixpath.join(base, image.path) for image in batch])
        for image, data in zip(batch, contents):
            _add_crops(rows, source, image, data, jpeg_quality)
        if rows.full:
            yield rows.take()
    yield rows.take()


def _add_crops(rows: RowBuffer, source: str, image: FaceImage, data: bytes | Exception,
               jpeg_quality: int) -> None:
    if isinstance(data, Exception):
        reason, detail = read_failure(data, "missing_image")
        for face in image.faces:
            rows.skip(reason, image.path, detail, face.sample_id)
        return
    try:
        crops = images.crop_faces(data, [face.box for face in image.faces], jpeg_quality)
    except images.ImageError as error:
        for face in image.faces:
            rows.skip("bad_image", image.path, str(error), face.sample_id)
        return
    for face, crop in zip(image.faces, crops):
        if isinstance(crop, images.ImageError):
            rows.skip("degenerate_box", image.path, str(crop), face.sample_id)
            continue
        jpeg, height, width = crop
        rows.add(face.sample_id, jpeg, images.ImageInfo("jpeg", height, width), face.label,
                 source, face.split)
