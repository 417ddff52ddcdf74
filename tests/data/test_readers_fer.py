"""The Aff-Wild2, AffectNet and ExpW readers on tiny corpora built in tmp_path, run through ingest."""

from __future__ import annotations

import io
import os
import pickle
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import ingest as ingest_module
from pipeline.data import schema, storage


def ingest(reader, out, **options):
    """These corpora are mostly damage on purpose: allow any skip fraction."""
    return ingest_module.ingest(reader, out, max_skipped_fraction=1.0, **options)
from pipeline.data.readers.affectnet import AffectNetReader
from pipeline.data.readers.affwild2 import HEADER, AffWild2Reader
from pipeline.data.readers.base import SourceUnusable
from pipeline.data.readers.expw import ExpWReader
from pipeline.data.readers.files import read_files
from pipeline.data.shards import MANIFEST_NAME, Manifest

RED = (220, 20, 20)
BLUE = (20, 20, 220)
GREEN = (20, 200, 20)
NOT_AN_IMAGE = b"this is not an image"
CLASSIFICATION = "EXPR_Classification_Challenge"
RECOGNITION = "EXPR_Recognition_Challenge"


# ---------------------------------------------------------------- helpers


def jpeg(width: int, height: int, colour=(128, 128, 128)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def two_colour_jpeg(width: int, height: int, split_x: int, left=RED, right=BLUE) -> bytes:
    """Left of `split_x` one colour, right of it another: tells where a crop came from."""
    image = Image.new("RGB", (width, height), right)
    image.paste(left, (0, 0, split_x, height))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write(path, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def shard_folder(out) -> dict:
    """Part files and their sizes (the manifest's size varies with its timing fields)."""
    return {name: os.path.getsize(os.path.join(out, name)) for name in sorted(os.listdir(out))
            if name != MANIFEST_NAME}


def read_rows(out, source: str) -> list[dict]:
    folder = storage.join(str(out), source)
    manifest = Manifest.load(folder)
    tables = [pq.read_table(uri) for uri in manifest.file_uris(folder)]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    return sorted(rows, key=lambda row: row[schema.SAMPLE_ID])


def mean_colour(data: bytes) -> tuple[int, ...]:
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    return tuple(int(round(value)) for value in pixels.reshape(-1, 3).mean(axis=0))


def near(colour, expected, tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(colour, expected))


def skips(manifest: Manifest) -> list[tuple[str, str, str | None]]:
    return sorted((skip["reason"], skip["location"], skip.get("sample_id"))
                  for skip in manifest.skipped)


# ---------------------------------------------------------------- Aff-Wild2


def affwild2_annotation(labels: list[str], newline: str = "\n", header: str = HEADER) -> str:
    return newline.join([header, *labels]) + newline


def write_affwild2_video(root, annotation_folder: str, split_folder: str, video: str,
                         labels: list[str], frames: dict[int, bytes] | None) -> None:
    write(os.path.join(root, annotation_folder, split_folder, f"{video}.txt"),
          affwild2_annotation(labels))
    if frames is not None:
        for frame, data in frames.items():
            write(os.path.join(root, "cropped_aligned", video, f"{frame:05d}.jpg"), data)


@pytest.mark.parametrize("annotation_folder", [CLASSIFICATION, RECOGNITION])
def test_affwild2_happy_path_both_editions_and_two_person_videos(tmp_path, annotation_folder):
    root = tmp_path / "affwild2"
    frame_bytes = {(video, frame): jpeg(8, 6, (frame * 30, 10, 10))
                   for video, count in (("video1", 4), ("video2", 2), ("10-60-1280x720_left", 2),
                                        ("10-60-1280x720_right", 1)) for frame in range(1, count + 1)}

    def frames_of(video):
        return {frame: data for (name, frame), data in frame_bytes.items() if name == video}

    write_affwild2_video(root, annotation_folder, "Train_Set", "video1", ["0", "4", "-1", "7"],
                         frames_of("video1"))
    write_affwild2_video(root, annotation_folder, "Train_Set", "10-60-1280x720_left", ["1", "2"],
                         frames_of("10-60-1280x720_left"))
    write_affwild2_video(root, annotation_folder, "Train_Set", "10-60-1280x720_right", ["3"],
                         frames_of("10-60-1280x720_right"))
    write_affwild2_video(root, annotation_folder, "Validation_Set", "video2", ["5", "6"],
                         frames_of("video2"))
    out = tmp_path / "out"

    manifest = ingest(AffWild2Reader(str(root), read_batch=3), str(out), progress=False)

    rows = read_rows(out, schema.AFFWILD2)
    expected = [
        ("10-60-1280x720_left", 1, 1, schema.TRAIN), ("10-60-1280x720_left", 2, 2, schema.TRAIN),
        ("10-60-1280x720_right", 1, 3, schema.TRAIN),
        ("video1", 1, 0, schema.TRAIN), ("video1", 2, 4, schema.TRAIN),
        ("video1", 3, -1, schema.TRAIN), ("video1", 4, 7, schema.TRAIN),
        ("video2", 1, 5, schema.VALIDATION), ("video2", 2, 6, schema.VALIDATION),
    ]
    assert [(row["video"], row["frame"], row["label"], row["split"]) for row in rows] == expected
    for row in rows:
        assert row["sample_id"] == f"affwild2/{row['video']}/{row['frame']:05d}"
        assert row["source"] == schema.AFFWILD2
        assert row["identity"] is None
        assert (row["height"], row["width"]) == (6, 8)
        assert row["image"] == frame_bytes[(row["video"], row["frame"])]
    assert manifest.skipped == []
    assert manifest.rows_by_split_label == {
        schema.TRAIN: {"-1": 1, "0": 1, "1": 1, "2": 1, "3": 1, "4": 1, "7": 1},
        schema.VALIDATION: {"5": 1, "6": 1},
    }
    assert manifest.details["annotation_folder"] == annotation_folder
    assert manifest.details["videos"] == {schema.TRAIN: 3, schema.VALIDATION: 1}
    assert manifest.details["missing_split_folders"] == []


def test_affwild2_one_split_alone_is_usable_and_recorded(tmp_path):
    root = tmp_path / "affwild2"
    write_affwild2_video(root, RECOGNITION, "Validation_Set", "video9", ["2"], {1: jpeg(8, 8)})

    manifest = ingest(AffWild2Reader(str(root)), str(tmp_path / "out"), progress=False)

    assert manifest.rows_by_split_label == {schema.VALIDATION: {"2": 1}}
    assert manifest.details["missing_split_folders"] == [f"{RECOGNITION}/Train_Set"]


def test_affwild2_record_problems_are_skipped_and_counted(tmp_path):
    root = tmp_path / "affwild2"
    good = jpeg(8, 8, GREEN)
    # Line i + 1 of the file labels frame i; CRLF endings, a BOM and trailing blank lines.
    labels = ["0", "abc", "9", "-1", "2", "1", "3", "", "4", "", ""]
    text = "\ufeff" + affwild2_annotation(labels, newline="\r\n")
    write(os.path.join(root, CLASSIFICATION, "Train_Set", "clip.txt"), text)
    frames = {1: good, 2: good, 3: good, 4: good, 6: NOT_AN_IMAGE, 7: good[:-40], 8: good, 9: good}
    for frame, data in frames.items():  # frame 5 has no file
        write(os.path.join(root, "cropped_aligned", "clip", f"{frame:05d}.jpg"), data)
    # A wrong header leaves the whole file out, with one skip saying how many lines.
    write(os.path.join(root, CLASSIFICATION, "Train_Set", "badheader.txt"),
          affwild2_annotation(["0", "1", "2"], header="Neutral,Anger,Disgust,Fear,Happy,Sad,Surprise"))
    write(os.path.join(root, "cropped_aligned", "badheader", "00001.jpg"), good)
    # An annotation without its frame folder: one skip for the whole video.
    write(os.path.join(root, CLASSIFICATION, "Validation_Set", "noframes.txt"),
          affwild2_annotation(["0", "1"]))
    out = tmp_path / "out"

    manifest = ingest(AffWild2Reader(str(root), read_batch=2), str(out), progress=False)

    rows = read_rows(out, schema.AFFWILD2)
    assert [(row["frame"], row["label"]) for row in rows] == [(1, 0), (4, -1), (9, 4)]
    annotation = f"{CLASSIFICATION}/Train_Set/clip.txt"
    assert skips(manifest) == sorted([
        ("annotation_bad_header", f"{CLASSIFICATION}/Train_Set/badheader.txt", None),
        ("annotation_bad_line", f"{annotation}:3", "affwild2/clip/00002"),
        ("annotation_bad_line", f"{annotation}:9", "affwild2/clip/00008"),
        ("bad_image", "cropped_aligned/clip/00006.jpg", "affwild2/clip/00006"),
        ("bad_image", "cropped_aligned/clip/00007.jpg", "affwild2/clip/00007"),
        ("missing_frame", "cropped_aligned/clip/00005.jpg", "affwild2/clip/00005"),
        ("missing_frame_folder", "cropped_aligned/noframes", None),
        ("unknown_label", f"{annotation}:4", "affwild2/clip/00003"),
    ])
    by_reason = {skip["reason"]: skip for skip in manifest.skipped}
    assert "3 lines not ingested" in by_reason["annotation_bad_header"]["detail"]
    assert "Happy" in by_reason["annotation_bad_header"]["detail"]
    assert by_reason["missing_frame_folder"]["detail"].startswith("2 ")
    by_location = {skip["location"]: skip["detail"] for skip in manifest.skipped}
    assert "'abc'" in by_location[f"{annotation}:3"]
    # Nothing dropped silently: rows, per-frame skips and the frames the two whole-file skips
    # count add up to every annotation line of the three files.
    per_frame = [skip for skip in manifest.skipped if "sample_id" in skip]
    whole_file = [int(re.match(r"\d+", skip["detail"].split("; ")[-1]).group())
                  for skip in manifest.skipped if "sample_id" not in skip]
    assert manifest.rows + len(per_frame) + sum(whole_file) == 9 + 3 + 2
    # The manifest counts the records the skips stand for, not the skips.
    assert manifest.rows + manifest.skipped_records == 9 + 3 + 2
    assert manifest.skipped_by_reason["missing_frame_folder"] == 2
    assert manifest.skipped_by_reason["annotation_bad_header"] == 3


def test_affwild2_videos_whose_frames_vanished_fail_the_skip_guard(tmp_path):
    """Frame folders of 2 of 3 videos gone (a storage outage): two skips, but 20 of 30 annotated
    frames lost, more than the default half, so no manifest is written."""
    root = tmp_path / "affwild2"
    for video in ("video1", "video2", "video3"):
        frames = {frame: jpeg(8, 8) for frame in range(1, 11)} if video == "video1" else None
        write_affwild2_video(root, CLASSIFICATION, "Train_Set", video, ["1"] * 10, frames)
    with pytest.raises(ingest_module.TooManySkipped, match=r"20 records skipped \(2 skips\) against 10 read"):
        ingest_module.ingest(AffWild2Reader(str(root)), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / schema.AFFWILD2 / MANIFEST_NAME).exists()


def test_affwild2_both_annotation_folders_is_unusable(tmp_path):
    root = tmp_path / "affwild2"
    for folder in (CLASSIFICATION, RECOGNITION):
        write_affwild2_video(root, folder, "Train_Set", "video1", ["0"], {1: jpeg(8, 8)})
    with pytest.raises(SourceUnusable, match="keep one") as raised:
        AffWild2Reader(str(root)).plan()
    assert CLASSIFICATION in str(raised.value) and RECOGNITION in str(raised.value)


def test_affwild2_unusable_layouts_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(SourceUnusable, match=str(missing)):
        AffWild2Reader(str(missing)).plan()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceUnusable, match=CLASSIFICATION):
        AffWild2Reader(str(empty)).plan()

    no_frames = tmp_path / "no_frames"
    write(os.path.join(no_frames, CLASSIFICATION, "Train_Set", "video1.txt"), affwild2_annotation(["0"]))
    with pytest.raises(SourceUnusable, match=os.path.join(str(no_frames), "cropped_aligned")):
        AffWild2Reader(str(no_frames)).plan()

    no_annotations = tmp_path / "no_annotations"
    write(os.path.join(no_annotations, CLASSIFICATION, "Train_Set", "readme.md"), "notes")
    (no_annotations / "cropped_aligned").mkdir()
    with pytest.raises(SourceUnusable, match="no .txt annotation file") as raised:
        AffWild2Reader(str(no_annotations)).plan()
    assert str(no_annotations) in str(raised.value)


# ---------------------------------------------------------------- AffectNet

AFFECTNET_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
                    "expression,valence,arousal")
LANDMARKS = '"10.1;20.2;30.3;40.4"'


def affectnet_row(path: str, box: tuple, expression) -> str:
    return ",".join([path, *map(str, box), LANDMARKS, str(expression), "0.1", "-0.2"])


def write_affectnet_csv(path, rows: list[str]) -> None:
    write(path, "\n".join([AFFECTNET_HEADER, *rows]) + "\n")


def test_affectnet_happy_path_crops_maps_and_splits(tmp_path):
    root = tmp_path / "affectnet"
    images = os.path.join(root, "Manually_Annotated_Images")
    write(os.path.join(images, "1", "a.jpg"), two_colour_jpeg(100, 80, split_x=50))
    write(os.path.join(images, "1", "b[1].jpg"), jpeg(60, 60, GREEN))
    write(os.path.join(images, "2", "c.jpg"), jpeg(40, 30, BLUE))
    write_affectnet_csv(os.path.join(root, "training.csv"), [
        affectnet_row("1/a.jpg", (60, 10, 30, 40), 1),  # right (blue) half of a.jpg; Happy -> 4
        affectnet_row("1/b[1].jpg", (5, 5, 20, 10), 6),  # Anger -> 1
    ])
    write_affectnet_csv(os.path.join(root, "Manually_Annotated_file_lists", "validation.csv"), [
        affectnet_row("2/c.jpg", (0, 0, 40, 30), 4),  # Fear -> 3, the whole image
    ])
    out = tmp_path / "out"

    manifest = ingest(AffectNetReader(str(root), rows_per_unit=2, read_batch=1), str(out),
                      progress=False)

    rows = read_rows(out, schema.AFFECTNET)
    assert [(row["sample_id"], row["label"], row["split"], row["width"], row["height"])
            for row in rows] == [
        ("affectnet/1/a.jpg", 4, schema.TRAIN, 30, 40),
        ("affectnet/1/b[1].jpg", 1, schema.TRAIN, 20, 10),
        ("affectnet/2/c.jpg", 3, schema.VALIDATION, 40, 30),
    ]
    for row in rows:
        assert row["source"] == schema.AFFECTNET
        assert row["video"] is None and row["frame"] is None and row["identity"] is None
        image = Image.open(io.BytesIO(row["image"]))
        assert image.format == "JPEG" and image.size == (row["width"], row["height"])
    assert near(mean_colour(rows[0]["image"]), BLUE)
    assert manifest.skipped == [] and manifest.excluded == {}
    assert manifest.details["csv_files"] == {
        "training.csv": schema.TRAIN, "Manually_Annotated_file_lists/validation.csv": schema.VALIDATION}
    assert manifest.details["units"] == 2


def test_affectnet_row_problems_exclusions_and_read_skips(tmp_path):
    root = tmp_path / "affectnet"
    images = os.path.join(root, "Manually_Annotated_Images")
    write(os.path.join(images, "1", "ok.jpg"), jpeg(100, 80, RED))
    write(os.path.join(images, "1", "edge.jpg"), jpeg(100, 80, RED))
    write(os.path.join(images, "1", "outside.jpg"), jpeg(100, 80, RED))
    write(os.path.join(images, "1", "corrupt.jpg"), NOT_AN_IMAGE)
    write(os.path.join(images, "1", "excluded.jpg"), jpeg(10, 10))
    csv_rows = [
        affectnet_row("1/ok.jpg", (10, 10, 20, 20), 0),  # line 2: kept
        "1/short.jpg,1,2",  # line 3: missing fields
        affectnet_row("1/nan.jpg", ("abc", 1, 10, 10), 0),  # line 4: non-numeric
        affectnet_row("1/big.jpg", (1, 1, 10, 10), 11),  # line 5: unknown label
        affectnet_row("1/neg.jpg", (1, 1, 10, 10), -1),  # line 6: unknown label
        affectnet_row("1/flat.jpg", (1, 1, 0, 10), 2),  # line 7: degenerate box
        affectnet_row("1/edge.jpg", (80, 60, 50, 50), 3),  # line 8: partly outside, clamped 20x20
        affectnet_row("1/outside.jpg", (200, 10, 20, 20), 3),  # line 9: empty once clamped
        affectnet_row("1/missing.jpg", (1, 1, 10, 10), 5),  # line 10: no image file
        affectnet_row("1/corrupt.jpg", (1, 1, 10, 10), 5),  # line 11: not an image
        affectnet_row("1/ok.jpg", (1, 1, 10, 10), 1),  # line 12: duplicate
        affectnet_row("1/excluded.jpg", (1, 1, 5, 5), 7),  # lines 13-17: excluded by design
        affectnet_row("1/c7.jpg", (1, 1, 5, 5), 7),
        affectnet_row("1/c8.jpg", (1, 1, 5, 5), 8),
        affectnet_row("1/c9.jpg", (1, 1, 5, 5), 9),
        affectnet_row("1/c10.jpg", (1, 1, 5, 5), 10),
        affectnet_row("1/extra.jpg", (1, 1, 5, 5), 1) + ",surplus",  # line 18: more fields
    ]
    write_affectnet_csv(os.path.join(root, "training.csv"), csv_rows)
    out = tmp_path / "out"

    manifest = ingest(AffectNetReader(str(root), rows_per_unit=3, read_batch=2), str(out),
                      progress=False)

    rows = read_rows(out, schema.AFFECTNET)
    assert [(row["sample_id"], row["label"], row["width"], row["height"]) for row in rows] == [
        ("affectnet/1/edge.jpg", 6, 20, 20),
        ("affectnet/1/ok.jpg", 0, 20, 20),
    ]
    assert skips(manifest) == sorted([
        ("bad_row", "training.csv:3", "affectnet/1/short.jpg"),
        ("bad_row", "training.csv:4", "affectnet/1/nan.jpg"),
        ("unknown_label", "training.csv:5", "affectnet/1/big.jpg"),
        ("unknown_label", "training.csv:6", "affectnet/1/neg.jpg"),
        ("degenerate_box", "training.csv:7", "affectnet/1/flat.jpg"),
        ("degenerate_box", "Manually_Annotated_Images/1/outside.jpg", "affectnet/1/outside.jpg"),
        ("missing_image", "Manually_Annotated_Images/1/missing.jpg", "affectnet/1/missing.jpg"),
        ("bad_image", "Manually_Annotated_Images/1/corrupt.jpg", "affectnet/1/corrupt.jpg"),
        ("duplicate_sample_id", "training.csv:12", "affectnet/1/ok.jpg"),
        ("bad_row", "training.csv:18", "affectnet/1/extra.jpg"),
    ])
    by_location = {skip["location"]: skip["detail"] for skip in manifest.skipped}
    assert "face_x" in by_location["training.csv:4"]
    assert "training.csv:2" in by_location["training.csv:12"]
    assert manifest.excluded == {
        "affectnet_expression_7_Contempt": 2, "affectnet_expression_8_None": 1,
        "affectnet_expression_9_Uncertain": 1, "affectnet_expression_10_No-Face": 1,
    }
    assert manifest.rows + len(manifest.skipped) + sum(manifest.excluded.values()) == len(csv_rows)


def test_affectnet_unusable_layouts_name_the_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(SourceUnusable, match=str(missing)):
        AffectNetReader(str(missing)).plan()

    no_csv = tmp_path / "no_csv"
    (no_csv / "Manually_Annotated_Images").mkdir(parents=True)
    with pytest.raises(SourceUnusable, match="training.csv"):
        AffectNetReader(str(no_csv)).plan()

    no_column = tmp_path / "no_column"
    (no_column / "Manually_Annotated_Images").mkdir(parents=True)
    csv_path = os.path.join(no_column, "validation.csv")
    write(csv_path, "subDirectory_filePath,face_x,face_y,face_width,face_height\n1/a.jpg,1,1,5,5\n")
    with pytest.raises(SourceUnusable, match="expression") as raised:
        AffectNetReader(str(no_column)).plan()
    assert csv_path in str(raised.value)

    no_images = tmp_path / "no_images"
    write_affectnet_csv(os.path.join(no_images, "training.csv"), [affectnet_row("1/a.jpg", (1, 1, 5, 5), 0)])
    with pytest.raises(SourceUnusable, match=os.path.join(str(no_images), "Manually_Annotated_Images")):
        AffectNetReader(str(no_images)).plan()


# ---------------------------------------------------------------- ExpW


def expw_line(image: str, face_id, top, left, right, bottom, label, confidence="55.3") -> str:
    return " ".join(map(str, (image, face_id, top, left, right, bottom, confidence, label)))


def write_expw(root, lines: list[str], images: dict[str, bytes]) -> None:
    write(os.path.join(root, "label", "label.lst"), "\n".join(lines) + "\n")
    os.makedirs(os.path.join(root, "image", "origin"), exist_ok=True)
    for name, data in images.items():
        write(os.path.join(root, "image", "origin", name), data)


def test_expw_happy_path_several_faces_per_image(tmp_path):
    root = tmp_path / "expw"
    write_expw(root, [
        expw_line("angry_actor_1.jpg", 0, 10, 5, 45, 30, 0),  # red half: left 5..45, top 10..30
        expw_line("angry_actor_1.jpg", 1, 20, 110, 150, 70, 6),  # blue half, 40 wide, 50 high
        expw_line("happy_crowd_2.jpg", 0, 0, 0, 30, 20, 3),
        expw_line("angry_actor_1.jpg", 2, 0, 60, 90, 10, 5),  # a later line for the first image
    ], {"angry_actor_1.jpg": two_colour_jpeg(200, 100, split_x=100),
        "happy_crowd_2.jpg": jpeg(40, 40, GREEN)})
    out = tmp_path / "out"
    reader = ExpWReader(str(root), faces_per_unit=2, read_batch=1)

    units = reader.plan().units
    assert [[(image.path, [face.sample_id for face in image.faces]) for image in unit]
            for unit in units] == [
        [("image/origin/angry_actor_1.jpg",
          ["expw/angry_actor_1.jpg/0", "expw/angry_actor_1.jpg/1", "expw/angry_actor_1.jpg/2"])],
        [("image/origin/happy_crowd_2.jpg", ["expw/happy_crowd_2.jpg/0"])],
    ]
    manifest = ingest(reader, str(out), progress=False)

    rows = read_rows(out, schema.EXPW)
    assert [(row["sample_id"], row["label"], row["split"], row["width"], row["height"])
            for row in rows] == [
        ("expw/angry_actor_1.jpg/0", 1, schema.TRAIN, 40, 20),
        ("expw/angry_actor_1.jpg/1", 0, schema.TRAIN, 40, 50),
        ("expw/angry_actor_1.jpg/2", 6, schema.TRAIN, 30, 10),
        ("expw/happy_crowd_2.jpg/0", 4, schema.TRAIN, 30, 20),
    ]
    assert near(mean_colour(rows[0]["image"]), RED)
    assert near(mean_colour(rows[1]["image"]), BLUE)
    assert all(row["source"] == schema.EXPW and row["video"] is None for row in rows)
    assert manifest.skipped == []
    assert manifest.details["images"] == 2 and manifest.details["faces"] == 4


def test_expw_line_problems_and_read_skips(tmp_path):
    root = tmp_path / "expw"
    lines = [
        expw_line("a.jpg", 0, 10, 10, 30, 30, 4),  # line 1: kept, Sad -> 5
        "a.jpg 1 10 10 30 30 4",  # line 2: 7 fields
        expw_line("a.jpg", 2, "top", 10, 30, 30, 4),  # line 3: non-numeric
        expw_line("a.jpg", 3, 10, 10, 30, 30, 7),  # line 4: unknown label
        expw_line("a.jpg", 4, 10, 30, 30, 40, 1),  # line 5: right == left
        expw_line("a.jpg", 0, 0, 0, 5, 5, 1),  # line 6: duplicate of line 1
        expw_line("a.jpg", 5, 30, 30, 90, 90, 2),  # line 7: partly outside, clamped to 20x20
        expw_line("a.jpg", 6, 60, 60, 90, 90, 2),  # line 8: empty once clamped
        expw_line("gone.jpg", 0, 1, 1, 9, 9, 2),  # lines 9-10: image file missing
        expw_line("gone.jpg", 1, 1, 1, 9, 9, 2),
        expw_line("junk.jpg", 0, 1, 1, 9, 9, 2),  # line 11: not an image
        "",  # blank lines are no records
        expw_line("b.jpg", "x", 1, 1, 9, 9, 2),  # line 13: face id not an integer
    ]
    write_expw(root, lines, {"a.jpg": jpeg(50, 50, RED), "junk.jpg": NOT_AN_IMAGE})
    out = tmp_path / "out"

    manifest = ingest(ExpWReader(str(root), read_batch=2), str(out), progress=False)

    rows = read_rows(out, schema.EXPW)
    assert [(row["sample_id"], row["label"], row["width"], row["height"]) for row in rows] == [
        ("expw/a.jpg/0", 5, 20, 20),
        ("expw/a.jpg/5", 3, 20, 20),
    ]
    assert skips(manifest) == sorted([
        ("bad_line", "label/label.lst:2", None),
        ("bad_line", "label/label.lst:3", "expw/a.jpg/2"),
        ("unknown_label", "label/label.lst:4", "expw/a.jpg/3"),
        ("degenerate_box", "label/label.lst:5", "expw/a.jpg/4"),
        ("duplicate_sample_id", "label/label.lst:6", "expw/a.jpg/0"),
        ("degenerate_box", "image/origin/a.jpg", "expw/a.jpg/6"),
        ("missing_image", "image/origin/gone.jpg", "expw/gone.jpg/0"),
        ("missing_image", "image/origin/gone.jpg", "expw/gone.jpg/1"),
        ("bad_image", "image/origin/junk.jpg", "expw/junk.jpg/0"),
        ("bad_line", "label/label.lst:13", None),
    ])
    records = sum(1 for line in lines if line)
    assert manifest.rows + len(manifest.skipped) + sum(manifest.excluded.values()) == records


def test_expw_unusable_layouts_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(SourceUnusable, match=str(missing)):
        ExpWReader(str(missing)).plan()

    no_label = tmp_path / "no_label"
    (no_label / "image" / "origin").mkdir(parents=True)
    with pytest.raises(SourceUnusable, match=os.path.join(str(no_label), "label/label.lst")):
        ExpWReader(str(no_label)).plan()

    no_images = tmp_path / "no_images"
    write(os.path.join(no_images, "label", "label.lst"), expw_line("a.jpg", 0, 1, 1, 9, 9, 0) + "\n")
    with pytest.raises(SourceUnusable, match=os.path.join(str(no_images), "image/origin")):
        ExpWReader(str(no_images)).plan()


def test_expw_with_no_usable_record_is_unusable(tmp_path):
    root = tmp_path / "expw"
    write_expw(root, [expw_line("gone.jpg", 0, 1, 1, 9, 9, 0)], {})
    with pytest.raises(SourceUnusable, match="no usable record"):
        ingest(ExpWReader(str(root)), str(tmp_path / "out"), progress=False)


# ---------------------------------------------------------------- all three


def build_corpus(tmp_path, source: str):
    root = tmp_path / source
    if source == schema.AFFWILD2:
        write_affwild2_video(root, CLASSIFICATION, "Train_Set", "v1", ["0", "1", "-1"],
                             {1: jpeg(8, 8, RED), 3: jpeg(8, 8, BLUE)})
        return AffWild2Reader(str(root), read_batch=1)
    if source == schema.AFFECTNET:
        write(os.path.join(root, "Manually_Annotated_Images", "1", "a.jpg"), jpeg(30, 30, RED))
        write_affectnet_csv(os.path.join(root, "training.csv"), [
            affectnet_row("1/a.jpg", (1, 1, 20, 20), 3), affectnet_row("1/b.jpg", (1, 1, 5, 5), 2),
            affectnet_row("1/c.jpg", (1, 1, 5, 5), 8)])
        return AffectNetReader(str(root), rows_per_unit=1)
    write_expw(root, [expw_line("a.jpg", 0, 1, 1, 20, 20, 3), expw_line("a.jpg", 1, 5, 5, 25, 25, 1),
                      expw_line("b.jpg", 0, 1, 1, 5, 5, 1)], {"a.jpg": jpeg(30, 30, RED)})
    return ExpWReader(str(root), faces_per_unit=1)


@pytest.mark.parametrize("source", [schema.AFFWILD2, schema.AFFECTNET, schema.EXPW])
def test_rerun_gives_the_same_files_and_manifest(tmp_path, source):
    reader = build_corpus(tmp_path, source)
    out = tmp_path / "out"
    first = ingest(reader, str(out), progress=False)
    first_files = shard_folder(out / source)
    first_rows = read_rows(out, source)

    second = ingest(reader, str(out), progress=False)

    assert shard_folder(out / source) == first_files
    assert read_rows(out, source) == first_rows
    assert second.files == first.files
    assert second.skipped == first.skipped and second.excluded == first.excluded
    assert Manifest.load(str(out / source)).to_dict()["files"] == first.to_dict()["files"]


@pytest.mark.parametrize("source", [schema.AFFWILD2, schema.AFFECTNET, schema.EXPW])
def test_readers_and_units_pickle(tmp_path, source):
    reader = build_corpus(tmp_path, source)
    plan = reader.plan()
    copy = pickle.loads(pickle.dumps(reader))
    assert copy.describe() == reader.describe()
    assert pickle.loads(pickle.dumps(plan.units)) == plan.units
    assert [batch.table.num_rows for batch in copy.read_unit(plan.units[0]) if batch.table] \
        == [batch.table.num_rows for batch in reader.read_unit(plan.units[0]) if batch.table]


def test_read_files_keeps_order_and_returns_errors(tmp_path):
    write(os.path.join(tmp_path, "a.jpg"), b"a")
    write(os.path.join(tmp_path, "b[1].jpg"), b"b")
    fs, base = storage.filesystem(str(tmp_path))
    paths = [f"{base}/b[1].jpg", f"{base}/missing.jpg", f"{base}/a.jpg"]

    contents = read_files(fs, paths)

    assert contents[0] == b"b" and contents[2] == b"a"
    assert isinstance(contents[1], FileNotFoundError)
