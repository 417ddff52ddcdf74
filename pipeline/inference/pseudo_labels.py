"""Pseudo-label export, the pure parts: the threshold in force per row and the accepted flag, the
manifest's per-class accepted counts, and reading accepted rows back (with their images from the
source shards) as extra labeled data for `jobs.train` (`data.labeled_pseudo_labels`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema, storage
from pipeline.inference import CONFIDENCE, DECODED, PREDICTED
from pipeline.prediction_files import read_table

MANIFEST = "_manifest.json"
THRESHOLD = "threshold"
ACCEPTED = "accepted"
RUN_ID = "run_id"


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


def read_accepted(folder: str, per_class: int | None = None, seed: int = 0) -> pa.Table:
    """The accepted rows of a finished export as labeled shard rows (sample_id, image, label =
    the pseudo label, video/frame when the source has them), images fetched from the input files
    the manifest lists. `per_class` caps each class (a seeded draw): the rows are held in memory."""
    manifest_uri = storage.join(folder, MANIFEST)
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"{folder}: no {MANIFEST}; the pseudo-label export did not finish")
    manifest = storage.read_json(manifest_uri)
    selected = []
    for entry in manifest["files"]:
        labels = read_table(storage.join(folder, entry["path"]), [schema.SAMPLE_ID, PREDICTED, ACCEPTED])
        labels = labels.filter(labels[ACCEPTED])
        if labels.num_rows:
            selected.append((entry["input"], labels))
    if per_class is not None:
        selected = _cap_per_class(selected, per_class, seed)
    parts = []
    columns = [schema.SAMPLE_ID, schema.IMAGE, schema.VIDEO, schema.FRAME]
    for input_uri, labels in selected:
        source = read_table(input_uri, columns)
        source = source.filter(pc.is_in(source[schema.SAMPLE_ID], value_set=labels[schema.SAMPLE_ID]))
        label_of = dict(zip(labels[schema.SAMPLE_ID].to_pylist(), labels[PREDICTED].to_pylist()))
        if source.num_rows != labels.num_rows:
            raise ValueError(f"{input_uri}: {labels.num_rows} accepted ids but {source.num_rows} found "
                             "in the input file (was it rewritten after the export?)")
        pseudo = [label_of[sample_id] for sample_id in source[schema.SAMPLE_ID].to_pylist()]
        parts.append(source.append_column(schema.LABEL, pa.array(pseudo, pa.int64())))
    if not parts:
        return pa.table({schema.SAMPLE_ID: pa.array([], pa.string()), schema.IMAGE: pa.array([], pa.binary()),
                         schema.VIDEO: pa.array([], pa.string()), schema.FRAME: pa.array([], pa.int64()),
                         schema.LABEL: pa.array([], pa.int64())})
    return pa.concat_tables(parts, promote_options="default")


def _cap_per_class(selected: list[tuple[str, pa.Table]], per_class: int, seed: int
                   ) -> list[tuple[str, pa.Table]]:
    labels = np.concatenate([table[PREDICTED].to_numpy() for _, table in selected]) if selected else np.zeros(0, int)
    keep = np.zeros(len(labels), bool)
    rng = np.random.default_rng(seed)
    for label in range(schema.NUM_CLASSES):
        rows = np.flatnonzero(labels == label)
        keep[rng.permutation(rows)[:per_class]] = True
    capped, offset = [], 0
    for uri, table in selected:
        mask = keep[offset:offset + table.num_rows]
        offset += table.num_rows
        if mask.any():
            capped.append((uri, table.filter(pa.array(mask))))
    return capped
