"""`jobs.tune` under `ray job submit`, as the README tells users to run it, against a real head with
token authentication (`tests/ray_head.py`: own ports and temp dir, stopped by PID): the demo search
file at a tiny budget (2 trials x 1 epoch of 2 steps, one at a time) on local storage; the job
succeeds, both trials report, and the report is written."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from ray_head import checked_ray_head

pytestmark = pytest.mark.ray

REPO_ROOT = Path(__file__).resolve().parents[2]
SEARCH_FILE = "jobs/tune/demo_dtm.yaml"
SEARCH_NAME = "demo_dtm_search"  # name in the search file
JOB_TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module")
def ray_head():
    with checked_ray_head(num_cpus=2) as head:
        yield head


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory) -> str:
    """An absolute split outside the repository (read in place, not uploaded with the working dir)."""
    from conftest import build_tiny_split

    split = Path(build_tiny_split(tmp_path_factory.mktemp("tune-submit"))).resolve()
    assert REPO_ROOT not in split.parents
    return str(split)


def run_cli(arguments: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(arguments, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def test_a_search_runs_under_ray_job_submit(ray_head, tiny_split, tmp_path):
    storage = tmp_path / "tune"
    submission_id = f"tune-test-{secrets.token_hex(4)}"
    environment = ray_head.client_env()
    environment.pop("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", None)
    command = [
        ray_head.ray, "job", "submit", "--address", ray_head.dashboard_url, "--no-wait",
        "--submission-id", submission_id, "--working-dir", str(REPO_ROOT), "--",
        "python", "-m", "jobs.tune", "--config", SEARCH_FILE,
        "--set", f"storage={storage}", "--set", "trials=2", "--set", "epochs=1", "--set", "concurrency=1",
        "--set", "scheduler.name=fifo",
        "--set", f"base.data.split={tiny_split}", "--set", "base.model.backbone=test_resnet",
        "--set", "base.data.image_size=32", "--set", "base.data.labeled_batch=8",
        "--set", "base.data.shuffle_buffer=64", "--set", "base.run.steps_per_epoch=2",
        "--set", "base.run.threads=1",
    ]
    started = time.monotonic()
    submitted = run_cli(command, env=environment, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    logs = ray_head.wait_for_success(submission_id, JOB_TIMEOUT_SECONDS, environment)
    print(f"job {submission_id} succeeded in {time.monotonic() - started:.0f} s")

    summary = json.loads([line for line in logs.splitlines() if line.startswith('{"experiment"')][-1])
    experiment = storage / SEARCH_NAME
    assert summary["experiment"] == str(experiment)
    assert summary["trials"] == 2 and summary["errored"] == 0 and summary["complete"] == 2
    trials = sorted(experiment.glob("trial_*"))
    assert len(trials) == 2
    for trial in trials:
        lines = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        assert [line["epoch"] for line in lines] == [1]
        assert "best_selection_macro_f1" in lines[0]
    report = experiment / "report"
    assert (report / "report.html").stat().st_size > 1_000_000
    assert (report / "best_config.yaml").exists() and (report / "trials.parquet").exists()
