"""Transient S3 faults survived, on loopback only: ingest through a proxy that fails a third of its
requests (503 SlowDown or a dropped connection), and through an outage of the endpoint in the
middle of the run, ends with the same manifest and the same shard bytes as a clean run, and leaves
no partial or extra object behind (`tests/s3_faults.py` is the proxy; `tests/s3_server.py` the
server)."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.data import ingest, schema, shards, storage
from pipeline.data.readers import make_reader
from pipeline.demo.corpus import DemoCorpusConfig, write_demo_corpus

from s3_faults import FaultyProxy
from s3_server import running_s3_server

pytestmark = pytest.mark.s3

BUCKET = "fer-faults"
# Many small files (video frames, AffectNet images) and one .rec: both kinds of read.
CORPUS = DemoCorpusConfig(train_videos=2, validation_videos=1, two_person_videos=0,
                          frames_per_video=(20, 25), affectnet_train=20, affectnet_validation=5,
                          expw_images=8, ms1mv2_identities=5, ms1mv2_images=60)


@pytest.fixture(scope="module")
def s3_corpus(tmp_path_factory):
    with running_s3_server(BUCKET) as (uri, variables):
        local = tmp_path_factory.mktemp("faults-corpus")
        write_demo_corpus(str(local), CORPUS)
        fs, _ = storage.filesystem(uri)
        fs.put(str(local) + "/", f"{BUCKET}/corpus/", recursive=True)
        yield uri, variables["AWS_ENDPOINT_URL"]


def ingest_all(root: str, out: str) -> dict[str, shards.Manifest]:
    return {source: ingest.ingest(make_reader(source, f"{root}/{source}"), out, progress=False)
            for source in schema.SOURCES}


def outcome(manifests: dict[str, shards.Manifest], out: str) -> dict[str, object]:
    """What must not change with faults: per source the rows, skips, file names and checksums,
    and the objects actually stored (no partial upload, no extra part left)."""
    result = {}
    for source, manifest in manifests.items():
        folder = f"{out}/{source}"
        stored = sorted(name for name in storage.list_dir(folder) if name != shards.MANIFEST_NAME)
        result[source] = {
            "rows": manifest.rows, "skipped": manifest.skipped_by_reason,
            "files": [(entry.path, entry.rows, entry.checksum) for entry in manifest.files],
            "stored": stored,
            "stored_checksums": [storage.file_checksum(f"{folder}/{entry.path}") for entry in manifest.files],
        }
    return result


def test_ingest_through_failing_requests_equals_a_clean_run(s3_corpus, monkeypatch):
    uri, endpoint = s3_corpus
    clean = outcome(ingest_all(f"{uri}/corpus", f"{uri}/clean"), f"{uri}/clean")
    with FaultyProxy(endpoint, fail_every=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        faulty = outcome(ingest_all(f"{uri}/corpus", f"{uri}/faulty"), f"{uri}/faulty")
    assert proxy.counts["503"] > 10 and proxy.counts["dropped"] > 10, proxy.counts
    assert faulty == clean
    assert all(value["rows"] > 0 for value in clean.values())


def test_ingest_survives_the_endpoint_going_down_and_coming_back(s3_corpus, monkeypatch):
    uri, endpoint = s3_corpus
    with FaultyProxy(endpoint) as counting:  # a clean run through the proxy: its request count
        monkeypatch.setenv("AWS_ENDPOINT_URL", counting.url)
        clean = outcome(ingest_all(f"{uri}/corpus", f"{uri}/before"), f"{uri}/before")
    requests = counting.counts["forwarded"]

    proxy = FaultyProxy(endpoint).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    outage = {"down_at": None, "seconds": 4.0}
    stop_watching = threading.Event()

    def take_down_midway() -> None:
        while not stop_watching.is_set():
            if proxy.counts["forwarded"] >= requests // 3:
                outage["down_at"] = proxy.counts["forwarded"]
                proxy.stop()  # connections refused from here ...
                time.sleep(outage["seconds"])
                proxy.start()  # ... and accepted again on the same port
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=take_down_midway, daemon=True)
    watcher.start()
    try:
        after = outcome(ingest_all(f"{uri}/corpus", f"{uri}/after"), f"{uri}/after")
    finally:
        stop_watching.set()
        watcher.join(timeout=30)
        proxy.stop()
    assert outage["down_at"] is not None and outage["down_at"] < requests
    assert after == clean
