"""The single-process trainer end to end on the tiny demo corpus: metrics files, checkpoints,
exact resume, threshold updates and config errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from jobs import train as train_job
from pipeline.data import schema
from pipeline.methods.base import MethodContext
from pipeline.training import checkpoint
from pipeline.training.config import load_config
from pipeline.training.data import UnlabeledStream, read_labeled, read_validation
from pipeline.training.inputs import evaluation_tensor, make_views
from pipeline.training.loop import METRICS_LINES, StepObserver, Trainer

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
        if "__" not in key:
            settings[key] = value
            continue
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
                "pseudo_label_acceptance_rate", "pseudo_label_histogram", "pseudo_label_quality"):
        assert key in record
    validation = record["validation"]
    # The reported macro-F1 is the one its own confusion matrix gives (sklearn as the oracle), and
    # every validation frame with a label is scored.
    confusion = np.array(validation["confusion"])
    assert confusion.shape == (8, 8)
    targets = np.repeat(np.arange(8), confusion.sum(axis=1))
    predictions = np.concatenate([np.repeat(np.arange(8), row) for row in confusion])
    assert validation["macro_f1"] == pytest.approx(
        f1_score(targets, predictions, labels=range(8), average="macro", zero_division=0))
    labels = read_validation(tiny_split).labels
    assert validation["scored_frames"] == confusion.sum() == int((labels >= 0).sum())
    assert set(validation["smoothed"]) == {"5"}
    assert checkpoint.list_checkpoints(str(run)) == [1, 2]
    assert final["epochs"] == 2 and final["steps"] == 6
    # The best epoch is chosen on the selection half of the validation videos, and reported with
    # its report-half figure.
    best = max(lines, key=lambda line: line["validation"]["halves"]["selection"]["macro_f1"])
    written = json.loads((run / "metrics.json").read_text())
    assert written["best_epoch"] == best["epoch"]
    assert written["best_report_macro_f1"] == best["validation"]["halves"]["report"]["macro_f1"]
    assert validation["halves"]["selection"]["frames"] + validation["halves"]["report"]["frames"] == len(labels)
    assert tensorboard_tags(run / "tensorboard") >= {
        "loss/loss", "validation/macro_f1", "validation/macro_f1_smoothed_5", "throughput/images_per_second",
        "validation_selection/macro_f1", "validation_report/macro_f1_smoothed_5"}


def seen_unlabeled_rows(config, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The hidden labels and sources of the decodable unlabeled rows a one-process run of `config`
    takes in `steps` steps, replayed from its stream (same seed, same order)."""
    stream = UnlabeledStream(config.data.split, config.run.seed, config.data.shuffle_buffer,
                             config.data.unlabeled_sources)
    per_step = config.data.labeled_batch * config.data.unlabeled_ratio
    images, labels, sources = stream.take(per_step * steps)
    _, decoded = make_views(config.data)[0].decode(images)
    return labels[decoded], sources[decoded]


def test_pseudo_label_quality_counts_the_rows_the_method_saw(tiny_split, tmp_path):
    config = tiny_config(tiny_split, str(tmp_path), method="dtm", run__epochs=1,
                         method_options={"initial_threshold": 0.0})
    Trainer(config).fit()
    record = json.loads((tmp_path / "tiny" / METRICS_LINES).read_text().splitlines()[0])
    quality = record["pseudo_label_quality"]
    labels, sources = seen_unlabeled_rows(config, steps=3)
    assert quality["rows_with_hidden_label"] == int((labels >= 0).sum()) > 0
    assert quality["unknown"]["rows"] == int((labels < 0).sum()) > 0
    # Per source: the rows with a hidden label and those without.
    expected = {schema.SOURCES[index]: (int((labels[sources == index] >= 0).sum()),
                                        int((labels[sources == index] < 0).sum()))
                for index in np.unique(sources)}
    assert {source: (figures["rows_with_hidden_label"], figures["unknown"]["rows"])
            for source, figures in quality["per_source"].items()} == expected
    # τ⁰ = 0: every pseudo label is accepted, so accepted rows = rows, and their labels add up to the
    # acceptance histogram the method reported.
    assert quality["accepted"] == quality["rows_with_hidden_label"]
    assert sum(record["pseudo_label_histogram"]) == len(labels)  # every row the replay says was seen
    assert record["pseudo_label_acceptance_rate"] == 1.0
    assert sum(figures["accepted_as"] for figures in quality["per_class"].values()) == quality["accepted"]
    correct = sum(np.diag(np.array(quality["confusion"])))
    assert quality["accuracy"] == pytest.approx(correct / quality["accepted"])


def expected_thresholds(method_name: str, options, probabilities: torch.Tensor, targets: torch.Tensor,
                        before: torch.Tensor, epoch: int) -> torch.Tensor:
    """Each threshold kind's update written out from its paper, without the trainer's code."""
    expected = before.clone()
    if method_name == "dtm":
        # ABAW5 eqs. (6)-(8): τ_c ← µ·τ_c + (1-µ)·(mean p_c over the images of class c the EMA
        # network gets right); a class with none keeps its threshold.
        for label in range(schema.NUM_CLASSES):
            right = (targets == label) & (probabilities.argmax(dim=1) == label)
            if right.any():
                expected[label] = (options.threshold_momentum * before[label]
                                   + (1 - options.threshold_momentum) * probabilities[right, label].mean())
    elif method_name == "mutexmatch":
        # Third paper, eq. (4): T_c = β·m_c / (1 + γ^-epoch), m_c the mean p_c over every image labeled c.
        for label in range(schema.NUM_CLASSES):
            mean = probabilities[targets == label, label].mean()
            expected[label] = options.threshold_scale * mean / (1 + options.threshold_base ** -epoch)
    else:
        # Noise-aware: T_c = the mean predicted probability of class c over the labeled set.
        expected = probabilities.mean(dim=0)
    return expected


@pytest.mark.parametrize("method_name", ["dtm", "mutexmatch", "noise_aware"])
def test_thresholds_after_each_epoch_equal_an_independent_computation(tiny_split, tmp_path, method_name):
    """After epoch 2 the thresholds in the checkpoint are those recomputed here from the epoch-1
    thresholds, the threshold network of epoch 2 and the whole labeled set."""
    config = tiny_config(tiny_split, str(tmp_path), method=method_name, run__epochs=2,
                         run__checkpoints_to_keep=0)
    Trainer(config).fit()
    folder = tmp_path / "tiny" / checkpoint.CHECKPOINT_FOLDER
    states = [checkpoint.load(str(folder / checkpoint.checkpoint_name(epoch))) for epoch in (1, 2)]
    method = config.method_class()(config.options(), MethodContext(
        model=config.model, optimizer=config.optimizer, total_steps=config.total_steps))
    method.load_state_dict(states[0]["method"])
    before = method.thresholds().double()
    method.load_state_dict(states[1]["method"])
    after = method.thresholds().double()
    labeled = read_labeled(tiny_split)
    images, decoded = evaluation_tensor(labeled.take_images(np.arange(len(labeled))), config.data,
                                        torch.device("cpu"))
    network = (method.ema.model if method_name == "dtm" else method.model).eval()
    with torch.no_grad():
        probabilities = network(images[torch.from_numpy(decoded)]).softmax(dim=1).double()
    targets = torch.from_numpy(labeled.labels[decoded]).long()
    expected = expected_thresholds(method_name, config.options(), probabilities, targets, before, epoch=2)
    assert not torch.allclose(expected, before, rtol=0, atol=1e-6)  # an update never applied shows
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_unlabeled", [True, False])
def test_unlabeled_batches_of_the_configured_size_reach_the_method_every_step(tiny_split, tmp_path,
                                                                             use_unlabeled):
    config = tiny_config(tiny_split, str(tmp_path), method="dtm", run__epochs=2,
                         data__unlabeled_ratio=2, data__use_unlabeled=use_unlabeled)
    seen = []

    class Sizes(StepObserver):
        def before_step(self, trainer, batch):
            seen.append((trainer.global_step, batch.labels.shape[0],
                         None if batch.unlabeled_weak is None else batch.unlabeled_weak.shape[0],
                         None if batch.unlabeled_strong is None else batch.unlabeled_strong.shape[0]))

    Trainer(config, step_observer=Sizes()).fit()
    unlabeled = 8 * 2 if use_unlabeled else None
    assert seen == [(step, 8, unlabeled, unlabeled) for step in range(6)]


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
