"""The validation metric (docs/methods.md, "Metric"): confusion matrix, per-class and macro F1 over the
ABAW classes, one-shot or accumulated batch by batch. Pure numpy; torch tensors are converted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.data import schema


def _as_numpy(values: Any) -> np.ndarray:
    # Duck-typed so this module never imports torch: tensors may live on a GPU or need grad.
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _check_ids(name: str, values: np.ndarray, low: int, num_classes: int) -> None:
    if values.ndim != 1:
        hint = " (pass class ids, e.g. probabilities.argmax(1))" if values.ndim == 2 else ""
        raise ValueError(f"{name} must be one-dimensional, got shape {values.shape}{hint}")
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name} must be integer class ids, got dtype {values.dtype}")
    invalid = (values < low) | (values >= num_classes)
    if invalid.any():
        raise ValueError(
            f"{name} must lie in {low}..{num_classes - 1}; found "
            f"{np.unique(values[invalid])[:10].tolist()} ({int(invalid.sum())} items)"
        )


def confusion_matrix(targets: Any, predictions: Any, num_classes: int = schema.NUM_CLASSES) -> np.ndarray:
    """Counts (num_classes, num_classes) int64: rows the true class, columns the predicted one.

    Frames whose target is -1 (schema.NO_LABEL) are left out, and so is their prediction, which may
    then be -1 too (a frame with neither label nor prediction). Every scored frame needs a
    prediction in 0..num_classes-1.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    targets = _as_numpy(targets)
    predictions = _as_numpy(predictions)
    _check_ids("targets", targets, schema.NO_LABEL, num_classes)
    _check_ids("predictions", predictions, schema.NO_LABEL, num_classes)
    if targets.shape != predictions.shape:
        raise ValueError(f"targets and predictions differ in length: {targets.size} vs {predictions.size}")
    scored = targets != schema.NO_LABEL
    targets = targets[scored].astype(np.int64)
    predictions = predictions[scored].astype(np.int64)
    unpredicted = predictions == schema.NO_LABEL
    if unpredicted.any():
        raise ValueError(f"predictions are -1 on {int(unpredicted.sum())} frames that have a target; "
                         "every scored frame needs a predicted class")
    counts = np.bincount(targets * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def per_class_f1(confusion: Any) -> np.ndarray:
    """F1 per class, 2·TP / (2·TP + FP + FN); a class neither present nor predicted scores 0.

    The zero matches sklearn's `zero_division=0`; any class with TP = 0 scores 0 either way.
    """
    confusion = _check_confusion(confusion)
    true_positives = np.diag(confusion).astype(np.float64)
    denominator = confusion.sum(axis=0) + confusion.sum(axis=1)  # = 2·TP + FP + FN
    scores = np.zeros(confusion.shape[0], dtype=np.float64)
    np.divide(2.0 * true_positives, denominator, out=scores, where=denominator > 0)
    return scores


def macro_f1(targets: Any, predictions: Any, num_classes: int = schema.NUM_CLASSES) -> float:
    """The mean of per-class F1 over all num_classes classes, absent ones scoring 0 (docs/methods.md).

    Equals `sklearn.metrics.f1_score(y, p, labels=range(num_classes), average="macro",
    zero_division=0)` after dropping -1 targets. Empty input (or only -1 targets) gives 0.0: every
    class is then neither present nor predicted.
    """
    return float(per_class_f1(confusion_matrix(targets, predictions, num_classes)).mean())


def accuracy(targets: Any, predictions: Any, num_classes: int = schema.NUM_CLASSES) -> float:
    """The fraction of scored frames (target != -1) predicted right; 0.0 when none is scored."""
    return _accuracy(confusion_matrix(targets, predictions, num_classes))


def _accuracy(confusion: np.ndarray) -> float:
    count = int(confusion.sum())
    return float(np.trace(confusion) / count) if count else 0.0


def _check_confusion(confusion: Any) -> np.ndarray:
    confusion = _as_numpy(confusion)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1] or confusion.shape[0] < 1:
        raise ValueError(f"a confusion matrix must be square and non-empty, got shape {confusion.shape}")
    if not np.issubdtype(confusion.dtype, np.integer):
        raise ValueError(f"a confusion matrix holds integer counts, got dtype {confusion.dtype}")
    if (confusion < 0).any():
        raise ValueError("a confusion matrix cannot hold negative counts")
    return confusion


@dataclass(frozen=True)
class ClassificationReport:
    """What a metrics file records for one evaluation; plain Python values so it serialises as is."""

    macro_f1: float
    per_class_f1: list[float]
    confusion: list[list[int]]
    """Rows the true class, columns the predicted one, in schema.CLASS_NAMES order."""
    accuracy: float
    support: list[int]
    """Scored frames per true class (the confusion's row sums)."""
    count: int
    """Scored frames in all (targets != -1)."""

    @classmethod
    def from_confusion(cls, confusion: Any) -> "ClassificationReport":
        """The report of a confusion matrix, e.g. one all-reduced over workers."""
        confusion = _check_confusion(confusion).astype(np.int64)
        scores = per_class_f1(confusion)
        return cls(
            macro_f1=float(scores.mean()),
            per_class_f1=scores.tolist(),
            confusion=confusion.tolist(),
            accuracy=_accuracy(confusion),
            support=confusion.sum(axis=1).tolist(),
            count=int(confusion.sum()),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def classification_report(targets: Any, predictions: Any,
                          num_classes: int = schema.NUM_CLASSES) -> ClassificationReport:
    return ClassificationReport.from_confusion(confusion_matrix(targets, predictions, num_classes))


class ConfusionAccumulator:
    """A confusion matrix summed batch by batch, for streaming evaluation over millions of frames.

    `matrix` is the raw int64 counts: a distributed run all-reduces (sums) it across workers and
    calls `ClassificationReport.from_confusion`, or merges accumulators gathered to one process.
    """

    def __init__(self, num_classes: int = schema.NUM_CLASSES) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, targets: Any, predictions: Any) -> "ConfusionAccumulator":
        self.matrix += confusion_matrix(targets, predictions, self.num_classes)
        return self

    def merge(self, other: "ConfusionAccumulator") -> "ConfusionAccumulator":
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge accumulators over {other.num_classes} and "
                             f"{self.num_classes} classes")
        self.matrix += other.matrix
        return self

    @property
    def count(self) -> int:
        return int(self.matrix.sum())

    def report(self) -> ClassificationReport:
        return ClassificationReport.from_confusion(self.matrix)
