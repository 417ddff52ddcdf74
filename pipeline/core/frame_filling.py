"""Labels for every annotated frame from predictions for some of them, as the ABAW scorer needs:
a frame without its own prediction (never predicted, or undecodable) takes its video's nearest
predicted frame's label. One rule for the test submission (`pipeline.inference.submission`) and
for the validation figure that counts every annotated frame (`pipeline.training.evaluate`). Pure
numpy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from pipeline.data import schema

FILL_RULE = "nearest_predicted_frame_of_the_video_earlier_on_tie"
"""A frame without its own prediction takes the label of the closest predicted frame of its video;
at equal distance before and after, the earlier frame's."""
FALLBACK_RULE = "most_frequent_predicted_label_lower_id_on_tie_else_neutral"
"""A video without any predicted frame takes the label predicted most often over all videos (the
lower class id on a tie), or Neutral (0) when nothing at all was predicted."""

# Frames and video codes packed in one int64 key, video in the high bits: sorting the keys sorts by
# (video, frame), so one searchsorted serves every video at once.
_FRAME_BITS = 32

Frame = tuple[str, int]


@dataclass(frozen=True)
class FillReport:
    """How each wanted frame got its label (`fill_labels`)."""

    exact: int
    """Frames with their own prediction."""
    filled_from_neighbour: int
    """Frames labelled from their video's nearest predicted frame (`FILL_RULE`)."""
    filled_without_video: int
    """Frames of videos with no predicted frame at all, given `fallback_label` (`FALLBACK_RULE`)."""
    videos_without_predictions: list[str] = field(default_factory=list)
    """Those videos, sorted: usually a naming mismatch or a video the predictor never saw."""
    fallback_label: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fill_labels(predicted_videos: Any, predicted_frames: Any, predicted_labels: Any,
                wanted: Sequence[Frame]) -> tuple[np.ndarray, FillReport]:
    """One label (0..7, int64) per wanted frame, in `wanted`'s order, and how each was obtained.

    A wanted frame takes its own prediction, else the nearest predicted frame of its video
    (`FILL_RULE`), else the fallback label (`FALLBACK_RULE`). Predictions labelled -1 count as
    missing. A (video, frame) predicted twice is an error (which label would it take?).
    """
    videos = np.asarray(predicted_videos)
    frames = np.asarray(predicted_frames)
    labels = np.asarray(predicted_labels)
    one_dimensional = videos.ndim == frames.ndim == labels.ndim == 1
    if not one_dimensional or not videos.size == frames.size == labels.size:
        raise ValueError(f"predicted videos {videos.shape}, frames {frames.shape} and labels "
                         f"{labels.shape} must be one-dimensional, one row per frame")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"predicted labels must be integer class ids, got dtype {labels.dtype}")
    if frames.size and not np.issubdtype(frames.dtype, np.integer):
        raise ValueError(f"predicted frames must be integers, got dtype {frames.dtype}")
    invalid = (labels < schema.NO_LABEL) | (labels >= schema.NUM_CLASSES)
    if invalid.any():
        raise ValueError(f"predicted labels must lie in {schema.NO_LABEL}..{schema.NUM_CLASSES - 1}; "
                         f"found {np.unique(labels[invalid])[:10].tolist()}")
    predicted = labels != schema.NO_LABEL
    videos, frames, labels = videos[predicted], frames[predicted].astype(np.int64), labels[predicted]
    _check_frames(frames, "predicted frames")

    codes: dict[str, int] = {}
    predicted_codes = np.fromiter((codes.setdefault(video, len(codes)) for video in videos.tolist()),
                                  dtype=np.int64, count=videos.size)
    predicted_keys = (predicted_codes << _FRAME_BITS) | frames
    order = np.argsort(predicted_keys, kind="stable")
    predicted_keys, labels = predicted_keys[order], labels[order].astype(np.int64)
    repeated = np.flatnonzero(predicted_keys[1:] == predicted_keys[:-1])
    if repeated.size:
        key = int(predicted_keys[repeated[0]])
        video = videos[order[repeated[0]]]
        raise ValueError(f"video {video!r} frame {key & ((1 << _FRAME_BITS) - 1)} is predicted "
                         f"more than once ({repeated.size} repeats)")

    wanted_codes = np.fromiter((codes.get(video, -1) for video, _ in wanted), dtype=np.int64,
                               count=len(wanted))
    wanted_frames = np.fromiter((frame for _, frame in wanted), dtype=np.int64, count=len(wanted))
    _check_frames(wanted_frames, "wanted frames")
    # A video without predictions gets a code of its own (-1): no predicted key shares its high bits.
    wanted_keys = (wanted_codes << _FRAME_BITS) | wanted_frames

    counts = np.bincount(labels, minlength=schema.NUM_CLASSES)
    fallback = int(np.argmax(counts)) if labels.size else 0  # argmax: the lower id on a tie
    result = np.full(len(wanted), fallback, dtype=np.int64)

    if predicted_keys.size == 0:
        # A sentinel whose video code (2**31 - 1) no wanted frame has: every frame takes the fallback.
        predicted_keys = np.array([np.iinfo(np.int64).max], dtype=np.int64)
        labels = np.array([fallback], dtype=np.int64)
    after = np.searchsorted(predicted_keys, wanted_keys, side="left")
    before = after - 1
    size = predicted_keys.size
    after_clipped = np.minimum(after, size - 1)
    before_clipped = np.maximum(before, 0)
    has_after = (after < size) & ((predicted_keys[after_clipped] >> _FRAME_BITS) == wanted_codes)
    has_before = (before >= 0) & ((predicted_keys[before_clipped] >> _FRAME_BITS) == wanted_codes)
    exact = has_after & (predicted_keys[after_clipped] == wanted_keys)
    far = np.iinfo(np.int64).max
    distance_after = np.where(has_after, predicted_keys[after_clipped] - wanted_keys, far)
    distance_before = np.where(has_before, wanted_keys - predicted_keys[before_clipped], far)
    take_before = has_before & (distance_before <= distance_after)  # `<=`: earlier frame on a tie
    take_after = has_after & ~take_before
    result[take_before] = labels[before_clipped[take_before]]
    result[take_after] = labels[after_clipped[take_after]]

    without_video = ~(has_before | has_after)
    missing_videos = sorted({video for (video, _), missing in zip(wanted, without_video.tolist())
                             if missing}) if without_video.any() else []
    report = FillReport(
        exact=int(exact.sum()),
        filled_from_neighbour=int((~exact & ~without_video).sum()),
        filled_without_video=int(without_video.sum()),
        videos_without_predictions=missing_videos,
        fallback_label=fallback,
    )
    return result, report


def _check_frames(frames: np.ndarray, name: str) -> None:
    if frames.size and (frames.min() < 1 or frames.max() >= 1 << (_FRAME_BITS - 1)):
        raise ValueError(f"{name} must lie in 1..{(1 << (_FRAME_BITS - 1)) - 1}, found "
                         f"{int(frames.min())}..{int(frames.max())}")
