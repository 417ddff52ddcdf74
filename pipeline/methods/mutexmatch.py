"""MutexMatch (Duan et al., 2022) as the third paper runs it: a true-positive classifier (TPC) and a
true-negative classifier (TNC) on one feature extractor, split by the class dynamic adaptive threshold.

Cost: one forward/backward over labeled weak + unlabeled weak + unlabeled strong (B + 2µB images,
1 + 2µ supervised passes), plus a linear head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.core.devices import to_device
from pipeline.core.thresholds import (ADAPTIVE_SAMPLES, ClassStatistics, DynamicAdaptiveThreshold,
                                      PseudoLabels, acceptance_histogram, select_pseudo_labels)
from pipeline.methods.base import (Method, MethodContext, StepResult, TrainBatch, Views, build_optimizer,
                                   build_scheduler, cross_entropy, register_method)


@dataclass
class MutexMatchOptions:
    unlabeled_weight: float = 1.0
    """λ_u on the pseudo-label loss L_p (MutexMatch builds on FixMatch, whose λ_u is 1)."""
    separation_weight: float = 1.0
    """λ_sep on L_sep, the TNC's complementary-label loss on low-confidence samples."""
    negative_consistency_weight: float = 1.0
    """λ_n on L_n, the TNC's weak/strong consistency over the top-k complementary classes."""
    top_k: int | None = None
    """k of eq. (3); None is C - 1: every class but the one the TNC ranks as most likely true."""
    labeled_complementary: bool = True
    """Train the TNC on labeled data too, with a complementary label drawn uniformly from the
    classes other than the ground truth (MutexMatch's supervised term for the TNC)."""
    threshold_scale: float = 0.95
    """β of eq. (4)."""
    threshold_base: float = math.e
    """γ of eq. (4)."""
    threshold_samples: str = "labeled"
    """Class means over every train sample labeled c (the paper's eq. 4) or the correctly
    predicted ones only ("correct", as Ada-CM and the authors' code)."""

    def __post_init__(self) -> None:
        for name in ("unlabeled_weight", "separation_weight", "negative_consistency_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.threshold_samples not in ADAPTIVE_SAMPLES:
            raise ValueError(f"threshold_samples must be one of {ADAPTIVE_SAMPLES}, "
                             f"got {self.threshold_samples!r}")


def split_by_confidence(probabilities: torch.Tensor, thresholds: torch.Tensor) -> PseudoLabels:
    """Hard pseudo labels and the confident mask: eq. (2) keeps "1(max(p_n^w) ≥ τ)" and eq. (3)
    takes "1(max(p_n^w) < τ)", so a confidence equal to T^c of its predicted class is confident."""
    return select_pseudo_labels(probabilities, thresholds, inclusive=MutexMatch.acceptance_inclusive)


def complementary_labels(probabilities: torch.Tensor) -> torch.Tensor:
    """The TNC's target on an unlabeled sample: "the class with lowest confidence on weak augmented
    image as predicted by the TPC"."""
    return probabilities.argmin(dim=1)


def random_complementary_labels(labels: torch.Tensor, num_classes: int, generator: torch.Generator
                                ) -> torch.Tensor:
    """A class other than each label, uniform over the C - 1 others (drawn on the generator's device)."""
    offsets = torch.randint(1, num_classes, tuple(labels.shape), generator=generator)
    return (labels + to_device(offsets, labels.device)) % num_classes


def top_k_mask(probabilities: torch.Tensor, k: int) -> torch.Tensor:
    """g of eq. (3): True for the k largest components of each row."""
    indices = probabilities.topk(k, dim=1).indices
    return torch.zeros_like(probabilities, dtype=torch.bool).scatter_(1, indices, True)


def negative_consistency_loss(weak_probabilities: torch.Tensor, strong_logits: torch.Tensor,
                              low_confidence: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. (3): L_n = 1/µB Σ_n 1(max p_n^w < τ) · (-1/k) Σ_i g_n,(i) r^w_n,(i) log r^s_n,(i).

    r^w (the TNC on the weak view) is the target and carries no gradient, as the weak view's
    prediction does in every FixMatch-family consistency loss; g selects its top-k classes.
    """
    weak = weak_probabilities.detach().float()
    selected = top_k_mask(weak, k)
    strong_log_probabilities = strong_logits.float().log_softmax(dim=1)
    per_sample = -(selected * weak * strong_log_probabilities).sum(dim=1) / k
    return (per_sample * low_confidence.float()).sum() / max(1, per_sample.numel())


@register_method
class MutexMatch(Method):
    name = "mutexmatch"
    acceptance_inclusive = True  # eq. (2): "1(max(p_n^w) ≥ τ)"
    Options = MutexMatchOptions
    views = Views(unlabeled=True, unlabeled_strong=True)

    def __init__(self, options: MutexMatchOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.model = context.create_model()
        positive_classifier = self.model.get_classifier()
        if not isinstance(positive_classifier, nn.Linear):
            raise ValueError(f"model.backbone: mutexmatch needs a backbone whose classifier is one linear "
                             f"layer, got {type(positive_classifier).__name__} for "
                             f"{context.model.backbone!r}")
        if positive_classifier.out_features != self.num_classes:
            raise ValueError(f"model.num_classes ({positive_classifier.out_features}) must equal the "
                             f"method's number of classes ({self.num_classes})")
        self.negative_classifier = nn.Linear(positive_classifier.in_features, self.num_classes)
        self.negative_classifier.to(context.device)
        self.top_k = self.num_classes - 1 if options.top_k is None else options.top_k
        if not 1 <= self.top_k <= self.num_classes:
            raise ValueError(f"method_options.top_k must lie in [1, {self.num_classes}], got {self.top_k}")
        self.threshold = DynamicAdaptiveThreshold(
            num_classes=self.num_classes, scale=options.threshold_scale, base=options.threshold_base,
            samples=options.threshold_samples).to(context.device)
        self.epoch = 0
        # Complementary labels for labeled data come from a generator of our own, so a resumed run
        # draws the same labels as an uninterrupted one.
        self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        parameters = list(self.model.parameters()) + list(self.negative_classifier.parameters())
        self.optimizer = build_optimizer(parameters, context.optimizer)
        self.scheduler = build_scheduler(self.optimizer, context.optimizer, context.total_steps)

    def _classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TPC and TNC logits from one pass of the shared feature extractor; the TNC's losses reach
        the extractor too, which is how low-confidence samples shape the features."""
        features = self.model.forward_features(self.prepare(images))
        pooled = self.model.forward_head(features, pre_logits=True)
        return self.model.get_classifier()(pooled).float(), self.negative_classifier(pooled).float()

    def compute_losses(self, batch: TrainBatch
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """The step's losses, and the pseudo labels and confidence mask on the unlabeled batch.

        A batch without unlabeled views (data.use_unlabeled=false, the method's ablation control)
        trains the TPC and TNC on the labeled terms alone; the unlabeled terms are then zero."""
        has_weak, has_strong = batch.unlabeled_weak is not None, batch.unlabeled_strong is not None
        if has_weak != has_strong:
            raise ValueError("mutexmatch needs both unlabeled views or neither")
        labeled_count = len(batch.labeled_weak)
        unlabeled_count = len(batch.unlabeled_weak) if has_weak else 0
        images = [batch.labeled_weak] + ([batch.unlabeled_weak, batch.unlabeled_strong] if has_weak else [])
        with self.autocast():
            positive, negative = self._classify(torch.cat(images))
        positive_labeled, positive_weak, positive_strong = positive.split(
            [labeled_count, unlabeled_count, unlabeled_count])
        negative_labeled, negative_weak, negative_strong = negative.split(
            [labeled_count, unlabeled_count, unlabeled_count])

        losses = {"labeled_loss": cross_entropy(positive_labeled, batch.labels)}
        # Not in the third paper's text: MutexMatch also supervises the TNC on labeled data, with
        # a random class other than the label, so the TNC is not trained on guesses alone.
        if self.options.labeled_complementary:
            targets = random_complementary_labels(batch.labels, self.num_classes, self.generator)
            losses["labeled_complementary_loss"] = cross_entropy(negative_labeled, targets)
        else:
            losses["labeled_complementary_loss"] = torch.zeros((), device=positive.device)

        if not unlabeled_count:
            zero = torch.zeros((), device=positive.device)
            losses.update(unlabeled_loss=zero, separation_loss=zero, negative_consistency_loss=zero)
            losses["loss"] = losses["labeled_loss"] + losses["labeled_complementary_loss"]
            return losses, None, None

        weak_probabilities = positive_weak.detach().softmax(dim=1)
        pseudo = split_by_confidence(weak_probabilities, self.threshold.thresholds)
        low_confidence = ~pseudo.mask
        # Eq. (2), L_p: CE between the weak view's hard label and the TPC on the strong view.
        losses["unlabeled_loss"] = cross_entropy(positive_strong, pseudo.labels, pseudo.mask)
        # L_sep: "cross entropy on TNC prediction of weak augmentation and the class with lowest
        # confidence on weak augmented image as predicted by the TPC", low-confidence samples only,
        # over µB like L_p and L_n.
        losses["separation_loss"] = cross_entropy(
            negative_weak, complementary_labels(weak_probabilities), low_confidence)
        losses["negative_consistency_loss"] = negative_consistency_loss(
            negative_weak.softmax(dim=1), negative_strong, low_confidence, self.top_k)
        losses["loss"] = (losses["labeled_loss"] + losses["labeled_complementary_loss"]
                          + self.options.unlabeled_weight * losses["unlabeled_loss"]
                          + self.options.separation_weight * losses["separation_loss"]
                          + self.options.negative_consistency_weight * losses["negative_consistency_loss"])
        return losses, pseudo.labels, pseudo.mask

    def train_step(self, batch: TrainBatch, step: int) -> StepResult:
        self.model.train()
        self.negative_classifier.train()
        losses, pseudo_labels, confident = self.compute_losses(batch)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        self.scheduler.step()
        logged = {name: value.detach() for name, value in losses.items()}
        if confident is None:
            logged["mask_rate"] = torch.zeros((), device=losses["loss"].device)
            return StepResult(logged, accepted=torch.zeros(self.num_classes, dtype=torch.int64,
                                                           device=losses["loss"].device))
        logged["mask_rate"] = confident.float().mean()
        return StepResult(logged, accepted=acceptance_histogram(pseudo_labels, confident, self.num_classes),
                          candidates=len(confident), pseudo_labels=pseudo_labels, accepted_mask=confident)

    def evaluation_model(self) -> nn.Module:
        # The backbone's own classifier is the TPC, so its forward gives the TPC logits.
        return self.model

    def threshold_statistics(self, probabilities: torch.Tensor, labels: torch.Tensor) -> ClassStatistics:
        return self.threshold.collect_statistics(probabilities, labels)

    def update_thresholds(self, statistics: ClassStatistics, epoch: int) -> None:
        self.threshold.update(statistics, epoch)
        self.epoch = epoch

    def thresholds(self) -> torch.Tensor:
        return self.threshold.thresholds

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(),
                "negative_classifier": self.negative_classifier.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "threshold": self.threshold.state_dict(), "epoch": self.epoch,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.negative_classifier.load_state_dict(state["negative_classifier"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.threshold.load_state_dict(state["threshold"])
        self.epoch = int(state["epoch"])
        self.generator.set_state(state["generator"])
