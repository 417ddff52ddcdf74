"""Semi-supervised learning with the Dynamic Threshold Module (ABAW5 paper, seeds 000/004): network A
learns from labeled images and from the unlabeled images whose averaged weak/strong prediction clears
a per-class threshold that network B, the EMA of A, sets once per epoch.

Cost of a step with B labeled and U unlabeled images: one forward and one backward of A over
B + 2U images (3B at unlabeled_ratio 1, i.e. 3x a supervised step) and the EMA update (no pass);
once per epoch B predicts the labeled set (forward only, run by the training loop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.core.ema import ModelEMA
from pipeline.core.thresholds import (ClassStatistics, DynamicThresholdModule, acceptance_histogram,
                                      class_statistics_correct, select_pseudo_labels)
from pipeline.methods.base import (Method, MethodContext, StepResult, TrainBatch, Views, build_optimizer,
                                   build_scheduler, cross_entropy, register_method)

UNLABELED_LOSSES = ("average", "stop_gradient")


@dataclass
class DynamicThresholdOptions:
    ema_decay: float = 0.999
    """Decay of network B, the EMA of network A (paper: 0.999)."""
    labeled_weight: float = 1.0
    """λ1, the weight of the labeled loss L_l (paper: 1)."""
    unlabeled_weight: float = 0.8
    """λ2, the weight of the unlabeled loss L_u (paper: 0.8)."""
    threshold_momentum: float = 0.9
    """µ in τ_c^t = µ·τ_c^(t-1) + (1-µ)·τ_c (paper: 0.9)."""
    initial_threshold: float = 0.8
    """τ^0 of every class before the first update (the paper gives none; Ada-CM starts at 0.8)."""
    unlabeled_loss: str = "average"
    """average: the paper's L_u = CE(ŷ, P̃), gradient through both views via P̃. stop_gradient:
    pseudo label and mask from the detached P̃, cross-entropy on the strong view's logits only."""
    evaluate_ema: bool = True
    """Validate and predict with network B (True) or with network A (False)."""

    def __post_init__(self) -> None:
        if self.unlabeled_loss not in UNLABELED_LOSSES:
            raise ValueError(f"unlabeled_loss must be one of {UNLABELED_LOSSES}, got {self.unlabeled_loss!r}")
        for name in ("ema_decay", "threshold_momentum", "initial_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("labeled_weight", "unlabeled_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@register_method
class DynamicThresholdSSL(Method):
    name = "dtm"
    Options = DynamicThresholdOptions
    views = Views(unlabeled=True, unlabeled_strong=True)

    def __init__(self, options: DynamicThresholdOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.model = context.create_model()
        self.ema = ModelEMA(self.model, decay=options.ema_decay)
        self.optimizer = build_optimizer(self.model.parameters(), context.optimizer)
        self.scheduler = build_scheduler(self.optimizer, context.optimizer, context.total_steps)
        self.threshold = DynamicThresholdModule(num_classes=context.num_classes,
                                                momentum=options.threshold_momentum,
                                                initial=options.initial_threshold).to(context.device)

    def train_step(self, batch: TrainBatch, step: int) -> StepResult:
        self.model.train()
        labeled_count = batch.labels.shape[0]
        has_unlabeled = batch.unlabeled_weak is not None and batch.unlabeled_strong is not None
        images = [batch.labeled_weak]
        if has_unlabeled:
            images += [batch.unlabeled_weak, batch.unlabeled_strong]
        # One pass over [x_l, WA(x_u), SA(x_u)] so every view is normalised by the same BatchNorm
        # statistics, as FixMatch does.
        with self.autocast():
            logits = self.model(self.prepare(torch.cat(images))).float()

        # L_l = CE(y_l, A(WA(x_l))), eq. (10).
        labeled_loss = cross_entropy(logits[:labeled_count], batch.labels)
        if has_unlabeled:
            unlabeled_count = batch.unlabeled_weak.shape[0]
            weak_logits, strong_logits = logits[labeled_count:].split(
                [unlabeled_count, batch.unlabeled_strong.shape[0]])
            # P̃ = (P_w + P_s) / 2, eq. (4), in log space so -log P̃ stays finite for tiny probabilities.
            log_average = torch.logsumexp(
                torch.stack([weak_logits.log_softmax(dim=1), strong_logits.log_softmax(dim=1)]), dim=0
            ) - math.log(2.0)
            # ŷ = argmax P̃, kept when max P̃ > τ_ŷ, eq. (5); labels and mask carry no gradient.
            pseudo = select_pseudo_labels(log_average.exp(), self.threshold.thresholds,
                                          inclusive=self.acceptance_inclusive)
            if self.options.unlabeled_loss == "average":
                # L_u = CE(ŷ, P̃), eq. (11): -log P̃_ŷ, whose gradient reaches both views.
                losses = nn.functional.nll_loss(log_average, pseudo.labels, reduction="none")
                unlabeled_loss = (losses * pseudo.mask.float()).sum() / unlabeled_count
            else:
                unlabeled_loss = cross_entropy(strong_logits, pseudo.labels, pseudo.mask)
            accepted = acceptance_histogram(pseudo.labels, pseudo.mask, self.num_classes)
            mask_rate = pseudo.mask.float().mean()
            pseudo_labels, accepted_mask = pseudo.labels, pseudo.mask
        else:
            unlabeled_count, unlabeled_loss, mask_rate = 0, logits.new_zeros(()), logits.new_zeros(())
            accepted = torch.zeros(self.num_classes, dtype=torch.int64, device=logits.device)
            pseudo_labels = accepted_mask = None

        # L = λ1·L_l + λ2·L_u, eq. (12).
        loss = self.options.labeled_weight * labeled_loss + self.options.unlabeled_weight * unlabeled_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        return StepResult(
            {"loss": loss.detach(), "labeled_loss": labeled_loss.detach(),
             "unlabeled_loss": unlabeled_loss.detach(), "mask_rate": mask_rate},
            accepted=accepted, candidates=unlabeled_count, pseudo_labels=pseudo_labels,
            accepted_mask=accepted_mask)

    def evaluation_model(self) -> nn.Module:
        return self.ema.model if self.options.evaluate_ema else self.model

    def threshold_model(self) -> nn.Module:
        # "We utilize the network B to extract ... probability distributions of the labeled data", eq. (6).
        return self.ema.model

    def threshold_statistics(self, probabilities: torch.Tensor, labels: torch.Tensor) -> ClassStatistics:
        return class_statistics_correct(probabilities, labels)

    def update_thresholds(self, statistics: ClassStatistics, epoch: int) -> None:
        self.threshold.update(statistics, epoch)

    def thresholds(self) -> torch.Tensor:
        return self.threshold.thresholds

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "threshold": self.threshold.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.threshold.load_state_dict(state["threshold"])
