"""The DTM method (ABAW5): every equation against a hand computation, network B, the thresholds, the
state round-trip, and a mini learning check on synthetic colour blobs."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from pipeline.methods.base import OptimizerConfig, TrainBatch
from pipeline.methods.dtm import DynamicThresholdOptions, DynamicThresholdSSL

from synthetic import (CLASSES, FixedLogits, accuracy, build_method, cluster_method,
                       colour_blob_batch, colour_blob_problem, save_and_load, seeded_batch, train,
                       with_and_without_unlabeled)

# DTM on the test ResNet (Adam, lr 1e-3); batches of 8 labeled and 12 unlabeled noise images.
build = partial(build_method, DynamicThresholdSSL)
random_batch = partial(seeded_batch, unlabeled=12)


# Hand-made probabilities of 4 unlabeled samples. P̃ = (P_w + P_s)/2 row by row:
# [0.8, .075, .065, .06] ŷ=0; [.15, 0.7, .075, .075] ŷ=1; [.25, .1, 0.55, .1] ŷ=2;
# [.175, .175, .175, .475] ŷ=3.
WEAK = torch.tensor([[0.9, 0.05, 0.03, 0.02], [0.2, 0.6, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1],
                     [0.25, 0.25, 0.25, 0.25]])
STRONG = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.8, 0.05, 0.05], [0.4, 0.1, 0.4, 0.1],
                       [0.1, 0.1, 0.1, 0.7]])
# τ = [0.75, 0.72, 0.5, 0.6]: 0.8 > 0.75 kept, 0.7 < 0.72 rejected, 0.55 > 0.5 kept, 0.475 < 0.6 rejected.
THRESHOLDS = torch.tensor([0.75, 0.72, 0.5, 0.6], dtype=torch.float64)
LABELED_LOGITS = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.3, -0.2, 1.0, 0.4]])
LABELS = torch.tensor([0, 3])


def stub_step(unlabeled_loss: str):
    logits = torch.cat([LABELED_LOGITS, WEAK.log(), STRONG.log()])  # softmax(log P) = P
    stub = FixedLogits(logits)
    method = build([stub], unlabeled_loss=unlabeled_loss)
    method.threshold.load_state_dict({"thresholds": THRESHOLDS, "updates": 0})
    images = torch.zeros(2 + 8, 3, 4, 4)
    batch = TrainBatch(labeled_weak=images[:2], labels=LABELS, unlabeled_weak=images[2:6],
                       unlabeled_strong=images[6:])
    return method, stub, method.train_step(batch, step=0)


@pytest.mark.parametrize("unlabeled_loss", ["average", "stop_gradient"])
def test_views_average_threshold_mask_and_losses_by_hand(unlabeled_loss):
    method, stub, result = stub_step(unlabeled_loss)
    assert method.model is stub  # the method reaches its network only through self.model

    assert result.accepted.tolist() == [1, 0, 1, 0]
    assert result.candidates == 4
    assert result.losses["mask_rate"] == pytest.approx(0.5)
    labeled = -(LABELED_LOGITS.log_softmax(dim=1)[0, 0] + LABELED_LOGITS.log_softmax(dim=1)[1, 3]) / 2
    assert result.losses["labeled_loss"] == pytest.approx(labeled.item(), rel=1e-6)
    if unlabeled_loss == "average":
        unlabeled = -(math.log(0.8) + math.log(0.55)) / 4  # -log P̃_ŷ over kept samples / batch size
    else:
        unlabeled = -(math.log(0.7) + math.log(0.4)) / 4  # -log P_s,ŷ with ŷ from the detached P̃
    assert result.losses["unlabeled_loss"] == pytest.approx(unlabeled, rel=1e-5)
    assert result.losses["loss"] == pytest.approx(labeled.item() + 0.8 * unlabeled, rel=1e-5)


def test_average_sends_gradient_through_both_views():
    _, stub, _ = stub_step("average")
    weak_gradient, strong_gradient = stub.logits.grad[2:6], stub.logits.grad[6:]
    # d(-log P̃_ŷ)/dz_w = -(P_w,ŷ / (2 P̃_ŷ))·(e_ŷ - P_w), times λ2 / batch size; kept row 0, ŷ = 0.
    expected = -(0.9 / (2 * 0.8)) * (torch.tensor([1.0, 0, 0, 0]) - WEAK[0]) * 0.8 / 4
    assert torch.allclose(weak_gradient[0], expected, atol=1e-6)
    assert weak_gradient[[0, 2]].abs().sum(dim=1).gt(0).all()
    assert strong_gradient[[0, 2]].abs().sum(dim=1).gt(0).all()
    assert weak_gradient[[1, 3]].abs().sum() == 0 and strong_gradient[[1, 3]].abs().sum() == 0  # rejected


def test_stop_gradient_leaves_the_weak_view_alone():
    _, stub, _ = stub_step("stop_gradient")
    weak_gradient, strong_gradient = stub.logits.grad[2:6], stub.logits.grad[6:]
    assert weak_gradient.abs().sum() == 0
    # dCE(ŷ, z_s)/dz_s = P_s - e_ŷ, times λ2 / batch size, for kept row 2 (ŷ = 2).
    expected = (STRONG[2] - torch.tensor([0, 0, 1.0, 0])) * 0.8 / 4
    assert torch.allclose(strong_gradient[2], expected, atol=1e-6)
    assert strong_gradient[[1, 3]].abs().sum() == 0


def test_network_b_is_the_moving_average_of_a():
    method = build(ema_decay=0.9)
    assert method.ema.model is not method.model
    ema_before = {name: value.detach().clone() for name, value in method.ema.model.named_parameters()}
    method.train_step(random_batch(seed=0), step=0)
    model_after = dict(method.model.named_parameters())
    changed = 0
    for name, ema_after in method.ema.model.named_parameters():
        # ema = decay·ema + (1 - decay)·A after the optimizer step.
        expected = 0.9 * ema_before[name] + 0.1 * model_after[name].detach()
        assert torch.allclose(ema_after, expected, atol=1e-7), name
        changed += not torch.equal(ema_after, ema_before[name])
    assert changed > 0
    assert method.evaluation_model() is method.ema.model
    plain = build(evaluate_ema=False)
    assert plain.evaluation_model() is plain.model


def test_thresholds_come_from_network_b_and_follow_the_moving_average():
    method = build(threshold_momentum=0.9, initial_threshold=0.8)
    assert method.threshold_model() is method.ema.model
    assert torch.allclose(method.thresholds(), torch.full((CLASSES,), 0.8))
    probabilities = torch.tensor([
        [0.9, 0.05, 0.03, 0.02],   # class 0, correct, p = 0.9
        [0.5, 0.2, 0.2, 0.1],      # class 0, correct, p = 0.5
        [0.1, 0.6, 0.2, 0.1],      # class 1, correct, p = 0.6
        [0.1, 0.2, 0.6, 0.1],      # class 1, wrong: ignored
        [0.7, 0.1, 0.1, 0.1],      # class 2, wrong: class 2 has no correct prediction
        [0.1, 0.1, 0.1, 0.7],      # label -1: ignored
    ])
    labels = torch.tensor([0, 0, 1, 1, 2, -1])
    method.update_thresholds(method.threshold_statistics(probabilities, labels), epoch=1)
    # τ_c = 0.9·0.8 + 0.1·mean: class 0 mean 0.7, class 1 mean 0.6; classes 2 and 3 keep 0.8.
    expected = torch.tensor([0.72 + 0.07, 0.72 + 0.06, 0.8, 0.8])
    assert torch.allclose(method.thresholds(), expected, atol=1e-6)
    method.update_thresholds(method.threshold_statistics(probabilities, labels), epoch=2)
    assert method.thresholds()[0].item() == pytest.approx(0.9 * 0.79 + 0.1 * 0.7, abs=1e-6)


def test_a_step_without_unlabeled_images_is_supervised():
    method = build()
    batch = random_batch(seed=0)
    batch.unlabeled_weak = batch.unlabeled_strong = None
    result = method.train_step(batch, step=0)
    assert result.candidates == 0 and result.losses["unlabeled_loss"] == 0.0
    assert result.losses["loss"] == pytest.approx(result.losses["labeled_loss"])


def test_options_fail_loudly():
    with pytest.raises(ValueError, match="unlabeled_loss"):
        DynamicThresholdOptions(unlabeled_loss="fixmatch")
    with pytest.raises(ValueError, match="ema_decay"):
        DynamicThresholdOptions(ema_decay=1.5)


@pytest.mark.parametrize("unlabeled_loss", ["average", "stop_gradient"])
def test_state_round_trip_reproduces_the_next_step(unlabeled_loss):
    options = dict(unlabeled_loss=unlabeled_loss, initial_threshold=0.3, ema_decay=0.9)
    method = build(**options)
    method.train_step(random_batch(seed=1), step=0)
    probabilities = torch.softmax(torch.randn(16, CLASSES), dim=1)
    method.update_thresholds(method.threshold_statistics(probabilities, probabilities.argmax(dim=1)), epoch=1)
    state = save_and_load(method.state_dict())

    twin = build(seed=99, **options)
    twin.load_state_dict(state)
    assert torch.equal(twin.thresholds(), method.thresholds())
    expected = method.train_step(random_batch(seed=2), step=1)
    actual = twin.train_step(random_batch(seed=2), step=1)
    assert actual.losses == expected.losses
    assert torch.equal(actual.accepted, expected.accepted)
    for network, twin_network in ((method.model, twin.model), (method.ema.model, twin.ema.model)):
        twin_state = twin_network.state_dict()
        for name, value in network.state_dict().items():
            assert torch.equal(value, twin_state[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("unlabeled_loss", ["average", "stop_gradient"])
def test_learns_a_tiny_problem_and_accepts_pseudo_labels(unlabeled_loss):
    """Seeds 0-5 reached 0.79-0.99 (average) and 0.85-0.99 (stop_gradient) held-out accuracy
    (chance 0.25) in 80 steps; 0.6 leaves room."""
    steps, epoch_steps = 80, 20
    generator = torch.Generator().manual_seed(0)
    problem = colour_blob_problem(generator)
    # B is an EMA with decay 0.95 here: the paper's 0.999 would leave it near its random start in 80 steps.
    method = build(optimizer=OptimizerConfig(lr=3e-3), total_steps=steps, ema_decay=0.95,
                   unlabeled_loss=unlabeled_loss)

    def update_thresholds(epoch: int) -> None:  # the loop's once-per-epoch DTM update, B on the labeled set
        network = method.threshold_model().eval()
        with torch.no_grad():
            probabilities = network(problem.labeled).softmax(dim=1)
        method.update_thresholds(method.threshold_statistics(probabilities, problem.labels), epoch=epoch)

    results = train(method, steps, lambda: colour_blob_batch(problem, generator), update_thresholds,
                    epoch_steps)
    accepted = [int(result.accepted.sum()) for result in results]
    assert accuracy(method, problem.test_images, problem.test_labels) >= 0.6
    assert sum(accepted[-epoch_steps:]) > 0
    assert not torch.allclose(method.thresholds(), torch.full((CLASSES,), 0.8))


SEEDS = range(5)


@pytest.mark.parametrize("unlabeled_loss", ["average", "stop_gradient"])
def test_unlabeled_data_beats_the_same_run_without_it(unlabeled_loss):
    """Two labels per class on Gaussian clusters (tests/synthetic.py): DTM against itself with the
    unlabeled batch switched off, same seeds, steps and labeled batches. Seeds 0-9 measured:
    control 0.64-0.77, average 0.70-0.97 (paired gain 0.06-0.26, mean 0.19), stop_gradient
    0.83-0.98 (gain 0.18-0.27, mean 0.22). The labels alone never reach 0.8."""
    build = cluster_method(DynamicThresholdSSL, ema_decay=0.9, unlabeled_loss=unlabeled_loss)
    with_unlabeled, without, gains = with_and_without_unlabeled(build, SEEDS)
    assert max(without) < 0.8
    assert sum(with_unlabeled) / len(SEEDS) >= 0.85
    assert sum(gains) / len(SEEDS) >= 0.12, gains
    assert min(gains) > 0.0, gains
