"""Noise-aware model: class activation maps, the flipped-view consistency and its alignment, the
logit-weighted CE, rank regularisation and the clean/noisy split checked by hand; exact resume;
mini learning checks on synthetic blobs with clean and with 30% flipped labels."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.methods.base import OptimizerConfig, TrainBatch, find_method
from pipeline.methods.supervised import Supervised
from pipeline.methods.noise_aware import (NoiseAware, NoiseAwareOptions, class_activation_maps,
                                          flipped_view_consistency, rank_regularization,
                                          weighted_cross_entropy)

from synthetic import (CLASSES, StubBackbone, StubContext, cluster_accuracy, cluster_method, make_context,
                       random_batch, resume_and_step, train_and_score)


def test_registered_with_its_views():
    assert find_method("noise_aware") is NoiseAware
    assert NoiseAware.views.labeled_strong
    assert not NoiseAware.views.unlabeled and not NoiseAware.views.unlabeled_strong


# ------------------------------------------------------------------------------ pure pieces

def test_class_activation_maps_by_hand():
    # One sample, two feature maps of 2x2, three classes.
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]],
                              [[0.0, -1.0], [2.0, 0.5]]]])
    weight = torch.tensor([[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0]])
    expected = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]],             # 1·F0 + 0·F1
                              [[0.5, -1.0], [5.5, 3.0]],            # 0.5·F0 + 2·F1
                              [[-1.0, -3.0], [-1.0, -3.5]]]])       # -F0 + F1
    torch.testing.assert_close(class_activation_maps(features, weight), expected)


def test_class_activation_maps_need_matching_channels():
    with pytest.raises(ValueError, match="feature maps"):
        class_activation_maps(torch.zeros(1, 3, 2, 2), torch.zeros(4, 2))


def test_flipped_view_consistency_flips_the_strong_maps_back():
    maps = torch.arange(24.0).reshape(1, 2, 3, 4)
    # The flipped image's maps are the mirror of the weak maps: aligned, zero loss.
    assert flipped_view_consistency(maps, maps.flip(-1)).item() == 0.0
    # By hand: mean of (maps - maps.flip(-1))² over 24 entries; per row [0,1,2,3] vs [3,2,1,0].
    expected = (9 + 1 + 1 + 9) / 4
    assert flipped_view_consistency(maps, maps).item() == pytest.approx(expected)


def test_weighted_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 1.0]])
    importance = torch.tensor([0.5, 0.25, 0.9])
    labels = torch.tensor([0, 2, 1])
    mask = torch.tensor([True, True, False])

    def term(scaled, target):
        return -(scaled[target] - math.log(sum(math.exp(value) for value in scaled)))

    expected = (term([1.0, 0.5, 0.0], 0) + term([0.0, 0.75, 0.25], 2)) / 3  # N is the batch size
    loss = weighted_cross_entropy(logits, importance, labels, mask)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_rank_regularization_by_hand():
    importance = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.2, 0.6, 0.5, 0.4, 0.3, 0.85])
    # β = 0.7 of 10: high group = the 7 largest.
    high = (0.9 + 0.85 + 0.8 + 0.7 + 0.6 + 0.5 + 0.4) / 7
    low = (0.3 + 0.2 + 0.1) / 3
    assert high - low > 0.15
    assert rank_regularization(importance, 0.7, 0.15).item() == 0.0
    assert rank_regularization(importance, 0.7, 0.6).item() == pytest.approx(0.6 - (high - low), rel=1e-6)
    # Two samples still form two groups; one sample gives no ranking.
    assert rank_regularization(torch.tensor([0.5, 0.45]), 0.7, 0.15).item() == pytest.approx(0.1, rel=1e-5)
    assert rank_regularization(torch.tensor([0.5]), 0.7, 0.15).item() == 0.0


def test_rank_regularization_over_a_mask_equals_it_over_the_chosen_samples():
    """The step passes the clean mask instead of indexing (indexing by a mask reads its size back
    to the host): the masked loss and its gradient are those of the chosen samples alone, and no
    gradient reaches the others."""
    generator = torch.Generator().manual_seed(3)
    for chosen_count in (0, 1, 2, 5, 11):
        importance = torch.rand(12, generator=generator, requires_grad=True)
        chosen = torch.zeros(12, dtype=torch.bool)
        chosen[torch.randperm(12, generator=generator)[:chosen_count]] = True
        masked = rank_regularization(importance, 0.7, 0.9, chosen=chosen)
        (masked_gradient,) = torch.autograd.grad(masked, importance)
        subset = importance.detach()[chosen].requires_grad_(True)
        expected = rank_regularization(subset, 0.7, 0.9)
        expected_gradient = (torch.autograd.grad(expected, subset)[0] if chosen_count >= 2
                             else torch.zeros(chosen_count))
        assert masked.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-7)
        assert torch.allclose(masked_gradient[chosen], expected_gradient, atol=1e-7)
        assert torch.count_nonzero(masked_gradient[~chosen]) == 0
        assert torch.isfinite(masked_gradient).all()


# ------------------------------------------------------------------------ a step by hand

def stub_method(options: NoiseAwareOptions, ramp: bool = True) -> NoiseAware:
    """On a StubBackbone whose maps are the image times a horizontal ramp, so not flip-equivariant:
    only the right flip-and-flip-back makes the method's maps equal the ones computed here.
    ramp=False: the image itself."""
    torch.manual_seed(0)
    context = make_context("stub", total_steps=10, optimizer=OptimizerConfig(), context_class=StubContext,
                           networks=[StubBackbone(3, CLASSES, ramp=ramp)])
    return NoiseAware(options, context)


def test_a_step_matches_the_paper_by_hand():
    method = stub_method(NoiseAwareOptions(consistency_weight=0.5, rank_weight=2.0, rank_margin=0.6))
    weight = torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0], [-0.7, 0.1, 0.9], [0.2, 0.2, 0.2]])
    bias = torch.tensor([0.1, -0.2, 0.0, 0.05])
    with torch.no_grad():
        method.model.fc.weight.copy_(weight)
        method.model.fc.bias.copy_(bias)
        method.attention[0].weight.copy_(torch.tensor([[1.0, -1.0, 0.5]]))
        method.attention[0].bias.fill_(0.1)
    thresholds = [0.3, 0.2, 0.25, 0.25]
    method.threshold.load_state_dict({"thresholds": torch.tensor(thresholds, dtype=torch.float64),
                                      "updates": 1})

    generator = torch.Generator().manual_seed(0)
    weak = torch.randn(5, 3, 2, 3, generator=generator)
    strong = torch.randn(5, 3, 2, 3, generator=generator)
    labels = [0, 1, 2, 3, 1]
    losses, clean = method.compute_losses(TrainBatch(labeled_weak=weak, labels=torch.tensor(labels),
                                                     labeled_strong=strong))

    ramp = [1.0, 2.0, 3.0]
    count, height, width = 5, 2, 3

    def feature(images, n, k, h, w, mirrored=False):
        # The method flips the strong image, weighs it with the ramp, then flips the maps back:
        # at column w that is strong[w] times the ramp's mirrored column.
        return float(images[n, k, h, w]) * ramp[width - 1 - w if mirrored else w]

    importance, logits = [], []
    for n in range(count):
        pooled = [sum(feature(weak, n, k, h, w) for h in range(height) for w in range(width)) / 6
                  for k in range(3)]
        logits.append([sum(float(weight[c, k]) * pooled[k] for k in range(3)) + float(bias[c])
                       for c in range(CLASSES)])
        importance.append(1 / (1 + math.exp(-(pooled[0] - pooled[1] + 0.5 * pooled[2] + 0.1))))
    clean_by_hand = []
    for n in range(count):
        total = sum(math.exp(value) for value in logits[n])
        clean_by_hand.append(math.exp(logits[n][labels[n]]) / total > thresholds[labels[n]])
    assert clean.tolist() == clean_by_hand
    assert 0 < sum(clean_by_hand) < count

    labeled_loss = 0.0
    for n in range(count):
        if clean_by_hand[n]:
            scaled = [importance[n] * value for value in logits[n]]
            labeled_loss -= scaled[labels[n]] - math.log(sum(math.exp(value) for value in scaled))
    labeled_loss /= count

    kept = sorted((importance[n] for n in range(count) if clean_by_hand[n]), reverse=True)
    high_count = min(len(kept) - 1, max(1, int(0.7 * len(kept))))
    rank_loss = max(0.0, 0.6 - (sum(kept[:high_count]) / high_count
                                - sum(kept[high_count:]) / (len(kept) - high_count)))

    squared = 0.0
    for n in range(count):
        for c in range(CLASSES):
            for h in range(height):
                for w in range(width):
                    weak_map = sum(float(weight[c, k]) * feature(weak, n, k, h, w) for k in range(3))
                    strong_map = sum(float(weight[c, k]) * feature(strong, n, k, h, w, mirrored=True)
                                     for k in range(3))
                    squared += (weak_map - strong_map) ** 2
    consistency = squared / (count * CLASSES * height * width)

    assert losses["labeled_loss"].item() == pytest.approx(labeled_loss, rel=1e-5)
    assert losses["rank_loss"].item() == pytest.approx(rank_loss, rel=1e-5, abs=1e-7)
    assert losses["consistency_loss"].item() == pytest.approx(consistency, rel=1e-5)
    total = labeled_loss + 2.0 * rank_loss + 0.5 * consistency
    assert losses["loss"].item() == pytest.approx(total, rel=1e-5)


def test_consistency_is_zero_when_the_strong_view_is_the_weak_one():
    # With features = the image, flipping the strong image and its maps back is the identity:
    # the same image in both views must give exactly zero, however asymmetric the image.
    method = stub_method(NoiseAwareOptions(), ramp=False)
    images = torch.randn(3, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    batch = TrainBatch(labeled_weak=images, labels=torch.tensor([0, 1, 2]), labeled_strong=images.clone())
    losses, _ = method.compute_losses(batch)
    assert losses["consistency_loss"].item() == 0.0
    # The mirror image as strong view is not aligned, so it is penalised.
    batch.labeled_strong = images.flip(-1)
    assert method.compute_losses(batch)[0]["consistency_loss"].item() > 0.1


# ------------------------------------------------------------------------------ clean split

PROBABILITIES = torch.tensor([[0.7, 0.1, 0.1, 0.1],
                              [0.2, 0.3, 0.4, 0.1],
                              [0.1, 0.6, 0.2, 0.1],
                              [0.4, 0.2, 0.2, 0.2]])
NOISY_LABELS = torch.tensor([0, 1, 1, 3])
# Class means of the predicted probabilities over every sample.
CLASS_MEANS = [(0.7 + 0.2 + 0.1 + 0.4) / 4, (0.1 + 0.3 + 0.6 + 0.2) / 4, 0.9 / 4, 0.5 / 4]


def test_clean_split_at_the_epoch_class_mean_threshold():
    method = stub_method(NoiseAwareOptions())
    # Before any update every sample counts as clean.
    assert method.clean_samples(PROBABILITIES, NOISY_LABELS).all()
    method.update_thresholds(method.threshold_statistics(PROBABILITIES, NOISY_LABELS), 1)
    torch.testing.assert_close(method.thresholds(), torch.tensor(CLASS_MEANS))
    # Own-label probability vs its class threshold: 0.7 > 0.35; 0.3 ≤ 0.3 (strict: noisy);
    # 0.6 > 0.3; 0.2 > 0.125.
    assert method.clean_samples(PROBABILITIES, NOISY_LABELS).tolist() == [True, False, True, True]


def test_clean_split_at_the_batch_class_mean_threshold():
    method = stub_method(NoiseAwareOptions(threshold_scope="batch"))
    assert method.thresholds() is None
    other = torch.tensor([[0.1, 0.1, 0.1, 0.7]] * 4)
    assert method.clean_samples(other, NOISY_LABELS).tolist() == [False, False, False, False]
    # The next batch's thresholds come from that batch alone.
    assert method.clean_samples(PROBABILITIES, NOISY_LABELS).tolist() == [True, False, True, True]


def test_clean_split_off_keeps_every_labeled_sample():
    method = stub_method(NoiseAwareOptions(clean_split=False))
    assert method.thresholds() is None
    clean = method.clean_samples(PROBABILITIES, torch.tensor([0, 1, -1, 3]))
    assert clean.tolist() == [True, True, False, True]


# ----------------------------------------------------------------------------- real backbone

def test_evaluation_model_is_the_plain_classifier():
    torch.manual_seed(0)
    method = NoiseAware(NoiseAwareOptions(), make_context())
    model = method.evaluation_model()
    assert not any(module is method.attention for module in model.modules())
    assert method.predict(torch.randn(2, 3, 32, 32)).shape == (2, CLASSES)


def noisy_pairs(generator: torch.Generator) -> TrainBatch:
    """6 labeled 64x64 noise images, the strong view 0.3 more noise away."""
    return random_batch(generator, labeled=6, size=64, strong_noise=0.3)


def test_state_dict_round_trip_reproduces_the_next_step():
    def update_thresholds(method: NoiseAware) -> None:
        probabilities = torch.softmax(torch.randn(8, CLASSES), 1)
        method.update_thresholds(method.threshold_statistics(probabilities, None), 1)

    generator = torch.Generator().manual_seed(1)
    method, resumed, result, resumed_result = resume_and_step(
        lambda: NoiseAware(NoiseAwareOptions(), make_context()), lambda: noisy_pairs(generator),
        before_save=update_thresholds)
    assert result.losses == resumed_result.losses
    for (name, left), (_, right) in zip(method.state_dict()["model"].items(),
                                        resumed.state_dict()["model"].items()):
        assert torch.equal(left, right), name
    assert torch.equal(method.attention[0].weight, resumed.attention[0].weight)
    torch.testing.assert_close(method.thresholds(), resumed.thresholds(), rtol=0, atol=0)


# --------------------------------------------------------------------------- learning checks

def score_on_blobs(flipped: float) -> float:
    """Held-out accuracy after 100 steps on 16 labeled blobs per class, a share `flipped` of them
    relabeled to another class, with a threshold pass every 20 steps."""
    def build(steps: int) -> NoiseAware:
        return NoiseAware(NoiseAwareOptions(), make_context(total_steps=steps))

    return train_and_score(build, seed=0, steps=100, labeled_per_class=16, flipped=flipped,
                           labeled_strong=True, thresholds=True)


@pytest.mark.slow
def test_learns_colour_blobs():
    # Seeds 0-5 reach 0.98, 0.88, 1.0, 0.995, 0.895, 0.99 (one thread); chance is 0.25.
    assert score_on_blobs(flipped=0.0) >= 0.6


@pytest.mark.slow
def test_learns_colour_blobs_with_30_percent_flipped_labels():
    # Seeds 0-5 reach 0.615, 0.785, 0.905, 0.565, 0.79, 0.905 (one thread); chance is 0.25.
    assert score_on_blobs(flipped=0.3) >= 0.45



# Gaussian clusters (tests/synthetic.py), 25 labeled points per class of which 40% carry another
# class's label, batches of 32 with the labeled strong view, 200 steps, thresholds every 20.
NOISY_CLUSTERS = dict(labeled_per_class=25, flipped=0.4, labeled_batch=32, labeled_strong=True,
                      use_unlabeled=False, steps=200, threshold_every=20)
NOISY_SEEDS = range(5)


def noisy_cluster_scores(method_class: type, **options) -> list[float]:
    build = cluster_method(method_class, steps=200, **options)
    return [cluster_accuracy(build, seed, **NOISY_CLUSTERS) for seed in NOISY_SEEDS]


def test_beats_plain_cross_entropy_on_the_same_noisy_labels():
    """Seeds 0-9 measured: noise-aware 0.87-0.99, plain CE (the supervised method, same network,
    optimizer and batches) 0.47-0.56, noise-aware with its split and consistency off 0.50-0.63."""
    full = noisy_cluster_scores(NoiseAware)
    plain = noisy_cluster_scores(Supervised)
    machinery_off = noisy_cluster_scores(NoiseAware, clean_split=False, consistency_weight=0.0)
    assert min(left - right for left, right in zip(full, plain)) >= 0.2, (full, plain)
    assert min(left - right for left, right in zip(full, machinery_off)) >= 0.15, (full, machinery_off)
    assert max(plain) < 0.7 <= min(full)


def test_the_clean_split_and_the_consistency_each_help():
    """Each part switched off alone, seeds 0-9: without the clean split 0.73-0.88 (paired loss
    against the full model 0.10-0.21), without the consistency 0.53-0.73 (0.25-0.40)."""
    full = noisy_cluster_scores(NoiseAware)
    for options in ({"clean_split": False}, {"consistency_weight": 0.0}):
        ablated = noisy_cluster_scores(NoiseAware, **options)
        losses = [left - right for left, right in zip(full, ablated)]
        assert sum(losses) / len(NOISY_SEEDS) >= 0.08, (options, losses)
        assert min(losses) > 0.0, (options, losses)
