"""Class statistics, the four thresholds and selection, checked against values worked out by hand."""

from __future__ import annotations

import io
import math

import pytest
import torch

from pipeline.core.thresholds import (THRESHOLDS, ClassMeanThreshold, ClassStatistics,
                                      DynamicAdaptiveThreshold, DynamicThresholdModule, FixedThreshold,
                                      acceptance_histogram, class_statistics_by_label,
                                      class_statistics_correct, class_statistics_predicted, make_threshold,
                                      select_clean_samples, select_pseudo_labels)


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def labels(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def random_batch(num_samples: int = 64, num_classes: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    probabilities = torch.softmax(3 * torch.randn(num_samples, num_classes, generator=generator), dim=1)
    targets = torch.randint(-1, num_classes, (num_samples,), generator=generator)
    return probabilities, targets


def assert_statistics_equal(left: ClassStatistics, right: ClassStatistics) -> None:
    torch.testing.assert_close(left.sums, right.sums, rtol=0, atol=1e-12)
    assert torch.equal(left.counts, right.counts)


def save_and_load(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# DTM, two epochs over 3 classes.
# Epoch 1: class 0 has two correct predictions (0.7, 0.5); both class-1 samples are predicted as
# class 0 (all wrong); class 2 appears only with label -1 (ignored).
EPOCH_ONE_PROBABILITIES = tensor([
    [0.7, 0.2, 0.1],    # label 0, predicted 0: correct, p_0 = 0.7
    [0.5, 0.3, 0.2],    # label 0, predicted 0: correct, p_0 = 0.5
    [0.6, 0.3, 0.1],    # label 1, predicted 0: wrong
    [0.4, 0.35, 0.25],  # label 1, predicted 0: wrong
    [0.1, 0.1, 0.8],    # label -1: ignored
])
EPOCH_ONE_LABELS = labels([0, 0, 1, 1, -1])
# Epoch 2: class 0 correct once (0.9), class 1 correct twice (0.4, 0.6), class 2 only wrong.
EPOCH_TWO_PROBABILITIES = tensor([
    [0.9, 0.05, 0.05],  # label 0, correct, p_0 = 0.9
    [0.3, 0.4, 0.3],    # label 1, correct, p_1 = 0.4
    [0.2, 0.6, 0.2],    # label 1, correct, p_1 = 0.6
    [0.5, 0.2, 0.3],    # label 2, predicted 0: wrong
])
EPOCH_TWO_LABELS = labels([0, 1, 1, 2])


def test_class_statistics_correct_by_hand():
    statistics = class_statistics_correct(EPOCH_ONE_PROBABILITIES, EPOCH_ONE_LABELS)
    # Class 0: 0.7 + 0.5 = 1.2 over 2 samples; classes 1 and 2: nothing correct.
    torch.testing.assert_close(statistics.sums, torch.tensor([1.2, 0.0, 0.0], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert statistics.counts.tolist() == [2, 0, 0]


def test_dynamic_threshold_module_two_epochs_by_hand():
    threshold = DynamicThresholdModule(num_classes=3, momentum=0.9, initial=0.8)
    torch.testing.assert_close(threshold.thresholds, torch.full((3,), 0.8))

    threshold.update(class_statistics_correct(EPOCH_ONE_PROBABILITIES, EPOCH_ONE_LABELS))
    # τ_0 = 1.2 / 2 = 0.6 → 0.9·0.8 + 0.1·0.6 = 0.72 + 0.06 = 0.78
    # class 1 (all wrong) and class 2 (no sample) keep 0.8
    torch.testing.assert_close(threshold.thresholds, tensor([0.78, 0.8, 0.8]), atol=1e-6, rtol=0)

    threshold.update(class_statistics_correct(EPOCH_TWO_PROBABILITIES, EPOCH_TWO_LABELS))
    # τ_0 = 0.9 → 0.9·0.78 + 0.1·0.9 = 0.702 + 0.09 = 0.792
    # τ_1 = (0.4 + 0.6) / 2 = 0.5 → 0.9·0.8 + 0.1·0.5 = 0.72 + 0.05 = 0.77
    # class 2 predicted wrongly only → keeps 0.8
    torch.testing.assert_close(threshold.thresholds, tensor([0.792, 0.77, 0.8]), atol=1e-6, rtol=0)
    assert threshold.updates == 2
    assert threshold.thresholds.dtype == torch.float32


def test_dynamic_threshold_module_rejects_unknown_empty_class_rule():
    with pytest.raises(ValueError, match="empty_class"):
        DynamicThresholdModule(empty_class="decay")


# Dynamic adaptive threshold over 3 classes; class 2 appears only with label -1.
ADAPTIVE_PROBABILITIES = tensor([
    [0.9, 0.05, 0.05],  # label 0: p_0 = 0.9
    [0.7, 0.2, 0.1],    # label 0: p_0 = 0.7           → m_0 = 0.8
    [0.6, 0.3, 0.1],    # label 1, predicted 0: p_1 = 0.3 (counts: every sample labeled 1)
    [0.05, 0.9, 0.05],  # label 1: p_1 = 0.9           → m_1 = 0.6
    [0.1, 0.1, 0.8],    # label -1: ignored            → m_2 keeps the initial mean 1.0
])
ADAPTIVE_LABELS = labels([0, 0, 1, 1, -1])


def test_class_statistics_by_label_counts_wrong_predictions():
    statistics = class_statistics_by_label(ADAPTIVE_PROBABILITIES, ADAPTIVE_LABELS)
    # Class 0: 0.9 + 0.7 = 1.6 over 2; class 1: 0.3 + 0.9 = 1.2 over 2; class 2: none.
    torch.testing.assert_close(statistics.sums, torch.tensor([1.6, 1.2, 0.0], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert statistics.counts.tolist() == [2, 2, 0]


@pytest.mark.parametrize("epoch, factor", [
    (0, 0.475),               # 0.95 / (1 + e^0) = 0.95 / 2
    (1, 0.6945056496985046),  # 0.95 / (1 + e^-1) = 0.95 / 1.3678794 = 0.6945056
    (5, 0.9436417916219294),  # 0.95 / (1 + e^-5) = 0.95 / 1.0067379 = 0.9436418
])
def test_dynamic_adaptive_threshold_by_hand(epoch, factor):
    threshold = DynamicAdaptiveThreshold(num_classes=3)
    threshold.update(class_statistics_by_label(ADAPTIVE_PROBABILITIES, ADAPTIVE_LABELS), epoch=epoch)
    # T^c = factor · m_c with m = (0.8, 0.6, 1.0):
    # epoch 0: 0.38, 0.285, 0.475; epoch 1: 0.5556045, 0.4167034, 0.6945056;
    # epoch 5: 0.7549134, 0.5661851, 0.9436418.
    expected = tensor([factor * 0.8, factor * 0.6, factor * 1.0])
    torch.testing.assert_close(threshold.thresholds, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(threshold.thresholds_at(epoch), expected, atol=1e-6, rtol=0)
    assert threshold.epoch == epoch


def test_dynamic_adaptive_threshold_grows_with_epoch_and_keeps_means():
    threshold = DynamicAdaptiveThreshold(num_classes=3)
    # Before any update: means 1.0, epoch 0 → 0.95 / 2 = 0.475 for every class.
    torch.testing.assert_close(threshold.thresholds, torch.full((3,), 0.475))
    threshold.update(class_statistics_by_label(ADAPTIVE_PROBABILITIES, ADAPTIVE_LABELS), epoch=0)
    # A later epoch with samples of class 1 only (p_1 = 0.5): classes 0 and 2 keep 0.8 and 1.0.
    threshold.update(class_statistics_by_label(tensor([[0.25, 0.5, 0.25]]), labels([1])), epoch=1)
    torch.testing.assert_close(threshold.class_means, tensor([0.8, 0.5, 1.0]), atol=1e-6, rtol=0)
    values = [threshold.thresholds_at(epoch)[0].item() for epoch in range(10)]
    assert values == sorted(values) and values[-1] < 0.95 * 0.8
    with pytest.raises(ValueError, match="epoch"):
        threshold.update(ClassStatistics.zeros(3))


def test_dynamic_adaptive_threshold_correct_samples_and_minimum():
    threshold = DynamicAdaptiveThreshold(num_classes=3, samples="correct", minimum=0.3)
    statistics = threshold.collect_statistics(ADAPTIVE_PROBABILITIES, ADAPTIVE_LABELS)
    # Correct only: class 0 = (0.9 + 0.7) / 2 = 0.8, class 1 = 0.9 (the 0.3 was a wrong prediction).
    threshold.update(statistics, epoch=0)
    # Epoch 0: 0.475 · (0.8, 0.9, 1.0) = (0.38, 0.4275, 0.475), all above the 0.3 floor.
    torch.testing.assert_close(threshold.thresholds, tensor([0.38, 0.4275, 0.475]), atol=1e-6, rtol=0)
    low = DynamicAdaptiveThreshold(num_classes=1, minimum=0.3)
    low.update(ClassStatistics(torch.tensor([0.2]), torch.tensor([1])), epoch=0)
    # 0.475 · 0.2 = 0.095 < 0.3 → floored at 0.3.
    torch.testing.assert_close(low.thresholds, tensor([0.3]))


def test_dynamic_adaptive_threshold_custom_scale_and_base():
    threshold = DynamicAdaptiveThreshold(num_classes=1, scale=0.5, base=2.0)
    threshold.update(ClassStatistics(torch.tensor([1.8]), torch.tensor([2])), epoch=1)
    # m = 0.9; 0.5 · 0.9 / (1 + 2^-1) = 0.45 / 1.5 = 0.3
    torch.testing.assert_close(threshold.thresholds, tensor([0.3]))


# Noise-aware class mean over 2 classes; every value is a binary fraction, so equality is exact.
CLASS_MEAN_PROBABILITIES = tensor([
    [0.75, 0.25],  # label 0
    [0.25, 0.75],  # label 1
    [0.5, 0.5],    # label 0; argmax ties go to class 0
])
CLASS_MEAN_LABELS = labels([0, 1, 0])


def test_class_statistics_predicted_by_hand():
    every = class_statistics_predicted(CLASS_MEAN_PROBABILITIES)
    # "all": column sums 0.75 + 0.25 + 0.5 = 1.5 for both classes, over 3 samples each.
    assert every.sums.tolist() == [1.5, 1.5] and every.counts.tolist() == [3, 3]
    predicted = class_statistics_predicted(CLASS_MEAN_PROBABILITIES, samples="argmax")
    # "argmax": class 0 predicted for rows 0 and 2 (0.75 + 0.5 = 1.25), class 1 for row 1 (0.75).
    assert predicted.sums.tolist() == [1.25, 0.75] and predicted.counts.tolist() == [2, 1]
    with pytest.raises(ValueError, match="samples"):
        class_statistics_predicted(CLASS_MEAN_PROBABILITIES, samples="labels")


def test_class_mean_threshold_and_clean_selection_by_hand():
    threshold = ClassMeanThreshold(num_classes=2)
    assert threshold.thresholds.tolist() == [0.0, 0.0]
    threshold.update(threshold.collect_statistics(CLASS_MEAN_PROBABILITIES))
    # 1.5 / 3 = 0.5 for both classes.
    assert threshold.thresholds.tolist() == [0.5, 0.5]
    clean = select_clean_samples(CLASS_MEAN_PROBABILITIES, CLASS_MEAN_LABELS, threshold.thresholds)
    # p_label = 0.75 > 0.5, 0.75 > 0.5, 0.5 > 0.5 is false (strict).
    assert clean.tolist() == [True, True, False]
    inclusive = select_clean_samples(CLASS_MEAN_PROBABILITIES, CLASS_MEAN_LABELS, threshold.thresholds,
                                     inclusive=True)
    assert inclusive.tolist() == [True, True, True]
    unlabeled = select_clean_samples(CLASS_MEAN_PROBABILITIES, labels([-1, 1, 0]), threshold.thresholds)
    assert unlabeled.tolist() == [False, True, False]
    # No momentum: a second update replaces the values; a class with no sample keeps its own.
    threshold.update(class_statistics_predicted(tensor([[0.25, 0.75]]), samples="argmax"))
    assert threshold.thresholds.tolist() == [0.5, 0.75]


def test_fixed_threshold_ignores_updates():
    threshold = FixedThreshold(num_classes=3, value=0.9)
    probabilities, targets = random_batch(num_classes=3)
    threshold.update(threshold.collect_statistics(probabilities, targets), epoch=4)
    torch.testing.assert_close(threshold.thresholds, torch.full((3,), 0.9))
    with pytest.raises(ValueError, match="value"):
        FixedThreshold(value=1.5)


def test_select_pseudo_labels_is_strict_at_equality():
    probabilities = tensor([
        [0.5, 0.25, 0.25],    # class 0, confidence 0.5 == τ_0 = 0.5: rejected (strict)
        [0.25, 0.75, 0.0],    # class 1, 0.75 > τ_1 = 0.7: kept
        [0.125, 0.125, 0.75], # class 2, 0.75 < τ_2 = 0.8: rejected
    ]).requires_grad_()
    thresholds = tensor([0.5, 0.7, 0.8])
    selection = select_pseudo_labels(probabilities, thresholds)
    assert selection.labels.tolist() == [0, 1, 2]
    assert selection.mask.tolist() == [False, True, False]
    assert selection.confidence.tolist() == [0.5, 0.75, 0.75]
    assert not selection.confidence.requires_grad
    labels_out, mask, confidence = select_pseudo_labels(probabilities, thresholds, inclusive=True)
    assert mask.tolist() == [True, True, False]
    assert acceptance_histogram(labels_out, mask, num_classes=3).tolist() == [1, 1, 0]
    with pytest.raises(ValueError, match="thresholds"):
        select_pseudo_labels(probabilities, tensor([0.5, 0.5]))


def test_acceptance_histogram_by_hand():
    histogram = acceptance_histogram(labels([0, 1, 2, 1, 1]), torch.tensor([False, True, False, True, True]),
                                     num_classes=4)
    assert histogram.tolist() == [0, 3, 0, 0]


@pytest.mark.parametrize("collect", [
    class_statistics_correct,
    class_statistics_by_label,
    lambda probabilities, targets: class_statistics_predicted(probabilities),
    lambda probabilities, targets: class_statistics_predicted(probabilities, samples="argmax"),
])
def test_statistics_accumulate_across_batches(collect):
    probabilities, targets = random_batch(num_samples=90)
    one_shot = collect(probabilities, targets)
    accumulated = ClassStatistics.zeros(8)
    for batch in range(3):
        rows = slice(30 * batch, 30 * (batch + 1))
        accumulated = accumulated + collect(probabilities[rows], targets[rows])
    assert_statistics_equal(accumulated, one_shot)


def test_as_tensor_round_trip():
    statistics = ClassStatistics(torch.tensor([1.25, 0.0, 3.5]), torch.tensor([2, 0, 7]))
    flat = statistics.as_tensor()
    assert flat.shape == (6,) and flat.dtype == torch.float64
    assert flat.tolist() == [1.25, 0.0, 3.5, 2.0, 0.0, 7.0]
    assert_statistics_equal(ClassStatistics.from_tensor(flat), statistics)
    with pytest.raises(ValueError, match="even length"):
        ClassStatistics.from_tensor(torch.zeros(5))


@pytest.mark.parametrize("name", sorted(THRESHOLDS))
def test_summed_halves_update_like_the_whole(name):
    """What an all-reduce does: each worker's flat statistics summed, then the same update."""
    probabilities, targets = random_batch(num_samples=64)
    whole, split = make_threshold(name), make_threshold(name)
    first = split.collect_statistics(probabilities[:32], targets[:32]).as_tensor()
    second = split.collect_statistics(probabilities[32:], targets[32:]).as_tensor()
    whole.update(whole.collect_statistics(probabilities, targets), epoch=2)
    split.update(ClassStatistics.from_tensor(first + second), epoch=2)
    torch.testing.assert_close(split.thresholds, whole.thresholds, atol=1e-7, rtol=0)


@pytest.mark.parametrize("name", sorted(THRESHOLDS))
def test_contract_and_state_round_trip(name):
    threshold = make_threshold(name)
    assert threshold.name == name
    assert threshold.thresholds.shape == (8,) and threshold.thresholds.dtype == torch.float32
    probabilities, targets = random_batch()
    threshold.update(threshold.collect_statistics(probabilities, targets), epoch=3)
    state = save_and_load(threshold.state_dict())
    restored = make_threshold(name)
    restored.load_state_dict(state)
    assert torch.equal(restored.thresholds, threshold.thresholds)
    assert restored.state_dict().keys() == threshold.state_dict().keys()
    selection = select_pseudo_labels(probabilities, restored.thresholds)
    assert selection.mask.dtype == torch.bool and selection.labels.shape == (64,)
    with pytest.raises(ValueError, match="keys"):
        restored.load_state_dict({**state, "unexpected": 1})


def test_state_shape_mismatch_is_an_error():
    state = DynamicThresholdModule(num_classes=3).state_dict()
    with pytest.raises(ValueError, match="shape"):
        DynamicThresholdModule(num_classes=8).load_state_dict(state)


def test_make_threshold_names_and_options():
    assert set(THRESHOLDS) == {"fixed", "dtm", "adaptive", "class_mean"}
    threshold = make_threshold("dtm", momentum=0.5, initial=0.7, num_classes=4)
    assert isinstance(threshold, DynamicThresholdModule) and threshold.momentum == 0.5
    assert make_threshold("adaptive").base == math.e
    with pytest.raises(ValueError, match="adaptive, class_mean, dtm, fixed"):
        make_threshold("flexmatch")
    with pytest.raises(TypeError):
        make_threshold("fixed", threshold=0.9)


def test_bad_labels_are_errors():
    with pytest.raises(ValueError, match="labels must lie"):
        class_statistics_correct(tensor([[0.5, 0.5]]), labels([2]))
    with pytest.raises(ValueError, match="labels must lie"):
        class_statistics_by_label(tensor([[0.5, 0.5]]), labels([-2]))
    with pytest.raises(ValueError, match="vector"):
        class_statistics_by_label(tensor([[0.5, 0.5]]), labels([0, 1]))
    with pytest.raises(ValueError, match="statistics cover"):
        DynamicThresholdModule(num_classes=3).update(ClassStatistics.zeros(8))
