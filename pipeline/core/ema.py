"""The exponential moving average of a network's weights: the ABAW5 paper's network B (decay 0.999).

Pure torch; accepts DDP- or compile-wrapped models and keeps the memory format of the copy.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel (`.module`) or torch.compile
    (`._orig_mod`), so the EMA copy and its state_dict keys never carry a wrapper's prefix."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class ModelEMA:
    """ema = decay·ema + (1 - decay)·param after each optimizer step; buffers are copied.

    Buffers (BatchNorm running mean/var, num_batches_tracked) are copied, not averaged: they are
    already running averages of recent batches, and the SSL reference code the papers build on
    (FixMatch, MutexMatch's `_eval_model_update`) copies them the same way. Non-floating parameters
    are copied too. The copy lives on the device the model was on when the EMA was made: build the
    EMA after moving the model.

    `decay_warmup=True` uses min(decay, (1 + step)/(10 + step)) so early averages are not dominated
    by the random initial weights; it is off by default because the paper states a plain 0.999.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, decay_warmup: bool = False) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.decay_warmup = bool(decay_warmup)
        self.updates = 0
        self.model = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next `update` will use."""
        if not self.decay_warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        source = unwrap_model(model)
        averaged: list[torch.Tensor] = []
        latest: list[torch.Tensor] = []
        for ema_parameter, parameter in _paired(
                self.model.named_parameters(), source.named_parameters(), "parameter"):
            if ema_parameter.is_floating_point():
                averaged.append(ema_parameter)
                latest.append(parameter.detach())
            else:
                ema_parameter.copy_(parameter)
        if averaged:
            # In place, so the copy keeps its own memory format (channels_last stays channels_last).
            torch._foreach_mul_(averaged, decay)
            torch._foreach_add_(averaged, latest, alpha=1.0 - decay)
        for ema_buffer, buffer in _paired(self.model.named_buffers(), source.named_buffers(), "buffer"):
            ema_buffer.copy_(buffer)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"model", "updates"}:
            raise ValueError(f"ModelEMA state must have keys ['model', 'updates'], got {sorted(state)}")
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def _paired(ema_items: Iterable[tuple[str, torch.Tensor]], source_items: Iterable[tuple[str, torch.Tensor]],
            kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(EMA tensor, model tensor) pairs from two named_parameters()/named_buffers(), matched by name."""
    ema_items, source_items = list(ema_items), list(source_items)
    if [name for name, _ in ema_items] != [name for name, _ in source_items]:
        raise ValueError(f"the model's {kind}s do not match the EMA copy's: is it the same architecture?")
    return [(ema_tensor, tensor) for (_, ema_tensor), (_, tensor) in zip(ema_items, source_items)]
