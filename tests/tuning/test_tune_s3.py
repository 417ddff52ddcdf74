"""`jobs.tune` with the experiment, its checkpoints and the report on S3 (a moto server on loopback;
local Ray started after it, so its workers see the endpoint; the split is local, reading one from
S3 is tests/jobs/test_s3.py's): the search runs, every
trial's result and Tune checkpoint are in the bucket, the report is written there and rewritten
from the bucket alone, and re-running the command restores the finished experiment instead of
training again."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.data import storage
from pipeline.training.config import load_config

from conftest import build_tiny_split
from s3_server import running_s3_server

pytestmark = pytest.mark.s3

BUCKET = "fer-tune"
SEARCH_FILE = "jobs/tune/demo_dtm.yaml"
SEARCH_NAME = "demo_dtm_search"


@pytest.fixture(scope="module")
def s3_bucket():
    with running_s3_server(BUCKET) as (uri, _):
        yield uri


@pytest.fixture(scope="module")
def split(s3_bucket, tmp_path_factory) -> str:
    return build_tiny_split(tmp_path_factory.mktemp("tune-s3"))


def test_a_search_on_s3_reports_there_and_resumes(s3_bucket, split, local_ray, capsys):
    from jobs import tune as tune_job

    experiment = f"{s3_bucket}/tune/{SEARCH_NAME}"
    arguments = ["--config", SEARCH_FILE, "--set", f"storage={s3_bucket}/tune", "--set", "trials=2",
                 "--set", "epochs=1", "--set", "concurrency=2", "--set", "scheduler.name=fifo",
                 "--set", f"base.data.split={split}", "--set", "base.model.backbone=test_resnet",
                 "--set", "base.data.image_size=32", "--set", "base.data.labeled_batch=8",
                 "--set", "base.data.shuffle_buffer=64", "--set", "base.run.steps_per_epoch=2",
                 "--set", "base.run.threads=1"]
    assert tune_job.main(arguments) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["experiment"] == experiment
    assert summary["trials"] == 2 and summary["errored"] == 0 and summary["complete"] == 2

    trials = sorted(name for name in storage.list_dir(experiment) if name.startswith("trial_"))
    assert len(trials) == 2
    results = {}
    for trial in trials:
        folder = storage.join(experiment, trial)
        results[trial] = storage.read_text(storage.join(folder, "result.json"))
        assert [json.loads(line)["epoch"] for line in results[trial].splitlines()] == [1]
        assert storage.exists(storage.join(folder, "checkpoint_000000", "checkpoints", "epoch-0001.pt"))
        assert storage.exists(storage.join(folder, "metrics.jsonl"))
    report = storage.join(experiment, "report")
    assert len(storage.read_bytes(storage.join(report, "report.html"))) > 1_000_000
    assert storage.exists(storage.join(report, "trials.parquet"))
    best = load_config(base=yaml.safe_load(storage.read_text(storage.join(report, "best_config.yaml"))))
    assert best.data.split == split

    # The report is rewritten from the bucket alone.
    storage.remove(storage.join(report, "report.html"))
    assert tune_job.main(["--report", experiment]) == 0
    assert storage.exists(storage.join(report, "report.html"))
    capsys.readouterr()

    # The same command again restores the finished experiment: no trial is trained again.
    assert tune_job.main(arguments) == 0
    output = capsys.readouterr().out
    assert f"[tune] restoring {experiment}" in output
    assert json.loads(output.strip().splitlines()[-1])["trials"] == 2
    assert sorted(name for name in storage.list_dir(experiment) if name.startswith("trial_")) == trials
    for trial in trials:
        assert storage.read_text(storage.join(experiment, trial, "result.json")) == results[trial]
