"""Aff-Wild2 EXPR: per-video annotation files and the cropped, aligned frames they label.

One unit per annotation file (video). Frames labeled -1 are kept, as unlabeled rows.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Iterator

from pipeline.data import images, schema, storage
from pipeline.data.readers.base import Batch, Plan, RowBuffer, SourceReader, SourceUnusable
from pipeline.data.readers.files import read_failure, read_files

# The 5th ABAW edition names the annotation folder one way, the 6th the other.
ANNOTATION_FOLDERS: tuple[str, ...] = ("EXPR_Classification_Challenge", "EXPR_Recognition_Challenge")
SPLIT_FOLDERS: dict[str, str] = {"Train_Set": schema.TRAIN, "Validation_Set": schema.VALIDATION}
FRAMES_FOLDER = "cropped_aligned"
HEADER = ",".join(schema.CLASS_NAMES)
ANNOTATION_SUFFIX = ".txt"


@dataclass(frozen=True)
class Unit:
    annotation: str  # path relative to the root
    video: str
    split: str


class AffWild2Reader(SourceReader):
    source = schema.AFFWILD2

    def __init__(self, root: str, full_decode: bool = False, read_batch: int = 256) -> None:
        if read_batch < 1:
            raise ValueError(f"read_batch must be at least 1, got {read_batch}")
        self.root = root
        self.full_decode = full_decode
        self.read_batch = read_batch

    def _annotation_folder(self) -> str:
        if not storage.is_dir(self.root):
            raise SourceUnusable(f"affwild2: {self.root} does not exist or is not a folder")
        present = [name for name in ANNOTATION_FOLDERS if storage.is_dir(storage.join(self.root, name))]
        if not present:
            expected = " or ".join(storage.join(self.root, name) for name in ANNOTATION_FOLDERS)
            raise SourceUnusable(f"affwild2: no annotation folder: expected {expected}")
        if len(present) > 1:
            both = " and ".join(storage.join(self.root, name) for name in present)
            raise SourceUnusable(
                f"affwild2: both {both} exist; keep one edition's annotations so labels are not "
                "read twice"
            )
        return present[0]

    def plan(self) -> Plan:
        annotation_folder = self._annotation_folder()
        frames = storage.join(self.root, FRAMES_FOLDER)
        if not storage.is_dir(frames):
            raise SourceUnusable(f"affwild2: frame folder {frames} does not exist")
        units: list[Unit] = []
        videos: dict[str, int] = {}
        missing_split_folders: list[str] = []
        for split_folder, split in SPLIT_FOLDERS.items():
            relative = posixpath.join(annotation_folder, split_folder)
            folder = storage.join(self.root, relative)
            if not storage.is_dir(folder):
                # One split alone is a usable corpus (validation-only users); the manifest says so.
                missing_split_folders.append(relative)
                continue
            names = [name for name in storage.list_dir(folder) if name.endswith(ANNOTATION_SUFFIX)]
            videos[split] = len(names)
            units += [Unit(posixpath.join(relative, name), name[:-len(ANNOTATION_SUFFIX)], split)
                      for name in names]
        if not units:
            expected = " or ".join(
                storage.join(self.root, annotation_folder, name) for name in SPLIT_FOLDERS)
            raise SourceUnusable(f"affwild2: no {ANNOTATION_SUFFIX} annotation file in {expected}")
        return Plan(units, details={"annotation_folder": annotation_folder, "videos": videos,
                                    "missing_split_folders": missing_split_folders})

    def read_unit(self, unit: Unit) -> Iterator[Batch]:
        rows = RowBuffer()
        labels = self._read_labels(unit, rows)
        if labels:
            yield from self._read_frames(unit, labels, rows)
        yield rows.take()

    def _read_labels(self, unit: Unit, rows: RowBuffer) -> dict[int, int]:
        """{frame: label} for the well-formed lines of the annotation file; skips for the rest."""
        try:
            text = storage.read_bytes(storage.join(self.root, unit.annotation)).decode(
                "utf-8-sig", errors="replace")
        except OSError as error:
            reason, detail = read_failure(error, "unreadable_file")
            # The video's frames are lost with its labels: count the frame files we can see.
            frames = self._frame_files(unit)
            rows.skip(reason, unit.annotation, f"{detail}; {frames} frame files not ingested", records=max(frames, 1))
            return {}
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        header = lines[0].replace("\ufeff", "").strip() if lines else ""
        if header != HEADER:
            rows.skip("annotation_bad_header", unit.annotation,
                      f"first line {header!r}, expected {HEADER!r}; "
                      f"{max(len(lines) - 1, 0)} lines not ingested", records=max(len(lines) - 1, 1))
            return {}
        labels: dict[int, int] = {}
        # The header is line 1, so frame i is on line i + 1.
        for frame, line in enumerate(lines[1:], start=1):
            sample_id = schema.affwild2_sample_id(unit.video, frame)
            location = f"{unit.annotation}:{frame + 1}"
            try:
                label = int(line.strip())
            except ValueError:
                rows.skip("annotation_bad_line", location, f"not an integer: {line.strip()!r}",
                          sample_id)
                continue
            if not schema.NO_LABEL <= label < schema.NUM_CLASSES:
                rows.skip("unknown_label", location, f"label {label} is outside -1..7", sample_id)
                continue
            labels[frame] = label
        return labels

    def _frame_names(self, unit: Unit) -> set[str]:
        """The file names in the video's frame folder: one listing per video tells every missing
        frame apart without a request each. Raises FileNotFoundError/NotADirectoryError when the
        folder is not there."""
        fs, base = storage.filesystem(self.root)
        entries = fs.ls(posixpath.join(base, FRAMES_FOLDER, unit.video), detail=False)
        return {posixpath.basename(entry.rstrip("/")) for entry in entries}

    def _frame_files(self, unit: Unit) -> int:
        """The number of .jpg files in the video's frame folder (0 if it cannot be listed)."""
        try:
            return sum(1 for name in self._frame_names(unit) if name.endswith(".jpg"))
        except OSError:
            return 0

    def _read_frames(self, unit: Unit, labels: dict[int, int], rows: RowBuffer) -> Iterator[Batch]:
        fs, base = storage.filesystem(self.root)
        relative_folder = posixpath.join(FRAMES_FOLDER, unit.video)
        try:
            present = self._frame_names(unit)
        except (FileNotFoundError, NotADirectoryError):
            rows.skip("missing_frame_folder", relative_folder,
                      f"{len(labels)} annotated frames not ingested", records=len(labels))
            return
        wanted: list[tuple[int, str]] = []
        for frame in labels:
            name = f"{frame:05d}.jpg"
            relative = posixpath.join(relative_folder, name)
            if name in present:
                wanted.append((frame, relative))
            else:
                rows.skip("missing_frame", relative, "annotated frame has no image file",
                          schema.affwild2_sample_id(unit.video, frame))
        for start in range(0, len(wanted), self.read_batch):
            batch = wanted[start:start + self.read_batch]
            contents = read_files(fs, [posixpath.join(base, relative) for _, relative in batch])
            for (frame, relative), data in zip(batch, contents):
                self._add_frame(rows, unit, frame, labels[frame], relative, data)
            if rows.full:
                yield rows.take()

    def _add_frame(self, rows: RowBuffer, unit: Unit, frame: int, label: int, relative: str,
                   data: bytes | Exception) -> None:
        sample_id = schema.affwild2_sample_id(unit.video, frame)
        if isinstance(data, Exception):
            reason, detail = read_failure(data, "missing_frame")
            rows.skip(reason, relative, detail, sample_id)
            return
        try:
            info = images.check(data, self.full_decode)
        except images.ImageError as error:
            rows.skip("bad_image", relative, str(error), sample_id)
            return
        rows.add(sample_id, data, info, label, schema.AFFWILD2, unit.split, video=unit.video,
                 frame=frame)

