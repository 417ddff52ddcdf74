"""Trials with Ray Train workers: the Tune function launches a TorchTrainer (one worker here) whose
rank-0 epochs reach Tune with the same metrics as a one-process trial; finished Train runs leave no
placement group behind and the next trial starts.

Whether ASHA stops one of these trials depends on epoch-1 scores that tie on the tiny split (seen:
no trial stopped in one run, one in another), so this test runs FIFO; the ASHA-stop check is
tests/tuning/test_tune_ray.py's, on one-process trials."""

from __future__ import annotations

import time

import pytest
from test_tune_ray import tiny_search

from pipeline.tuning.search import load_search

from conftest import build_tiny_split

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_with_dashboard():
    """Train V2 cleans up a stopped run's placement group through the dashboard's state API."""
    ray = pytest.importorskip("ray")
    from pipeline.data.ray_ingest import ensure_ray

    ensure_ray(num_cpus=2, dashboard=True)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_worker_trials_report_and_leave_no_placement_group(ray_with_dashboard, tmp_path):
    from pipeline.tuning import ray_tune, report

    split = build_tiny_split(tmp_path)
    mapping = tiny_search(split, str(tmp_path / "tune"), "workers", searcher="grid", trials=2,
                          concurrency=1, resources_per_trial={"cpu": 0.2}, scheduler={"name": "fifo"},
                          space=[{"key": "run.seed", "distribution": "grid", "values": [0, 1]}])
    mapping["base"]["scaling"] = {"num_workers": 1, "cpus_per_worker": 0.5}
    mapping["base"]["data"]["unlabeled_reader"] = "in_process"
    search = load_search(mapping=mapping)
    results = ray_tune.run_search(search)
    assert len(results) == 2 and not results.errors
    epochs = {result.config["run.seed"]: int(result.metrics["epoch"]) for result in results}
    assert epochs == {0: 2, 1: 2}  # the second trial started after the first's Train run ended
    for result in results:
        history = result.metrics_dataframe
        assert list(history["epoch"]) == list(range(1, len(history) + 1))
        assert history["best_selection_macro_f1"].notna().all()
        assert history["checkpoint_path"].str.contains("/train/checkpoint_").all()
    # The Train runs' placement groups are removed (asynchronously, by Train's cleaner actor).
    deadline = time.monotonic() + 60
    while True:
        groups = ray_with_dashboard.util.placement_group_table().values()
        left = [group for group in groups if group["state"] != "REMOVED"]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert left == []
    summary = report.write_report(search.experiment)
    assert summary["complete"] == 2 and summary["best_report_macro_f1"] is not None


def test_a_checkpoint_on_an_object_store_is_reported_with_its_scheme(tmp_path):
    """Ray's checkpoint path inside S3 or GCS is `bucket/...`: reported as is, the report and the
    temporal refine would look for it on local disk and find nothing."""
    import pyarrow.fs
    from ray.train import Checkpoint

    from pipeline.tuning.ray_tune import checkpoint_uri

    on_s3 = Checkpoint("bucket/experiment/train/checkpoint_0001",
                       filesystem=pyarrow.fs.S3FileSystem(anonymous=True, region="us-east-1"))
    assert checkpoint_uri(on_s3) == "s3://bucket/experiment/train/checkpoint_0001"
    on_gcs = Checkpoint("bucket/experiment/checkpoint_0001", filesystem=pyarrow.fs.GcsFileSystem(anonymous=True))
    assert checkpoint_uri(on_gcs) == "gs://bucket/experiment/checkpoint_0001"
    local = Checkpoint(str(tmp_path), filesystem=pyarrow.fs.LocalFileSystem())
    assert checkpoint_uri(local) == str(tmp_path)
