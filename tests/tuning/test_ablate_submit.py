"""`jobs.ablate --paper abaw6` as a cluster user runs it: under `ray job submit` against a head with
token authentication, the experiment on S3 (a moto server on loopback; the split is local here, as
reading a split from S3 is tests/jobs/test_s3.py's;
the head is started without the S3 settings, which reach the job through its runtime environment,
as on a real cluster). The feedback row's trials (`--rows`: 2 seeds, 2 epochs of 4 steps) and the
temporal row after them: one temporal run per feedback trial, on that trial's model of the epoch the
table scores, splitting validation into the same halves; the post-processing row smooths those
runs; the table is rewritten from the bucket alone, without Ray. (A second submission of the same
command, which restores the experiment and redoes nothing, was checked once and left out of CI for
time; restoring a finished experiment on S3 is tests/tuning/test_tune_s3.py's.)"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.data import storage

from conftest import build_tiny_split
from ray_head import checked_ray_head
from s3_server import VARIABLES, running_s3_server

pytestmark = [pytest.mark.ray, pytest.mark.s3]

REPO_ROOT = Path(__file__).resolve().parents[2]
BUCKET = "fer-ablate"
JOB_TIMEOUT_SECONDS = 420
TEMPORAL = ["temporal.clip_length=16", "temporal.model_dim=16", "temporal.heads=2",
            "temporal.feedforward_dim=32", "temporal.steps=4", "temporal.epochs=2", "temporal.batch_clips=4",
            "inference.batch_size=64"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with running_s3_server(BUCKET) as (uri, variables):
        split = build_tiny_split(tmp_path_factory.mktemp("ablate-s3"), validation_videos=2)
        yield {"bucket": uri, "split": split, "variables": variables}


@pytest.fixture(scope="module")
def ray_head(s3):
    """A head that does not know the S3 endpoint: the job must bring it."""
    saved = {key: os.environ.pop(key) for key in VARIABLES if key in os.environ}
    try:
        with checked_ray_head(num_cpus=2) as head:
            os.environ.update(saved)
            yield head
    finally:
        os.environ.update(saved)


def submit(ray_head, s3, arguments: list[str]) -> str:
    submission_id = f"ablate-test-{secrets.token_hex(4)}"
    environment = ray_head.client_env()
    environment.pop("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", None)
    command = [ray_head.ray, "job", "submit", "--address", ray_head.dashboard_url, "--no-wait",
               "--submission-id", submission_id, "--working-dir", str(REPO_ROOT),
               "--runtime-env-json", json.dumps({"env_vars": s3["variables"]}), "--",
               "python", "-m", "jobs.ablate", *arguments]
    submitted = subprocess.run(command, env=environment, cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    return ray_head.wait_for_success(submission_id, JOB_TIMEOUT_SECONDS, environment)


def read_lines(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def test_abaw6_table_with_its_temporal_row_under_job_submit_on_s3(ray_head, s3):
    storage_uri = f"{s3['bucket']}/ablate"
    arguments = ["--paper", "abaw6", "--rows", "feedback,temporal,postprocess", "--split", s3["split"],
                 "--scale", "demo", "--seeds", "2",
                 "--epochs", "2", "--concurrency", "2", "--storage", storage_uri,
                 "--set", "run.steps_per_epoch=4", "--set", "run.threads=1", "--set", "data.shuffle_buffer=64",
                 "--set", "data.labeled_batch=8", "--set", "evaluation.batch_size=64",
                 *[item for setting in TEMPORAL for item in ("--set-temporal", setting)]]
    started = time.monotonic()
    logs = submit(ray_head, s3, arguments)
    print(f"ablation job succeeded in {time.monotonic() - started:.0f} s")
    summary = json.loads([line for line in logs.splitlines() if line.startswith('{"experiment"')][-1])
    experiment = f"{storage_uri}/abaw6"
    assert summary["experiment"] == experiment
    assert summary["trials"] == 2 and summary["errored"] == 0
    assert summary["refined"] == 2 and summary["refine_errors"] == 0

    rows = {row["row"]: row for row in
            csv.DictReader(io.StringIO(storage.read_text(storage.join(experiment, "ablation.csv"))))}
    assert list(rows) == ["feedback", "temporal", "postprocess"]
    assert rows["temporal"]["trials"] == rows["feedback"]["trials"] == rows["postprocess"]["trials"]
    assert rows["temporal"]["n_seeds"] == "2" and rows["postprocess"]["n_seeds"] == "2"

    temporal_scores = [float(value) for value in rows["temporal"]["scores"].split(";")]
    smoothed_scores = [float(value) for value in rows["postprocess"]["scores"].split(";")]
    for trial_id, temporal_score, smoothed_score in zip(rows["temporal"]["trials"].split(";"),
                                                        temporal_scores, smoothed_scores):
        trial = storage.join(experiment, f"trial_{trial_id}")
        history = {record["epoch"]: record for record in read_lines(storage.join(trial, "metrics.jsonl"))}
        run = storage.join(experiment, "refine", "temporal", trial_id)
        frame = json.loads(storage.read_text(storage.join(run, "frame_model.json")))
        # The model refined is this trial's, of an epoch with its best selection-half score.
        assert frame["checkpoint"].startswith(trial + "/checkpoint_")
        assert frame["checkpoint"].endswith(f"epoch-{frame['epoch']:04d}.pt")
        best = max(record["validation"]["halves"]["selection"]["macro_f1"] for record in history.values())
        scored = history[frame["epoch"]]["validation"]
        assert scored["halves"]["selection"]["macro_f1"] == best
        records = read_lines(storage.join(run, "metrics.jsonl"))
        assert [record["epoch"] for record in records] == [1, 2]
        # The temporal run scores that frozen model as its trial did: whole set and both halves.
        assert records[-1]["ablation"]["frame"] == pytest.approx(scored["macro_f1"], abs=1e-9)
        for half in ("selection", "report"):
            assert records[-1]["halves"][half]["frame"] == pytest.approx(scored["halves"][half]["macro_f1"],
                                                                        abs=1e-9)
        # The rows report the encoder's epoch chosen on the selection half, raw and smoothed.
        chosen = max(records, key=lambda record: record["halves"]["selection"]["temporal"])
        assert 100 * chosen["halves"]["report"]["temporal"] == pytest.approx(temporal_score, abs=1e-9)
        assert 100 * chosen["halves"]["report"]["temporal+smoothing"] == pytest.approx(smoothed_score, abs=1e-9)

    # The table is rewritten from the bucket alone (no Ray in this process).
    from jobs import ablate

    table = storage.read_text(storage.join(experiment, "ablation.md"))
    storage.remove(storage.join(experiment, "ablation.md"))
    assert ablate.main(["--paper", "abaw6", "--rows", "feedback,temporal,postprocess", "--table", experiment]) == 0
    assert storage.read_text(storage.join(experiment, "ablation.md")) == table
