"""The third paper's noise-aware model: Self-Cure-Network importance weights, a class-mean threshold
that keeps only clean labeled samples in the supervised loss, and a flip consistency of class activation maps.

Cost: one forward/backward over the labeled weak view and the flipped labeled strong view (2B images,
2 supervised passes); no unlabeled data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.core.thresholds import (PREDICTED_SAMPLES, ClassMeanThreshold, ClassStatistics,
                                      class_statistics_predicted, select_clean_samples)
from pipeline.data import schema
from pipeline.methods.base import (Method, MethodContext, StepResult, TrainBatch, Views, build_optimizer,
                                   build_scheduler, cross_entropy, register_method)

THRESHOLD_SCOPES = ("epoch", "batch")


@dataclass
class NoiseAwareOptions:
    consistency_weight: float = 1.0
    """Weight of the attention-map MSE, eq. (6); the paper sums its two losses without weights."""
    rank_regularization: bool = True
    """SCN's rank regularisation of the importance weights, the term that makes them learn to rank
    ("The weights are learnt by the model as per in SCN")."""
    rank_weight: float = 1.0
    """Weight of the rank regularisation (SCN's released code adds it to the weighted CE unscaled)."""
    high_importance_ratio: float = 0.7
    """β of SCN: the share of samples in the high-importance group."""
    rank_margin: float = 0.15
    """δ1 of SCN: the margin between the mean importance of the high and low groups."""
    clean_split: bool = True
    """Keep only labeled samples whose own-label probability clears the class threshold in the
    weighted CE; False puts every sample in it (plain SCN weighting)."""
    threshold_scope: str = "epoch"
    """epoch: thresholds from the labeled-set pass after each epoch ("in every epoch"), used
    through the next; batch: recomputed from each global batch before the split ("in every
    batch", as DNFER, the cited method, does)."""
    threshold_samples: str = "all"
    """all: T_c = mean p_c over every sample ("the class vise mean of all the prediction
    probabilities"); argmax: over the samples predicted as c only."""

    def __post_init__(self) -> None:
        for name in ("consistency_weight", "rank_weight", "rank_margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.high_importance_ratio < 1.0:
            raise ValueError(f"high_importance_ratio must lie in (0, 1), "
                             f"got {self.high_importance_ratio}")
        if self.threshold_scope not in THRESHOLD_SCOPES:
            raise ValueError(f"threshold_scope must be one of {THRESHOLD_SCOPES}, "
                             f"got {self.threshold_scope!r}")
        if self.threshold_samples not in PREDICTED_SAMPLES:
            raise ValueError(f"threshold_samples must be one of {PREDICTED_SAMPLES}, "
                             f"got {self.threshold_samples!r}")


def class_activation_maps(features: torch.Tensor, classifier_weight: torch.Tensor) -> torch.Tensor:
    """CAM_c(h, w) = Σ_k w_c,k F_k(h, w): (N, K, H, W) feature maps and (C, K) weights -> (N, C, H, W).

    "by multiplying the weights and feature maps we obtained the attention maps for every class";
    the bias is left out (it is the same constant in both views, so the consistency ignores it).
    """
    if features.ndim != 4 or features.shape[1] != classifier_weight.shape[1]:
        raise ValueError(f"class activation maps need (N, K, H, W) feature maps whose K matches the "
                         f"classifier's {classifier_weight.shape[1]} inputs, got {tuple(features.shape)}")
    return torch.einsum("nkhw,ck->nchw", features.float(), classifier_weight.float())


def flipped_view_consistency(weak_maps: torch.Tensor, flipped_strong_maps: torch.Tensor) -> torch.Tensor:
    """Eq. (6): the mean over samples, maps and positions of (AM - AM')², AM' being the maps of the
    horizontally flipped strong image, flipped back here so both sets line up pixel for pixel.

    The eq. prints a leading minus sign; a loss to minimise is the plain MSE.
    """
    return nn.functional.mse_loss(weak_maps, flipped_strong_maps.flip(dims=(-1,)))


def weighted_cross_entropy(logits: torch.Tensor, importance: torch.Tensor, labels: torch.Tensor,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (5), SCN's logit-weighted CE: -1/N Σ_i log softmax(α_i · logits_i)[y_i] over the masked
    samples, N the batch size."""
    return cross_entropy(importance[:, None] * logits, labels, mask)


def rank_regularization(importance: torch.Tensor, high_ratio: float, margin: float,
                        chosen: torch.Tensor | None = None) -> torch.Tensor:
    """SCN's L_RR = max(0, δ1 - (mean α_H - mean α_L)) over the `chosen` samples, the high group
    being the ⌊β·N⌋ largest weights (at least one, and at least one sample left for the low group);
    0 below two samples. N lives on the device: the groups are masks over the sorted weights, not
    slices, so the step never reads N back. `chosen` None: every sample."""
    if chosen is None:
        chosen = torch.ones_like(importance, dtype=torch.bool)
    count = chosen.sum()
    high_count = torch.minimum(count - 1, (high_ratio * count.double()).floor().long().clamp(min=1))
    # Unchosen samples sort last (below every sigmoid weight) and fall in neither group.
    ordered = torch.where(chosen, importance, -1.0).sort(descending=True).values
    position = torch.arange(importance.numel(), device=importance.device)
    high, low = position < high_count, (position >= high_count) & (position < count)
    # Both denominators at least 1, so a skipped case (N < 2) has no 0/0 to leak NaN gradients.
    high_mean = torch.where(high, ordered, 0.0).sum() / high_count.clamp(min=1)
    low_mean = torch.where(low, ordered, 0.0).sum() / (count - high_count).clamp(min=1)
    return torch.where(count >= 2, torch.relu(margin - (high_mean - low_mean)), 0.0)


@register_method
class NoiseAware(Method):
    name = "noise_aware"
    Options = NoiseAwareOptions
    # A noisy-label method on labeled data: the paper's consistency loss is over "all the
    # samples" of the labeled batch, and no unlabeled data enters this model.
    views = Views(labeled_strong=True)

    def __init__(self, options: NoiseAwareOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.model = context.create_model()
        classifier = self.model.get_classifier()
        if not isinstance(classifier, nn.Linear):
            raise ValueError(f"model.backbone: noise_aware needs a backbone whose classifier is one linear "
                             f"layer on pooled feature maps, got {type(classifier).__name__} for "
                             f"{context.model.backbone!r}")
        # SCN's self-attention importance branch: "a FC layer and the sigmoid activation function".
        self.attention = nn.Sequential(nn.Linear(classifier.in_features, 1), nn.Sigmoid()).to(context.device)
        self.threshold = ClassMeanThreshold(num_classes=self.num_classes,
                                            samples=options.threshold_samples).to(context.device)
        parameters = list(self.model.parameters()) + list(self.attention.parameters())
        self.optimizer = build_optimizer(parameters, context.optimizer)
        self.scheduler = build_scheduler(self.optimizer, context.optimizer, context.total_steps)

    def clean_samples(self, probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The labeled samples that enter the weighted CE (bool (n,))."""
        if not self.options.clean_split:
            return labels != schema.NO_LABEL
        if self.options.threshold_scope == "batch":
            statistics = class_statistics_predicted(probabilities, samples=self.options.threshold_samples)
            summed = self.context.collectives.all_reduce_sum(statistics.as_tensor())
            self.threshold.update(ClassStatistics.from_tensor(summed))
        return select_clean_samples(probabilities, labels, self.threshold.thresholds)

    def compute_losses(self, batch: TrainBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The step's losses and the clean mask over the labeled batch."""
        if batch.labeled_strong is None:
            raise ValueError("noise_aware needs the labeled strong view in every batch")
        count = len(batch.labeled_weak)
        images = torch.cat([batch.labeled_weak, batch.labeled_strong.flip(dims=(-1,))])
        with self.autocast():
            features = self.model.forward_features(self.prepare(images))
            pooled = self.model.forward_head(features, pre_logits=True)[:count]
            classifier = self.model.get_classifier()
            logits = classifier(pooled).float()
            importance = self.attention(pooled).float().squeeze(1)
        weak_maps, flipped_strong_maps = class_activation_maps(features, classifier.weight).split(count)

        clean = self.clean_samples(logits.detach().softmax(dim=1), batch.labels)
        targets = batch.labels.clamp(min=0)
        losses = {
            "labeled_loss": weighted_cross_entropy(logits, importance, targets, clean),
            "consistency_loss": flipped_view_consistency(weak_maps, flipped_strong_maps),
        }
        if self.options.rank_regularization:
            # Over the samples the weighted CE sees, as in SCN where both terms cover the batch.
            losses["rank_loss"] = rank_regularization(
                importance, self.options.high_importance_ratio, self.options.rank_margin, chosen=clean)
        else:
            losses["rank_loss"] = torch.zeros((), device=logits.device)
        losses["loss"] = (losses["labeled_loss"] + self.options.rank_weight * losses["rank_loss"]
                          + self.options.consistency_weight * losses["consistency_loss"])
        losses["importance_mean"] = importance.detach().mean()
        return losses, clean

    def train_step(self, batch: TrainBatch, step: int) -> StepResult:
        self.model.train()
        self.attention.train()
        losses, clean = self.compute_losses(batch)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        self.scheduler.step()
        logged = {name: value.detach() for name, value in losses.items()}
        logged["clean_rate"] = clean.float().mean()
        return StepResult(logged)

    def evaluation_model(self) -> nn.Module:
        # As in SCN, the importance branch is a training device: inference is the plain classifier.
        return self.model

    def threshold_statistics(self, probabilities: torch.Tensor, labels: torch.Tensor) -> ClassStatistics:
        return self.threshold.collect_statistics(probabilities, labels)

    def update_thresholds(self, statistics: ClassStatistics, epoch: int) -> None:
        self.threshold.update(statistics, epoch)

    def thresholds(self) -> torch.Tensor | None:
        # None tells the loop to skip the labeled-set pass: batch-scoped thresholds need none.
        if not self.options.clean_split or self.options.threshold_scope == "batch":
            return None
        return self.threshold.thresholds

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "attention": self.attention.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "threshold": self.threshold.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.attention.load_state_dict(state["attention"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.threshold.load_state_dict(state["threshold"])
