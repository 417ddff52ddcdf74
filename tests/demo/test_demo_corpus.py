"""The demo corpus has the structure the methods need: persistent expressions in videos with
transitions and -1 runs, class imbalance, and all four on-disk formats."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.data import schema
from pipeline.demo.corpus import PRESETS, DemoCorpusConfig, video_timeline, write_demo_corpus


def test_video_labels_persist_over_runs_with_blended_transitions():
    config = DemoCorpusConfig(label_noise=0.0, invalid_run_probability=0.0)
    weights, labels, truth = video_timeline(np.random.default_rng(3), config, 600)
    changes = np.flatnonzero(np.diff(truth) != 0)
    run_lengths = np.diff(np.concatenate(([0], changes + 1, [truth.size])))
    assert run_lengths.mean() >= config.segment_frames[0] * 0.8
    assert np.array_equal(labels, truth)
    assert np.allclose(weights.sum(axis=1), 1.0)
    # Inside a transition both the old and the new expression carry weight.
    mixed = ((weights > 0.05).sum(axis=1) >= 3).sum()
    assert mixed > 0


def test_invalid_runs_and_label_noise():
    config = DemoCorpusConfig(invalid_run_probability=0.3, label_noise=0.1)
    _, labels, truth = video_timeline(np.random.default_rng(0), config, 3000)
    invalid = labels == schema.NO_LABEL
    assert 0.15 < invalid.mean() < 0.45
    valid = ~invalid
    assert 0.03 < (labels[valid] != truth[valid]).mean() < 0.15


def test_class_shares_are_imbalanced_like_fer():
    config = DemoCorpusConfig(label_noise=0.0, invalid_run_probability=0.0)
    _, labels, _ = video_timeline(np.random.default_rng(1), config, 20000)
    shares = np.bincount(labels, minlength=8) / labels.size
    assert shares[4] > 3 * shares[3] and shares[0] > 3 * shares[2]  # Happy >> Fear, Neutral >> Disgust


@pytest.mark.slow
def test_tiny_corpus_files_in_the_real_layouts(tmp_path):
    counts = write_demo_corpus(str(tmp_path), PRESETS["tiny"]).counts
    assert set(counts) == set(schema.SOURCES)
    assert os.path.exists(tmp_path / "ms1mv2" / "train.rec") and os.path.exists(tmp_path / "ms1mv2" / "train.idx")
    annotations = tmp_path / "affwild2" / "EXPR_Classification_Challenge"
    assert sorted(os.listdir(annotations)) == ["Train_Set", "Validation_Set"]
    train = sorted(os.listdir(annotations / "Train_Set"))
    assert any(name.endswith("_left.txt") for name in train) and any(name.endswith("_right.txt") for name in train)
    first = (annotations / "Train_Set" / train[0]).read_text().splitlines()
    assert first[0] == ",".join(schema.CLASS_NAMES)
    assert os.path.exists(tmp_path / "affectnet" / "training.csv")
    assert os.path.exists(tmp_path / "expw" / "label" / "label.lst")
    again = write_demo_corpus(str(tmp_path / "again"), PRESETS["tiny"], sources=("ms1mv2",))
    assert (tmp_path / "again" / "ms1mv2" / "train.rec").read_bytes() == (tmp_path / "ms1mv2" / "train.rec").read_bytes()
    assert again.counts == {"ms1mv2": counts["ms1mv2"]}
