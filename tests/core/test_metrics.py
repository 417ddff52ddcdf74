"""The validation metric: hand-computed cases, scikit-learn as an oracle, streaming accumulation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as sklearn_metrics

from pipeline.core.metrics import (ClassificationReport, ConfusionAccumulator, accuracy,
                                   classification_report, confusion_matrix, macro_f1, per_class_f1)
from pipeline.data import schema

# The -1 target (with its out-of-range-looking prediction 5) is left out, leaving
# targets [0, 0, 1, 1, 2, 3] and predictions [0, 1, 1, 1, 0, 3]:
#   class 0: TP 1, FP 1, FN 1 -> 2/(2+1+1) = 0.5
#   class 1: TP 2, FP 1, FN 0 -> 4/(4+1)   = 0.8
#   class 2: TP 0, FP 0, FN 1 -> 0
#   class 3: TP 1, FP 0, FN 0 -> 2/2       = 1.0
#   classes 4..7: neither present nor predicted -> 0, still in the mean
#   macro F1 = (0.5 + 0.8 + 0 + 1.0) / 8 = 0.2875; accuracy = 4/6
HAND_TARGETS = [0, 0, 1, 1, 2, 3, -1]
HAND_PREDICTIONS = [0, 1, 1, 1, 0, 3, 5]
HAND_F1 = [0.5, 0.8, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_hand_computed_case():
    confusion = confusion_matrix(HAND_TARGETS, HAND_PREDICTIONS)
    expected = np.zeros((8, 8), dtype=np.int64)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 1] = 2
    expected[2, 0] = 1
    expected[3, 3] = 1
    assert confusion.dtype == np.int64 and confusion.shape == (8, 8)
    np.testing.assert_array_equal(confusion, expected)
    np.testing.assert_allclose(per_class_f1(confusion), HAND_F1)
    assert macro_f1(HAND_TARGETS, HAND_PREDICTIONS) == pytest.approx(0.2875)
    assert accuracy(HAND_TARGETS, HAND_PREDICTIONS) == pytest.approx(4 / 6)


def test_absent_class_scores_zero_and_counts_in_the_mean():
    # Three classes, class 2 neither present nor predicted: F1 [1, 1, 0], mean 2/3 (not 1).
    assert macro_f1([0, 0, 1], [0, 0, 1], num_classes=3) == pytest.approx(2 / 3)
    # All 8 ABAW classes count by default: a perfect score on two classes is 2/8.
    assert macro_f1([0, 4, 4], [0, 4, 4]) == pytest.approx(0.25)


def test_predicted_but_absent_class_scores_zero():
    # Class 1 predicted once but never present: TP 0 -> F1 0; class 0: TP 1, FN 1 -> 2/3.
    np.testing.assert_allclose(per_class_f1(confusion_matrix([0, 0], [0, 1], num_classes=2)), [2 / 3, 0.0])


def test_no_label_targets_are_dropped_with_their_predictions():
    # A frame with neither target nor prediction (-1, -1) is simply not scored.
    assert confusion_matrix([-1, -1, 2], [-1, 7, 2]).sum() == 1
    assert macro_f1([-1, -1, 2], [-1, 7, 2]) == pytest.approx(1 / 8)


def test_empty_input_scores_zero():
    assert macro_f1([], []) == 0.0
    assert macro_f1([-1, -1], [3, 4]) == 0.0
    assert accuracy([], []) == 0.0
    report = classification_report([], [])
    assert report.count == 0 and report.support == [0] * 8 and report.macro_f1 == 0.0


@pytest.mark.parametrize(
    "targets, predictions, message",
    [
        ([0, 8], [0, 1], r"targets must lie in -1\.\.7; found \[8\]"),
        ([0, -2], [0, 1], r"targets must lie in -1\.\.7; found \[-2\]"),
        ([0, 1], [0, 9], r"predictions must lie in -1\.\.7; found \[9\]"),
        ([0, 1], [0, -1], r"predictions are -1 on 1 frames"),
        ([0, 1, 2], [0, 1], r"differ in length: 3 vs 2"),
        ([0, 1], [0.0, 1.0], r"predictions must be integer"),
        ([0, 1], [[0.9, 0.1], [0.2, 0.8]], r"one-dimensional.*argmax"),
    ],
)
def test_invalid_input_is_an_error(targets, predictions, message):
    with pytest.raises(ValueError, match=message):
        confusion_matrix(targets, predictions)


def test_invalid_confusion_is_an_error():
    with pytest.raises(ValueError, match="square"):
        per_class_f1(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="negative"):
        per_class_f1(-np.eye(2, dtype=np.int64))


def random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random sizes, a random subset of classes present and predicted, and random -1 targets."""
    size = int(rng.integers(0, 80))
    present = rng.choice(8, size=int(rng.integers(1, 9)), replace=False)
    predicted = rng.choice(8, size=int(rng.integers(1, 9)), replace=False)
    targets = rng.choice(present, size=size)
    predictions = rng.choice(predicted, size=size)
    targets[rng.random(size) < rng.random() * 0.3] = -1
    return targets, predictions


def test_against_sklearn_on_random_cases():
    rng = np.random.default_rng(0)
    labels = list(range(8))
    compared = 0
    for _ in range(300):
        targets, predictions = random_case(rng)
        scored = targets != -1
        kept_targets, kept_predictions = targets[scored], predictions[scored]
        if not kept_targets.size:
            assert macro_f1(targets, predictions) == 0.0
            continue
        confusion = confusion_matrix(targets, predictions)
        np.testing.assert_array_equal(
            confusion, sklearn_metrics.confusion_matrix(kept_targets, kept_predictions, labels=labels))
        np.testing.assert_allclose(
            per_class_f1(confusion),
            sklearn_metrics.f1_score(kept_targets, kept_predictions, labels=labels, average=None,
                                     zero_division=0))
        assert macro_f1(targets, predictions) == pytest.approx(
            sklearn_metrics.f1_score(kept_targets, kept_predictions, labels=labels, average="macro",
                                     zero_division=0), abs=1e-12)
        assert accuracy(targets, predictions) == pytest.approx(
            sklearn_metrics.accuracy_score(kept_targets, kept_predictions))
        compared += 1
    assert compared >= 250


def test_accumulator_and_merge_equal_one_shot():
    rng = np.random.default_rng(1)
    batches = [random_case(rng) for _ in range(40)]
    targets = np.concatenate([batch[0] for batch in batches])
    predictions = np.concatenate([batch[1] for batch in batches])
    workers = [ConfusionAccumulator(), ConfusionAccumulator(), ConfusionAccumulator()]
    for index, (batch_targets, batch_predictions) in enumerate(batches):
        workers[index % 3].update(batch_targets, batch_predictions)
    merged = ConfusionAccumulator().merge(workers[0]).merge(workers[1]).merge(workers[2])
    np.testing.assert_array_equal(merged.matrix, confusion_matrix(targets, predictions))
    assert merged.count == int((targets != -1).sum())
    assert merged.report() == classification_report(targets, predictions)
    # An all-reduce is a sum of the raw matrices; the report of that sum is the same report.
    summed = sum(worker.matrix for worker in workers)
    assert ClassificationReport.from_confusion(summed) == merged.report()
    with pytest.raises(ValueError, match="cannot merge"):
        merged.merge(ConfusionAccumulator(num_classes=3))


def test_report_to_dict_is_plain_json():
    report = classification_report(HAND_TARGETS, HAND_PREDICTIONS)
    record = json.loads(json.dumps(report.to_dict()))
    assert set(record) == {"macro_f1", "per_class_f1", "confusion", "accuracy", "support", "count"}
    assert record["macro_f1"] == pytest.approx(0.2875)
    assert record["per_class_f1"] == pytest.approx(HAND_F1)
    assert record["support"] == [2, 2, 1, 1, 0, 0, 0, 0]
    assert record["count"] == 6
    assert len(record["confusion"]) == schema.NUM_CLASSES


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    targets = torch.tensor(HAND_TARGETS)
    predictions = torch.tensor(HAND_PREDICTIONS)
    assert macro_f1(targets, predictions) == pytest.approx(0.2875)
    accumulator = ConfusionAccumulator().update(targets, predictions)
    assert accumulator.report().macro_f1 == pytest.approx(0.2875)


def test_pure_modules_import_no_ray_torch_or_sklearn():
    code = ("import sys, pipeline.core.metrics, pipeline.core.smoothing; "
            "print(sorted({'ray', 'torch', 'sklearn'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
