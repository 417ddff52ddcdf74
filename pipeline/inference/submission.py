"""The ABAW EXPR test submission (docs/methods.md): the list of frames to label, labels for frames without
a prediction filled from their video's nearest predicted frame, and writing and checking the file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from pipeline.data import schema, storage
from pipeline.data.readers.affwild2 import ANNOTATION_SUFFIX
from pipeline.data.readers.affwild2 import HEADER as ANNOTATION_HEADER

HEADER = "image_location," + ",".join(schema.CLASS_NAMES)
LOCATION_COLUMN = "image_location"

FILL_RULE = "nearest_predicted_frame_of_the_video_earlier_on_tie"
"""A frame without its own prediction takes the label of the closest predicted frame of its video;
at equal distance before and after, the earlier frame's."""
FALLBACK_RULE = "most_frequent_predicted_label_lower_id_on_tie_else_neutral"
"""A video without any predicted frame takes the label predicted most often over all videos (the
lower class id on a tie), or Neutral (0) when nothing at all was predicted."""

FRAME_SUFFIX = ".jpg"
_LABEL_TEXTS = frozenset(str(label) for label in range(schema.NUM_CLASSES))
# Frames and video codes packed in one int64 key, video in the high bits: sorting the keys sorts by
# (video, frame), so one searchsorted serves every video at once.
_FRAME_BITS = 32

Frame = tuple[str, int]


def frame_location(video: str, frame: int) -> str:
    """The submission's name of a frame: `video/00001.jpg`, as Aff-Wild2's cropped_aligned files."""
    return f"{video}/{frame:05d}{FRAME_SUFFIX}"


def parse_location(text: str) -> Frame:
    """(video, frame) of a `video/00001.jpg` name; ValueError (without file context) otherwise."""
    video, _, name = text.rpartition("/")
    digits = name[:-len(FRAME_SUFFIX)]
    if (not video or not name.endswith(FRAME_SUFFIX) or not (digits.isascii() and digits.isdigit())
            or "," in video or video != video.strip()):
        raise ValueError(f"{text!r} is not a frame name of the form <video>/<00001>.jpg")
    frame = int(digits)
    if frame < 1:
        raise ValueError(f"{text!r}: frames are numbered from 1")
    # Names must come back byte for byte when written: 00001 and 000001 are different files.
    if len(digits) != len(f"{frame:05d}"):
        raise ValueError(f"{text!r}: frame numbers are zero-padded to 5 digits, no more")
    return video, frame


def read_frame_list(uri: str) -> list[Frame]:
    """The frames to label, in file order, from a text file (local or s3://) of `video/00001.jpg` lines.

    A first line starting with `image_location` is a header and is skipped; a second column (a
    label, as in a submission file) is ignored; blank lines are ignored. Anything else, and a frame
    listed twice, is a ValueError naming the file and line.
    """
    frames: list[Frame] = []
    first_line: dict[Frame, int] = {}
    for index, (number, line) in enumerate(_lines(uri)):
        if index == 0 and line.startswith(LOCATION_COLUMN):
            continue
        fields = line.split(",")
        if len(fields) > 2:
            raise ValueError(f"{uri}:{number}: expected `video/00001.jpg` with at most one label "
                             f"column, got {len(fields)} columns: {line!r}")
        try:
            frame = parse_location(fields[0].strip())
        except ValueError as error:
            raise ValueError(f"{uri}:{number}: {error}") from None
        if frame in first_line:
            raise ValueError(f"{uri}:{number}: {frame_location(*frame)} is already listed on line "
                             f"{first_line[frame]}")
        first_line[frame] = number
        frames.append(frame)
    return frames


def frame_list_from_annotations(folder: str) -> list[Frame]:
    """Every frame an Aff-Wild2 EXPR annotation folder lists (labels -1 included), video by video.

    Frame i is on line i + 1 of `<video>.txt` (the header is line 1); trailing blank lines are not
    frames. Videos come in name order, frames in frame order.
    """
    names = [name for name in storage.list_dir(folder) if name.endswith(ANNOTATION_SUFFIX)]
    if not names:
        raise ValueError(f"{folder}: no {ANNOTATION_SUFFIX} annotation file")
    frames: list[Frame] = []
    for name in names:
        uri = storage.join(folder, name)
        lines = storage.read_bytes(uri).decode("utf-8-sig").splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        header = lines[0].strip() if lines else ""
        if header != ANNOTATION_HEADER:
            raise ValueError(f"{uri}:1: expected the header {ANNOTATION_HEADER!r}, got {header!r}")
        video = name[:-len(ANNOTATION_SUFFIX)]
        frames += [(video, frame) for frame in range(1, len(lines))]
    return frames


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
        raise ValueError(f"{frame_location(str(video), key & ((1 << _FRAME_BITS) - 1))} is predicted "
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


def write_submission(uri: str, wanted: Sequence[Frame], labels: Any) -> None:
    """Write the submission file atomically (local or s3://): the header, then `video/00001.jpg,<id>`
    per wanted frame in `wanted`'s order. Labels must be 0..7, one per frame; frames must be
    distinct and numbered from 1, video names free of commas and line breaks."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size != len(wanted):
        raise ValueError(f"{len(wanted)} frames but labels of shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    invalid = (labels < 0) | (labels >= schema.NUM_CLASSES)
    if invalid.any():
        first = int(np.flatnonzero(invalid)[0])
        raise ValueError(f"labels must lie in 0..{schema.NUM_CLASSES - 1} (every listed frame needs "
                         f"a class): {int(invalid.sum())} do not, the first {labels[first]} for "
                         f"{frame_location(*wanted[first])}")
    if len(set(wanted)) != len(wanted):
        raise ValueError("a frame is listed more than once")
    lines = [HEADER]
    for (video, frame), label in zip(wanted, labels.tolist()):
        location = frame_location(video, frame)
        if frame < 1 or "," in video or "\n" in video or "\r" in video or not video.strip():
            raise ValueError(f"{location!r} cannot be written as a submission frame name")
        lines.append(f"{location},{label}")
    storage.write_bytes_atomic(uri, ("\n".join(lines) + "\n").encode())


def read_submission(uri: str) -> tuple[list[Frame], np.ndarray]:
    """The frames and labels (int64) of a submission file, checking the header and every line.

    A ValueError names the file and line of the first problem: a wrong header, a blank line, a bad
    frame name, a label outside 0..7, or a frame listed twice.
    """
    frames: list[Frame] = []
    labels: list[int] = []
    first_line: dict[Frame, int] = {}
    text = storage.read_bytes(uri).decode("utf-8")
    lines = text.splitlines()
    if not lines or lines[0] != HEADER:
        raise ValueError(f"{uri}:1: expected the header {HEADER!r}, got "
                         f"{(lines[0] if lines else '')!r}")
    for number, line in enumerate(lines[1:], start=2):
        location, separator, label = line.partition(",")
        if not separator or "," in label:
            raise ValueError(f"{uri}:{number}: expected `video/00001.jpg,<label>`, got {line!r}")
        if label not in _LABEL_TEXTS:
            raise ValueError(f"{uri}:{number}: label {label!r} is not one of 0..{schema.NUM_CLASSES - 1}")
        try:
            frame = parse_location(location)
        except ValueError as error:
            raise ValueError(f"{uri}:{number}: {error}") from None
        if frame in first_line:
            raise ValueError(f"{uri}:{number}: {location} is already listed on line {first_line[frame]}")
        first_line[frame] = number
        frames.append(frame)
        labels.append(int(label))
    return frames, np.asarray(labels, dtype=np.int64)


def _lines(uri: str) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of the non-blank lines of a text file."""
    text = storage.read_bytes(uri).decode("utf-8-sig")
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)
            if line.strip()]


def _check_frames(frames: np.ndarray, name: str) -> None:
    if frames.size and (frames.min() < 1 or frames.max() >= 1 << (_FRAME_BITS - 1)):
        raise ValueError(f"{name} must lie in 1..{(1 << (_FRAME_BITS - 1)) - 1}, found "
                         f"{int(frames.min())}..{int(frames.max())}")
