"""The ABAW organisers' baseline: VGG16 with frozen convolutional weights, three trainable fully
connected layers and a softmax output, trained with cross-entropy on the labeled weak view.

Cost: one forward of the frozen convolutions without gradients, forward/backward through the three
FC layers only (less than one supervised pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vgg import VGG
from torch import nn

from pipeline.methods.base import (
    Method, MethodContext, StepResult, TrainBatch, build_optimizer, build_scheduler, cross_entropy,
    register_method,
)


@dataclass
class VggBaselineOptions:
    label_smoothing: float = 0.0
    freeze_features: bool = True
    """Keep the convolutional weights fixed ("fixed convolutional weights from a pre-trained
    checkpoint on VGGFACE dataset for feature extraction"); False fine-tunes the whole VGG."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")


@register_method
class VggBaseline(Method):
    name = "vgg_baseline"
    Options = VggBaselineOptions

    def __init__(self, options: VggBaselineOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.model = context.create_model()
        if not isinstance(self.model, VGG):
            raise ValueError(f"model.backbone: vgg_baseline needs a timm VGG (vgg11, vgg13, vgg16, vgg19 or "
                             f"their _bn variants), got {context.model.backbone!r}")
        # "the last three fully connected layers are trainable": timm's VGG keeps fc6 and fc7 (as
        # 7x7 and 1x1 convolutions) in `pre_logits` and fc8 in the head; the convolutions are `features`.
        if options.freeze_features:
            self.model.features.requires_grad_(False)
        self.optimizer = build_optimizer(self.model.parameters(), context.optimizer)
        self.scheduler = build_scheduler(self.optimizer, context.optimizer, context.total_steps)

    def train_step(self, batch: TrainBatch, step: int) -> StepResult:
        self.model.train()
        frozen = self.options.freeze_features
        if frozen:
            # Fixed weights are a fixed feature extractor: eval mode, so a _bn variant's running
            # statistics stay those of the checkpoint too.
            self.model.features.eval()
        with self.autocast():
            with torch.no_grad() if frozen else torch.enable_grad():
                features = self.model.forward_features(self.prepare(batch.labeled_weak))
            logits = self.model.forward_head(features)
        if self.options.label_smoothing:
            loss = nn.functional.cross_entropy(logits.float(), batch.labels,
                                               label_smoothing=self.options.label_smoothing)
        else:
            loss = cross_entropy(logits, batch.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return StepResult({"loss": loss.item(), "labeled_loss": loss.item()})

    def evaluation_model(self) -> nn.Module:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
