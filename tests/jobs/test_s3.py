"""Ingest and split from and to s3:// against a real S3-compatible server on loopback (moto's
server mode), locally and through Ray Data; S3 output must match a local run byte for byte."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import f1_score

from pipeline.data import ingest, schema, shards, storage
from pipeline.data.readers import make_reader
from pipeline.data.readers.base import SourceUnusable
from pipeline.data.split import load_split, make_split
from pipeline.demo.corpus import DemoCorpusConfig, write_demo_corpus

from s3_server import running_s3_server

pytestmark = pytest.mark.s3

BUCKET = "fer-test"
SMALL = DemoCorpusConfig(train_videos=3, validation_videos=1, two_person_videos=1,
                         frames_per_video=(20, 30), affectnet_train=40, affectnet_validation=10,
                         expw_images=15, ms1mv2_identities=10, ms1mv2_images=120)


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on 127.0.0.1, started for this module and stopped after it."""
    with running_s3_server(BUCKET) as (uri, _):
        yield uri


@pytest.fixture(scope="module")
def corpus(s3_server, tmp_path_factory):
    """The small demo corpus, on local disk and uploaded to the S3 server."""
    local = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(str(local), SMALL)
    fs, _ = storage.filesystem(s3_server)
    fs.put(str(local) + "/", f"{BUCKET}/corpus/", recursive=True)
    return str(local), f"{s3_server}/corpus"


def ingest_and_split(corpus, s3_server: str, name: str) -> tuple[str, str]:
    """Every source of the S3 corpus ingested to `<bucket>/<name>-shards` and split (3 per class)
    into `<bucket>/<name>-split`; returns both URIs."""
    _, remote_root = corpus
    shards_root = f"{s3_server}/{name}-shards"
    for source in schema.SOURCES:
        ingest.ingest(make_reader(source, f"{remote_root}/{source}"), shards_root, progress=False)
    split_dir = f"{s3_server}/{name}-split"
    make_split(shards_root, split_dir, per_class=3, seed=0)
    return shards_root, split_dir


def file_bytes(folder: str) -> dict[str, bytes]:
    manifest = shards.Manifest.load(folder)
    return {entry.path: storage.read_bytes(storage.join(folder, entry.path)) for entry in manifest.files}


@pytest.mark.parametrize("source", schema.SOURCES)
def test_ingest_from_and_to_s3_matches_local(source, corpus, s3_server, tmp_path):
    local_root, remote_root = corpus
    local = ingest.ingest(make_reader(source, os.path.join(local_root, source)), str(tmp_path),
                          progress=False)
    out = f"{s3_server}/shards-{source}"
    remote = ingest.ingest(make_reader(source, f"{remote_root}/{source}"), out, progress=False)
    assert remote.rows == local.rows > 0
    assert remote.skipped_by_reason == local.skipped_by_reason
    assert [(f.path, f.rows, f.checksum) for f in remote.files] == \
        [(f.path, f.rows, f.checksum) for f in local.files]
    remote_folder = f"{out}/{source}"
    assert file_bytes(remote_folder) == file_bytes(os.path.join(str(tmp_path), source))
    for entry in remote.files:  # the recorded checksum is the stored object's checksum
        assert storage.file_checksum(f"{remote_folder}/{entry.path}") == entry.checksum
    fs, path = storage.filesystem(f"{remote_folder}/{remote.files[0].path}")
    assert pq.read_table(path, filesystem=fs).schema.equals(schema.SHARD_SCHEMA, check_metadata=False)


def test_split_from_and_to_s3(corpus, s3_server):
    _, remote_root = corpus
    shards_root = f"{s3_server}/all-shards"
    for source in schema.SOURCES:
        ingest.ingest(make_reader(source, f"{remote_root}/{source}"), shards_root, progress=False)
    out = f"{s3_server}/split"
    summary = make_split(shards_root, out, per_class=3, seed=0)
    again = load_split(out)
    assert again.to_dict() == summary.to_dict()
    labeled = shards.Manifest.load(f"{out}/labeled")
    validation = shards.Manifest.load(f"{out}/validation")
    assert labeled.rows > 0 and validation.rows > 0
    assert storage.exists(f"{out}/_split.json")


@pytest.mark.ray
def test_ray_data_ingest_on_s3(corpus, s3_server):
    import ray

    from pipeline.data.ray_ingest import RayDataExecutor, ensure_ray

    ensure_ray(num_cpus=2)  # after the fixture set AWS_ENDPOINT_URL: workers inherit it
    try:
        _, remote_root = corpus
        out = f"{s3_server}/ray-shards"
        manifest = ingest.ingest(make_reader("affwild2", f"{remote_root}/affwild2"), out,
                                 RayDataExecutor(), progress=False)
        local_like = ingest.ingest(make_reader("affwild2", f"{remote_root}/affwild2"),
                                   f"{s3_server}/seq-shards", progress=False)
        assert [(f.path, f.checksum) for f in manifest.files] == \
            [(f.path, f.checksum) for f in local_like.files]
    finally:
        ray.shutdown()


def test_unreachable_root_fails_fast(s3_server):
    with pytest.raises(SourceUnusable, match="no-such-corpus"):
        make_reader("ms1mv2", f"{s3_server}/no-such-corpus/ms1mv2").plan()


def test_training_reads_an_s3_split_and_checkpoints_to_s3(corpus, s3_server):
    from pipeline.training import checkpoint
    from pipeline.training.config import load_config
    from pipeline.training.loop import Trainer

    shards_root, split_dir = ingest_and_split(corpus, s3_server, "train")
    settings = {
        "method": "dtm", "method_options": {"ema_decay": 0.9},
        "model": {"backbone": "test_resnet", "channels_last": False},
        "data": {"split": split_dir, "image_size": 32, "labeled_batch": 8, "shuffle_buffer": 32},
        "evaluation": {"windows": [5]},
        "run": {"name": "s3-run", "storage": f"{s3_server}/runs", "epochs": 1, "steps_per_epoch": 2},
    }
    Trainer(load_config(base=settings)).fit()
    run = f"{s3_server}/runs/s3-run"
    assert checkpoint.list_checkpoints(run) == [1]
    assert len(storage.read_text(f"{run}/metrics.jsonl").splitlines()) == 1
    settings["run"]["epochs"] = 2
    final = Trainer(load_config(base=settings)).fit()  # resumes from the S3 checkpoint
    assert final["steps"] == 4 and checkpoint.list_checkpoints(run) == [1, 2]


@pytest.mark.ray
def test_distributed_training_checkpoints_to_s3_and_resumes(corpus, s3_server):
    """Ray Train, 2 workers, with the split and `run.storage` on S3: Ray's checkpoint folders and
    the metrics land in the bucket, and a second `fit()` of the same run name continues it."""
    import json
    import re

    import ray

    from pipeline.data.ray_ingest import ensure_ray
    from pipeline.training import checkpoint
    from pipeline.training.config import load_config
    from pipeline.training.loop import FINAL_METRICS, METRICS_LINES, worker_metrics_uri
    from pipeline.training.ray_train import WORKER_CHECKPOINT_FOLDER, build_trainer, registered_epochs

    shards_root, split_dir = ingest_and_split(corpus, s3_server, "dist")
    steps, workers = 2, 2
    settings = {
        "method": "dtm", "method_options": {"ema_decay": 0.5},
        "model": {"backbone": "test_resnet", "channels_last": False},
        "data": {"split": split_dir, "image_size": 32, "labeled_batch": 8, "shuffle_buffer": 32},
        "evaluation": {"windows": [5]},
        "run": {"name": "dist-run", "storage": f"{s3_server}/dist-runs", "epochs": 1,
                "steps_per_epoch": steps, "threads": 1},
        "scaling": {"num_workers": workers, "cpus_per_worker": 0.5, "max_failures": 0},
    }
    run = f"{s3_server}/dist-runs/dist-run"
    fs, run_path = storage.filesystem(run)

    def checkpoint_objects() -> dict[int, list[str]]:
        """Epoch -> the objects under that epoch's Ray checkpoint folder (paths below it)."""
        found: dict[int, list[str]] = {}
        for path in fs.find(run_path):
            relative = path[len(run_path) + 1:]
            match = re.fullmatch(r"(checkpoint_[^/]+)/checkpoints/epoch-(\d+)\.pt", relative)
            if match:
                folder = f"{run_path}/{match.group(1)}"
                names = (name[len(folder) + 1:] for name in fs.find(folder))
                # pyarrow also writes empty "folder/" marker objects; keep the files.
                found[int(match.group(2))] = sorted(name for name in names
                                                    if name and not name.endswith("/"))
        return found

    # A Ray started earlier in this process may lack AWS_ENDPOINT_URL in its workers' environment.
    if ray.is_initialized():
        ray.shutdown()
    ensure_ray(num_cpus=2, dashboard=True)  # after the fixture: workers get the AWS_* variables
    try:
        first = build_trainer(load_config(base=settings)).fit()
        assert registered_epochs(run) == [1]
        objects = checkpoint_objects()
        assert objects == {1: ["checkpoints/epoch-0001.pt", f"{WORKER_CHECKPOINT_FOLDER}/rank-0001.pt"]}
        assert first.checkpoint.filesystem.type_name == "s3"
        assert first.checkpoint.path.startswith(run_path + "/checkpoint_")
        first_records = storage.read_text(f"{run}/{METRICS_LINES}").splitlines()
        assert [json.loads(line)["epoch"] for line in first_records] == [1]

        settings["run"]["epochs"] = 2
        second = build_trainer(load_config(base=settings)).fit()
    finally:
        ray.shutdown()

    assert registered_epochs(run) == [1, 2]
    assert sorted(checkpoint_objects()) == [1, 2]
    assert second.checkpoint.path != first.checkpoint.path
    assert second.metrics["epoch"] == 2 and second.metrics["step"] == 2 * steps
    records = [json.loads(line) for line in storage.read_text(f"{run}/{METRICS_LINES}").splitlines()]
    assert [(record["epoch"], record["step"]) for record in records] == [(1, steps), (2, 2 * steps)]
    assert records[0] == json.loads(first_records[0])  # epoch 1 was not trained again
    for rank in range(workers):
        lines = storage.read_text(worker_metrics_uri(run, rank)).splitlines()
        assert [json.loads(line)["step"] for line in lines] == [steps, 2 * steps]
    state = checkpoint.load(f"s3://{second.checkpoint.path}/checkpoints/epoch-0002.pt")
    assert state["epoch"] == 2 and state["global_step"] == 2 * steps
    assert state["method"]["threshold"]["updates"] == 2  # the threshold state continued
    final = storage.read_json(f"{run}/{FINAL_METRICS}")
    assert (final["epochs"], final["steps"]) == (2, 2 * steps)


@pytest.mark.ray
def test_inference_and_pseudo_labels_read_and_write_s3(corpus, s3_server):
    """jobs.infer and jobs.pseudolabel with the checkpoint, the shards and the outputs on S3; a
    re-run of the export skips every file already in the bucket."""
    import ray

    from jobs import infer, pseudolabel
    from pipeline.data.ray_ingest import ensure_ray
    from pipeline.data.split import load_unlabeled_pool
    from pipeline.training.config import load_config
    from pipeline.training.loop import Trainer

    shards_root, split_dir = ingest_and_split(corpus, s3_server, "infer")
    Trainer(load_config(base={
        "method": "dtm", "model": {"backbone": "test_resnet", "channels_last": False},
        "data": {"split": split_dir, "image_size": 32, "labeled_batch": 8, "shuffle_buffer": 32},
        "evaluation": {"windows": [5]},
        "run": {"name": "frame", "storage": f"{s3_server}/infer-runs", "epochs": 1, "steps_per_epoch": 2}})).fit()
    run = f"{s3_server}/infer-runs/frame"
    if ray.is_initialized():  # its workers may lack AWS_ENDPOINT_URL
        ray.shutdown()
    ensure_ray(num_cpus=2)
    try:
        out = f"{s3_server}/inference"
        assert infer.main(["--checkpoint", run, "--shards", f"{shards_root}/{schema.AFFWILD2}",
                           "--out", out, "--window", "5"]) == 0
        manifest = storage.read_json(f"{out}/_manifest.json")
        assert manifest["frames"] == shards.Manifest.load(f"{shards_root}/{schema.AFFWILD2}").rows
        # The scores are those of the per-frame files written to S3 (sklearn as the oracle).
        frames = pa.concat_tables([storage.read_parquet(f"{out}/{path}") for path in manifest["files"]
                                   if path.startswith("frames/")])
        scored = (frames[schema.LABEL].to_numpy() >= 0) & frames["decoded"].to_numpy(zero_copy_only=False)
        assert manifest["scores"]["scored_frames"] == int(scored.sum()) > 0
        assert manifest["scores"]["raw"]["macro_f1"] == pytest.approx(f1_score(
            frames[schema.LABEL].to_numpy()[scored], frames["predicted"].to_numpy()[scored],
            labels=range(8), average="macro", zero_division=0))
        assert all(storage.exists(f"{out}/{path}") for path in manifest["files"])

        exported = f"{s3_server}/pseudolabels"
        arguments = ["--checkpoint", run, "--split", split_dir, "--out", exported, "--confidence", "0.2"]
        assert pseudolabel.main(arguments) == 0
        first = storage.read_json(f"{exported}/_manifest.json")
        assert first["rows"] == load_unlabeled_pool(split_dir).rows and first["predicted_files"] > 0
        assert pseudolabel.main(arguments) == 0
        second = storage.read_json(f"{exported}/_manifest.json")
        assert second["predicted_files"] == 0 and second["skipped_done_files"] == first["predicted_files"]
        assert second["accepted_per_class"] == first["accepted_per_class"]
    finally:
        ray.shutdown()
