"""VGG baseline: only the three FC layers train, the frozen convolutions stay fixed and in eval mode,
a non-VGG backbone is refused; exact resume; a mini learning check on synthetic blobs."""

from __future__ import annotations

import pytest
import torch
from timm.models.vgg import VGG
from torch import nn

from pipeline.methods.base import MethodContext, OptimizerConfig, find_method
from pipeline.methods.vgg_baseline import VggBaseline, VggBaselineOptions

from synthetic import CLASSES, make_context, random_batch, resume_and_step, train_and_score


class TinyVggContext(MethodContext):
    """A timm VGG small enough for CPU tests: three conv blocks and a 64-wide fc6 (fc7 stays 4096
    wide, as timm fixes it), through the same VGG class, head and 7x7 fc6 as vgg16."""

    def create_model(self, config=None) -> nn.Module:
        return VGG(cfg=[16, "M", 32, "M", 64, "M"], mlp_ratio=1 / 64, num_classes=self.num_classes)


def tiny_context(total_steps: int = 100) -> MethodContext:
    return make_context("tiny_vgg", total_steps, lr=3e-4, context_class=TinyVggContext)


FC_LAYERS = ("pre_logits.fc1.", "pre_logits.fc2.", "head.fc.")


def test_registered_with_labeled_weak_only():
    assert find_method("vgg_baseline") is VggBaseline
    views = VggBaseline.views
    assert not (views.labeled_strong or views.unlabeled or views.unlabeled_strong)


@pytest.mark.slow
def test_vgg16_trains_exactly_its_three_fc_layers_at_32_pixels():
    torch.manual_seed(0)
    context = make_context("vgg16", total_steps=10, optimizer=OptimizerConfig())
    method = VggBaseline(VggBaselineOptions(), context)
    trainable = {name for name, parameter in method.model.named_parameters() if parameter.requires_grad}
    assert trainable == {prefix + suffix for prefix in FC_LAYERS for suffix in ("weight", "bias")}
    optimised = {id(parameter) for group in method.optimizer.param_groups for parameter in group["params"]}
    assert optimised == {id(parameter) for parameter in method.model.parameters() if parameter.requires_grad}
    # timm's fc6 is a 7x7 convolution that average-pools smaller maps up to 7x7, so 32 px works.
    assert method.predict(torch.randn(2, 3, 32, 32)).shape == (2, CLASSES)


def test_steps_move_the_fc_layers_and_leave_the_convolutions():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    method = VggBaseline(VggBaselineOptions(), tiny_context())
    before = {name: value.clone() for name, value in method.model.state_dict().items()}
    for step in range(3):
        result = method.train_step(random_batch(generator), step)
    assert not method.model.features.training and method.model.pre_logits.training
    assert result.losses["loss"] == result.losses["labeled_loss"]
    for name, value in method.model.state_dict().items():
        if name.startswith("features."):
            assert torch.equal(value, before[name]), name
        else:
            assert name.startswith(FC_LAYERS)
            assert not torch.equal(value, before[name]), name


def test_unfrozen_features_train_too():
    torch.manual_seed(0)
    method = VggBaseline(VggBaselineOptions(freeze_features=False), tiny_context())
    before = method.model.features[0].weight.clone()
    method.train_step(random_batch(torch.Generator().manual_seed(0)), 0)
    assert method.model.features.training
    assert not torch.equal(method.model.features[0].weight, before)


def test_label_smoothing_is_the_smoothed_cross_entropy():
    torch.manual_seed(0)
    method = VggBaseline(VggBaselineOptions(label_smoothing=0.1), tiny_context())
    batch = random_batch(torch.Generator().manual_seed(0))
    method.model.eval()
    with torch.no_grad():
        logits = method.model(batch.labeled_weak)
    # Cross-entropy against targets 0.9 on the label + 0.1/C on every class, by hand.
    targets = torch.full((len(batch.labels), CLASSES), 0.1 / CLASSES)
    targets[torch.arange(len(batch.labels)), batch.labels] += 0.9
    expected = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean().item()
    # The tiny VGG has no dropout, so train mode gives the same logits as eval mode.
    assert method.train_step(batch, 0).losses["loss"] == pytest.approx(expected, rel=1e-5)


def test_a_backbone_that_is_not_vgg_is_refused():
    context = make_context(total_steps=10, optimizer=OptimizerConfig())
    with pytest.raises(ValueError, match=r"model\.backbone.*'test_resnet'"):
        VggBaseline(VggBaselineOptions(), context)


def test_state_dict_round_trip_reproduces_the_next_step():
    generator = torch.Generator().manual_seed(1)
    method, resumed, result, resumed_result = resume_and_step(
        lambda: VggBaseline(VggBaselineOptions(), tiny_context()), lambda: random_batch(generator))
    assert result.losses == resumed_result.losses
    for (name, left), (_, right) in zip(method.model.state_dict().items(),
                                        resumed.model.state_dict().items()):
        assert torch.equal(left, right), name


# --------------------------------------------------------------------------- learning check

@pytest.mark.slow
def test_learns_colour_blobs_on_frozen_convolutions():
    # Seeds 0-5 reach 0.815, 0.85, 0.86, 0.82, 0.735, 0.585 (one thread); chance is 0.25.
    # The FC layers on frozen random convolutions, 150 steps on 8 labeled blobs per class.
    def build(steps: int) -> VggBaseline:
        return VggBaseline(VggBaselineOptions(), tiny_context(total_steps=steps))

    assert train_and_score(build, seed=0, steps=150) >= 0.45
