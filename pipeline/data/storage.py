"""Local paths, s3:// and gs:// URIs behind one small interface (fsspec: s3fs, gcsfs underneath).

The S3 endpoint comes from `AWS_ENDPOINT_URL` (the AWS SDKs' own variable) so the same command
runs against AWS, MinIO or a loopback test server; credentials come from the usual AWS chain.
GCS credentials are Google's Application Default Credentials (`GOOGLE_APPLICATION_CREDENTIALS`, the
gcloud ADC file, or the metadata server: a VM's service account, GKE workload identity); only when
`STORAGE_EMULATOR_HOST` names a GCS emulator are requests sent there, unauthenticated.
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


# The object stores this module configures: URI scheme -> store. Every other "<scheme>://" URI is
# still remote (fsspec serves it with its defaults); a plain path or file:// is local.
OBJECT_STORES = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
# Where a GCS emulator listens ("127.0.0.1:9023" or a URL); the variable gcsfs and Google's client
# libraries read. Set, it also makes requests unauthenticated: an emulator takes no credentials.
GCS_EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def object_store(uri: str) -> str | None:
    """The object store of `uri` ("s3" or "gcs") when this module configures it, else None."""
    scheme, separator, _ = uri.partition("://")
    return OBJECT_STORES.get(scheme.lower()) if separator else None


def gcs_emulator() -> str | None:
    """The GCS emulator's URL from `STORAGE_EMULATOR_HOST`, or None (the real GCS)."""
    host = os.environ.get(GCS_EMULATOR_VARIABLE, "")
    if host in ("", "default"):  # gcsfs reads "default" as unset too
        return None
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for `uri`: for s3 the endpoint override, no listing cache, and botocore's
    per-request retries of the project's policy (`retry.BOTOCORE_RETRIES`); for gs no listing
    cache and the credentials (see `gcs_options`).

    The listing cache is off because jobs list folders they have just written (re-runs, manifest
    clean-up) and a stale listing would hide or resurrect files.
    """
    store = object_store(uri)
    if store == "s3":
        options: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True,
                                   "config_kwargs": {"retries": dict(retry.BOTOCORE_RETRIES)}}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        return options
    if store == "gcs":
        return gcs_options()
    return {}


def gcs_options() -> dict[str, Any]:
    """gcsfs options: Application Default Credentials ("google_default": a missing credential is
    an error at once, where gcsfs's own default would quietly go on unauthenticated), or, only
    with `STORAGE_EMULATOR_HOST` set, that emulator without credentials.

    The instance cache stays on (unlike s3's): an instance resolves its credentials and fetches
    its token once, instead of at every storage call; its options name the endpoint, so an
    instance for another emulator or for the real GCS is never reused."""
    options: dict[str, Any] = {"use_listings_cache": False}
    emulator = gcs_emulator()
    if emulator:
        options.update(endpoint_url=emulator, token="anon")
    else:
        options["token"] = "google_default"
    return options


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding `uri` and the path inside it."""
    if object_store(uri) == "gcs":
        # gcsfs's JSON-API filesystem by name: the class that `gs://` resolves to by default
        # (gcsfs's "extended" one) first asks a gRPC control API for each bucket's layout, which
        # no JSON-API emulator answers (each call stalled up to a minute), so the tested class is used.
        from gcsfs.core import GCSFileSystem

        fs = GCSFileSystem(**storage_options(uri))
        return fs, fs._strip_protocol(uri)
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

    Local: temp file + rename. S3 and GCS: a single upload is already atomic (an object appears
    whole when its upload completes, replacing any older one; an unfinished one is never visible).
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
    outlive them in a power loss. An S3 or GCS object is durable once its upload completes on close.
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
