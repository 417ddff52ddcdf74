"""Debiased feedback learning (ABAW6 paper, seeds 001/003), Meta Pseudo Labels style: a teacher
pseudo-labels unlabeled faces for a student, and learns from labeled images, from a weak/strong
consistency and from how much the student's step changed the student's loss on the labeled batch.

Cost of a step with B labeled and U unlabeled images (supervised: one forward + backward over B):
teacher forward + backward over B + 2U; student forward + backward over B + U (the labeled part
only gives L_before, but BatchNorm couples the batch so the backward spans it); one student forward
without gradient for L_after, over B + U (feedback_measurement "joint") or B ("labeled").
At U = B, counting a backward as two forwards: 17B forward-equivalents (joint) or 16B (labeled)
against 3B supervised, about 5.7x (5.3x), with two networks and two optimizers in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.core.thresholds import acceptance_histogram
from pipeline.methods.base import (
    Method, MethodContext, StepResult, TrainBatch, Views, build_optimizer, build_scheduler, cross_entropy,
    register_method,
)

CONSISTENCY_TARGETS = ("soft", "hard")
STUDENT_VIEWS = ("strong", "weak")
FEEDBACK_MEASUREMENTS = ("joint", "labeled")
EVALUATED_NETWORKS = ("student", "teacher")


@dataclass
class DebiasedFeedbackOptions:
    teacher_lr: float | None = 1e-2
    """Teacher learning rate (paper: 1e-2); None takes the optimizer config's lr."""
    student_lr: float | None = 1e-3
    """Student learning rate (paper: 1e-3); None takes the optimizer config's lr."""
    consistency_weight: float = 1.0
    """λ_c in L_T = L_s + λ_c·L_c + λ_f·L_f (paper: 1)."""
    feedback_weight: float = 1.0
    """λ_f in L_T (paper: 1)."""
    consistency_target: str = "soft"
    """Target of L_c = CE(T(x_FR), T(Aug(x_FR))): the detached softmax of the plain view (soft) or
    its argmax (hard)."""
    student_view: str = "strong"
    """The unlabeled view the student learns from: strong (Aug(x_FR), as Meta Pseudo Labels and
    Face2Exp) or weak (the plain x_FR of eq. (1))."""
    feedback_sign: int = 1
    """f = sign·(L_before - L_after): +1 reinforces a pseudo label whose student step lowered the
    labeled loss (the paper's eq. (6), Face2Exp); -1 is the kekmodel/Google MPL code's new - old."""
    feedback_baseline_decay: float = 0.0
    """Moving-average baseline subtracted from f (0: off; Meta Pseudo Labels' code uses 0.99)."""
    feedback_measurement: str = "joint"
    """How L_after is measured: joint reruns the student on the same [labeled, unlabeled] batch
    L_before came from, so both share the batch composition of the BatchNorm statistics; labeled
    runs it on the labeled images alone, as the reference implementations do (cheaper)."""
    evaluate: str = "student"
    """The network validated and frozen for the temporal phase (paper: the student)."""

    def __post_init__(self) -> None:
        for name, choices in (("consistency_target", CONSISTENCY_TARGETS), ("student_view", STUDENT_VIEWS),
                              ("feedback_measurement", FEEDBACK_MEASUREMENTS),
                              ("evaluate", EVALUATED_NETWORKS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.feedback_sign not in (1, -1):
            raise ValueError(f"feedback_sign must be 1 or -1, got {self.feedback_sign!r}")
        if not 0.0 <= self.feedback_baseline_decay < 1.0:
            raise ValueError(
                f"feedback_baseline_decay must lie in [0, 1), got {self.feedback_baseline_decay}")
        for name in ("teacher_lr", "student_lr"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("consistency_weight", "feedback_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@register_method
class DebiasedFeedback(Method):
    name = "feedback"
    Options = DebiasedFeedbackOptions
    # Its ablation control keeps the unlabeled data and sets feedback_weight=0 instead.
    views = Views(unlabeled=True, unlabeled_strong=True, unlabeled_required=True)

    def __init__(self, options: DebiasedFeedbackOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.teacher = context.create_model()
        self.student = context.create_model()
        optimizer, total_steps = context.optimizer, context.total_steps
        self.teacher_optimizer = build_optimizer(self.teacher.parameters(), optimizer, options.teacher_lr)
        self.student_optimizer = build_optimizer(self.student.parameters(), optimizer, options.student_lr)
        self.teacher_scheduler = build_scheduler(self.teacher_optimizer, optimizer, total_steps)
        self.student_scheduler = build_scheduler(self.student_optimizer, optimizer, total_steps)
        # Device scalars, so a step never reads one back: the running baseline, the last step's
        # global sign·(L_before - L_after), and the f the teacher used (raw - baseline).
        zero = torch.zeros((), dtype=torch.float32, device=context.device)
        self.feedback_baseline = zero
        self.feedback_raw = zero
        self.feedback_coefficient = zero
        self.steps = 0

    def train_step(self, batch: TrainBatch, step: int) -> StepResult:
        if batch.unlabeled_weak is None or batch.unlabeled_strong is None:
            raise ValueError("feedback needs the unlabeled weak and strong views (data.use_unlabeled)")
        options = self.options
        self.teacher.train()
        self.student.train()
        labeled_count, unlabeled_count = batch.labels.shape[0], batch.unlabeled_weak.shape[0]

        # 1. Teacher on [x_FER, x_FR, Aug(x_FR)] in one pass; ŷ_FR = argmax T(x_FR), a fixed target.
        with self.autocast():
            teacher_logits = self.teacher(self.prepare(torch.cat(
                [batch.labeled_weak, batch.unlabeled_weak, batch.unlabeled_strong]))).float()
        teacher_labeled, teacher_plain, teacher_augmented = teacher_logits.split(
            [labeled_count, unlabeled_count, batch.unlabeled_strong.shape[0]])
        pseudo_labels = teacher_plain.detach().argmax(dim=1)

        # 2-3. Student on [x_FER, x_FR view]: L_before from the labeled part (no gradient), and the
        # student step on L_u = CE(ŷ_FR, S(x_FR)), eq. (1).
        unlabeled_view = batch.unlabeled_strong if options.student_view == "strong" else batch.unlabeled_weak
        student_images = self.prepare(torch.cat([batch.labeled_weak, unlabeled_view]))
        with self.autocast():
            student_logits = self.student(student_images).float()
        labeled_before = cross_entropy(student_logits[:labeled_count].detach(), batch.labels)
        student_loss = cross_entropy(student_logits[labeled_count:], pseudo_labels)
        self.student_optimizer.zero_grad(set_to_none=True)
        student_loss.backward()
        self.student_optimizer.step()
        self.student_scheduler.step()

        # 4. L_after = CE(y_FER, S_new(x_FER)), in train mode like L_before. "joint" reruns the very
        # batch L_before came from: on the labeled images alone (the reference code) the BatchNorm
        # batch statistics change with the batch's make-up, a shift we measured at 10x (ResNet-18) to
        # 100x (timm's test ResNet) the step's own effect. The rerun moves the running statistics too.
        with torch.no_grad(), self.autocast():
            if options.feedback_measurement == "joint":
                after_logits = self.student(student_images)[:labeled_count].float()
            else:
                after_logits = self.student(self.prepare(batch.labeled_weak)).float()
        labeled_after = cross_entropy(after_logits, batch.labels)

        # 5. Feedback coefficient, first-order form of eq. (6). With g = ∇_θ CE(ŷ_FR, S(x_FR; θ)) and a
        # step θ' = θ - η_S·g, expanding L(θ) = L(θ' + η_S·g) ≈ L(θ') + η_S·∇L(θ')ᵀg gives
        # L_before - L_after ≈ η_S·∇L(θ')ᵀg = f: positive when the pseudo labels moved the student
        # the way the labeled loss wanted, and then L_f = f·CE(ŷ_FR, T(x_FR)) makes ŷ_FR more likely.
        # Averaged over workers so every replica of the teacher takes the same step.
        local = options.feedback_sign * (labeled_before - labeled_after)
        raw = torch.as_tensor(self.context.collectives.all_reduce_mean(local.detach()),
                              dtype=torch.float32, device=teacher_plain.device)
        # The baseline is the average of earlier steps only, so it does not cancel this step's signal.
        coefficient = raw - self.feedback_baseline if options.feedback_baseline_decay > 0 else raw
        self.feedback_raw, self.feedback_coefficient = raw.detach(), coefficient.detach()
        if options.feedback_baseline_decay > 0:
            decay = options.feedback_baseline_decay
            self.feedback_baseline = decay * self.feedback_baseline + (1.0 - decay) * self.feedback_raw

        # 6. Teacher: L_T = L_s + λ_c·L_c + λ_f·L_f, eqs. (2)-(5).
        supervised_loss = cross_entropy(teacher_labeled, batch.labels)
        if options.consistency_target == "soft":
            target = teacher_plain.detach().softmax(dim=1)
            consistency_loss = -(target * teacher_augmented.log_softmax(dim=1)).sum(dim=1).mean()
        else:
            consistency_loss = cross_entropy(teacher_augmented, pseudo_labels)
        feedback_loss = coefficient * cross_entropy(teacher_plain, pseudo_labels)
        teacher_loss = (supervised_loss + options.consistency_weight * consistency_loss
                        + options.feedback_weight * feedback_loss)
        self.teacher_optimizer.zero_grad(set_to_none=True)
        teacher_loss.backward()
        self.teacher_optimizer.step()
        self.teacher_scheduler.step()
        self.steps += 1
        every = torch.ones_like(pseudo_labels, dtype=torch.bool)  # no threshold: all pseudo labels teach
        return StepResult({
            "loss": teacher_loss.detach(), "teacher_supervised": supervised_loss.detach(),
            "teacher_consistency": consistency_loss.detach(), "teacher_feedback": feedback_loss.detach(),
            "student_unlabeled": student_loss.detach(), "student_labeled_before": labeled_before.detach(),
            "student_labeled_after": labeled_after.detach(),
            "feedback_coefficient": self.feedback_coefficient, "feedback_raw": self.feedback_raw,
        }, accepted=acceptance_histogram(pseudo_labels, every, self.num_classes), candidates=unlabeled_count,
            pseudo_labels=pseudo_labels, accepted_mask=every)

    def forward_images(self, batch: TrainBatch) -> int:
        # The teacher sees [x_FER, x_FR, Aug(x_FR)], the student [x_FER, x_FR view] twice (the
        # "joint" L_after reruns that batch) or once plus x_FER alone.
        labeled, unlabeled = len(batch.labels), len(batch.unlabeled_weak)
        rerun = labeled + unlabeled if self.options.feedback_measurement == "joint" else labeled
        return (labeled + 2 * unlabeled) + (labeled + unlabeled) + rerun

    def evaluation_model(self) -> nn.Module:
        return self.student if self.options.evaluate == "student" else self.teacher

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "student": self.student.state_dict(),
                "teacher_optimizer": self.teacher_optimizer.state_dict(),
                "student_optimizer": self.student_optimizer.state_dict(),
                "teacher_scheduler": self.teacher_scheduler.state_dict(),
                "student_scheduler": self.student_scheduler.state_dict(),
                "feedback_baseline": self.feedback_baseline.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.student.load_state_dict(state["student"])
        self.teacher_optimizer.load_state_dict(state["teacher_optimizer"])
        self.student_optimizer.load_state_dict(state["student_optimizer"])
        self.teacher_scheduler.load_state_dict(state["teacher_scheduler"])
        self.student_scheduler.load_state_dict(state["student_scheduler"])
        # Checkpoints written before the baseline became a tensor hold a float.
        self.feedback_baseline = torch.as_tensor(state["feedback_baseline"], dtype=torch.float32).to(self.device)
        self.steps = int(state["steps"])
