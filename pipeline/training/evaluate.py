"""Validation: predict every frame, then macro-F1 raw and after per-video smoothing, on the whole
validation set and on its two halves.

Frames labeled -1 are predicted (they give the smoothing window its context) and left out of the
metric, as the ABAW protocol does. A frame whose image does not decode is left out of `macro_f1`;
`all_annotated` scores it too, as the official scorer does (every annotated frame counts), with the
label the test submission would give it (`core.frame_filling`). The validation videos are split, by
video and with a fixed seed, into a selection half and a report half: choices (the best epoch, a
default, a searched setting) are made on the selection half and reported on the other, so a
reported figure is not the one the choice was made on.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pipeline.core import frame_filling, metrics, smoothing
from pipeline.data import schema
from pipeline.methods.base import Collectives
from pipeline.training.data import ImageTable


def prepared_batches(table: ImageTable, indices: np.ndarray, batch_size: int,
                     prepare: Callable[[list[bytes]], tuple[torch.Tensor, np.ndarray]]
                     ) -> Iterator[tuple[np.ndarray, torch.Tensor, np.ndarray]]:
    """(row indices, images, decodable) for `indices` in batches, each decoded in a background
    thread while the caller runs the previous one through the network (JPEG decoding releases the
    GIL), so a validation or threshold pass is not decode, then compute, then decode."""
    starts = list(range(0, len(indices), batch_size))
    if not starts:
        return

    def load(start: int) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        chosen = indices[start:start + batch_size]
        images, ok = prepare(table.take_images(chosen))
        return chosen, images, ok

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, starts[0])
        for following in starts[1:] + [None]:
            ready = pending.result()
            if following is not None:
                pending = pool.submit(load, following)
            yield ready


@torch.no_grad()
def predict_table(table: ImageTable, predict: Callable[[torch.Tensor], torch.Tensor],
                  prepare: Callable[[list[bytes]], tuple[torch.Tensor, np.ndarray]],
                  batch_size: int, collectives: Collectives | None = None, rank: int = 0,
                  world_size: int = 1) -> np.ndarray:
    """Class probabilities (N, C) for every row; undecodable rows get all-zero probabilities.

    With `collectives` and several workers each worker predicts every world_size-th row and the
    rows are gathered as one sum (each row is non-zero on one worker only), so every worker gets
    the whole table's probabilities in about 1/world_size of the time."""
    probabilities = np.zeros((len(table), schema.NUM_CLASSES), dtype=np.float32)
    mine = np.arange(rank, len(table), world_size)
    for indices, images, ok in prepared_batches(table, mine, batch_size, prepare):
        if ok.any():
            output = predict(images[torch.from_numpy(ok).to(images.device)])
            probabilities[indices[ok]] = output.float().cpu().numpy()
    if world_size > 1 and collectives is not None:
        probabilities = collectives.all_reduce_sum(torch.from_numpy(probabilities)).numpy()
    return probabilities


SELECTION = "selection"
REPORT = "report"


def validation_halves(videos: np.ndarray, sample_ids: list[str], seed: int) -> np.ndarray:
    """True for the frames of the selection half: the distinct videos (sorted, so the draw does not
    depend on row order) shuffled with `seed`, the first half (rounded up) selecting. A row without
    a video (a still image) is its own group."""
    keys = np.array([video if video else f"image:{sample_id}" for video, sample_id in zip(videos, sample_ids)],
                    dtype=object)
    names = np.array(sorted(set(keys.tolist())), dtype=object)
    order = np.random.default_rng(seed).permutation(len(names))
    chosen = set(names[order[:(len(names) + 1) // 2]].tolist())
    return np.array([key in chosen for key in keys], dtype=bool)


def validation_report(table: ImageTable, probabilities: np.ndarray, windows: list[int],
                      mode: str, halves_seed: int = 0) -> dict[str, Any]:
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
        "undecodable_frames": int(undecoded.sum()),
        "all_annotated": all_annotated(table, predictions, undecoded),
    }
    selection = validation_halves(table.videos, table.sample_ids, halves_seed)
    halves = {SELECTION: selection, REPORT: ~selection}
    report["halves"] = {name: {"frames": int(mask.sum()),
                               **_scores(np.where(mask, targets, schema.NO_LABEL), predictions)}
                        for name, mask in halves.items()}
    if any(video == "" for video in table.videos):
        # Smoothing is per video; frames without a video (still images) have no sequence.
        report["smoothed"] = None
        return report
    for window in windows:
        # The halves are whole videos and the window never crosses a video, so scoring the smoothed
        # labels on a half equals smoothing that half alone.
        smoothed = smoothing.smooth_by_video(table.videos, table.frames, predictions, window, mode)
        result = metrics.classification_report(targets, smoothed)
        report["smoothed"][str(window)] = {"macro_f1": result.macro_f1,
                                           "per_class_f1": result.per_class_f1}
        for name, mask in halves.items():
            half = report["halves"][name].setdefault("smoothed", {})
            half[str(window)] = _scores(np.where(mask, targets, schema.NO_LABEL), smoothed)["macro_f1"]
    return report


def all_annotated(table: ImageTable, predictions: np.ndarray, undecoded: np.ndarray) -> dict[str, Any]:
    """Macro-F1 over every annotated frame, undecodable ones included, as the official scorer
    counts them: such a frame takes its video's nearest decoded frame's label (`FILL_RULE`); a
    still image, or a video with no decoded frame, the most frequent predicted label
    (`FALLBACK_RULE`)."""
    filled = predictions.copy()
    if undecoded.any():
        decoded = ~undecoded
        in_video = np.array([bool(video) for video in table.videos], dtype=bool)
        wanted = np.flatnonzero(undecoded & in_video)
        labels, _ = frame_filling.fill_labels(
            np.asarray(table.videos)[decoded & in_video], np.asarray(table.frames)[decoded & in_video],
            predictions[decoded & in_video],
            [(table.videos[index], int(table.frames[index])) for index in wanted.tolist()])
        filled[wanted] = labels
        counts = np.bincount(predictions[decoded], minlength=schema.NUM_CLASSES)
        fallback = int(np.argmax(counts)) if decoded.any() else 0
        filled[undecoded & ~in_video] = fallback
    result = metrics.classification_report(table.labels, filled)
    return {"macro_f1": result.macro_f1, "scored_frames": result.count,
            "filled_frames": int(undecoded.sum()), "fill_rule": frame_filling.FILL_RULE,
            "fallback_rule": frame_filling.FALLBACK_RULE}


def _scores(targets: np.ndarray, predictions: np.ndarray) -> dict[str, Any]:
    result = metrics.classification_report(targets, predictions)
    return {"scored_frames": result.count, "macro_f1": result.macro_f1}
