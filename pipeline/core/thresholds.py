"""Class-wise confidence thresholds (fixed, DTM, dynamic adaptive, class mean) and the selection they drive.

Thresholds update from per-class sums and counts, so a distributed run all-reduces one small tensor
and every worker then makes the same update. Pure torch.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple

import torch

from pipeline.data import schema

# Per-class statistics: what a worker computes per batch and what an all-reduce sums.

@dataclass(frozen=True, eq=False)
class ClassStatistics:
    """Per-class sums of a confidence and the number of samples behind each sum.

    Sums are float64 and counts int64 so accumulating a whole epoch (millions of samples, many
    workers) loses nothing that matters; `as_tensor` packs both into one float64 tensor of length
    2C for a single `all_reduce(SUM)` (float64 holds integer counts exactly up to 2**53).
    """

    sums: torch.Tensor
    counts: torch.Tensor

    def __post_init__(self) -> None:
        if self.sums.ndim != 1 or self.sums.shape != self.counts.shape:
            raise ValueError(
                f"sums and counts must be matching vectors, got {tuple(self.sums.shape)} and "
                f"{tuple(self.counts.shape)}")
        object.__setattr__(self, "sums", self.sums.to(torch.float64))
        object.__setattr__(self, "counts", self.counts.to(torch.int64))

    @classmethod
    def zeros(cls, num_classes: int, device: torch.device | str | None = None) -> ClassStatistics:
        return cls(torch.zeros(num_classes, dtype=torch.float64, device=device),
                   torch.zeros(num_classes, dtype=torch.int64, device=device))

    @property
    def num_classes(self) -> int:
        return self.sums.shape[0]

    @property
    def present(self) -> torch.Tensor:
        """Boolean (C,): the classes with at least one sample behind their sum."""
        return self.counts > 0

    def means(self, fallback: torch.Tensor) -> torch.Tensor:
        """sums / counts per class, and `fallback` (float64) where a class has no sample."""
        fallback = fallback.to(device=self.sums.device, dtype=torch.float64)
        return torch.where(self.present, self.sums / self.counts.clamp(min=1), fallback)

    def __add__(self, other: ClassStatistics) -> ClassStatistics:
        if not isinstance(other, ClassStatistics):
            return NotImplemented
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot add statistics over {self.num_classes} and {other.num_classes} classes")
        return ClassStatistics(self.sums + other.sums.to(self.sums.device),
                               self.counts + other.counts.to(self.counts.device))

    def to(self, device: torch.device | str) -> ClassStatistics:
        return ClassStatistics(self.sums.to(device), self.counts.to(device))

    def as_tensor(self) -> torch.Tensor:
        """One float64 tensor [sums..., counts...] of length 2C, the unit of a distributed all-reduce."""
        return torch.cat([self.sums, self.counts.to(torch.float64)])

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> ClassStatistics:
        if tensor.ndim != 1 or tensor.shape[0] % 2:
            raise ValueError(f"expected a flat tensor of even length 2C, got shape {tuple(tensor.shape)}")
        num_classes = tensor.shape[0] // 2
        tensor = tensor.to(torch.float64)
        return cls(tensor[:num_classes].clone(), tensor[num_classes:].round().to(torch.int64))


def _check_probabilities(probabilities: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities must be (samples, classes), got shape {tuple(probabilities.shape)}")
    if labels is None:
        return
    if labels.ndim != 1 or labels.shape[0] != probabilities.shape[0]:
        raise ValueError(
            f"labels must be a vector of {probabilities.shape[0]} entries, got shape {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    num_classes = probabilities.shape[1]
    outside = (labels < schema.NO_LABEL) | (labels >= num_classes)
    message = f"labels must lie in [{schema.NO_LABEL}, {num_classes - 1}]"
    if labels.device.type == "cpu":
        if labels.numel() and bool(outside.any()):
            raise ValueError(message)
    else:
        # Checked on the device: reading the answer back would make the host wait for the step.
        torch._assert_async(~outside.any(), message)


def _sum_by_class(probabilities: torch.Tensor, classes: torch.Tensor, chosen: torch.Tensor | None = None
                  ) -> ClassStatistics:
    """Sum of p[i, classes[i]] per class and the count of rows per class, over the `chosen` rows
    (all when None). Rows are masked by weight rather than dropped, and counted with index_add
    rather than bincount: both of those read sizes back to the host."""
    num_classes = probabilities.shape[1]
    if chosen is None:
        chosen = torch.ones_like(classes, dtype=torch.bool)
    classes = torch.where(chosen, classes, 0)  # a dropped row's class may be -1
    confidence = probabilities.gather(1, classes[:, None]).squeeze(1).to(torch.float64)
    sums = torch.zeros(num_classes, dtype=torch.float64, device=probabilities.device)
    sums.index_add_(0, classes, torch.where(chosen, confidence, 0.0))
    counts = torch.zeros(num_classes, dtype=torch.int64, device=probabilities.device)
    counts.index_add_(0, classes, chosen.to(torch.int64))
    return ClassStatistics(sums, counts)


@torch.no_grad()
def class_statistics_correct(probabilities: torch.Tensor, labels: torch.Tensor) -> ClassStatistics:
    """DTM, eq. (7) of the ABAW5 paper: per class c, the sum of p_c over the samples labeled c that
    the model predicts correctly (argmax == label), and their number N_c.

    "the average confidence score of all correctly predicted samples in the labeled data for each
    class ... p_i^c is the predicted confidence score of the correct class c". Labels -1 are ignored.
    """
    _check_probabilities(probabilities, labels)
    labels = labels.to(device=probabilities.device, dtype=torch.int64)
    chosen = (labels != schema.NO_LABEL) & (probabilities.argmax(dim=1) == labels)
    return _sum_by_class(probabilities, labels, chosen)


@torch.no_grad()
def class_statistics_by_label(probabilities: torch.Tensor, labels: torch.Tensor) -> ClassStatistics:
    """Dynamic adaptive threshold, eq. (4) of the third paper: per class c, the sum of the
    probability of class c over every train sample labeled c (right or wrong), and their number.

    Eq. (4) sums "δ_i^c * p_i" with "δ_i^c = 1 if ỹ_i = c", and ỹ_i is the ground truth ("ỹ_i
    represents expression class of i-th image", section 2.5), so every sample labeled c counts, not
    only correct ones. p_i carries no class index there; we read it as p^c (eq. (1): "p^c refers to
    prediction probability of class c"), the probability given to the true class, because the text
    says the threshold "is calculated by the model's performance on train set" and the max
    probability would reward confident mistakes. The eq. writes 1/N_s; we divide by the class count
    (the MutexMatch paper: "mean confidence of train samples whose label is c"), which `means` does.
    Labels -1 are ignored.
    """
    _check_probabilities(probabilities, labels)
    labels = labels.to(device=probabilities.device, dtype=torch.int64)
    return _sum_by_class(probabilities, labels, labels != schema.NO_LABEL)


PREDICTED_SAMPLES = ("all", "argmax")


@torch.no_grad()
def class_statistics_predicted(probabilities: torch.Tensor, samples: str = "all") -> ClassStatistics:
    """Noise-aware model (third paper, section 2.4): per class c, a sum of predicted probabilities
    of class c and its count; no labels involved.

    samples="all" (default): p_c summed over every sample, count = number of samples, so the mean is
    the batch's mean posterior of class c. The paper: "calculated by taking the class vise mean of
    all the prediction probabilities in every batch"; the method it cites (DNFER, same group) uses
    "the mean posterior class probabilities of each mini-batch" as the class-specific threshold.
    samples="argmax": p_c summed over the samples predicted as c only (the narrower reading of
    "class mean of predicted probabilities").
    """
    _check_probabilities(probabilities)
    if samples == "all":
        num_samples = probabilities.shape[0]
        sums = probabilities.to(torch.float64).sum(dim=0)
        counts = torch.full_like(sums, num_samples, dtype=torch.int64)
        return ClassStatistics(sums, counts)
    if samples == "argmax":
        return _sum_by_class(probabilities, probabilities.argmax(dim=1))
    raise ValueError(f"samples must be one of {PREDICTED_SAMPLES}, got {samples!r}")


# Selection.

class PseudoLabels(NamedTuple):
    labels: torch.Tensor      # (n,) int64, argmax of the probabilities
    mask: torch.Tensor        # (n,) bool, the sample is kept
    confidence: torch.Tensor  # (n,) the max probability, detached


def _threshold_vector(thresholds: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    if thresholds.ndim != 1 or thresholds.shape[0] != probabilities.shape[1]:
        raise ValueError(
            f"thresholds must be a vector of {probabilities.shape[1]} classes, "
            f"got shape {tuple(thresholds.shape)}")
    return thresholds.to(device=probabilities.device, dtype=probabilities.dtype)


def clears(values: Any, thresholds: Any, inclusive: bool) -> Any:
    """The project's one acceptance rule, for tensors and arrays alike: a confidence clears its
    class threshold when it is above it, or (`inclusive`) equal to it. Training (the methods) and
    the pseudo-label export both decide through this function, with the rule of the method
    (`Method.acceptance_inclusive`)."""
    return values >= thresholds if inclusive else values > thresholds


def select_pseudo_labels(probabilities: torch.Tensor, thresholds: torch.Tensor, *,
                         inclusive: bool = False) -> PseudoLabels:
    """Pseudo label = argmax; kept when its confidence clears the threshold of that class.

    Strict by default, as in the ABAW5 paper ("If argmax(P̃u) is greater than the confidence
    threshold τ"), so a confidence exactly equal to τ_ŷ is rejected. `inclusive=True` keeps it,
    as MutexMatch's eq. (2) does ("1(max(p_n^w) ≥ τ)"). The outputs carry no gradient: the loss
    takes its gradient from the probabilities themselves.
    """
    _check_probabilities(probabilities)
    probabilities = probabilities.detach()
    confidence, labels = probabilities.max(dim=1)
    class_thresholds = _threshold_vector(thresholds, probabilities)[labels]
    return PseudoLabels(labels, clears(confidence, class_thresholds, inclusive), confidence)


def select_clean_samples(probabilities: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor, *,
                         inclusive: bool = False) -> torch.Tensor:
    """Noise-aware model: a labeled sample is clean when the probability of its own label clears
    that label's threshold ("samples whose ground truth prediction probabilities that are greater
    than the dynamic adaptive threshold for class i as clean"); strict by default. Labels -1 are
    never clean. Returns a bool (n,) mask.
    """
    _check_probabilities(probabilities, labels)
    probabilities = probabilities.detach()
    labels = labels.to(device=probabilities.device, dtype=torch.int64)
    valid = labels != schema.NO_LABEL
    safe_labels = labels.clamp(min=0)
    own = probabilities.gather(1, safe_labels[:, None]).squeeze(1)
    class_thresholds = _threshold_vector(thresholds, probabilities)[safe_labels]
    return valid & clears(own, class_thresholds, inclusive)


def acceptance_histogram(labels: torch.Tensor, mask: torch.Tensor,
                         num_classes: int = schema.NUM_CLASSES) -> torch.Tensor:
    """Count of accepted pseudo labels per class, int64 (C,); no host read (see `_sum_by_class`)."""
    counts = torch.zeros(num_classes, dtype=torch.int64, device=labels.device)
    return counts.index_add_(0, labels.to(torch.int64), mask.to(torch.int64))


# Thresholds and their registry.

THRESHOLDS: dict[str, type[ClassThreshold]] = {}


def register_threshold(name: str) -> Callable[[type[ClassThreshold]], type[ClassThreshold]]:
    def register(threshold_class: type[ClassThreshold]) -> type[ClassThreshold]:
        if name in THRESHOLDS:
            raise ValueError(f"threshold {name!r} is already registered by {THRESHOLDS[name].__name__}")
        threshold_class.name = name
        THRESHOLDS[name] = threshold_class
        return threshold_class
    return register


def make_threshold(name: str, **options: Any) -> ClassThreshold:
    """Build a registered threshold by name, e.g. `make_threshold("dtm", momentum=0.9)`."""
    if name not in THRESHOLDS:
        raise ValueError(f"unknown threshold {name!r}; known thresholds: {', '.join(sorted(THRESHOLDS))}")
    return THRESHOLDS[name](**options)


def _check_fraction(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class ClassThreshold(abc.ABC):
    """The contract every threshold honours.

    `thresholds`: float32 (C,). `collect_statistics(probabilities, labels)`: the ClassStatistics
    this threshold learns from, for one batch (sum them over batches and workers). `update(statistics,
    epoch)`: one step of the threshold's rule from the summed statistics; `epoch` is used only by
    thresholds whose formula depends on it. `state_dict()` holds plain tensors and ints only, so
    `torch.load(..., weights_only=True)` reads it back; hyper-parameters come from the config.

    A threshold lives on one device (`to(device)`, the CPU until then): its vectors are where the
    training step compares confidences with them, so no step copies them over, and the
    statistics of an update are moved there once.
    """

    name: ClassVar[str]
    _vectors: ClassVar[tuple[str, ...]] = ()
    """The attributes holding the threshold's stored (C,) tensors, moved by `to`."""

    def __init__(self, num_classes: int) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> ClassThreshold:
        """Keep the stored vectors on `device` from now on; returns self."""
        self.device = torch.device(device)
        for name in self._vectors:
            setattr(self, name, getattr(self, name).to(self.device))
        return self

    @property
    @abc.abstractmethod
    def thresholds(self) -> torch.Tensor: ...

    @abc.abstractmethod
    def collect_statistics(self, probabilities: torch.Tensor, labels: torch.Tensor | None
                           ) -> ClassStatistics: ...

    @abc.abstractmethod
    def update(self, statistics: ClassStatistics, epoch: int | None = None) -> None: ...

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def _check_statistics(self, statistics: ClassStatistics) -> ClassStatistics:
        if statistics.num_classes != self.num_classes:
            raise ValueError(
                f"statistics cover {statistics.num_classes} classes, threshold has {self.num_classes}")
        return statistics.to(self.device)

    def _check_state(self, state: dict[str, Any], keys: tuple[str, ...]) -> None:
        if set(state) != set(keys):
            raise ValueError(
                f"{type(self).__name__} state must have keys {sorted(keys)}, got {sorted(state)}")

    def _load_vector(self, state: dict[str, Any], key: str) -> torch.Tensor:
        vector = torch.as_tensor(state[key], dtype=torch.float64)
        if vector.shape != (self.num_classes,):
            raise ValueError(
                f"state {key!r} must have shape ({self.num_classes},), got {tuple(vector.shape)}")
        return vector.to(self.device, copy=True)


@register_threshold("fixed")
class FixedThreshold(ClassThreshold):
    """One constant threshold for every class (FixMatch-style); `update` does nothing."""

    _vectors = ("_values",)

    def __init__(self, *, num_classes: int = schema.NUM_CLASSES, value: float = 0.95) -> None:
        super().__init__(num_classes)
        self.value = _check_fraction("value", value)
        self._values = torch.full((self.num_classes,), self.value, dtype=torch.float32)

    @property
    def thresholds(self) -> torch.Tensor:
        return self._values.clone()

    def collect_statistics(self, probabilities: torch.Tensor,
                           labels: torch.Tensor | None = None) -> ClassStatistics:
        _check_probabilities(probabilities)
        return ClassStatistics.zeros(probabilities.shape[1], device=probabilities.device)

    def update(self, statistics: ClassStatistics, epoch: int | None = None) -> None:
        self._check_statistics(statistics)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state, ())


class _StoredThreshold(ClassThreshold):
    """A threshold that is a stored per-class vector (float64) plus an update counter."""

    _vectors = ("_values",)

    def _start(self, initial: float) -> None:
        self._values = torch.full((self.num_classes,), initial, dtype=torch.float64, device=self.device)
        self.updates = 0

    @property
    def thresholds(self) -> torch.Tensor:
        return self._values.to(torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"thresholds": self._values.clone(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state, ("thresholds", "updates"))
        self._values = self._load_vector(state, "thresholds")
        self.updates = int(state["updates"])


EMPTY_CLASS_RULES = ("keep",)


@register_threshold("dtm")
class DynamicThresholdModule(_StoredThreshold):
    """DTM (ABAW5 paper, eqs. 7-8): τ_c = mean p_c over correctly predicted labeled samples of class
    c (predicted by the EMA network B), then τ_c^t = µ·τ_c^(t-1) + (1-µ)·τ_c, once per epoch.

    `initial` is τ^0: the paper gives none; Ada-CM, which DTM follows ("Inspired by [30]"), starts
    its margins at 0.8. A class with no correct prediction this epoch keeps τ_c^(t-1)
    (`empty_class="keep"`): eq. (7) is undefined there (N_c = 0) and the paper suggests no other
    rule, so "keep" is the only one offered; the option exists so configs state the choice.
    """

    def __init__(self, *, num_classes: int = schema.NUM_CLASSES, momentum: float = 0.9,
                 initial: float = 0.8, empty_class: str = "keep") -> None:
        super().__init__(num_classes)
        self.momentum = _check_fraction("momentum", momentum)
        self.initial = _check_fraction("initial", initial)
        self.empty_class = _check_choice("empty_class", empty_class, EMPTY_CLASS_RULES)
        self._start(self.initial)

    def collect_statistics(self, probabilities: torch.Tensor, labels: torch.Tensor | None) -> ClassStatistics:
        if labels is None:
            raise ValueError("the dynamic threshold module learns from labeled samples: pass their labels")
        return class_statistics_correct(probabilities, labels)

    def update(self, statistics: ClassStatistics, epoch: int | None = None) -> None:
        statistics = self._check_statistics(statistics)
        epoch_thresholds = statistics.means(fallback=self._values)
        blended = self.momentum * self._values + (1.0 - self.momentum) * epoch_thresholds
        self._values = torch.where(statistics.present, blended, self._values)
        self.updates += 1


ADAPTIVE_SAMPLES = ("labeled", "correct")


@register_threshold("adaptive")
class DynamicAdaptiveThreshold(ClassThreshold):
    """Class dynamic adaptive threshold (third paper, eq. 4, for MutexMatch):
    T^c = β·m_c / (1 + γ^(-epoch)), with m_c the class mean from the latest `update`, β = `scale`
    = 0.95 and γ = `base` = e ("The values β = 0.95 and γ = e are taken from [21]").

    The factor 1/(1 + γ^(-epoch)) is 1/2 at epoch 0 and rises towards 1 ("dynamically scaled up as
    the training progresses"). `samples="labeled"` takes m_c over every train sample labeled c (the
    paper's text, see `class_statistics_by_label`); `samples="correct"` over the correctly predicted
    ones only, as Ada-CM (the cited [21]) and the authors' released code do. `minimum` floors
    T^c; the paper has no floor (0.0), the released code floors at its fixed cutoff.
    A class with no sample keeps its previous mean; before any update every mean is
    `initial_mean` = 1.0, the largest a mean can be, so an unmeasured class gets the strictest
    threshold the epoch allows (β/(1 + γ^(-epoch))).
    """

    _vectors = ("_means",)

    def __init__(self, *, num_classes: int = schema.NUM_CLASSES, scale: float = 0.95, base: float = math.e,
                 initial_mean: float = 1.0, samples: str = "labeled", minimum: float = 0.0) -> None:
        super().__init__(num_classes)
        self.scale = _check_fraction("scale", scale)
        if not base > 1.0:
            raise ValueError(f"base must be greater than 1 so the threshold grows with the epoch, got {base}")
        self.base = float(base)
        self.initial_mean = _check_fraction("initial_mean", initial_mean)
        self.samples = _check_choice("samples", samples, ADAPTIVE_SAMPLES)
        self.minimum = _check_fraction("minimum", minimum)
        self._means = torch.full((num_classes,), self.initial_mean, dtype=torch.float64)
        self.epoch = 0
        self.updates = 0

    @property
    def thresholds(self) -> torch.Tensor:
        return self.thresholds_at(self.epoch)

    @property
    def class_means(self) -> torch.Tensor:
        return self._means.to(torch.float32)

    def thresholds_at(self, epoch: int) -> torch.Tensor:
        """T^c for the current class means at another epoch (the means do not change)."""
        epoch = _check_epoch(epoch)
        values = self.scale * self._means / (1.0 + self.base ** (-epoch))
        return values.clamp(min=self.minimum).to(torch.float32)

    def collect_statistics(self, probabilities: torch.Tensor, labels: torch.Tensor | None) -> ClassStatistics:
        if labels is None:
            raise ValueError("the dynamic adaptive threshold learns from labeled samples: pass their labels")
        if self.samples == "correct":
            return class_statistics_correct(probabilities, labels)
        return class_statistics_by_label(probabilities, labels)

    def update(self, statistics: ClassStatistics, epoch: int | None = None) -> None:
        if epoch is None:
            raise ValueError("the dynamic adaptive threshold depends on the epoch: pass `epoch`")
        self.epoch = _check_epoch(epoch)
        statistics = self._check_statistics(statistics)
        self._means = statistics.means(fallback=self._means)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"class_means": self._means.clone(), "epoch": self.epoch, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state, ("class_means", "epoch", "updates"))
        self._means = self._load_vector(state, "class_means")
        self.epoch = _check_epoch(int(state["epoch"]))
        self.updates = int(state["updates"])


def _check_epoch(epoch: int) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    return epoch


@register_threshold("class_mean")
class ClassMeanThreshold(_StoredThreshold):
    """Noise-aware model (third paper, section 2.4): T_c = the class mean of the predicted
    probabilities (see `class_statistics_predicted`), replaced at every update, no momentum (the
    paper names none). The paper computes it "in every batch" and says "in every epoch": the caller
    chooses by updating with one batch's statistics or with an epoch's sum.

    A class with no sample keeps its previous value; before any update every threshold is
    `initial` = 0.0, so every sample counts as clean until the model has been measured (the cited
    method, DNFER, trains on all samples during its warm-up).
    """

    def __init__(self, *, num_classes: int = schema.NUM_CLASSES, initial: float = 0.0,
                 samples: str = "all") -> None:
        super().__init__(num_classes)
        self.initial = _check_fraction("initial", initial)
        self.samples = _check_choice("samples", samples, PREDICTED_SAMPLES)
        self._start(self.initial)

    def collect_statistics(self, probabilities: torch.Tensor,
                           labels: torch.Tensor | None = None) -> ClassStatistics:
        return class_statistics_predicted(probabilities, samples=self.samples)

    def update(self, statistics: ClassStatistics, epoch: int | None = None) -> None:
        statistics = self._check_statistics(statistics)
        self._values = statistics.means(fallback=self._values)
        self.updates += 1
