"""Pseudo-label export, the pure parts: the threshold in force per row and the accepted flag, and
the manifest's per-class accepted counts. Reading accepted rows back for training is
`pipeline.data.pseudo_labels`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

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


def mark_accepted(table: pa.Table, thresholds: np.ndarray, run_id: str) -> pa.Table:
    """Add the threshold of each row's predicted class, `accepted` (decoded and confidence >= that
    threshold, the `select_pseudo_labels` rule) and the producing run."""
    predicted = table[PREDICTED].to_numpy()
    decoded = table[DECODED].to_numpy(zero_copy_only=False)
    confidence = table[CONFIDENCE].to_numpy()
    threshold = np.where(predicted >= 0, thresholds[np.clip(predicted, 0, None)], np.nan)
    accepted = decoded & (predicted >= 0) & (confidence >= threshold)
    return (table.append_column(THRESHOLD, pa.array(threshold.astype(np.float32)))
            .append_column(ACCEPTED, pa.array(accepted))
            .append_column(RUN_ID, pa.array([run_id] * table.num_rows, pa.string())))


def summarise(tables: list[pa.Table]) -> dict[str, Any]:
    """Per-class accepted counts and the acceptance rate over every output file."""
    accepted = np.zeros(schema.NUM_CLASSES, np.int64)
    predicted_counts = np.zeros(schema.NUM_CLASSES, np.int64)
    rows = undecodable = 0
    for table in tables:
        predicted = table[PREDICTED].to_numpy()
        flags = table[ACCEPTED].to_numpy(zero_copy_only=False)
        rows += table.num_rows
        undecodable += int((~table[DECODED].to_numpy(zero_copy_only=False)).sum())
        valid = predicted >= 0
        predicted_counts += np.bincount(predicted[valid], minlength=schema.NUM_CLASSES)
        accepted += np.bincount(predicted[valid & flags], minlength=schema.NUM_CLASSES)
    return {
        "rows": rows,
        "undecodable": undecodable,
        "accepted": int(accepted.sum()),
        "acceptance_rate": float(accepted.sum() / rows) if rows else None,
        "accepted_per_class": dict(zip(schema.CLASS_NAMES, accepted.tolist())),
        "predicted_per_class": dict(zip(schema.CLASS_NAMES, predicted_counts.tolist())),
    }
