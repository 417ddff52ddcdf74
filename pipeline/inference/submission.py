"""The ABAW EXPR test submission (docs/methods.md): the list of frames to label, and writing and
checking the file. Frames without a prediction take their video's nearest predicted frame's label
(`pipeline.core.frame_filling.fill_labels`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pipeline.core.frame_filling import Frame
from pipeline.data import schema, storage
from pipeline.data.readers.affwild2 import ANNOTATION_SUFFIX
from pipeline.data.readers.affwild2 import HEADER as ANNOTATION_HEADER

HEADER = "image_location," + ",".join(schema.CLASS_NAMES)
LOCATION_COLUMN = "image_location"

FRAME_SUFFIX = ".jpg"
_LABEL_TEXTS = frozenset(str(label) for label in range(schema.NUM_CLASSES))


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
