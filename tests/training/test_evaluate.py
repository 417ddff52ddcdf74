"""Validation on the whole set and on its selection and report halves (by video, seeded)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import f1_score

from pipeline.core import smoothing
from pipeline.training.data import ImageTable
from pipeline.training.evaluate import REPORT, SELECTION, validation_halves, validation_report


def frames_table(videos: list[str], labels: list[int]) -> ImageTable:
    frames = np.zeros(len(videos), np.int64)
    for video in set(videos):
        rows = [index for index, name in enumerate(videos) if name == video]
        frames[rows] = np.arange(1, len(rows) + 1)
    return ImageTable(images=pa.array([b""] * len(videos), pa.binary()), labels=np.array(labels, np.int64),
                      sample_ids=[f"{video}/{frame}" for video, frame in zip(videos, frames)],
                      videos=np.array(videos, dtype=object), frames=frames)


def test_halves_split_whole_videos_and_depend_only_on_the_seed():
    videos = np.array([f"v{index % 9}" for index in range(90)], dtype=object)
    ids = [f"id{index}" for index in range(90)]
    selection = validation_halves(videos, ids, seed=0)
    for video in set(videos):  # a video is never cut in two
        assert len(set(selection[videos == video].tolist())) == 1
    assert len(set(videos[selection])) == 5 and len(set(videos[~selection])) == 4  # 9 videos: 5 + 4
    # Row order does not matter; another seed draws other videos.
    order = np.random.default_rng(1).permutation(90)
    assert validation_halves(videos[order], [ids[index] for index in order], 0).tolist() == selection[order].tolist()
    draws = {tuple(sorted(set(videos[validation_halves(videos, ids, seed)]))) for seed in range(6)}
    assert len(draws) > 1


def test_still_images_are_groups_of_their_own():
    videos = np.array([""] * 10, dtype=object)
    selection = validation_halves(videos, [f"image{index}" for index in range(10)], seed=3)
    assert selection.sum() == 5


def test_report_scores_each_half_on_its_own_frames():
    rng = np.random.default_rng(0)
    videos = [f"video{index % 6}" for index in range(240)]
    labels = rng.integers(-1, 8, 240).tolist()
    table = frames_table(videos, labels)
    probabilities = rng.random((240, 8)).astype(np.float32)
    probabilities[7] = 0  # one undecodable frame: not scored
    report = validation_report(table, probabilities, windows=[5], mode="centred", halves_seed=4)
    selection = validation_halves(table.videos, table.sample_ids, 4)
    predictions = probabilities.argmax(axis=1)
    smoothed = smoothing.smooth_by_video(table.videos, table.frames, np.where(probabilities.sum(axis=1) == 0, -1,
                                                                               predictions), 5, "centred")
    targets = np.array(labels)
    scored = (targets >= 0) & (probabilities.sum(axis=1) > 0)
    for name, mask in ((SELECTION, selection), (REPORT, ~selection)):
        keep = scored & mask
        half = report["halves"][name]
        assert half["frames"] == int(mask.sum())
        assert half["scored_frames"] == int(keep.sum()) > 0
        assert half["macro_f1"] == pytest.approx(
            f1_score(targets[keep], predictions[keep], labels=range(8), average="macro", zero_division=0))
        assert half["smoothed"]["5"] == pytest.approx(
            f1_score(targets[keep], smoothed[keep], labels=range(8), average="macro", zero_division=0))
    assert report["halves"][SELECTION]["macro_f1"] != report["halves"][REPORT]["macro_f1"]
    assert report["scored_frames"] == int(scored.sum())


def test_undecodable_frames_are_left_out_of_macro_f1_and_filled_in_the_all_annotated_figure():
    """The official scorer counts every annotated frame: an undecodable one is scored with the
    label of its video's nearest decoded frame (earlier on a tie); a still image without a decoded
    neighbour with the most frequent prediction. sklearn's F1 is the oracle."""
    rng = np.random.default_rng(3)
    videos = [f"video{index // 40}" for index in range(120)] + [""] * 20
    labels = rng.integers(0, 8, 140)
    labels[::7] = -1
    table = frames_table(videos, labels.tolist())
    probabilities = rng.random((140, 8)).astype(np.float32)
    undecodable = np.zeros(140, bool)
    undecodable[[0, 5, 6, 7, 39, 41, 80, 125, 133]] = True
    probabilities[undecodable] = 0.0
    predicted = probabilities.argmax(axis=1)
    report = validation_report(table, probabilities, [5], smoothing.CENTRED)

    scored = (labels >= 0) & ~undecodable
    assert report["undecodable_frames"] == 9
    assert report["macro_f1"] == pytest.approx(f1_score(labels[scored], predicted[scored], labels=range(8),
                                                        average="macro", zero_division=0))
    expected = predicted.copy()
    decoded = ~undecodable
    fallback = int(np.bincount(predicted[decoded], minlength=8).argmax())
    for index in np.flatnonzero(undecodable):
        if videos[index]:
            same = [other for other in range(140) if videos[other] == videos[index] and decoded[other]]
            nearest = min(same, key=lambda other: (abs(table.frames[other] - table.frames[index]),
                                                   table.frames[other]))
            expected[index] = predicted[nearest]
        else:
            expected[index] = fallback
    annotated = labels >= 0
    all_annotated = report["all_annotated"]
    assert all_annotated["scored_frames"] == int(annotated.sum()) > int(scored.sum())
    assert all_annotated["filled_frames"] == 9
    assert all_annotated["macro_f1"] == pytest.approx(f1_score(
        labels[annotated], expected[annotated], labels=range(8), average="macro", zero_division=0))
    assert all_annotated["macro_f1"] != pytest.approx(report["macro_f1"])


def test_without_undecodable_frames_both_figures_agree():
    rng = np.random.default_rng(4)
    table = frames_table([f"video{index // 30}" for index in range(90)], rng.integers(-1, 8, 90).tolist())
    report = validation_report(table, rng.random((90, 8)).astype(np.float32), [5], smoothing.CENTRED)
    assert report["undecodable_frames"] == 0 and report["all_annotated"]["filled_frames"] == 0
    assert report["all_annotated"]["macro_f1"] == report["macro_f1"]
    assert report["all_annotated"]["scored_frames"] == report["scored_frames"]
