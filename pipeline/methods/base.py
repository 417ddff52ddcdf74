"""The one interface every training method implements, and the pieces methods share.

A method owns its networks, optimizers and thresholds, and turns one `TrainBatch` into one
optimisation step. Everything it needs comes in as arguments (the batch, the step, the
`Collectives` used for global values), never as hidden attributes set by a trainer.
"""

from __future__ import annotations

import abc
import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.core.models import ModelConfig, create_model
from pipeline.core.thresholds import ClassStatistics
from pipeline.data import schema


@dataclass
class OptimizerConfig:
    name: str = "adam"
    """adam, adamw or sgd."""
    lr: float = 5e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    """SGD momentum (ignored by Adam)."""
    nesterov: bool = False
    schedule: str = "constant"
    """constant or cosine (annealed to 0 over the run's total steps)."""
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.name not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer.name must be adam, adamw or sgd, got {self.name!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"optimizer.schedule must be constant or cosine, got {self.schedule!r}")
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be positive, got {self.lr}")


def build_optimizer(parameters, config: OptimizerConfig, lr: float | None = None) -> torch.optim.Optimizer:
    rate = config.lr if lr is None else lr
    parameters = [parameter for parameter in parameters if parameter.requires_grad]
    # The fused kernels update every parameter in one launch per group instead of several per
    # tensor (the difference is large on a GPU); torch has them on CPU and CUDA for these three.
    fused = True if parameters and all(parameter.device.type in ("cpu", "cuda") and parameter.is_floating_point()
                                       for parameter in parameters) else None
    if config.name == "sgd":
        return torch.optim.SGD(parameters, lr=rate, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=config.nesterov, fused=fused)
    if config.name == "adamw":
        return torch.optim.AdamW(parameters, lr=rate, weight_decay=config.weight_decay, fused=fused)
    return torch.optim.Adam(parameters, lr=rate, weight_decay=config.weight_decay, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimizerConfig, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(0, config.warmup_steps)
    total = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainBatch:
    """One step's inputs, already on the device, normalised, NCHW.

    Which of the optional views are filled is what the method's `views` declares.
    """

    labeled_weak: torch.Tensor
    labels: torch.Tensor
    labeled_strong: torch.Tensor | None = None
    unlabeled_weak: torch.Tensor | None = None
    unlabeled_strong: torch.Tensor | None = None


@dataclass(frozen=True)
class Views:
    """The views a method consumes; the input path builds only these."""

    labeled_strong: bool = False
    unlabeled: bool = False
    unlabeled_strong: bool = False
    unlabeled_required: bool = False
    """True for a method that cannot train without unlabeled images (feedback's student learns from
    them alone), so data.use_unlabeled=false is refused when the config loads, not at the first step."""


@dataclass
class StepResult:
    values: dict[str, torch.Tensor]
    """Detached scalar losses and coefficients for logging ("loss" is the total), as 0-d tensors on
    the training device: a step never reads a value back to the host (on a GPU that read would make
    the host wait for the step to finish before launching the next one). The training loop sums
    them on the device and reads them once per epoch."""
    accepted: torch.Tensor | None = None
    """Accepted pseudo labels per class this step (C,), for the acceptance rate and histogram."""
    candidates: int = 0
    """Unlabeled samples considered this step."""
    pseudo_labels: torch.Tensor | None = None
    """Each unlabeled sample's pseudo label (N_u,), in the order of `TrainBatch.unlabeled_weak`; the
    trainer scores them against labels the split hid (never shown to the method)."""
    accepted_mask: torch.Tensor | None = None
    """Which of those pseudo labels entered the unlabeled loss (N_u,) bool."""

    @property
    def losses(self) -> dict[str, float]:
        """`values` read to the host as floats (a synchronisation): for tests and tools, never the loop."""
        if not self.values:
            return {}
        names = list(self.values)
        read = torch.stack([torch.as_tensor(self.values[name]).detach().double().cpu()
                            for name in names]).tolist()
        return dict(zip(names, read))


class PendingReduction:
    """A reduction under way; `wait()` returns its result (on CUDA it orders the current stream
    after the collective instead of blocking the host)."""

    def __init__(self, result: torch.Tensor, work: Any = None) -> None:
        self.result, self.work = result, work

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.result


class Collectives:
    """Global reductions a method may need mid-step (the feedback coefficient, say).

    This single-process version is the identity; the Ray Train adapter substitutes one backed by
    torch.distributed, so methods never import or test for distribution themselves.
    """

    world_size: int = 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_sum_async(self, tensor: torch.Tensor) -> PendingReduction:
        """Start a sum over the workers of `tensor`, a buffer the caller hands over (it may be
        reduced in place). This default finishes at once; torch.distributed's runs in the background."""
        return PendingReduction(self.all_reduce_sum(tensor))

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


@dataclass
class MethodContext:
    """What every method is built from."""

    model: ModelConfig
    optimizer: OptimizerConfig
    total_steps: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    """fp32, or bf16 (autocast on CUDA; on CPU too, where it helps little)."""
    collectives: Collectives = field(default_factory=Collectives)
    num_classes: int = schema.NUM_CLASSES

    def create_model(self, config: ModelConfig | None = None) -> nn.Module:
        model = create_model(config or self.model)
        return model.to(self.device)


class Method(abc.ABC):
    """Base of every training method; subclasses register with `@register_method`."""

    name: ClassVar[str]
    Options: ClassVar[type]
    """Dataclass of the method's own options (the recipe's `method_options`)."""
    views: ClassVar[Views] = Views()
    acceptance_inclusive: ClassVar[bool] = False
    """Whether a pseudo label whose confidence equals its class threshold is accepted (the
    method's paper decides); training and the pseudo-label export both apply it through
    `core.thresholds.clears`."""

    def __init__(self, options: Any, context: MethodContext) -> None:
        self.options = options
        self.context = context
        self.device = context.device
        self.num_classes = context.num_classes

    # ---------------------------------------------------------------------------- the contract

    @abc.abstractmethod
    def train_step(self, batch: TrainBatch, step: int) -> StepResult:
        """One optimisation step (every network the method updates at this step)."""

    @abc.abstractmethod
    def evaluation_model(self) -> nn.Module:
        """The network used for validation, inference and pseudo-label export."""

    def forward_images(self, batch: TrainBatch) -> int:
        """Images the step runs through its networks' forward passes, for the throughput that
        compares with a plain fwd+bwd loop: every view once by default (one pass over the
        concatenated views, as DTM, MutexMatch and the noise-aware model run)."""
        views = (batch.labeled_weak, batch.labeled_strong, batch.unlabeled_weak, batch.unlabeled_strong)
        return sum(len(view) for view in views if view is not None)

    def threshold_model(self) -> nn.Module:
        """The network whose labeled-set predictions feed `threshold_statistics`."""
        return self.evaluation_model()

    def threshold_statistics(self, probabilities: torch.Tensor, labels: torch.Tensor
                             ) -> ClassStatistics | None:
        """Per-class sums/counts from one labeled batch; None for methods without thresholds."""
        return None

    def update_thresholds(self, statistics: ClassStatistics, epoch: int) -> None:
        """Apply the epoch's (globally summed) statistics."""

    def thresholds(self) -> torch.Tensor | None:
        return None

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: networks, EMA, optimizers, schedulers, thresholds."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    # ---------------------------------------------------------------------------- shared helpers

    def autocast(self):
        if self.context.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        if self.context.model.channels_last and images.ndim == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities of the evaluation model (eval mode, no gradients)."""
        model = self.evaluation_model()
        was_training = model.training
        model.eval()
        with self.autocast():
            probabilities = model(self.prepare(images)).float().softmax(dim=1)
        model.train(was_training)
        return probabilities


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method findable by its `name` (one registry, no hand-kept list)."""
    if not getattr(cls, "name", None) or not getattr(cls, "Options", None):
        raise TypeError(f"{cls.__name__} needs class attributes `name` and `Options`")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def find_method(name: str) -> type[Method]:
    import pipeline.methods  # noqa: F401  (importing the package registers every method)

    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Mean CE over the masked samples, divided by the batch size (FixMatch's convention), so a
    step where few pseudo labels pass contributes proportionally little rather than being
    renormalised into a full-strength loss."""
    losses = nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    if mask is None:
        return losses.mean()
    return (losses * mask.float()).sum() / max(1, losses.numel())

