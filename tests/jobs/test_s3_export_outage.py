"""A pseudo-label export whose S3 endpoint goes down in the middle and stays down until the job gives
up: the files finished before the outage are whole (each with its done-marker), nothing partial or
extra is left, no manifest claims completion; the re-run, with the endpoint back, exports only the
rest, and the result equals a clean export file for file and row for row, without duplicates.

Everything on loopback: the moto server (`tests/s3_server.py`) behind the fault proxy
(`tests/s3_faults.py`), which Ray's workers reach because `AWS_ENDPOINT_URL` names the proxy before
this module's Ray starts. The outage is watched from the server's side (boto3 straight to moto)."""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data import ingest, schema, shards, storage
from pipeline.data.pseudo_labels import MANIFEST
from pipeline.data.readers import make_reader
from pipeline.data.split import load_unlabeled_pool, make_split
from pipeline.demo.corpus import DemoCorpusConfig, write_demo_corpus

from s3_faults import FaultyProxy
from s3_server import running_s3_server

pytestmark = [pytest.mark.s3, pytest.mark.ray, pytest.mark.slow]

BUCKET = "fer-export-outage"
CORPUS = DemoCorpusConfig(train_videos=2, validation_videos=1, two_person_videos=0,
                          frames_per_video=(20, 25), affectnet_train=40, affectnet_validation=10,
                          expw_images=16, ms1mv2_identities=10, ms1mv2_images=160)
# MS1MV2 in small files: the pool is many input files, so the outage falls between finished ones.
ROWS_PER_FILE = 20
OUTAGE_CAP_SECONDS = 150.0
"""The outage ends when the first run has given up; this only bounds the test if it never does."""


@pytest.fixture(scope="module")
def exported_setup(tmp_path_factory):
    """The shards and the split on S3, a tiny trained checkpoint on local disk, and a local Ray whose workers reach S3 through
    the proxy. Yields (bucket uri, split uri, checkpoint run uri, proxy, upstream endpoint)."""
    import ray

    from pipeline.data.ray_ingest import ensure_ray
    from pipeline.training.config import load_config
    from pipeline.training.loop import Trainer

    with running_s3_server(BUCKET) as (uri, variables):
        upstream = variables["AWS_ENDPOINT_URL"]
        # Ingested here, then uploaded: only the export's own reads and writes go over S3.
        local = tmp_path_factory.mktemp("outage-corpus")
        write_demo_corpus(str(local / "corpus"), CORPUS)
        for source in schema.SOURCES:
            ingest.ingest(make_reader(source, str(local / "corpus" / source)), str(local / "shards"),
                          progress=False)
        reshard(str(local / "shards" / schema.MS1MV2), rows_per_file=ROWS_PER_FILE)
        storage.filesystem(uri)[0].put(str(local / "shards") + "/", f"{BUCKET}/shards/", recursive=True)
        split_dir = f"{uri}/split"
        make_split(f"{uri}/shards", split_dir, per_class=3, seed=0)
        Trainer(load_config(base={
            "method": "dtm", "model": {"backbone": "test_resnet", "channels_last": False},
            "data": {"split": split_dir, "image_size": 32, "labeled_batch": 8, "shuffle_buffer": 32},
            "evaluation": {"windows": [5]},
            "run": {"name": "frame", "storage": str(local / "runs"), "epochs": 1, "steps_per_epoch": 2}})).fit()
        proxy = FaultyProxy(upstream).start()
        os.environ["AWS_ENDPOINT_URL"] = proxy.url  # running_s3_server restores it
        if ray.is_initialized():
            ray.shutdown()
        ensure_ray(num_cpus=2)  # its workers inherit the proxy's endpoint
        try:
            yield uri, split_dir, str(local / "runs" / "frame"), proxy, upstream
        finally:
            ray.shutdown()
            proxy.stop()


def reshard(folder: str, rows_per_file: int) -> None:
    """Rewrite a shard folder as files of `rows_per_file` rows, with the manifest to match."""
    manifest = shards.Manifest.load(folder)
    table = pa.concat_tables([storage.read_parquet(uri) for uri in manifest.file_uris(folder)])
    for uri in manifest.file_uris(folder):
        storage.remove(uri)
    writer = shards.ShardWriter(folder, "part-00000", max_file_bytes=1)  # a file per write
    for start in range(0, table.num_rows, rows_per_file):
        writer.write(table.slice(start, rows_per_file))
    dataclasses.replace(manifest, files=writer.close()).save(folder)


def stored_objects(upstream: str, prefix: str) -> dict[str, int]:
    """Every object under `prefix` and its size, as the server has them (not through the proxy)."""
    import boto3

    client = boto3.client("s3", endpoint_url=upstream, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    objects: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            objects[item["Key"][len(prefix) + 1:]] = item["Size"]
    return objects


def export(split_dir: str, run: str, out: str) -> int:
    from jobs import pseudolabel

    return pseudolabel.main(["--checkpoint", run, "--split", split_dir, "--out", out,
                             "--confidence", "0.2", "--batch-size", "16"])


def output_tables(out: str, manifest: dict) -> dict[str, pa.Table]:
    return {entry["path"]: storage.read_parquet(f"{out}/{entry['path']}") for entry in manifest["files"]}


def test_an_export_interrupted_by_an_outage_resumes_to_the_clean_result(exported_setup):
    uri, split_dir, run, proxy, upstream = exported_setup
    pool_rows = load_unlabeled_pool(split_dir).rows

    assert export(split_dir, run, f"{uri}/clean") == 0
    clean = storage.read_json(f"{uri}/clean/{MANIFEST}")
    assert clean["rows"] == pool_rows and len(clean["files"]) >= 6, clean["files"]

    # The outage starts once the first output file of the second export is complete and lasts
    # until that export has given up (bounded by OUTAGE_CAP_SECONDS).
    outage = {"started": None, "ended": None, "done_before": None}
    run_over = threading.Event()

    def take_down_after_first_file() -> None:
        deadline = time.monotonic() + 300
        while not run_over.is_set() and time.monotonic() < deadline:
            markers = [key for key in stored_objects(upstream, "interrupted") if key.startswith("_done/")]
            if markers:
                proxy.stop()
                outage["started"] = time.monotonic()
                run_over.wait(OUTAGE_CAP_SECONDS)
                outage["ended"] = time.monotonic()
                proxy.start()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=take_down_after_first_file, daemon=True)
    watcher.start()
    failure: BaseException | None = None
    try:
        code = export(split_dir, run, f"{uri}/interrupted")
    except Exception as error:  # the job's own failure, inspected below
        code, failure = None, error
    finally:
        run_over.set()
        watcher.join(timeout=60)
    assert outage["started"] is not None, "the outage never started"
    assert outage["ended"] - outage["started"] < OUTAGE_CAP_SECONDS, "the first run never gave up"
    assert code is None and failure is not None, f"the run went through a full outage: {code}"

    # What the failed run left: whole files with their markers, no manifest, nothing else.
    left = stored_objects(upstream, "interrupted")
    outputs = {key for key in left if key.endswith(".parquet")}
    markers = {key[len("_done/"):-len(".json")] for key in left if key.startswith("_done/")}
    assert MANIFEST not in left
    assert set(left) == outputs | {f"_done/{name}.json" for name in markers}, sorted(left)
    assert outputs == markers and 0 < len(outputs) < len(clean["files"])
    clean_rows = {entry["path"]: entry["rows"] for entry in clean["files"]}
    for name in outputs:
        assert storage.read_parquet(f"{uri}/interrupted/{name}").num_rows == clean_rows[name], name

    # The re-run exports only the rest, and the whole equals the clean export.
    assert export(split_dir, run, f"{uri}/interrupted") == 0
    resumed = storage.read_json(f"{uri}/interrupted/{MANIFEST}")
    assert resumed["skipped_done_files"] == len(outputs)
    assert resumed["predicted_files"] == len(clean["files"]) - len(outputs)
    assert set(stored_objects(upstream, "interrupted")) == set(stored_objects(upstream, "clean"))
    assert resumed["rows"] == clean["rows"] == pool_rows
    assert resumed["accepted_per_class"] == clean["accepted_per_class"]
    expected, actual = output_tables(f"{uri}/clean", clean), output_tables(f"{uri}/interrupted", resumed)
    assert actual.keys() == expected.keys()
    for name, table in actual.items():
        ids = table[schema.SAMPLE_ID].to_pylist()
        assert len(set(ids)) == len(ids) and ids == expected[name][schema.SAMPLE_ID].to_pylist(), name
        assert table["predicted"].to_pylist() == expected[name]["predicted"].to_pylist(), name
        np.testing.assert_allclose(table["confidence"].to_numpy(), expected[name]["confidence"].to_numpy(),
                                   rtol=0, atol=1e-5)
