"""Per-frame predictions turned into per-video results: frames in order, the sliding-window vote
per video, one Parquet file per video, and macro-F1 raw and smoothed when the frames carry labels.
Pure pyarrow/numpy.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import metrics, schema, smoothing, storage
from pipeline.inference import CONFIDENCE, DECODED, FEATURES, PREDICTED, PROBABILITY_COLUMNS
from pipeline.prediction_files import write_table_atomic

SMOOTHED = "smoothed"
RUN_ID = "run_id"
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


def apply_temporal(table: pa.Table, model: Any, config: Any) -> pa.Table:
    """Replace the frame model's probabilities and labels by the temporal encoder's over each video
    (frames in order, windows of `config.clip_length`); keeps the frame model's label as
    `frame_predicted` and drops the features. Undecodable frames (no features) stay -1."""
    from pipeline.temporal import FrameSequences, predict_sequences

    decoded = table[DECODED].to_numpy(zero_copy_only=False)
    width = table.schema.field(FEATURES).type.list_size
    features = table[FEATURES].combine_chunks().flatten().to_numpy().reshape(table.num_rows, width)
    probabilities = np.zeros((table.num_rows, schema.NUM_CLASSES), np.float32)
    if decoded.any():
        rows = np.flatnonzero(decoded)
        sequences = FrameSequences(features[rows], np.full(rows.size, schema.NO_LABEL),
                                   table[schema.VIDEO].to_numpy(zero_copy_only=False)[rows],
                                   table[schema.FRAME].to_numpy()[rows], config.clip_length)
        probabilities[rows] = predict_sequences(model, sequences, config.batch_clips, config.inference_stride)
    predicted = np.where(decoded, probabilities.argmax(axis=1), schema.NO_LABEL)
    table = table.drop_columns([FEATURES]).rename_columns(
        [f"frame_{PREDICTED}" if name == PREDICTED else name for name in table.column_names if name != FEATURES])
    for index, name in enumerate(PROBABILITY_COLUMNS):
        table = table.set_column(table.column_names.index(name), name, pa.array(probabilities[:, index]))
    table = table.append_column(PREDICTED, pa.array(predicted.astype(np.int64)))
    return table.set_column(table.column_names.index(CONFIDENCE), CONFIDENCE, pa.array(probabilities.max(axis=1)))


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
        write_table_atomic(storage.join(folder, name), table.slice(start, end - start))
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
