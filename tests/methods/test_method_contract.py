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
# The paper recipes train in bf16 (autocast, on the CPU too), so every method's step also runs in
# bf16, except the VGG baseline's: its autocast path is the supervised method's (tested here), and
# a VGG in bf16 on a CPU takes minutes a step.
PRECISIONS = [pytest.param(name, precision, id=f"{name}-{precision}",
                           marks=[pytest.mark.slow] if name in BACKBONE else [])
              for name in sorted(METHODS) for precision in ("fp32", "bf16")
              if not (name in BACKBONE and precision == "bf16")]


def build(name: str, seed: int = 0, precision: str = "fp32"):
    torch.manual_seed(seed)
    method_class = find_method(name)
    model = ModelConfig(backbone=BACKBONE.get(name, "test_resnet"), channels_last=False)
    context = MethodContext(model=model, optimizer=OptimizerConfig(lr=1e-3), total_steps=10,
                            precision=precision)
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


@pytest.mark.parametrize("name, precision", PRECISIONS)
def test_one_step_changes_the_evaluation_model(name, precision):
    method = build(name, precision=precision)
    assert dataclasses.is_dataclass(method.Options)
    # Parameters, not the state dict: BatchNorm buffers move on any forward pass, so a step whose
    # optimizer never ran would still change the state dict.
    evaluated = dict(method.evaluation_model().named_parameters())
    before = {key: value.detach().clone() for key, value in evaluated.items()}
    optimizers = [value for value in vars(method).values() if isinstance(value, torch.optim.Optimizer)]
    trained = [[parameter for group in optimizer.param_groups for parameter in group["params"]]
               for optimizer in optimizers]
    trained_before = [[parameter.detach().clone() for parameter in group] for group in trained]
    result = method.train_step(make_batch(name), step=0)
    assert isinstance(result, StepResult) and "loss" in result.losses
    assert all(torch.isfinite(torch.tensor(value)) for value in result.losses.values())
    assert any(not torch.equal(before[key], value) for key, value in evaluated.items())
    # Every optimizer the method owns moved some of its parameters (a teacher and a student both).
    assert len(optimizers) >= 1
    assert [any(not torch.equal(old, new) for old, new in zip(olds, news))
            for olds, news in zip(trained_before, trained)] == [True] * len(optimizers)
    probabilities = method.predict(make_batch(name).labeled_weak)
    assert probabilities.shape == (8, 8)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(8), atol=1e-5)
    # Methods that learn from unlabeled images say which pseudo label each of the 16 got and which
    # were accepted (what the trainer scores against hidden labels); the others say nothing.
    uses_unlabeled = find_method(name).views.unlabeled
    shape = lambda tensor: None if tensor is None else tuple(tensor.shape)
    assert shape(result.pseudo_labels) == ((16,) if uses_unlabeled else None)
    assert shape(result.accepted_mask) == ((16,) if uses_unlabeled else None)
    assert shape(result.accepted) == ((8,) if uses_unlabeled else None)
    assert result.candidates == (16 if uses_unlabeled else 0)


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


@pytest.mark.parametrize("name, precision", PRECISIONS)
def test_state_round_trip_reproduces_the_next_step(name, precision):
    method = build(name, precision=precision)
    method.train_step(make_batch(name, seed=1), step=0)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    twin = build(name, seed=123, precision=precision)  # different initial weights: everything must come from the state
    twin.load_state_dict(state)
    torch.manual_seed(7)
    expected = method.train_step(make_batch(name, seed=2), step=1).losses
    torch.manual_seed(7)
    actual = twin.train_step(make_batch(name, seed=2), step=1).losses
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
