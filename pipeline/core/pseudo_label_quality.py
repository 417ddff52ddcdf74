"""How good the pseudo labels are, measured on the unlabeled rows whose label the split hid.

The unlabeled pool holds FER rows with a known label (the remainder of Aff-Wild2 train, AffectNet,
ExpW) next to rows with none (MS1MV2, Aff-Wild2's -1 frames). Training never sees those labels;
this module only counts, per source, how the method's pseudo labels relate to them:

    counts[source, hidden, outcome]   hidden in 0..C-1, or C for "no label known"
                                      outcome = the accepted pseudo label 0..C-1, or C: rejected

From that one table follow the acceptance rate, the accuracy of the accepted pseudo labels, and
per class their precision (of the rows given class c, how many are c), recall (of the rows whose
hidden label is c, how many were accepted as c) and coverage (of the rows whose hidden label is c,
how many were accepted at all). Counting is one `index_add_` on the device (no host sync, so it can
run every step); the table is summed over workers before it is read.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from pipeline.data import schema

UNKNOWN = "unknown"
"""The report's name for rows without a hidden label (MS1MV2, Aff-Wild2 frames labeled -1)."""


def empty_counts(num_sources: int = len(schema.SOURCES), num_classes: int = schema.NUM_CLASSES,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros((num_sources, num_classes + 1, num_classes + 1), dtype=torch.int64, device=device)


def add_counts(counts: torch.Tensor, hidden_labels: torch.Tensor, pseudo_labels: torch.Tensor,
               accepted: torch.Tensor, sources: torch.Tensor) -> None:
    """Count one batch into `counts` in place. All four inputs are per row and on `counts`'s
    device: the hidden label (-1 when none is known), the pseudo label, whether it was accepted,
    and the source index."""
    num_classes = counts.shape[1] - 1
    hidden = torch.where(hidden_labels >= 0, hidden_labels, num_classes).long()
    outcome = torch.where(accepted.bool(), pseudo_labels.long(), num_classes)
    flat = (sources.long() * (num_classes + 1) + hidden) * (num_classes + 1) + outcome
    counts.view(-1).index_add_(0, flat, torch.ones_like(flat))


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


def _summary(table: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """The report of one (C+1, C+1) table (one source, or all summed)."""
    num_classes = len(class_names)
    known = table[:num_classes]
    accepted = known[:, :num_classes]
    correct = np.diag(accepted)
    rows = int(known.sum())
    accepted_total = int(accepted.sum())
    per_class = {}
    for index, name in enumerate(class_names):
        given = int(accepted[:, index].sum())
        present = int(known[index].sum())
        per_class[name] = {
            "hidden": present,
            "accepted_as": given,
            "precision": _ratio(correct[index], given),
            "recall": _ratio(correct[index], present),
            "coverage": _ratio(accepted[index].sum(), present),
        }
    unknown_accepted = table[num_classes, :num_classes]
    return {
        "rows_with_hidden_label": rows,
        "accepted": accepted_total,
        "acceptance_rate": _ratio(accepted_total, rows),
        "accuracy": _ratio(correct.sum(), accepted_total),
        "per_class": per_class,
        UNKNOWN: {
            "rows": int(table[num_classes].sum()),
            "accepted": int(unknown_accepted.sum()),
            "accepted_per_class": dict(zip(class_names, unknown_accepted.tolist())),
        },
        "confusion": accepted.tolist(),
    }


def quality_report(counts: torch.Tensor | np.ndarray, sources: Sequence[str] = schema.SOURCES,
                   class_names: Sequence[str] = schema.CLASS_NAMES) -> dict[str, Any]:
    """Overall and per-source figures; `confusion[hidden][pseudo]` counts accepted rows only.
    A ratio with nothing to divide by is None (no row of that kind was seen)."""
    table = counts.cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    report = _summary(table.sum(axis=0), class_names)
    report["per_source"] = {name: _summary(table[index], class_names)
                            for index, name in enumerate(sources) if table[index].sum()}
    return report


def flat_quality(report: dict[str, Any], prefix: str = "pseudo_label") -> dict[str, float]:
    """The figures worth a scalar each (TensorBoard, Ray reports): overall acceptance and accuracy,
    and per class precision and coverage. None values are left out."""
    flat = {f"{prefix}_acceptance_rate": report["acceptance_rate"],
            f"{prefix}_accuracy": report["accuracy"]}
    for name, figures in report["per_class"].items():
        flat[f"{prefix}_precision_{name.lower()}"] = figures["precision"]
        flat[f"{prefix}_coverage_{name.lower()}"] = figures["coverage"]
    for source, figures in report["per_source"].items():
        flat[f"{prefix}_accuracy_{source}"] = figures["accuracy"]
        flat[f"{prefix}_acceptance_rate_{source}"] = figures["acceptance_rate"]
    return {key: float(value) for key, value in flat.items() if value is not None}
