"""The ABAW EXPR submission file: the exact format, the nearest-frame fill and its tie rule, frame
lists and their errors, a write/read round trip, and a large random case against a slow reference."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from pipeline.core.frame_filling import FALLBACK_RULE, FILL_RULE, FillReport, fill_labels
from pipeline.data import schema
from pipeline.inference.submission import (HEADER, frame_list_from_annotations, parse_location, read_frame_list,
                                           read_submission, write_submission)


def test_header_is_the_organisers_literal_line():
    assert HEADER == "image_location,Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
    assert HEADER.split(",")[1:] == list(schema.CLASS_NAMES)


def test_written_file_is_byte_for_byte_the_format(tmp_path):
    wanted = [("video10_1", 1), ("video10_1", 2), ("10-60-1280x720_right", 12345), ("v", 100000)]
    write_submission(str(tmp_path / "sub.txt"), wanted, np.array([0, 7, 4, 1], dtype=np.int8))
    assert (tmp_path / "sub.txt").read_bytes() == (
        b"image_location,Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n"
        b"video10_1/00001.jpg,0\n"
        b"video10_1/00002.jpg,7\n"
        b"10-60-1280x720_right/12345.jpg,4\n"
        b"v/100000.jpg,1\n"
    )
    assert not [path for path in tmp_path.iterdir() if path.name != "sub.txt"], "temporary file left"


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    wanted = [(f"video{video}", frame) for video in range(5) for frame in range(1, 300)]
    labels = rng.integers(0, 8, len(wanted))
    uri = str(tmp_path / "out" / "submission.txt")
    write_submission(uri, wanted, labels)
    frames, read_labels = read_submission(uri)
    assert frames == wanted
    assert read_labels.dtype == np.int64 and np.array_equal(read_labels, labels)
    # A submission is also a valid frame list (its label column is ignored).
    assert read_frame_list(uri) == wanted


@pytest.mark.parametrize("labels, message", [
    ([0, 8], "0..7"),
    ([0, -1], "0..7"),
    ([0], "2 frames"),
    ([0.0, 1.0], "integer"),
])
def test_write_refuses_bad_labels(tmp_path, labels, message):
    with pytest.raises(ValueError, match=message):
        write_submission(str(tmp_path / "sub.txt"), [("a", 1), ("a", 2)], np.array(labels))
    assert not (tmp_path / "sub.txt").exists()


@pytest.mark.parametrize("wanted", [[("a", 1), ("a", 1)], [("a", 0)], [("a,b", 1)], [("", 1)]])
def test_write_refuses_frames_it_could_not_read_back(tmp_path, wanted):
    with pytest.raises(ValueError):
        write_submission(str(tmp_path / "sub.txt"), wanted, np.zeros(len(wanted), dtype=np.int64))


@pytest.mark.parametrize("body, line, message", [
    ("image_location,Neutral\na/00001.jpg,0\n", 1, "header"),
    (f"{HEADER}\na/00001.jpg,0\n\na/00002.jpg,1\n", 3, "expected"),
    (f"{HEADER}\na/00001.jpg,8\n", 2, "label '8'"),
    (f"{HEADER}\na/00001.jpg,-1\n", 2, "label"),
    (f"{HEADER}\na/00001.jpg, 1\n", 2, "label"),
    (f"{HEADER}\na/00001.jpg\n", 2, "expected"),
    (f"{HEADER}\na/00001.jpg,1,2\n", 2, "expected"),
    (f"{HEADER}\na/1.jpg,1\n", 2, "zero-padded|form"),
    (f"{HEADER}\na/00001.png,1\n", 2, "form"),
    (f"{HEADER}\na/00001.jpg,1\nb/00001.jpg,1\na/00001.jpg,2\n", 4, "already listed on line 2"),
])
def test_read_submission_names_the_bad_line(tmp_path, body, line, message):
    path = tmp_path / "sub.txt"
    path.write_text(body)
    with pytest.raises(ValueError, match=rf"sub.txt:{line}: .*({message})"):
        read_submission(str(path))


def test_frame_list_accepts_header_label_column_and_blank_lines(tmp_path):
    path = tmp_path / "frames.txt"
    path.write_text("\ufeffimage_location,Neutral,Anger\r\nvideo1/00001.jpg\r\n\r\n  video1/00003.jpg,5 \r\n"
                    "video2_left/00010.jpg,\nnested/name/00002.jpg\n\n")
    assert read_frame_list(str(path)) == [("video1", 1), ("video1", 3), ("video2_left", 10),
                                          ("nested/name", 2)]


@pytest.mark.parametrize("body, line, message", [
    ("a/00001.jpg\nnot a frame\n", 2, "not a frame name"),
    ("a/00001.jpg\n\n\na/0001.jpg\n", 4, "not a frame name|zero-padded"),
    ("a/00001.jpg\na/000002.jpg\n", 2, "zero-padded"),
    ("a/00000.jpg\n", 1, "numbered from 1"),
    ("/00001.jpg\n", 1, "not a frame name"),
    ("a/00001.jpg,0,1\n", 1, "3 columns"),
    ("a/00001.jpg\nimage_location\n", 2, "not a frame name"),  # a header only on the first line
    ("a/00002.jpg\nb/00002.jpg\na/00002.jpg,3\n", 3, "already listed on line 1"),
])
def test_frame_list_errors_name_file_and_line(tmp_path, body, line, message):
    path = tmp_path / "frames.txt"
    path.write_text(body)
    with pytest.raises(ValueError, match=rf"frames.txt:{line}: .*({message})"):
        read_frame_list(str(path))


def test_parse_location_splits_at_the_last_slash():
    assert parse_location("a/b/00042.jpg") == ("a/b", 42)
    with pytest.raises(ValueError):
        parse_location("a /00042.jpg")


def test_frame_list_from_annotations(tmp_path):
    header = ",".join(schema.CLASS_NAMES)
    (tmp_path / "video2.txt").write_text(f"{header}\n0\n-1\n3\n\n")
    (tmp_path / "video1_left.txt").write_text(f"\ufeff{header}\n-1\n7\n")
    (tmp_path / "notes.md").write_text("not an annotation file")
    assert frame_list_from_annotations(str(tmp_path)) == [
        ("video1_left", 1), ("video1_left", 2), ("video2", 1), ("video2", 2), ("video2", 3)]
    (tmp_path / "video3.txt").write_text("Neutral,Anger\n0\n")
    with pytest.raises(ValueError, match=r"video3.txt:1: expected the header"):
        frame_list_from_annotations(str(tmp_path))


def test_frame_list_from_an_empty_folder_fails(tmp_path):
    with pytest.raises(ValueError, match="no .txt annotation file"):
        frame_list_from_annotations(str(tmp_path))


def fill(predictions, wanted):
    videos, frames, labels = zip(*predictions) if predictions else ((), (), ())
    return fill_labels(np.array(videos, dtype=str), np.array(frames, dtype=np.int64),
                       np.array(labels, dtype=np.int64), wanted)


def test_fill_nearest_with_the_earlier_frame_on_a_tie():
    assert FILL_RULE == "nearest_predicted_frame_of_the_video_earlier_on_tie"
    predictions = [("a", 3, 1), ("a", 5, 2), ("a", 10, 3), ("b", 4, 6)]
    wanted = [("a", frame) for frame in range(1, 14)] + [("b", 1), ("b", 9)]
    labels, report = fill(predictions, wanted)
    #          frame:  1  2  3  4  5  6  7  8  9 10 11 12 13   b1 b9
    # 4 is 1 from 3 and 5: the earlier wins; 7.5 is the midpoint of 5 and 10, so 7 -> 5, 8 -> 10.
    assert labels.tolist() == [1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 6, 6]
    assert labels.dtype == np.int64
    assert report == FillReport(exact=3, filled_from_neighbour=12, filled_without_video=0,
                                videos_without_predictions=[], fallback_label=1)


def test_exact_tie_at_equal_distance_takes_the_earlier_frame():
    labels, _ = fill([("a", 2, 5), ("a", 6, 1)], [("a", 4)])
    assert labels.tolist() == [5]


def test_minus_one_predictions_count_as_missing_and_videos_without_any_use_the_fallback():
    assert FALLBACK_RULE.startswith("most_frequent")
    predictions = [("a", 1, 4), ("a", 2, -1), ("a", 3, 2), ("c", 1, 4), ("c", 5, 2), ("d", 1, -1)]
    wanted = [("a", 2), ("b", 1), ("b", 2), ("d", 7), ("a", 3)]
    labels, report = fill(predictions, wanted)
    # Votes: 4 twice, 2 twice -> the lower id, 2, is the fallback.
    assert labels.tolist() == [4, 2, 2, 2, 2]
    assert report.exact == 1 and report.filled_from_neighbour == 1
    assert report.filled_without_video == 3
    assert report.videos_without_predictions == ["b", "d"]
    assert report.fallback_label == 2
    assert report.to_dict()["videos_without_predictions"] == ["b", "d"]


def test_nothing_predicted_falls_back_to_neutral():
    labels, report = fill([("a", 1, -1)], [("a", 1), ("b", 3)])
    assert labels.tolist() == [0, 0]
    assert report.filled_without_video == 2 and report.fallback_label == 0
    labels, report = fill([], [("a", 1)])
    assert labels.tolist() == [0] and report.videos_without_predictions == ["a"]


def test_fill_with_nothing_wanted():
    labels, report = fill([("a", 1, 3)], [])
    assert labels.shape == (0,) and report.exact == 0


@pytest.mark.parametrize("predictions, message", [
    ((["a", "a"], [1, 1], [2, 2]), "more than once"),
    ((["a"], [1], [8]), "-1..7"),
    ((["a"], [0], [1]), "1.."),
    ((["a", "b"], [1], [1]), "one row per frame"),
    ((["a"], [1], [1.5]), "integer"),
])
def test_fill_rejects_bad_predictions(predictions, message):
    videos, frames, labels = (np.array(values) for values in predictions)
    with pytest.raises(ValueError, match=message):
        fill_labels(videos, frames, labels, [("a", 1)])


def slow_reference(predictions: dict[str, dict[int, int]], video: str, frame: int, fallback: int) -> int:
    frames = predictions.get(video)
    if not frames:
        return fallback
    if frame in frames:
        return frames[frame]
    # The earlier frame first, so that min() keeps it on a tie.
    nearest = min(sorted(frames), key=lambda candidate: abs(candidate - frame))
    return frames[nearest]


def test_large_random_case_against_a_slow_reference():
    rng = np.random.default_rng(7)
    video_lengths = rng.integers(1, 2000, 200)
    wanted = [(f"video{video}", frame) for video, length in enumerate(video_lengths)
              for frame in range(1, length + 1)]
    assert len(wanted) > 190_000
    order = rng.permutation(len(wanted))  # the wanted order is not sorted
    wanted = [wanted[index] for index in order]
    predicted_rows = rng.random(len(wanted)) < 0.7
    silent_videos = {f"video{video}" for video in rng.choice(200, 5, replace=False)}
    predicted_rows &= np.array([video not in silent_videos for video, _ in wanted])
    rows = np.flatnonzero(predicted_rows)
    videos = np.array([wanted[row][0] for row in rows])
    frames = np.array([wanted[row][1] for row in rows])
    # Predictions may also name frames outside the wanted list; shuffle their order too.
    extra = 1000
    videos = np.concatenate([videos, rng.choice(videos, extra)])
    frames = np.concatenate([frames, rng.integers(3000, 5000, extra)])
    labels = rng.integers(-1, 8, videos.size)
    keys = set()
    keep = np.array([(key := (video, frame)) not in keys and not keys.add(key)
                     for video, frame in zip(videos.tolist(), frames.tolist())])
    videos, frames, labels = videos[keep], frames[keep], labels[keep]
    shuffle = rng.permutation(videos.size)
    videos, frames, labels = videos[shuffle], frames[shuffle], labels[shuffle]

    started = time.perf_counter()
    filled, report = fill_labels(videos, frames, labels, wanted)
    elapsed = time.perf_counter() - started
    assert elapsed < 3.0, f"fill_labels took {elapsed:.2f}s for {len(wanted)} frames"

    predictions: dict[str, dict[int, int]] = {}
    for video, frame, label in zip(videos.tolist(), frames.tolist(), labels.tolist()):
        if label != -1:
            predictions.setdefault(video, {})[frame] = label
    counts = Counter(label for frames_of_video in predictions.values() for label in frames_of_video.values())
    fallback = min(counts, key=lambda label: (-counts[label], label))
    assert report.fallback_label == fallback
    assert report.videos_without_predictions == sorted(silent_videos)
    assert report.filled_without_video == sum(video in silent_videos for video, _ in wanted)
    exact = sum(frame in predictions.get(video, {}) for video, frame in wanted)
    assert report.exact == exact
    assert report.exact + report.filled_from_neighbour + report.filled_without_video == len(wanted)
    for index in rng.choice(len(wanted), 3000, replace=False).tolist():
        video, frame = wanted[index]
        assert filled[index] == slow_reference(predictions, video, frame, fallback), wanted[index]
