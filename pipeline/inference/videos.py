"""Per-frame predictions turned into per-video results: frames in order, the sliding-window vote
per video, one Parquet file per video, and macro-F1 raw and smoothed when the frames carry labels.
Pure pyarrow/numpy.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.core import metrics, smoothing
from pipeline.data import schema, storage
from pipeline.data.schema import PREDICTED, RUN_ID

SMOOTHED = "smoothed"
VIDEOS_FOLDER = "videos"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]")


def in_frame_order(tables: list[pa.Table]) -> pa.Table:
    """All frame predictions, sorted by (video, frame); a frame listed twice is an error."""
    table = pa.concat_tables(tables, promote_options="default")
    if schema.VIDEO not in table.column_names or schema.FRAME not in table.column_names:
        raise ValueError("the inputs have no video/frame columns: per-video results need Aff-Wild2 "
                         "shards (crops of still images have no sequence)")
    if table[schema.VIDEO].null_count:
        raise ValueError(f"{table[schema.VIDEO].null_count} frames have no video; "
                         "pass Aff-Wild2 shards only (or --sources affwild2)")
    return table.sort_by([(schema.VIDEO, "ascending"), (schema.FRAME, "ascending")])


def add_smoothed(table: pa.Table, window: int, mode: str) -> pa.Table:
    """The `smoothed` label of every frame: a window vote over its own video only, in frame order
    (undecodable frames, predicted -1, do not vote)."""
    smoothed = smoothing.smooth_by_video(table[schema.VIDEO].to_numpy(zero_copy_only=False),
                                         table[schema.FRAME].to_numpy(), table[PREDICTED].to_numpy(),
                                         window, mode)
    return table.append_column(SMOOTHED, pa.array(smoothed.astype(np.int64)))


def video_file(video: str) -> str:
    """A file name for a video: its name with anything but [A-Za-z0-9._=-] replaced, so no name can
    leave the folder."""
    safe = _UNSAFE.sub("_", video)
    if safe in ("", ".", ".."):
        safe = f"video_{safe.replace('.', '_')}"
    return f"{safe}.parquet"


def write_videos(out: str, table: pa.Table, run_id: str) -> list[str]:
    """`<out>/videos/<video>.parquet` per video (rows in frame order, with the run id); removes
    video files a previous run left that this one did not write. Returns the relative paths."""
    folder = storage.join(out, VIDEOS_FOLDER)
    table = table.append_column(RUN_ID, pa.array([run_id] * table.num_rows, pa.string()))
    videos = table[schema.VIDEO].to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, videos[1:] != videos[:-1]]) if len(videos) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(videos)]
    written = []
    names: dict[str, str] = {}
    for start, end in zip(starts, ends):
        name = video_file(str(videos[start]))
        if name in names:
            raise ValueError(f"videos {names[name]!r} and {videos[start]!r} map to the same file {name}")
        names[name] = str(videos[start])
        storage.write_parquet_atomic(storage.join(folder, name), table.slice(start, end - start))
        written.append(f"{VIDEOS_FOLDER}/{name}")
    if storage.exists(folder):
        for stale in set(storage.list_dir(folder)) - set(names):
            storage.remove(storage.join(folder, stale))
    return written


def scores(table: pa.Table) -> dict[str, Any] | None:
    """Macro-F1 (and per-class F1, accuracy) of the raw and the smoothed labels over the frames
    that have a label (not -1) and decoded; None when no frame has a label."""
    targets = table[schema.LABEL].to_numpy() if schema.LABEL in table.column_names else None
    if targets is None or not (targets >= 0).any():
        return None
    predicted = table[PREDICTED].to_numpy()
    targets = np.where(predicted < 0, schema.NO_LABEL, targets)  # undecodable: not scored
    result: dict[str, Any] = {"scored_frames": int((targets >= 0).sum())}
    for name, labels in (("raw", predicted), ("smoothed", table[SMOOTHED].to_numpy())):
        report = metrics.classification_report(targets, labels)
        result[name] = {"macro_f1": report.macro_f1, "accuracy": report.accuracy,
                        "per_class_f1": report.per_class_f1}
    return result
