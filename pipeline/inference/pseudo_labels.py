"""Pseudo-label export, the pure parts: the threshold in force per row and the accepted flag, and
the manifest's per-class accepted counts. Reading accepted rows back for training is
`pipeline.data.pseudo_labels`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.core.thresholds import clears
from pipeline.core.pseudo_label_quality import add_counts, empty_counts, quality_report
from pipeline.data import schema
from pipeline.data.schema import ACCEPTED, CONFIDENCE, DECODED, PREDICTED, RUN_ID, THRESHOLD


def class_thresholds(model_thresholds: np.ndarray | None, fixed: float | None) -> tuple[np.ndarray, str]:
    """The per-class thresholds rows are accepted against, and where they came from: a fixed
    confidence when given, else the checkpoint's own (DTM, adaptive, ...) thresholds."""
    if fixed is not None:
        if not 0.0 <= fixed <= 1.0:
            raise ValueError(f"--confidence {fixed}: must be within [0, 1]")
        return np.full(schema.NUM_CLASSES, fixed, np.float64), "fixed"
    if model_thresholds is None:
        raise ValueError("this checkpoint's method keeps no class thresholds: pass --confidence "
                         "(a fixed threshold, e.g. 0.95)")
    return np.asarray(model_thresholds, np.float64), "checkpoint"


def mark_accepted(table: pa.Table, thresholds: np.ndarray, run_id: str, inclusive: bool) -> pa.Table:
    """Add the threshold of each row's predicted class, `accepted` (decoded and confidence clearing
    that threshold by the producing method's rule, `core.thresholds.clears`, as in training) and the
    producing run."""
    predicted = table[PREDICTED].to_numpy()
    decoded = table[DECODED].to_numpy(zero_copy_only=False)
    confidence = table[CONFIDENCE].to_numpy()
    threshold = np.where(predicted >= 0, thresholds[np.clip(predicted, 0, None)], np.nan)
    with np.errstate(invalid="ignore"):  # NaN thresholds (undecoded rows) compare False
        accepted = decoded & (predicted >= 0) & clears(confidence, threshold, inclusive)
    return (table.append_column(THRESHOLD, pa.array(threshold.astype(np.float32)))
            .append_column(ACCEPTED, pa.array(accepted))
            .append_column(RUN_ID, pa.array([run_id] * table.num_rows, pa.string())))


def summarise(tables: list[pa.Table]) -> dict[str, Any]:
    """Per-class accepted counts and the acceptance rate over every output file, and `quality`:
    the accepted pseudo labels against the labels the split hid (`core.pseudo_label_quality`:
    per-class precision, recall and coverage, the confusion matrix, per source; rows without a
    known label, MS1MV2 and Aff-Wild2's -1 frames, are counted as "unknown")."""
    predicted_counts = np.zeros(schema.NUM_CLASSES, np.int64)
    quality = empty_counts()
    rows = undecodable = 0
    for table in tables:
        predicted = table[PREDICTED].to_numpy()
        add_counts(quality, torch.from_numpy(hidden_labels(table)), torch.from_numpy(predicted.astype(np.int64)),
                   torch.from_numpy(table[ACCEPTED].to_numpy(zero_copy_only=False).astype(bool)),
                   torch.from_numpy(schema.source_indices(table[schema.SOURCE].to_pylist())))
        rows += table.num_rows
        undecodable += int((~table[DECODED].to_numpy(zero_copy_only=False)).sum())
        predicted_counts += np.bincount(predicted[predicted >= 0], minlength=schema.NUM_CLASSES)
    # Accepted rows by pseudo label, whatever their hidden label: a sum of the quality table.
    accepted = quality[:, :, :schema.NUM_CLASSES].sum(dim=(0, 1)).numpy()
    return {
        "rows": rows,
        "undecodable": undecodable,
        "accepted": int(accepted.sum()),
        "acceptance_rate": float(accepted.sum() / rows) if rows else None,
        "accepted_per_class": dict(zip(schema.CLASS_NAMES, accepted.tolist())),
        "predicted_per_class": dict(zip(schema.CLASS_NAMES, predicted_counts.tolist())),
        "quality": quality_report(quality),
    }


def hidden_labels(table: pa.Table) -> np.ndarray:
    """Each output row's label from its input shard (-1: none known, or the input had no labels)."""
    if schema.LABEL not in table.column_names:
        return np.full(table.num_rows, schema.NO_LABEL, np.int64)
    return table[schema.LABEL].to_numpy().astype(np.int64)
