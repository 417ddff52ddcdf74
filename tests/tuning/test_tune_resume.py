"""Resume with a real kill: the `jobs.tune` driver (and the local Ray it started) is SIGKILLed once
its first trial has finished and the second has checkpointed its first epoch; re-running the same
command restores the experiment, keeps the finished trial as it was, continues the second from its
checkpoint and completes the search. One-process trials: the Ray Train worker path resumes its
Train run by name, which tests/training covers for Train itself; a killed-driver variant of this
test with a worker per trial missed its kill window under load (Tune's experiment snapshot lags
the short epochs) and was not kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from test_tune_ray import tiny_search

from pipeline.tuning.report import read_trials, tune_statuses
from pipeline.tuning.search import load_search

from conftest import build_tiny_split

pytestmark = pytest.mark.ray
REPOSITORY = Path(__file__).resolve().parents[2]


def kill_session(session: int) -> None:
    """SIGKILL every process of the session this test started (the driver, its Ray, Ray's workers)."""
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session:
                process.kill()
        except (ProcessLookupError, psutil.Error, PermissionError):
            continue


def snapshot(experiment: Path) -> dict[str, tuple[str, int | None]]:
    """trial id -> (status, last reported epoch) from Tune's newest experiment-state file."""
    names = sorted(experiment.glob("experiment_state-*.json"))
    try:
        state = json.loads(names[-1].read_text()) if names else {}
    except ValueError:  # caught mid-write
        return {}
    trials = {}
    for trial_json, runtime_json in state.get("trial_data", []):
        trial, runtime = json.loads(trial_json), json.loads(runtime_json)
        trials[trial["trial_id"]] = (trial["status"], (runtime.get("last_result") or {}).get("epoch"))
    return trials


def test_killed_driver_resumes_and_keeps_finished_trials(tmp_path):
    split = build_tiny_split(tmp_path)
    search_file = tmp_path / "search.yaml"
    mapping = tiny_search(split, str(tmp_path / "tune"), "resume", concurrency=1, scheduler={"name": "fifo"})
    mapping["base"]["run"]["steps_per_epoch"] = 6  # an epoch long enough to kill the driver inside
    search_file.write_text(yaml.safe_dump(mapping))
    experiment = tmp_path / "tune" / "resume"
    command = [sys.executable, "-m", "jobs.tune", "--config", str(search_file), "--no-report"]
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    first = subprocess.Popen(command, cwd=REPOSITORY, env=environment, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 150
        finished: list[str] = []
        interrupted: list[str] = []
        while not (finished and interrupted) and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.1)
            trials = snapshot(experiment) if experiment.exists() else {}
            finished = [trial for trial, (status, _) in trials.items() if status == "TERMINATED"]
            interrupted = [trial for trial, (status, epoch) in trials.items()
                           if status == "RUNNING" and epoch == 1]
        assert finished and interrupted, f"not killed in the second trial's second epoch: {trials}"
        assert first.poll() is None, "the search ended before it could be killed"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        kill_session(first.pid)
    done = experiment / f"trial_{finished[0]}" / "result.json"
    before = done.read_bytes()
    assert [json.loads(line)["epoch"] for line in before.decode().splitlines()] == [1, 2]

    second = subprocess.run(command, cwd=REPOSITORY, env=environment, capture_output=True, text=True,
                            timeout=240, start_new_session=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[tune] restoring" in second.stdout
    assert done.read_bytes() == before  # the finished trial was not run again
    statuses = tune_statuses(str(experiment))
    assert len(statuses) == 3 and set(statuses.values()) == {"TERMINATED"}
    search = load_search(str(search_file))
    rebuilt = {trial["trial_id"]: trial for trial in read_trials(str(experiment), search)}
    for trial in statuses:
        lines = [json.loads(line) for line in (experiment / f"trial_{trial}" / "result.json").read_text().splitlines()]
        assert [line["epoch"] for line in lines] == [1, 2], trial
        assert [result["epoch"] for result in rebuilt[trial]["results"]] == [1, 2], trial
        assert rebuilt[trial]["results"][0]["best_selection_macro_f1"] is not None
    # The interrupted trial ran only its second epoch after the restore, from its epoch-1 checkpoint.
    lines = [json.loads(line) for line in
             (experiment / f"trial_{interrupted[0]}" / "result.json").read_text().splitlines()]
    assert lines[-1]["iterations_since_restore"] == 1
    history = [json.loads(line) for line in
               (experiment / f"trial_{interrupted[0]}" / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in history] == [1, 2]
