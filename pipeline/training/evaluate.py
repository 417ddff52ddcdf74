"""Validation: predict every frame, then macro-F1 raw and after per-video smoothing.

Frames labeled -1 are predicted (they give the smoothing window its context) and left out of the
metric, as the ABAW protocol does.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from pipeline.core import metrics, smoothing
from pipeline.data import schema
from pipeline.training.data import ImageTable


@torch.no_grad()
def predict_table(table: ImageTable, predict: Callable[[torch.Tensor], torch.Tensor],
                  prepare: Callable[[list[bytes]], tuple[torch.Tensor, np.ndarray]],
                  batch_size: int) -> np.ndarray:
    """Class probabilities (N, C) for every row; undecodable rows get all-zero probabilities."""
    probabilities = np.zeros((len(table), schema.NUM_CLASSES), dtype=np.float32)
    for start in range(0, len(table), batch_size):
        indices = np.arange(start, min(len(table), start + batch_size))
        images, ok = prepare(table.take_images(indices))
        if ok.any():
            output = predict(images[torch.from_numpy(ok).to(images.device)])
            probabilities[indices[ok]] = output.float().cpu().numpy()
    return probabilities


def validation_report(table: ImageTable, probabilities: np.ndarray, windows: list[int],
                      mode: str) -> dict[str, Any]:
    predictions = probabilities.argmax(axis=1)
    undecoded = probabilities.sum(axis=1) == 0
    predictions[undecoded] = schema.NO_LABEL
    # An undecodable frame cannot be scored fairly: leave it out of the metric like a -1 frame.
    targets = np.where(undecoded, schema.NO_LABEL, table.labels)
    raw = metrics.classification_report(targets, predictions)
    report: dict[str, Any] = {
        "macro_f1": raw.macro_f1,
        "accuracy": raw.accuracy,
        "per_class_f1": raw.per_class_f1,
        "confusion": raw.confusion,
        "frames": int(len(table)),
        "scored_frames": raw.count,
        "smoothed": {},
        "smoothing_mode": mode,
        "smoothing_tie_rule": smoothing.TIE_RULE,
    }
    if any(video == "" for video in table.videos):
        # Smoothing is per video; frames without a video (still images) have no sequence.
        report["smoothed"] = None
        return report
    for window in windows:
        smoothed = smoothing.smooth_by_video(table.videos, table.frames, predictions, window, mode)
        result = metrics.classification_report(targets, smoothed)
        report["smoothed"][str(window)] = {"macro_f1": result.macro_f1,
                                           "per_class_f1": result.per_class_f1}
    return report
