"""Fully supervised baseline (third paper): one network, cross-entropy on the labeled weak view.

It is also the reference every SSL method is compared against at equal backbone and steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.methods.base import (
    Method, MethodContext, StepResult, TrainBatch, build_optimizer, build_scheduler, cross_entropy,
    register_method,
)


@dataclass
class SupervisedOptions:
    label_smoothing: float = 0.0


@register_method
class Supervised(Method):
    name = "supervised"
    Options = SupervisedOptions

    def __init__(self, options: SupervisedOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.model = context.create_model()
        self.configure_model()
        self.optimizer = build_optimizer(self.model.parameters(), context.optimizer)
        self.scheduler = build_scheduler(self.optimizer, context.optimizer, context.total_steps)

    def configure_model(self) -> None:
        """Adjust the network before its optimizer is built (a subclass freezes layers here)."""

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def train_step(self, batch: TrainBatch, step: int) -> StepResult:
        self.model.train()
        with self.autocast():
            logits = self.logits(self.prepare(batch.labeled_weak))
        if self.options.label_smoothing:
            loss = nn.functional.cross_entropy(logits.float(), batch.labels,
                                               label_smoothing=self.options.label_smoothing)
        else:
            loss = cross_entropy(logits, batch.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return StepResult({"loss": loss.detach(), "labeled_loss": loss.detach()})

    def evaluation_model(self) -> nn.Module:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

