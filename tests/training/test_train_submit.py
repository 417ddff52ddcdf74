"""`ray job submit` of distributed training (`jobs.train` with `scaling.num_workers=2`), as the README
tells users to run it, against a real head with token authentication (`tests/ray_head.py`: own
ports and temp dir, stopped by PID).

Resources on the 2-CPU head: two Train workers at 0.5 CPU each (1 CPU); Train V2's controller
actor asks for 0 CPUs (`ray.train.v2.api.data_parallel_trainer`, pinned to the driver's node) and
so do the job's supervisor and entrypoint (`--entrypoint-num-cpus` defaults to 0). One CPU stays
free, so nothing waits on a CPU that the workers hold.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.data import ingest, schema
from pipeline.data.readers import make_reader
from pipeline.data.split import make_split
from pipeline.demo.corpus import PRESETS, write_demo_corpus
from pipeline.training import checkpoint, ray_train
from pipeline.training.loop import FINAL_METRICS, METRICS_LINES, worker_metrics_uri

from ray_head import checked_ray_head

pytestmark = pytest.mark.ray

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = "jobs/recipes/demo_abaw5_dtm.yaml"
RUN_NAME = "demo_abaw5_dtm"  # run.name in the recipe
HEAD_CPUS = 2
WORKERS = 2
CPUS_PER_WORKER = 0.5
STEPS = 2
JOB_TIMEOUT_SECONDS = 240


@pytest.fixture(scope="module")
def ray_head():
    with checked_ray_head(num_cpus=HEAD_CPUS) as head:
        yield head


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory) -> str:
    """A tiny split outside the repo (an absolute path: the job reads it in place, it is not
    uploaded with the working dir)."""
    root = tmp_path_factory.mktemp("train-submit")
    write_demo_corpus(str(root / "corpus"), PRESETS["tiny"])
    for source in schema.SOURCES:
        ingest.ingest(make_reader(source, str(root / "corpus" / source)), str(root / "shards"),
                      progress=False)
    make_split(str(root / "shards"), str(root / "split"), per_class=4, seed=0)
    split = (root / "split").resolve()
    assert REPO_ROOT not in split.parents
    return str(split)


def run_cli(arguments: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(arguments, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_distributed_training_runs_under_ray_job_submit(ray_head, tiny_split, tmp_path):
    # The reservation below must leave the head a free CPU (see the module docstring).
    assert WORKERS * CPUS_PER_WORKER < HEAD_CPUS
    storage = tmp_path / "runs"
    submission_id = f"train-test-{secrets.token_hex(4)}"
    environment = ray_head.client_env()
    environment.pop("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", None)  # the default: .gitignore applies
    command = [
        ray_head.ray, "job", "submit", "--address", ray_head.dashboard_url, "--no-wait",
        "--submission-id", submission_id, "--working-dir", str(REPO_ROOT), "--",
        "python", "-m", "jobs.train", "--config", RECIPE,
        "--set", f"data.split={tiny_split}", "--set", f"run.storage={storage}",
        "--set", f"scaling.num_workers={WORKERS}", "--set", f"scaling.cpus_per_worker={CPUS_PER_WORKER}",
        "--set", "model.backbone=test_resnet", "--set", "data.image_size=32",
        "--set", "run.epochs=1", "--set", f"run.steps_per_epoch={STEPS}", "--set", "data.labeled_batch=8",
    ]
    started = time.monotonic()
    submitted = run_cli(command, env=environment, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    logs = ray_head.wait_for_success(submission_id, JOB_TIMEOUT_SECONDS, environment)
    print(f"job {submission_id} succeeded in {time.monotonic() - started:.0f} s")

    run = storage / RUN_NAME
    # Ray's checkpoint for epoch 1, registered by the controller, holding rank 0's full state and
    # rank 1's own part; the adapter leaves checkpoints to Ray (no <run>/checkpoints/ of its own).
    assert ray_train.registered_epochs(str(run)) == [1]
    folders = sorted(path for path in run.glob("checkpoint_*") if path.is_dir())
    assert len(folders) == 1, folders
    assert checkpoint.list_checkpoints(str(folders[0])) == [1]
    state = checkpoint.load(checkpoint.latest(str(folders[0])))  # weights_only=True
    assert state["epoch"] == 1 and state["global_step"] == STEPS
    assert (folders[0] / ray_train.WORKER_CHECKPOINT_FOLDER / "rank-0001.pt").is_file()
    assert not (run / checkpoint.CHECKPOINT_FOLDER).exists()

    # The metrics the Trainer writes: metrics.jsonl and metrics.json from rank 0, one
    # workers/rank-NNNN.jsonl per worker; the thresholds are the same on both ranks.
    records = read_lines(run / METRICS_LINES)
    assert [(record["epoch"], record["step"]) for record in records] == [(1, STEPS)]
    record = records[0]
    assert len(record["thresholds"]) == schema.NUM_CLASSES
    validation = record["validation"]
    halves = validation["halves"]
    assert halves["selection"]["frames"] + halves["report"]["frames"] == validation["frames"] > 0
    assert record["images_per_second_total"] > 0
    ranks = [read_lines(Path(worker_metrics_uri(str(run), rank))) for rank in range(WORKERS)]
    assert [[line["epoch"] for line in lines] for lines in ranks] == [[1]] * WORKERS
    assert ranks[0][0]["thresholds"] == ranks[1][0]["thresholds"] == record["thresholds"]
    final = json.loads((run / FINAL_METRICS).read_text())
    assert (final["run"], final["method"], final["epochs"], final["steps"]) == (RUN_NAME, "dtm", 1, STEPS)
    assert final["config"]["scaling"]["num_workers"] == WORKERS
    assert final["config"]["data"]["split"] == tiny_split
    assert final["final"]["validation"]["macro_f1"] == validation["macro_f1"]

    # The job's log: the workers' epoch line and the job's summary naming Ray's checkpoint.
    assert re.search(r"\[train\] epoch 1 +step 2 ", logs), logs
    summary = [json.loads(line) for line in logs.splitlines() if line.startswith('{"method"')]
    assert summary, logs
    assert summary[-1]["epochs"] == 1 and summary[-1]["run"] == RUN_NAME
    assert os.path.basename(summary[-1]["checkpoint"]) == folders[0].name


def test_inference_and_pseudo_label_export_run_under_ray_job_submit(ray_head, tiny_split, tmp_path):
    """One submitted job runs jobs.pseudolabel then jobs.infer (actor pools on the head) on a run
    trained here; both outputs are complete (their manifests) and cover every row."""
    from pipeline.data import shards, split
    from pipeline.training.config import load_config
    from pipeline.training.loop import Trainer

    Trainer(load_config(base={
        "method": "dtm", "model": {"backbone": "test_resnet", "channels_last": False},
        "data": {"split": tiny_split, "image_size": 32, "labeled_batch": 8},
        "evaluation": {"windows": [5]},
        "run": {"name": "frame", "storage": str(tmp_path / "runs"), "epochs": 1, "steps_per_epoch": 2}})).fit()
    run = tmp_path / "runs" / "frame"
    shards_folder = str(Path(tiny_split).parent / "shards" / schema.AFFWILD2)
    submission_id = f"infer-test-{secrets.token_hex(4)}"
    environment = ray_head.client_env()
    environment.pop("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", None)
    entrypoint = (f"python -m jobs.pseudolabel --checkpoint {run} --split {tiny_split} "
                  f"--out {tmp_path / 'pseudo'} --confidence 0.2 && "
                  f"python -m jobs.infer --checkpoint {run} --shards {shards_folder} "
                  f"--out {tmp_path / 'infer'} --window 5")
    submitted = run_cli([ray_head.ray, "job", "submit", "--address", ray_head.dashboard_url, "--no-wait",
                         "--submission-id", submission_id, "--working-dir", str(REPO_ROOT), "--",
                         "bash", "-c", entrypoint], env=environment, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    logs = ray_head.wait_for_success(submission_id, JOB_TIMEOUT_SECONDS, environment)
    exported = json.loads((tmp_path / "pseudo" / "_manifest.json").read_text())
    assert exported["rows"] == split.load_unlabeled_pool(tiny_split).rows
    inferred = json.loads((tmp_path / "infer" / "_manifest.json").read_text())
    assert inferred["frames"] == shards.Manifest.load(shards_folder).rows
    assert "[pseudolabel]" in logs and "[infer]" in logs
