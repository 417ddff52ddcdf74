"""ModelEMA: the update by hand, copied buffers, no gradients, wrapper unwrapping and state."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from pipeline.core.ema import ModelEMA, unwrap_model


class FakeDistributed(nn.Module):
    """Stands in for DistributedDataParallel: the real model sits at `.module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.module(inputs)


def two_parameter_model(weight: float, bias: float) -> nn.Linear:
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(weight)
        model.bias.fill_(bias)
    return model


def set_weights(model: nn.Linear, weight: float, bias: float) -> None:
    with torch.no_grad():
        model.weight.fill_(weight)
        model.bias.fill_(bias)


def test_one_update_by_hand():
    model = two_parameter_model(weight=1.0, bias=0.0)
    ema = ModelEMA(model, decay=0.9)
    set_weights(model, weight=3.0, bias=2.0)
    ema.update(model)
    # weight: 0.9·1 + 0.1·3 = 1.2; bias: 0.9·0 + 0.1·2 = 0.2
    assert ema.model.weight.item() == pytest.approx(1.2)
    assert ema.model.bias.item() == pytest.approx(0.2)
    ema.update(model)
    # weight: 0.9·1.2 + 0.1·3 = 1.38; bias: 0.9·0.2 + 0.1·2 = 0.38
    assert ema.model.weight.item() == pytest.approx(1.38)
    assert ema.model.bias.item() == pytest.approx(0.38)
    assert ema.updates == 2


def test_default_decay_is_the_papers():
    model = two_parameter_model(weight=1.0, bias=0.0)
    ema = ModelEMA(model)
    set_weights(model, weight=3.0, bias=2.0)
    ema.update(model)
    # 0.999·1 + 0.001·3 = 1.002; 0.999·0 + 0.001·2 = 0.002
    assert ema.decay == 0.999 and not ema.decay_warmup
    assert ema.model.weight.item() == pytest.approx(1.002)
    assert ema.model.bias.item() == pytest.approx(0.002)


def test_decay_warmup():
    model = two_parameter_model(weight=1.0, bias=0.0)
    ema = ModelEMA(model, decay=0.999, decay_warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)  # min(0.999, (1+0)/(10+0))
    set_weights(model, weight=3.0, bias=2.0)
    ema.update(model)
    # 0.1·1 + 0.9·3 = 2.8
    assert ema.model.weight.item() == pytest.approx(2.8)
    assert ema.current_decay() == pytest.approx(2 / 11)  # (1+1)/(10+1)
    ema.updates = 10_000
    assert ema.current_decay() == 0.999  # 10001/10010 = 0.99910 > 0.999


def test_buffers_are_copied_not_averaged():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9)
    model.train()
    model(torch.randn(16, 2, generator=torch.Generator().manual_seed(0)) * 5 + 3)
    ema.update(model)
    assert torch.equal(ema.model[1].running_mean, model[1].running_mean)
    assert torch.equal(ema.model[1].running_var, model[1].running_var)
    assert ema.model[1].num_batches_tracked.item() == 1


def test_ema_model_gets_no_gradients():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model)
    assert not ema.model.training
    assert all(not parameter.requires_grad for parameter in ema.model.parameters())
    assert all(parameter.requires_grad for parameter in model.parameters())
    inputs = torch.randn(4, 3)
    model(inputs).sum().backward()
    ema.update(model)
    assert all(parameter.grad is None for parameter in ema.model.parameters())
    assert not ema.model(inputs).requires_grad


def test_wrapped_model_is_unwrapped():
    model = two_parameter_model(weight=1.0, bias=0.0)
    wrapped = FakeDistributed(model)
    assert unwrap_model(wrapped) is model
    ema = ModelEMA(wrapped, decay=0.5)
    assert not isinstance(ema.model, FakeDistributed)
    assert set(ema.model.state_dict()) == {"weight", "bias"}
    set_weights(model, weight=3.0, bias=2.0)
    ema.update(wrapped)
    # 0.5·1 + 0.5·3 = 2; 0.5·0 + 0.5·2 = 1
    assert ema.model.weight.item() == pytest.approx(2.0)
    assert ema.model.bias.item() == pytest.approx(1.0)
    ema.update(model)
    # Same model seen without its wrapper: 0.5·2 + 0.5·3 = 2.5
    assert ema.model.weight.item() == pytest.approx(2.5)


def test_channels_last_is_kept():
    model = nn.Conv2d(3, 4, kernel_size=3).to(memory_format=torch.channels_last)
    ema = ModelEMA(model, decay=0.5)
    start = ema.model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    # 0.5·w + 0.5·(w + 1) = w + 0.5
    torch.testing.assert_close(ema.model.weight, start + 0.5)
    assert ema.model.weight.is_contiguous(memory_format=torch.channels_last)


def test_state_round_trip():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9)
    model.train()
    model(torch.randn(8, 2))
    ema.update(model)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = ModelEMA(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), decay=0.9)
    restored.load_state_dict(state)
    assert restored.updates == 1
    for name, value in ema.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], value), name
    with pytest.raises(ValueError, match="keys"):
        restored.load_state_dict({"model": state["model"]})


def test_mismatched_model_is_an_error():
    ema = ModelEMA(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="same architecture"):
        ema.update(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(nn.Linear(2, 2), decay=1.5)
