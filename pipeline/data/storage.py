"""Local paths and s3:// URIs behind one small interface (fsspec / s3fs underneath).

The S3 endpoint comes from `AWS_ENDPOINT_URL` (the AWS SDKs' own variable) so the same command
runs against AWS, MinIO or a loopback test server; credentials come from the usual AWS chain.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
import zlib
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from pipeline.data import retry


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for `uri`: for s3 the endpoint override, no listing cache, and botocore's
    per-request retries of the project's policy (`retry.BOTOCORE_RETRIES`).

    The listing cache is off because jobs list folders they have just written (re-runs, manifest
    clean-up) and a stale listing would hide or resurrect files.
    """
    if uri.startswith(("s3://", "s3a://")):
        options: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True,
                                   "config_kwargs": {"retries": dict(retry.BOTOCORE_RETRIES)}}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        return options
    return {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding `uri` and the path inside it."""
    fs, path = url_to_fs(uri, **storage_options(uri))
    return fs, path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI, always with '/'."""
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def absolute(uri: str) -> str:
    """A local path made absolute (Ray workers and `ray job submit` run elsewhere); URIs unchanged."""
    return uri if is_remote(uri) else os.path.abspath(os.path.expanduser(uri))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.isdir(path)


def list_dir(uri: str) -> list[str]:
    """Base names of the entries directly under `uri` (files and folders), sorted."""
    fs, path = filesystem(uri)
    entries = retry.call(lambda: fs.ls(path, detail=False), f"listing {uri}")
    names = [posixpath.basename(entry.rstrip("/")) for entry in entries]
    return sorted(name for name in names if name)


def size(uri: str) -> int:
    fs, path = filesystem(uri)
    return int(retry.call(lambda: fs.size(path), f"size of {uri}"))


def read_bytes(uri: str, start: int | None = None, end: int | None = None) -> bytes:
    """Whole file, or the byte range [start, end) of it (one ranged GET on S3), with transient
    errors retried under the project's policy (`retry`)."""
    fs, path = filesystem(uri)
    return retry.call(lambda: fs.cat_file(path, start=start, end=end), f"reading {uri}")


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write a whole file so that readers see either the old or the new content, never a part.

    Local: temp file + rename. S3: a single PUT is already atomic.
    """
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_remote(uri):
        retry.call(lambda: fs.pipe_file(path, data), f"writing {uri}")  # a repeated PUT is harmless
        return
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_json_atomic(uri: str, payload: Any) -> None:
    write_bytes_atomic(uri, (json.dumps(payload, indent=1, sort_keys=False) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path)


def make_dirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


class ChecksumWriter:
    """A write-only file wrapper that CRC-32s and counts the bytes as they go out.

    Checksumming on the way out avoids reading every shard back; pyarrow writes through it.
    A `durable` (local) file is fsynced on close: a manifest written after its parts must not
    outlive them in a power loss. An S3 object is durable once its upload completes on close.
    """

    def __init__(self, handle, durable: bool = False) -> None:
        self._handle = handle
        self._durable = durable
        self.crc32 = 0
        self.bytes_written = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        self.crc32 = zlib.crc32(view, self.crc32)
        self.bytes_written += view.nbytes
        self._handle.write(view)
        return view.nbytes

    def tell(self) -> int:
        return self.bytes_written

    def flush(self) -> None:
        self._handle.flush()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            if self._durable:
                self._handle.flush()
                os.fsync(self._handle.fileno())
            self._handle.close()
            self.closed = True

    @property
    def checksum(self) -> str:
        return f"crc32:{self.crc32:08x}"


def open_for_write(uri: str) -> ChecksumWriter:
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    return ChecksumWriter(fs.open(path, "wb"), durable=not is_remote(uri))


def file_checksum(uri: str, chunk_bytes: int = 16 << 20) -> str:
    """CRC-32 of a stored file, read back in chunks (for verifying manifests)."""
    fs, path = filesystem(uri)
    crc = 0
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            crc = zlib.crc32(chunk, crc)
    return f"crc32:{crc:08x}"


def write_parquet_atomic(uri: str, table: pa.Table) -> None:
    """One whole Parquet file (zstd) at `uri`, visible only once complete."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    write_bytes_atomic(uri, buffer.getvalue())


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file at `uri` (local or remote), optionally only `columns`."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)
