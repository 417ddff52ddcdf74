"""Post-processing (docs/methods.md): a per-video sliding-window vote over per-frame labels, never across
videos, centred or in blocks, in O(n) vectorised numpy.

Tie rule (`TIE_RULE`): among the labels tied for most votes in a window, the one with an occurrence
closest to the frame being labelled wins (in block mode: closest to the block's centre); if still
tied (equally close on both sides), the lower class id. Labels -1 do not vote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data import schema

CENTRED = "centred"
BLOCK = "block"
MODES: tuple[str, ...] = (CENTRED, BLOCK)

TIE_RULE = "closest_occurrence_then_lower_id"

# Larger than any doubled distance inside one array (2·n), so "no occurrence" always loses.
_FAR = np.iinfo(np.int64).max


def _as_numpy(values: Any) -> np.ndarray:
    # Duck-typed so this module never imports torch: tensors may live on a GPU or need grad.
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def smooth_labels(labels: Any, window: int, mode: str = CENTRED, groups: Any = None,
                  num_classes: int = schema.NUM_CLASSES) -> np.ndarray:
    """Replace each frame's label by the most frequent label of its window, per video.

    labels: class ids in frame order within each group; -1 (no prediction) does not vote, and a
        window without votes keeps -1.
    groups: one key per frame (video ids: str, int, any hashable numpy compares), the frames of a
        group contiguous; None means one video. A group that reappears after another started is an
        error: sort first, or call `smooth_by_video`.
    mode "centred": frame i's window holds frames i - window//2 .. i + (window-1)//2, so an even
        window takes its extra frame from the past (the convention of scipy.ndimage filters),
        truncated at the video's ends.
    mode "block": non-overlapping blocks of `window` frames from each video's first frame, the last
        one possibly shorter; every frame of a block gets the block's label.
    Ties (`TIE_RULE`): the tied label with an occurrence closest to the labelled frame (block mode:
    to the block's centre, which for an even block lies between its two middle frames) wins; if
    equally close, the lower class id.

    Returns an array of the input's dtype; window 1 returns a copy of the input.
    """
    labels = _as_numpy(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    invalid = (labels < schema.NO_LABEL) | (labels >= num_classes)
    if invalid.any():
        raise ValueError(f"labels must lie in {schema.NO_LABEL}..{num_classes - 1}; found "
                         f"{np.unique(labels[invalid])[:10].tolist()} ({int(invalid.sum())} items)")
    windows = _windows(labels.size, window, mode, groups)
    if window == 1:
        return labels.copy()
    return windows.expand(_vote(labels, num_classes, windows)).astype(labels.dtype, copy=False)


def smooth_probabilities(probabilities: Any, window: int, mode: str = CENTRED,
                         groups: Any = None) -> np.ndarray:
    """The averaging variant: argmax of the mean probabilities over the same windows as the vote.

    The papers' rule is the vote (`smooth_labels`); this is an option. Every row takes part (there
    is no "no prediction" row), and an exact tie goes to the lower class id, as `np.argmax` does;
    window sums come from cumulative sums, so near-ties are subject to float64 rounding.
    Returns int64 class ids, one per row.
    """
    probabilities = _as_numpy(probabilities)
    if probabilities.ndim != 2 or probabilities.shape[1] < 1:
        raise ValueError(f"probabilities must have shape (frames, classes), got {probabilities.shape}")
    if not np.isfinite(probabilities).all():
        raise ValueError("probabilities hold NaN or infinite values")
    windows = _windows(probabilities.shape[0], window, mode, groups)
    low, high = windows.low, windows.high
    best_label = np.zeros(low.size, dtype=np.int64)
    best_sum = np.full(low.size, -np.inf)
    cumulative = np.zeros(probabilities.shape[0] + 1, dtype=np.float64)
    # One class at a time keeps memory at O(n) instead of an (n, C) cumulative table; the window
    # sum ranks classes the same as the mean because all classes share the window's length.
    for label in range(probabilities.shape[1]):
        np.cumsum(probabilities[:, label], dtype=np.float64, out=cumulative[1:])
        window_sum = cumulative[high] - cumulative[low]
        better = window_sum > best_sum
        np.copyto(best_label, label, where=better)
        np.copyto(best_sum, window_sum, where=better)
    return windows.expand(best_label)


def smooth_by_video(videos: Any, frames: Any, predictions: Any, window: int, mode: str = CENTRED,
                    num_classes: int = schema.NUM_CLASSES) -> np.ndarray:
    """Smooth a per-frame prediction table in any row order; results come back in that order.

    predictions: class ids (n,) voted with `smooth_labels`, or probabilities (n, C) averaged with
    `smooth_probabilities`. Rows are sorted by (video, frame); the window counts rows, so a
    frame missing from the table is skipped over, not filled. A repeated (video, frame) is an error
    (it would vote twice).
    """
    videos = _as_numpy(videos)
    frames = _as_numpy(frames)
    predictions = _as_numpy(predictions)
    count = predictions.shape[0] if predictions.ndim else -1
    if videos.ndim != 1 or frames.ndim != 1 or videos.size != count or frames.size != count:
        raise ValueError(f"videos {videos.shape}, frames {frames.shape} and predictions "
                         f"{predictions.shape} must have one row per frame")
    # np.unique gives integer video codes, so lexsort never compares (possibly object) keys.
    video_keys, video_codes = np.unique(videos, return_inverse=True)
    video_codes = video_codes.reshape(-1)
    order = np.lexsort((frames, video_codes))
    sorted_codes = video_codes[order]
    sorted_frames = frames[order]
    repeated = (sorted_codes[1:] == sorted_codes[:-1]) & (sorted_frames[1:] == sorted_frames[:-1])
    if repeated.any():
        first = int(np.flatnonzero(repeated)[0])
        raise ValueError(f"video {video_keys[sorted_codes[first]].tolist()!r} lists frame "
                         f"{sorted_frames[first].tolist()!r} more than once ({int(repeated.sum())} repeats)")
    if predictions.ndim == 2:
        smoothed = smooth_probabilities(predictions[order], window, mode, groups=sorted_codes)
    else:
        smoothed = smooth_labels(predictions[order], window, mode, groups=sorted_codes,
                                 num_classes=num_classes)
    restored = np.empty_like(smoothed)
    restored[order] = smoothed
    return restored


@dataclass(frozen=True)
class _Windows:
    """The windows of one call, one per query: a frame (centred) or a block."""

    low: np.ndarray
    high: np.ndarray
    """Window bounds [low, high), inside the query's video."""
    before: np.ndarray
    after: np.ndarray
    """Where the tie rule looks back from and forward from: the frame, or a block's middle frames."""
    anchor: np.ndarray
    """The labelled frame or the block's centre, doubled so a centre between two frames is whole."""
    block_lengths: np.ndarray | None
    """Frames per block (block mode), None when queries are frames."""

    def expand(self, values: np.ndarray) -> np.ndarray:
        """Per-query values as per-frame values (block mode repeats each block's value)."""
        return values if self.block_lengths is None else np.repeat(values, self.block_lengths)


def _windows(size: int, window: int, mode: str, groups: Any) -> _Windows:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    window = int(window)
    group_starts = _group_starts(size, groups)
    group_lengths = np.diff(np.append(group_starts, size))
    positions = np.arange(size, dtype=np.int64)
    first = np.repeat(group_starts, group_lengths)  # each frame's group start
    end = np.repeat(group_starts + group_lengths, group_lengths)  # each frame's group end
    if mode == CENTRED:
        low = np.maximum(positions - window // 2, first)
        high = np.minimum(positions + (window - 1) // 2 + 1, end)
        return _Windows(low, high, positions, positions, 2 * positions, None)
    # Every group start is a block start, so the next block start (or the end) closes each block.
    low = np.flatnonzero((positions - first) % window == 0).astype(np.int64)
    high = np.append(low[1:], size)[: low.size].astype(np.int64)
    return _Windows(low, high, (low + high - 1) // 2, (low + high) // 2, low + high - 1, high - low)


def _group_starts(size: int, groups: Any) -> np.ndarray:
    """The first frame of each group, validating that groups are contiguous."""
    if groups is None:
        return np.zeros(min(size, 1), dtype=np.int64)
    groups = _as_numpy(groups)
    if groups.shape != (size,):
        raise ValueError(f"groups must have one key per frame: shape {groups.shape} for {size} frames")
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.append(True, groups[1:] != groups[:-1])).astype(np.int64)
    keys = groups[starts].tolist()
    if len(set(keys)) != len(keys):
        seen: set = set()
        for key in keys:  # one step per group run, not per frame
            if key in seen:
                raise ValueError(f"group {key!r} reappears after another group started: the frames "
                                 "of a group must be contiguous (sort by group and frame first)")
            seen.add(key)
    return starts


def _vote(labels: np.ndarray, num_classes: int, windows: _Windows) -> np.ndarray:
    """The winning label per window, under `TIE_RULE`; -1 where no frame votes."""
    low, high, anchor = windows.low, windows.high, windows.anchor
    size = labels.size
    positions = np.arange(size, dtype=np.int64)
    best_label = np.full(low.size, schema.NO_LABEL, dtype=np.int64)
    best_count = np.zeros(low.size, dtype=np.int64)
    best_distance = np.full(low.size, _FAR, dtype=np.int64)
    cumulative = np.zeros(size + 1, dtype=np.int64)
    # Classes in ascending order with a strict "closer" test: an exact tie keeps the lower id.
    for label in range(num_classes):
        present = labels == label
        if not present.any():
            continue
        np.cumsum(present, out=cumulative[1:])
        count = cumulative[high] - cumulative[low]
        # Last occurrence at or before each position, and first at or after it; the scans run over
        # the whole array, and the window bounds below discard hits from a neighbouring video.
        last_seen = np.maximum.accumulate(np.where(present, positions, -1))
        next_seen = np.minimum.accumulate(np.where(present, positions, size)[::-1])[::-1]
        previous = last_seen[windows.before]
        following = next_seen[windows.after]
        distance = np.minimum(
            np.where(previous >= low, anchor - 2 * previous, _FAR),
            np.where(following < high, 2 * following - anchor, _FAR),
        )
        better = count > best_count
        better |= (count == best_count) & (distance < best_distance)
        better &= count > 0
        np.copyto(best_label, label, where=better)
        np.copyto(best_count, count, where=better)
        np.copyto(best_distance, distance, where=better)
    return best_label
