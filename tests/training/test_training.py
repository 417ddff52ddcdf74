"""The single-process trainer end to end on the tiny demo corpus: metrics files, checkpoints,
exact resume, threshold updates and config errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from jobs import train as train_job
from pipeline.training import checkpoint
from pipeline.training.config import load_config
from pipeline.training.loop import METRICS_LINES, Trainer

from conftest import build_tiny_split


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    return build_tiny_split(tmp_path_factory.mktemp("training"))


def tiny_config(split_dir: str, storage: str, method: str = "supervised", **overrides):
    settings = {
        "method": method,
        "model": {"backbone": "test_resnet", "channels_last": False},
        "data": {"split": split_dir, "image_size": 32, "labeled_batch": 8, "unlabeled_ratio": 1,
                 "shuffle_buffer": 64},
        "evaluation": {"windows": [5], "batch_size": 64},
        "run": {"name": "tiny", "storage": storage, "epochs": 2, "steps_per_epoch": 3},
    }
    for key, value in overrides.items():
        section, field = key.split("__")
        settings[section][field] = value
    return load_config(base=settings)


def test_metrics_and_checkpoints_are_written(tiny_split, tmp_path):
    final = Trainer(tiny_config(tiny_split, str(tmp_path))).fit()
    run = tmp_path / "tiny"
    lines = [json.loads(line) for line in (run / METRICS_LINES).read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    record = lines[-1]
    for key in ("losses", "learning_rates", "images_per_second", "validation", "thresholds",
                "pseudo_label_acceptance_rate", "pseudo_label_histogram"):
        assert key in record
    validation = record["validation"]
    assert 0.0 <= validation["macro_f1"] <= 1.0 and len(validation["per_class_f1"]) == 8
    assert len(validation["confusion"]) == 8 and "5" in validation["smoothed"]
    assert validation["scored_frames"] < validation["frames"] or validation["frames"] > 0
    assert checkpoint.list_checkpoints(str(run)) == [1, 2]
    assert final["epochs"] == 2 and final["steps"] == 6
    assert json.loads((run / "metrics.json").read_text())["best_epoch"] in (1, 2)
    assert tensorboard_tags(run / "tensorboard") >= {
        "loss/loss", "validation/macro_f1", "validation/macro_f1_smoothed_5", "throughput/images_per_second"}


def tensorboard_tags(folder) -> set[str]:
    """Scalar tags in the TFRecord event files of `folder` (read with tensorboardX's protos)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    tags = set()
    for name in os.listdir(folder):
        data = (folder / name).read_bytes()
        position = 0
        while position < len(data):
            (length,) = struct.unpack_from("<Q", data, position)
            event = Event.FromString(data[position + 12:position + 12 + length])
            tags.update(value.tag for value in event.summary.value)
            position += 12 + length + 4
    return tags


def tensors(value, prefix=""):
    """Every tensor in a nested state, by its path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    found = {}
    if isinstance(value, dict):
        for key, item in value.items():
            found.update(tensors(item, f"{prefix}/{key}"))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found.update(tensors(item, f"{prefix}/{index}"))
    return found


@pytest.mark.parametrize("method", ["supervised", "dtm"])
def test_resume_continues_exactly(tiny_split, tmp_path, method):
    """Stopping after epoch 1 and resuming gives the same networks, EMA, optimizer and threshold
    state as an uninterrupted run (the unlabeled stream replays to its exact position)."""
    straight = Trainer(tiny_config(tiny_split, str(tmp_path / "a"), method=method)).fit()
    first = tiny_config(tiny_split, str(tmp_path / "b"), method=method)
    first.run.epochs = 1
    Trainer(first).fit()
    resumed = Trainer(tiny_config(tiny_split, str(tmp_path / "b"), method=method)).fit()
    assert resumed["steps"] == straight["steps"] == 6
    straight_state = tensors(checkpoint.load(checkpoint.latest(str(tmp_path / "a" / "tiny")))["method"])
    resumed_state = tensors(checkpoint.load(checkpoint.latest(str(tmp_path / "b" / "tiny")))["method"])
    assert straight_state.keys() == resumed_state.keys() and straight_state
    for key, value in straight_state.items():
        assert torch.equal(value, resumed_state[key]), key


def test_rerun_of_a_finished_run_trains_nothing_more(tiny_split, tmp_path):
    config = tiny_config(tiny_split, str(tmp_path))
    Trainer(config).fit()
    again = Trainer(tiny_config(tiny_split, str(tmp_path))).fit()
    assert again["steps"] == 6
    assert checkpoint.list_checkpoints(str(tmp_path / "tiny")) == [1, 2]


@pytest.mark.parametrize("method", ["dtm", "mutexmatch"])
def test_threshold_methods_update_thresholds_each_epoch(tiny_split, tmp_path, method):
    pytest.importorskip(f"pipeline.methods.{method}")
    final = Trainer(tiny_config(tiny_split, str(tmp_path), method=method)).fit()
    lines = [json.loads(line) for line in (tmp_path / "tiny" / METRICS_LINES).read_text().splitlines()]
    assert all(len(line["thresholds"]) == 8 for line in lines)
    assert lines[-1]["pseudo_label_acceptance_rate"] is not None
    assert final["steps"] == 6


def test_train_command_reports_config_errors(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: supervised\nrun:\n  epochs: 2\n")
    assert train_job.main(["--config", str(recipe), "--set", "run.epochz=3"]) == 2
    assert "run.epochz: unknown key" in capsys.readouterr().err
    assert train_job.main(["--config", str(recipe), "--set", "method_options.label_smoothing=oops"]) == 2
    assert "method_options.label_smoothing" in capsys.readouterr().err
    assert train_job.main(["--config", str(recipe), "--print-config", "--set", "run.epochs=5"]) == 0
    assert json.loads(capsys.readouterr().out)["run"]["epochs"] == 5
    assert train_job.main(["--config", str(recipe)]) == 2  # the recipe names no split
    assert "data.split" in capsys.readouterr().err


def test_every_recipe_loads():
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "jobs", "recipes")
    recipes = sorted(name for name in os.listdir(folder) if name.endswith(".yaml"))
    assert recipes
    for name in recipes:
        if name.endswith("temporal.yaml"):  # jobs.train_temporal's own config
            from pipeline.temporal.training import load_temporal_config

            assert load_temporal_config(os.path.join(folder, name)).temporal.clip_length >= 1
            continue
        config = load_config(os.path.join(folder, name))
        assert config.method
