"""Every registered method honours the Method contract: one tiny step, predictions, thresholds,
and an exact state round-trip. Parametrized over the registry, so a new method is tested here
without anyone adding a test."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from pipeline.core.models import ModelConfig
from pipeline.core.thresholds import ClassStatistics
from pipeline.methods import METHODS, find_method
from pipeline.methods.base import MethodContext, OptimizerConfig, StepResult, TrainBatch

# Methods tied to one model family; every other method runs on timm's tiny test ResNet.
BACKBONE = {"vgg_baseline": "vgg11"}
SIZE = {"vgg_baseline": 32}
# A VGG, even vgg11 at 32 px, takes seconds a step on a CPU: its cases run with the slow tests.
METHOD_NAMES = [pytest.param(name, marks=pytest.mark.slow) if name in BACKBONE else name
                for name in sorted(METHODS)]


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    method_class = find_method(name)
    model = ModelConfig(backbone=BACKBONE.get(name, "test_resnet"), channels_last=False)
    context = MethodContext(model=model, optimizer=OptimizerConfig(lr=1e-3), total_steps=10)
    return method_class(method_class.Options(), context)


def make_batch(name: str, seed: int = 0) -> TrainBatch:
    generator = torch.Generator().manual_seed(seed)
    size = SIZE.get(name, 32)
    image = lambda count: torch.randn(count, 3, size, size, generator=generator)
    needs = find_method(name).views
    return TrainBatch(
        labeled_weak=image(8), labels=torch.arange(8) % 8,
        labeled_strong=image(8) if needs.labeled_strong else None,
        unlabeled_weak=image(16) if needs.unlabeled else None,
        unlabeled_strong=image(16) if needs.unlabeled_strong else None,
    )


def test_registry_holds_every_paper_method():
    assert {"supervised", "vgg_baseline", "dtm", "feedback", "mutexmatch", "noise_aware"} <= set(METHODS)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: .*supervised"):
        find_method("fixmatch2")


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_one_step_changes_the_evaluation_model(name):
    method = build(name)
    assert dataclasses.is_dataclass(method.Options)
    before = {key: value.clone() for key, value in method.evaluation_model().state_dict().items()}
    result = method.train_step(make_batch(name), step=0)
    assert isinstance(result, StepResult) and "loss" in result.losses
    assert all(torch.isfinite(torch.tensor(value)) for value in result.losses.values())
    after = method.evaluation_model().state_dict()
    assert any(not torch.equal(before[key], after[key]) for key in before if before[key].is_floating_point())
    probabilities = method.predict(make_batch(name).labeled_weak)
    assert probabilities.shape == (8, 8)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(8), atol=1e-5)
    if result.accepted is not None:
        assert result.accepted.shape == (8,) and result.candidates > 0


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_thresholds_follow_the_interface(name):
    method = build(name)
    probabilities = torch.softmax(torch.randn(12, 8), dim=1)
    labels = torch.arange(12) % 8
    thresholds = method.thresholds()
    statistics = method.threshold_statistics(probabilities, labels)
    if thresholds is None:
        assert statistics is None
        return
    assert thresholds.shape == (8,)
    assert isinstance(statistics, ClassStatistics)
    method.update_thresholds(statistics, epoch=1)
    assert method.thresholds().shape == (8,)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_state_round_trip_reproduces_the_next_step(name):
    method = build(name)
    method.train_step(make_batch(name, seed=1), step=0)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    twin = build(name, seed=123)  # different initial weights: everything must come from the state
    twin.load_state_dict(state)
    torch.manual_seed(7)
    expected = method.train_step(make_batch(name, seed=2), step=1).losses
    torch.manual_seed(7)
    actual = twin.train_step(make_batch(name, seed=2), step=1).losses
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
