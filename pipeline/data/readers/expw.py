"""ExpW: `label/label.lst` face boxes cropped out of the images under `image/origin/`.

Units hold whole images, so an image with several faces is read and decoded once.
"""

from __future__ import annotations

import posixpath
from typing import Iterator

from pipeline.data import schema, storage
from pipeline.data.readers.base import Batch, Plan, Skip, SourceReader, SourceUnusable
from pipeline.data.readers.files import (Face, FaceImage, open_text, parse_integer, parse_number,
                                         read_face_crops)

LABEL_FILE = "label/label.lst"
IMAGE_FOLDER = "image/origin"
# The columns of label.lst, spelled as the corpus documents them ("cofidence" included).
FIELDS = ("image_name", "face_id_in_image", "face_box_top", "face_box_left", "face_box_right",
          "face_box_bottom", "face_box_cofidence", "expression_label")


class ExpWReader(SourceReader):
    source = schema.EXPW

    def __init__(self, root: str, faces_per_unit: int = 2048, jpeg_quality: int = 95,
                 read_batch: int = 64) -> None:
        if faces_per_unit < 1 or read_batch < 1:
            raise ValueError(
                f"faces_per_unit and read_batch must be at least 1, got {faces_per_unit}, {read_batch}")
        self.root = root
        self.faces_per_unit = faces_per_unit
        self.jpeg_quality = jpeg_quality
        self.read_batch = read_batch

    def plan(self) -> Plan:
        if not storage.is_dir(self.root):
            raise SourceUnusable(f"expw: {self.root} does not exist or is not a folder")
        label_uri = storage.join(self.root, LABEL_FILE)
        if not storage.exists(label_uri):
            raise SourceUnusable(f"expw: label file {label_uri} does not exist")
        image_folder = storage.join(self.root, IMAGE_FOLDER)
        if not storage.is_dir(image_folder):
            raise SourceUnusable(f"expw: image folder {image_folder} does not exist")

        faces_by_image: dict[str, list[Face]] = {}
        skipped: list[Skip] = []
        first_seen: dict[str, str] = {}
        lines_read = 0
        with open_text(label_uri) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                lines_read += 1
                location = f"{LABEL_FILE}:{number}"
                parsed = _parse_line(line, location)
                if isinstance(parsed, Skip):
                    skipped.append(parsed)
                    continue
                image_name, face = parsed
                if face.sample_id in first_seen:
                    skipped.append(Skip("duplicate_sample_id", location,
                                        f"same image and face id as {first_seen[face.sample_id]}",
                                        face.sample_id))
                    continue
                first_seen[face.sample_id] = location
                faces_by_image.setdefault(image_name, []).append(face)

        units: list[list[FaceImage]] = []
        unit: list[FaceImage] = []
        unit_faces = 0
        for image_name, faces in faces_by_image.items():
            unit.append(FaceImage(posixpath.join(IMAGE_FOLDER, image_name), tuple(faces)))
            unit_faces += len(faces)
            if unit_faces >= self.faces_per_unit:
                units.append(unit)
                unit, unit_faces = [], 0
        if unit:
            units.append(unit)
        return Plan(units, skipped, details={
            "lines_read": lines_read, "images": len(faces_by_image), "faces": len(first_seen)})

    def read_unit(self, unit: list[FaceImage]) -> Iterator[Batch]:
        yield from read_face_crops(self.root, self.source, unit, self.read_batch, self.jpeg_quality)


def _parse_line(line: str, location: str) -> tuple[str, Face] | Skip:
    """(image name, face) for a well-formed line of label.lst, or the Skip saying what is wrong."""
    fields = line.split()
    if len(fields) != len(FIELDS):
        return Skip("bad_line", location, f"{len(fields)} fields, expected {len(FIELDS)}")
    image_name = fields[0]
    try:
        face_id = parse_integer(fields[1], FIELDS[1])
    except ValueError as error:
        return Skip("bad_line", location, str(error))
    sample_id = schema.expw_sample_id(image_name, face_id)
    try:
        top, left, right, bottom, _confidence = (
            parse_number(text, name) for text, name in zip(fields[2:7], FIELDS[2:7]))
        expression = parse_integer(fields[7], FIELDS[7])
    except ValueError as error:
        return Skip("bad_line", location, str(error), sample_id)
    if expression not in schema.EXPW_TO_ABAW:
        return Skip("unknown_label", location,
                    f"expression {expression} is outside 0..{len(schema.EXPW_TO_ABAW) - 1}", sample_id)
    if right <= left or bottom <= top:
        return Skip("degenerate_box", location,
                    f"face box left {left} top {top} right {right} bottom {bottom}", sample_id)
    return image_name, Face(sample_id, (left, top, right, bottom), schema.EXPW_TO_ABAW[expression],
                            schema.TRAIN)
