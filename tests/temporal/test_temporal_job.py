"""`jobs.train_temporal` on a local Ray: features from the frozen frame model, the ablation rows,
resume, `jobs.infer --temporal` agreeing with the ablation, and the Ray Train path."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core import metrics, smoothing
from pipeline.data import schema, shards, storage
from pipeline.inference.predict import load_frame_model, predict_rows
from pipeline.temporal.training import CHECKPOINT, METRICS, METRICS_LINES, load_temporal_model
from pipeline.training.config import load_config
from pipeline.training.loop import Trainer

from conftest import build_tiny_split

pytestmark = pytest.mark.ray
RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "jobs", "recipes",
                      "demo_temporal.yaml")


@pytest.fixture(scope="module")
def frame_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("temporal-job")
    split_dir = build_tiny_split(root)
    Trainer(load_config(base={
        "method": "supervised", "model": {"backbone": "test_resnet", "channels_last": False},
        "data": {"split": split_dir, "image_size": 32, "labeled_batch": 8},
        "evaluation": {"windows": [5], "batch_size": 64},
        "run": {"name": "frame", "storage": str(root / "runs"), "epochs": 1, "steps_per_epoch": 4}})).fit()
    return {"root": root, "run": str(root / "runs" / "frame"), "shards": str(root / "shards" / schema.AFFWILD2)}


def overrides(frame_run, name: str, *extra: str) -> list[str]:
    settings = [f"frame_checkpoint={frame_run['run']}", f"shards={frame_run['shards']}",
                f"run.storage={frame_run['root'] / 'runs'}", f"run.name={name}", "temporal.clip_length=16",
                "temporal.model_dim=16", "temporal.heads=2", "temporal.feedforward_dim=32",
                "temporal.steps=4", "temporal.epochs=2", "temporal.batch_clips=4", "evaluation.window=5"]
    return [item for setting in [*settings, *extra] for item in ("--set", setting)]


def validation_frames(frame_run) -> pa.Table:
    folder = frame_run["shards"]
    table = pa.concat_tables([storage.read_parquet(uri) for uri in shards.Manifest.load(folder).file_uris(folder)])
    return table.filter(pa.compute.equal(table[schema.SPLIT], schema.VALIDATION))


def test_temporal_job_writes_the_ablation_and_resumes(local_ray, frame_run, tmp_path):
    from jobs import infer, train_temporal

    assert train_temporal.main(["--config", RECIPE, *overrides(frame_run, "single")]) == 0
    folder = frame_run["root"] / "runs" / "single"
    with open(folder / METRICS) as handle:
        final = json.load(handle)
    assert set(final["ablation"]) == {"frame", "frame+smoothing", "temporal", "temporal+smoothing"}
    assert final["steps"] == 8 and final["scored_frames"] > 0
    # The frame rows come from the stored features' run: equal to predicting the frames directly.
    frames = validation_frames(frame_run).sort_by([(schema.VIDEO, "ascending"), (schema.FRAME, "ascending")])
    predicted = predict_rows(load_frame_model(frame_run["run"]), frames)["predicted"].to_numpy()
    labels = frames[schema.LABEL].to_numpy()
    assert final["ablation"]["frame"] == pytest.approx(metrics.macro_f1(labels, predicted))
    smoothed = smoothing.smooth_by_video(frames[schema.VIDEO].to_numpy(zero_copy_only=False),
                                         frames[schema.FRAME].to_numpy(), predicted, 5)
    assert final["ablation"]["frame+smoothing"] == pytest.approx(metrics.macro_f1(labels, smoothed))
    lines = (folder / METRICS_LINES).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]

    # Asked for a third epoch: resumes from temporal.pt and trains only that epoch.
    assert train_temporal.main(["--config", RECIPE, *overrides(frame_run, "single", "temporal.epochs=3")]) == 0
    lines = (folder / METRICS_LINES).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    model, config, state = load_temporal_model(str(folder))
    assert state["trainer"]["step"] == 12 and config.temporal.epochs == 3

    # jobs.infer with the temporal checkpoint reproduces the ablation's temporal rows.
    with open(folder / METRICS) as handle:
        final = json.load(handle)
    out = str(tmp_path / "infer")
    assert infer.main(["--checkpoint", frame_run["run"], "--temporal", str(folder / CHECKPOINT),
                       "--shards", frame_run["shards"], "--subset", "validation", "--out", out,
                       "--window", "5"]) == 0
    with open(os.path.join(out, "_manifest.json")) as handle:
        manifest = json.load(handle)
    assert manifest["scores"]["raw"]["macro_f1"] == pytest.approx(final["ablation"]["temporal"])
    assert manifest["scores"]["smoothed"]["macro_f1"] == pytest.approx(final["ablation"]["temporal+smoothing"])
    video = pa.concat_tables([storage.read_parquet(os.path.join(out, "videos", name))
                              for name in os.listdir(os.path.join(out, "videos"))])
    assert "frame_predicted" in video.column_names and "features" not in video.column_names
    probabilities = np.stack([video[f"probability_{name.lower()}"].to_numpy() for name in schema.CLASS_NAMES], 1)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_temporal_job_on_ray_train(local_ray, frame_run):
    from jobs import train_temporal

    assert train_temporal.main(["--config", RECIPE, *overrides(
        frame_run, "distributed", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5")]) == 0
    folder = frame_run["root"] / "runs" / "distributed"
    with open(folder / METRICS) as handle:
        final = json.load(handle)
    assert final["steps"] == 8 and set(final["ablation"]) >= {"temporal", "temporal+smoothing"}
    assert [json.loads(line)["epoch"] for line in (folder / METRICS_LINES).read_text().splitlines()] == [1, 2]
    assert any(name.startswith("checkpoint_") for name in os.listdir(folder))  # Ray's own checkpoints
    _, _, state = load_temporal_model(str(folder))
    assert state["trainer"]["step"] == 8
