"""gs:// against a GCS JSON-API emulator on loopback (its own process, no credentials): the storage
primitives, writes that a crash leaves invisible, the credentials gcsfs is given, and `jobs.ingest`
from a gs:// corpus into gs:// shards matching the same ingest of a local folder byte for byte."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import ingest, schema, shards, storage
from pipeline.data.readers import make_reader
from pipeline.data.readers.base import SourceUnusable
from pipeline.demo.corpus import DemoCorpusConfig, write_demo_corpus

from gcs_server import running_gcs_server

pytestmark = pytest.mark.gcs

BUCKET = "fer-gcs-test"
REPOSITORY = Path(__file__).resolve().parents[2]
SMALL = DemoCorpusConfig(train_videos=2, validation_videos=1, two_person_videos=1,
                         frames_per_video=(12, 16), affectnet_train=16, affectnet_validation=6,
                         expw_images=10, ms1mv2_identities=6, ms1mv2_images=40)


@pytest.fixture(scope="module")
def gcs_server():
    """The emulator on 127.0.0.1, started for this module and stopped after it."""
    with running_gcs_server(BUCKET) as (uri, _):
        yield uri


@pytest.fixture(scope="module")
def corpus(gcs_server, tmp_path_factory):
    """The small demo corpus, on local disk and uploaded to the emulator."""
    local = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(str(local), SMALL)
    fs, _ = storage.filesystem(gcs_server)
    fs.put(str(local) + "/", f"{BUCKET}/corpus/", recursive=True)
    return str(local), f"{gcs_server}/corpus"


def object_names(fs, prefix: str) -> list[str]:
    return sorted(path[len(prefix) + 1:] for path in fs.find(prefix))


# ------------------------------------------------------------------------- credentials and routing

def test_gs_uris_are_routed_to_gcsfs_and_the_emulator_takes_no_credentials(gcs_server):
    assert storage.object_store("gs://bucket/a") == storage.object_store("gcs://bucket/a") == "gcs"
    assert storage.object_store("s3://bucket/a") == "s3" and storage.object_store("/data/a") is None
    assert storage.is_remote("gs://bucket/a")
    assert storage.join("gs://bucket/a/", "b", "c.json") == "gs://bucket/a/b/c.json"
    assert storage.absolute("gs://bucket/a") == "gs://bucket/a"
    fs, path = storage.filesystem(f"{gcs_server}/folder/file.json")
    # gcsfs's JSON-API class: the one `gs://` resolves to by default stalls on any emulator.
    from gcsfs.core import GCSFileSystem

    assert type(fs) is GCSFileSystem and path == f"{BUCKET}/folder/file.json"
    assert fs.storage_options["token"] == "anon"
    assert fs.storage_options["endpoint_url"] == os.environ["STORAGE_EMULATOR_HOST"]


def test_without_an_emulator_gcs_uses_default_credentials_and_fails_without_them(monkeypatch, tmp_path):
    """Real GCS: Application Default Credentials, never a quiet anonymous fallback. A credentials
    file that does not exist must raise (google.auth reads the variable first, no network)."""
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent-key.json"))
    assert storage.gcs_emulator() is None
    options = storage.storage_options("gs://bucket/a")
    assert options["token"] == "google_default" and "endpoint_url" not in options
    from google.auth.exceptions import DefaultCredentialsError

    with pytest.raises(DefaultCredentialsError, match="absent-key.json"):
        storage.filesystem("gs://bucket/a")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9")
    assert storage.gcs_options() == {"use_listings_cache": False, "endpoint_url": "http://127.0.0.1:9",
                                     "token": "anon"}


# ------------------------------------------------------------------------------ storage primitives

def test_storage_primitives_on_gcs(gcs_server):
    root = f"{gcs_server}/primitives"
    payload = bytes(range(256)) * 40
    storage.write_bytes_atomic(f"{root}/blob.bin", payload)
    storage.write_json_atomic(f"{root}/nested/deeper/settings.json", {"a": 1, "b": [2, 3]})
    storage.write_bytes_atomic(f"{root}/nested/notes.txt", "é\n".encode())

    assert storage.read_bytes(f"{root}/blob.bin") == payload
    assert storage.read_bytes(f"{root}/blob.bin", 300, 1300) == payload[300:1300]  # a ranged read
    assert storage.read_bytes(f"{root}/blob.bin", start=len(payload) - 7) == payload[-7:]
    assert storage.size(f"{root}/blob.bin") == len(payload)
    assert storage.read_json(f"{root}/nested/deeper/settings.json") == {"a": 1, "b": [2, 3]}
    assert storage.read_text(f"{root}/nested/notes.txt") == "é\n"
    # Base names, sorted, of files and of the "folders" that object names imply, one level only.
    assert storage.list_dir(root) == ["blob.bin", "nested"]
    assert storage.list_dir(f"{root}/nested") == ["deeper", "notes.txt"]
    assert storage.list_dir(f"{root}/nested/") == ["deeper", "notes.txt"]
    assert storage.is_dir(f"{root}/nested") and not storage.is_dir(f"{root}/blob.bin")
    assert storage.exists(f"{root}/nested/notes.txt") and not storage.exists(f"{root}/absent.txt")

    storage.remove(f"{root}/nested/notes.txt")
    storage.remove(f"{root}/never-written.txt")  # removing what is absent is not an error
    assert storage.list_dir(f"{root}/nested") == ["deeper"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{root}/nested/notes.txt")
    with pytest.raises(FileNotFoundError):
        storage.size(f"{root}/absent.bin")

    table = pa.table({"sample_id": ["a", "b", "c"], "label": [0, 4, -1]})
    storage.write_parquet_atomic(f"{root}/table.parquet", table)
    assert storage.read_parquet(f"{root}/table.parquet").equals(table)
    assert storage.read_parquet(f"{root}/table.parquet", columns=["label"]).column_names == ["label"]


def another_writer(method: str, bucket_uri: str, name: str, data: bytes | None = None) -> None:
    """Upload (POST) or delete (DELETE) an object straight through the emulator's JSON API: what
    another process does behind this one's back."""
    bucket = bucket_uri.removeprefix("gs://")
    base = os.environ["STORAGE_EMULATOR_HOST"]
    quoted = urllib.parse.quote(name, safe="")
    url = (f"{base}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={quoted}" if method == "POST"
           else f"{base}/storage/v1/b/{bucket}/o/{quoted}")
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(urllib.request.Request(url, data=data, method=method), timeout=30) as answer:
        assert answer.status in (200, 204)


def test_listings_see_what_another_writer_did_since(gcs_server):
    """No listing cache: a folder listed once and then changed by another process lists anew
    (re-runs and manifest clean-up list folders other workers have just written)."""
    folder = f"{gcs_server}/listed"
    storage.write_bytes_atomic(f"{folder}/a.json", b"{}")
    assert storage.list_dir(folder) == ["a.json"] and not storage.exists(f"{folder}/b.json")
    another_writer("POST", gcs_server, "listed/b.json", b"[]")
    assert storage.list_dir(folder) == ["a.json", "b.json"] and storage.exists(f"{folder}/b.json")
    another_writer("DELETE", gcs_server, "listed/a.json")
    assert storage.list_dir(folder) == ["b.json"] and not storage.exists(f"{folder}/a.json")


def test_streamed_write_checksum_is_the_stored_objects(gcs_server):
    """`open_for_write` over more than one upload chunk: the CRC it computed on the way out is the
    CRC of the object read back, and the size is the object's size."""
    uri = f"{gcs_server}/streamed/part-00.bin"
    chunks = [os.urandom(3 << 20) for _ in range(3)]  # 9 MiB: past gcsfs's 5 MiB upload block
    writer = storage.open_for_write(uri)
    for chunk in chunks:
        writer.write(chunk)
    writer.close()
    assert writer.bytes_written == storage.size(uri) == 9 << 20
    assert storage.file_checksum(uri, chunk_bytes=1 << 20) == writer.checksum
    assert storage.read_bytes(uri, 5 << 20, (5 << 20) + 10) == b"".join(chunks)[5 << 20:(5 << 20) + 10]


def test_an_atomic_write_replaces_the_object_whole_and_leaves_nothing_beside_it(gcs_server):
    folder = f"{gcs_server}/atomic"
    storage.write_json_atomic(f"{folder}/_manifest.json", {"version": 1})
    storage.write_json_atomic(f"{folder}/_manifest.json", {"version": 2, "rows": list(range(1000))})
    assert storage.read_json(f"{folder}/_manifest.json") == {"version": 2, "rows": list(range(1000))}
    # The object alone: no temporary object beside it, as a failed temp-and-rename would leave.
    fs, path = storage.filesystem(folder)
    assert object_names(fs, path) == ["_manifest.json"]


CRASHING_WRITER = r"""
import os, sys, time
from pipeline.data import storage

writer = storage.open_for_write(sys.argv[1])
writer.write(os.urandom(12 << 20))  # more than two upload blocks: chunks go out now
# The bytes the server has acknowledged so far (gcsfs's resumable-upload offset).
print("uploaded", writer._handle.offset, flush=True)
time.sleep(120)  # killed here, as a preempted worker would be
"""


def test_a_writer_killed_mid_upload_leaves_the_previous_object_whole(gcs_server, tmp_path):
    """A process that dies during a multi-chunk upload (a preempted spot worker) leaves readers
    the old object, whole, and nothing else: an unfinished upload is never visible."""
    folder = f"{gcs_server}/crash"
    uri = f"{folder}/part-00.parquet"
    old = b"the previous, complete object"
    storage.write_bytes_atomic(uri, old)
    errors = tmp_path / "writer.stderr"
    with open(errors, "wb") as error_file:
        child = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, uri], cwd=REPOSITORY,
                                 stdout=subprocess.PIPE, stderr=error_file,
                                 env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
    try:
        ready, _, _ = select.select([child.stdout], [], [], 120)
        line = child.stdout.readline().decode() if ready else ""
        assert line.startswith("uploaded "), errors.read_text(errors="replace")[-3000:]
        assert int(line.split()[1]) >= 10 << 20  # the upload is under way on the server
        fs, path = storage.filesystem(folder)
        assert storage.read_bytes(uri) == old  # mid-upload: readers still see the old object
        assert object_names(fs, path) == ["part-00.parquet"]
    finally:
        child.kill()
        child.wait(10)
        child.stdout.close()
    assert child.returncode == -9
    assert storage.read_bytes(uri) == old and storage.size(uri) == len(old)
    assert object_names(fs, path) == ["part-00.parquet"]


# ----------------------------------------------------------------------------- a stage end to end

def comparable(manifest: shards.Manifest) -> dict:
    """The manifest less what names where and when the run happened (its root, time, duration)."""
    payload = manifest.to_dict()
    del payload["created"], payload["details"]["seconds"]
    payload["inputs"] = {key: value for key, value in payload["inputs"].items() if key != "root"}
    return payload


def shard_bytes(folder: str) -> dict[str, bytes]:
    return {entry.path: storage.read_bytes(storage.join(folder, entry.path))
            for entry in shards.Manifest.load(folder).files}


@pytest.mark.parametrize("source", schema.SOURCES)
def test_ingest_from_and_to_gcs_matches_local(source, corpus, gcs_server, tmp_path):
    local_root, remote_root = corpus
    local = ingest.ingest(make_reader(source, os.path.join(local_root, source)), str(tmp_path),
                          progress=False)
    out = f"{gcs_server}/shards-{source}"
    remote = ingest.ingest(make_reader(source, f"{remote_root}/{source}"), out, progress=False)
    assert remote.rows == local.rows > 0
    remote_folder, local_folder = f"{out}/{source}", os.path.join(str(tmp_path), source)
    stored = shards.Manifest.load(remote_folder)
    assert comparable(stored) == comparable(shards.Manifest.load(local_folder)) == comparable(local)
    assert shard_bytes(remote_folder) == shard_bytes(local_folder)
    for entry in stored.files:  # the recorded checksum is the stored object's checksum
        assert storage.file_checksum(f"{remote_folder}/{entry.path}") == entry.checksum
    fs, path = storage.filesystem(f"{remote_folder}/{stored.files[0].path}")
    assert pq.read_table(path, filesystem=fs).schema.equals(schema.SHARD_SCHEMA, check_metadata=False)


def test_the_ingest_job_reads_and_writes_gcs(corpus, gcs_server, tmp_path, capsys):
    """`python -m jobs.ingest` (its `main`) with `--root` and `--out` on gs://, the local executor;
    a re-run rewrites the same shards."""
    from jobs import ingest as ingest_job

    local_root, remote_root = corpus
    out = f"{gcs_server}/job-shards"
    arguments = ["affectnet", "--root", f"{remote_root}/affectnet", "--out", out, "--executor", "local"]
    assert ingest_job.main(arguments) == 0
    assert ingest_job.main(["affectnet", "--root", os.path.join(local_root, "affectnet"),
                            "--out", str(tmp_path), "--executor", "local"]) == 0
    first = storage.read_bytes(f"{out}/affectnet/_manifest.json")
    assert comparable(shards.Manifest.load(f"{out}/affectnet")) == \
        comparable(shards.Manifest.load(str(tmp_path / "affectnet")))
    assert ingest_job.main(arguments) == 0
    again = json.loads(storage.read_bytes(f"{out}/affectnet/_manifest.json"))
    assert again["files"] == json.loads(first)["files"]
    assert "affectnet:" in capsys.readouterr().out


def test_a_missing_gcs_root_fails_fast_naming_it(gcs_server):
    started = time.monotonic()
    with pytest.raises(SourceUnusable, match="no-such-corpus"):
        make_reader("ms1mv2", f"{gcs_server}/no-such-corpus/ms1mv2").plan()
    assert time.monotonic() - started < 10  # "not found" is permanent: no retries, no backoff


@pytest.mark.ray
def test_the_ingest_job_over_ray_data_on_gcs(corpus, gcs_server):
    """`jobs.ingest` with its default executor (Ray Data tasks on a local Ray) from and to gs://:
    the workers inherit STORAGE_EMULATOR_HOST and reach the emulator; the shards are those of the
    in-process run."""
    import ray

    from jobs import ingest as ingest_job
    from pipeline.data.ray_ingest import ensure_ray

    _, remote_root = corpus
    if ray.is_initialized():  # a Ray started earlier in this process lacks the emulator variable
        ray.shutdown()
    ensure_ray(num_cpus=2)
    try:
        out = f"{gcs_server}/ray-shards"
        assert ingest_job.main(["affwild2", "--root", f"{remote_root}/affwild2", "--out", out]) == 0
    finally:
        ray.shutdown()
    in_process = ingest.ingest(make_reader("affwild2", f"{remote_root}/affwild2"),
                               f"{gcs_server}/in-process-shards", progress=False)
    assert shard_bytes(f"{out}/affwild2") == shard_bytes(f"{gcs_server}/in-process-shards/affwild2")
    assert comparable(shards.Manifest.load(f"{out}/affwild2")) == comparable(in_process)
