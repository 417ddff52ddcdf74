"""AffectNet: the face boxes of `training.csv` / `validation.csv`, cropped out of the images under
`Manually_Annotated_Images/`. Expressions 7..10 have no ABAW class and are left out by design
(counted in the manifest, not skipped).
"""

from __future__ import annotations

import csv
import posixpath
from collections import Counter
from typing import Iterator

from pipeline.data import schema, storage
from pipeline.data.readers.base import Batch, Plan, Skip, SourceReader, SourceUnusable
from pipeline.data.readers.files import (Face, FaceImage, open_text, parse_integer, parse_number,
                                         read_face_crops)

CSV_FILES: dict[str, str] = {"training.csv": schema.TRAIN, "validation.csv": schema.VALIDATION}
# Where users keep the csv files: beside the image folder, or in the folder AffectNet ships them in.
CSV_FOLDERS: tuple[str, ...] = ("", "Manually_Annotated_file_lists")
IMAGE_FOLDER = "Manually_Annotated_Images"
PATH_COLUMN = "subDirectory_filePath"
BOX_COLUMNS: tuple[str, ...] = ("face_x", "face_y", "face_width", "face_height")
EXPRESSION_COLUMN = "expression"
REQUIRED_COLUMNS: tuple[str, ...] = (PATH_COLUMN, *BOX_COLUMNS, EXPRESSION_COLUMN)
LARGEST_EXPRESSION = 10


class AffectNetReader(SourceReader):
    source = schema.AFFECTNET

    def __init__(self, root: str, rows_per_unit: int = 2048, jpeg_quality: int = 95,
                 read_batch: int = 64) -> None:
        if rows_per_unit < 1 or read_batch < 1:
            raise ValueError(
                f"rows_per_unit and read_batch must be at least 1, got {rows_per_unit}, {read_batch}")
        self.root = root
        self.rows_per_unit = rows_per_unit
        self.jpeg_quality = jpeg_quality
        self.read_batch = read_batch

    def _csv_files(self) -> dict[str, str]:
        """{csv path relative to the root: split} for each csv found, the root's copy first."""
        if not storage.is_dir(self.root):
            raise SourceUnusable(f"affectnet: {self.root} does not exist or is not a folder")
        found: dict[str, str] = {}
        looked: list[str] = []
        for name, split in CSV_FILES.items():
            for folder in CSV_FOLDERS:
                relative = posixpath.join(folder, name)
                looked.append(storage.join(self.root, relative))
                if storage.exists(looked[-1]):
                    found[relative] = split
                    break
        if not found:
            raise SourceUnusable(f"affectnet: no annotation csv; looked for {', '.join(looked)}")
        image_folder = storage.join(self.root, IMAGE_FOLDER)
        if not storage.is_dir(image_folder):
            raise SourceUnusable(f"affectnet: image folder {image_folder} does not exist")
        return found

    def plan(self) -> Plan:
        csv_files = self._csv_files()
        face_images: list[FaceImage] = []
        skipped: list[Skip] = []
        excluded: Counter[int] = Counter()
        first_seen: dict[str, str] = {}
        rows_read: dict[str, int] = {}
        for relative, split in csv_files.items():
            uri = storage.join(self.root, relative)
            with open_text(uri) as handle:
                reader = _dict_reader(handle, uri)
                rows_read[relative] = 0
                for row in reader:
                    rows_read[relative] += 1
                    location = f"{relative}:{reader.line_num}"
                    parsed = _parse_row(row, split, location)
                    if isinstance(parsed, Skip):
                        skipped.append(parsed)
                    elif isinstance(parsed, int):
                        excluded[parsed] += 1
                    elif parsed.sample_id in first_seen:
                        skipped.append(Skip("duplicate_sample_id", location,
                                            f"same image as {first_seen[parsed.sample_id]}",
                                            parsed.sample_id))
                    else:
                        first_seen[parsed.sample_id] = location
                        image = posixpath.join(IMAGE_FOLDER, row[PATH_COLUMN].strip())
                        face_images.append(FaceImage(image, (parsed,)))
        units = [face_images[start:start + self.rows_per_unit]
                 for start in range(0, len(face_images), self.rows_per_unit)]
        excluded_by_name = {f"affectnet_expression_{expression}_{name}": excluded[expression]
                            for expression, name in schema.AFFECTNET_EXCLUDED.items()
                            if excluded[expression]}
        return Plan(units, skipped, excluded_by_name,
                    details={"csv_files": csv_files, "rows_read": rows_read, "faces": len(face_images)})

    def read_unit(self, unit: list[FaceImage]) -> Iterator[Batch]:
        yield from read_face_crops(self.root, self.source, unit, self.read_batch, self.jpeg_quality)


def _dict_reader(handle, uri: str) -> csv.DictReader:
    """A csv reader over `handle` whose header has been checked for the required columns."""
    reader = csv.DictReader(handle)
    if reader.fieldnames is None:
        raise SourceUnusable(f"affectnet: {uri} is empty (no header line)")
    reader.fieldnames = [name.strip() for name in reader.fieldnames]
    missing = [name for name in REQUIRED_COLUMNS if name not in reader.fieldnames]
    if missing:
        raise SourceUnusable(
            f"affectnet: {uri} lacks the column(s) {', '.join(missing)} "
            f"(header: {','.join(reader.fieldnames)})")
    return reader


def _parse_row(row: dict, split: str, location: str) -> Face | Skip | int:
    """The face a csv row describes, the Skip saying why it gives none, or its excluded expression."""
    path = (row.get(PATH_COLUMN) or "").strip()
    sample_id = schema.affectnet_sample_id(path) if path else None
    try:
        if None in row:
            # csv puts fields beyond the header under None: the columns may be shifted.
            raise ValueError(f"{len(row[None])} more fields than the header")
        if not path:
            raise ValueError(f"no {PATH_COLUMN}")
        left, top, width, height = (parse_number(_field(row, column), column)
                                    for column in BOX_COLUMNS)
        expression = parse_integer(_field(row, EXPRESSION_COLUMN), EXPRESSION_COLUMN)
    except ValueError as error:
        return Skip("bad_row", location, str(error), sample_id)
    if not 0 <= expression <= LARGEST_EXPRESSION:
        return Skip("unknown_label", location,
                    f"expression {expression} is outside 0..{LARGEST_EXPRESSION}", sample_id)
    if expression in schema.AFFECTNET_EXCLUDED:
        return expression
    if width <= 0 or height <= 0:
        return Skip("degenerate_box", location, f"face box width {width} x height {height}",
                    sample_id)
    return Face(sample_id, (left, top, left + width, top + height),
                schema.AFFECTNET_TO_ABAW[expression], split)


def _field(row: dict, column: str) -> str:
    value = (row.get(column) or "").strip()
    if not value:
        raise ValueError(f"no {column}")
    return value
