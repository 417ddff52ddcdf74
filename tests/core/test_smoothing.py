"""Post-processing: hand-made sequences, the tie rule, video boundaries, and a brute-force reference."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from pipeline.core.smoothing import (BLOCK, CENTRED, TIE_RULE, smooth_by_video, smooth_labels,
                                     smooth_probabilities)


def smoothed(labels, window, mode=CENTRED, groups=None) -> list[int]:
    return smooth_labels(np.array(labels), window, mode, groups=groups).tolist()


# Centred windows: odd windows are symmetric; an even window (4) covers frames i-2 .. i+1.
@pytest.mark.parametrize(
    "labels, window, expected",
    [
        # i=5 sees [1, 0, 2], one vote each: its own label is closest.
        ([0, 0, 1, 1, 1, 0, 2, 2], 3, [0, 0, 1, 1, 1, 0, 2, 2]),
        # i=2 sees [3, 3, 1, 1] and i=4 sees [1, 1, 2, 2]: two-way ties, own label wins.
        ([3, 3, 1, 1, 2, 2, 2, 1], 4, [3, 3, 1, 1, 2, 2, 2, 2]),
        # Window 5 at the ends is truncated to 3 and 4 frames.
        ([6, 2, 6, 2, 2, 6, 6], 5, [6, 2, 2, 2, 6, 6, 6]),
    ],
)
def test_centred_hand_cases(labels, window, expected):
    assert smoothed(labels, window) == expected


def test_even_centred_window_takes_its_extra_frame_from_the_past():
    # Window 2 at i=1 holds frames 0 and 1: the past neighbour's 1, not the future's 2.
    assert smoothed([1, -1, 2], 2) == [1, 1, 2]
    # Window 4 at i=2 holds frames 0..3: two 5s in the past beat one 3 in the future; at i=3 it
    # holds frames 1..4, one 5 and one 3, and the frame's own 3 is closest.
    assert smoothed([5, 5, -1, 3, -1], 4) == [5, 5, 5, 3, 3]


@pytest.mark.parametrize(
    "labels, window, expected",
    [
        # Blocks [0 1 1] [2 0 2] [5 3]: the short last block ties 3 vs 5 at equal distance 0.5
        # from its centre, so the lower id 3.
        ([0, 1, 1, 2, 0, 2, 5, 3], 3, [1, 1, 1, 2, 2, 2, 3, 3]),
        # Blocks of 4: [1 6 6 1] -> the 6s sit 0.5 from the centre, the 1s 1.5; [2 2 0] -> 2.
        ([1, 6, 6, 1, 2, 2, 0], 4, [6, 6, 6, 6, 2, 2, 2]),
        # A block longer than the video is the whole video.
        ([4, 4, 7], 10, [4, 4, 4]),
    ],
)
def test_block_hand_cases(labels, window, expected):
    assert smoothed(labels, window, BLOCK) == expected


def test_ties_go_to_the_closest_occurrence_then_the_lower_id():
    # i=2, window 5 over [2 4 -1 4 2]: 2 and 4 two votes each; 4 is 1 frame away, 2 is 2 away.
    # (A plain lower-id rule would say 2.)
    assert smoothed([2, 4, -1, 4, 2], 5)[2] == 4
    # [4 2 -1 4 2]: 4 and 2 both have an occurrence 1 frame away -> the lower id, 2.
    assert smoothed([4, 2, -1, 4, 2], 5)[2] == 2
    # A majority beats closeness: [1 1 0 2 1] at i=2 -> 1 although the frame itself is 0.
    assert smoothed([1, 1, 0, 2, 1], 5)[2] == 1
    # Block of 5 [5 3 -1 5 3], centre frame 2: 3 and 5 both 1 away -> 3.
    assert smoothed([5, 3, -1, 5, 3], 5, BLOCK) == [3] * 5
    # Block of 5 [3 5 -1 3 3 ...]: no tie, 3 wins regardless of position.
    assert smoothed([3, 5, 5, 3, 3], 5, BLOCK) == [3] * 5
    assert isinstance(TIE_RULE, str) and TIE_RULE


def test_no_label_frames_do_not_vote():
    assert smoothed([-1, -1, -1, 2, -1], 3) == [-1, -1, 2, 2, 2]
    assert smoothed([-1, -1, -1, 2, -1], 2, BLOCK) == [-1, -1, 2, 2, -1]
    # Two -1s do not outvote one label.
    assert smoothed([0, -1, -1], 3, BLOCK) == [0, 0, 0]
    assert smoothed([-1, -1, -1], 5) == [-1, -1, -1]


def test_windows_never_cross_videos():
    labels = [0, 0, 1, 1, 1, 2]
    # Over one video, frame 2's window of 5 would hold [0 0 1 1 1] -> 1; within video "a" it
    # holds only [0 0 1] -> 0.
    assert smoothed(labels, 5) == [0, 0, 1, 1, 1, 1]
    assert smoothed(labels, 5, groups=["a", "a", "a", "b", "b", "b"]) == [0, 0, 0, 1, 1, 1]
    assert smoothed(labels, 5, groups=[7, 7, 7, 3, 3, 3]) == [0, 0, 0, 1, 1, 1]
    # Blocks restart at each video's first frame: [1 6 6 1] [2 2 0] | [0 0 3], against
    # [1 6 6 1] [2 2 0 0] [0 3] over one video.
    labels = [1, 6, 6, 1, 2, 2, 0, 0, 0, 3]
    groups = ["a"] * 7 + ["b"] * 3
    assert smoothed(labels, 4, BLOCK, groups=groups) == [6, 6, 6, 6, 2, 2, 2, 0, 0, 0]
    assert smoothed(labels, 4, BLOCK) == [6, 6, 6, 6, 0, 0, 0, 0, 0, 0]


def test_group_contiguity_and_argument_errors():
    with pytest.raises(ValueError, match="group 'a' reappears"):
        smooth_labels([0, 1, 2, 3], 3, groups=["a", "a", "b", "a"])
    with pytest.raises(ValueError, match="group 'a' reappears"):
        smooth_labels([0, 1, 2, 3], 1, groups=["a", "a", "b", "a"])
    with pytest.raises(ValueError, match="one key per frame"):
        smooth_labels([0, 1, 2], 3, groups=["a", "a"])
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        smooth_labels([0, 1], 0)
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        smooth_labels([0, 1], 2.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        smooth_labels([0, 1], 3, mode="center")
    with pytest.raises(ValueError, match=r"found \[8\]"):
        smooth_labels([0, 8], 3)
    with pytest.raises(ValueError, match="integer class ids"):
        smooth_labels([0.0, 1.0], 3)


def test_window_one_is_the_identity():
    rng = np.random.default_rng(3)
    labels = rng.integers(-1, 8, 200).astype(np.int16)
    for mode in (CENTRED, BLOCK):
        result = smooth_labels(labels, 1, mode, groups=np.repeat([0, 1, 2, 3], 50))
        assert result.dtype == np.int16 and result is not labels
        np.testing.assert_array_equal(result, labels)


def test_empty_input():
    for mode in (CENTRED, BLOCK):
        assert smooth_labels(np.zeros(0, dtype=np.int64), 5, mode).size == 0
        assert smooth_labels(np.zeros(0, dtype=np.int64), 5, mode, groups=[]).size == 0
        assert smooth_probabilities(np.zeros((0, 8)), 5, mode).size == 0


def _group_runs(groups) -> list[tuple[int, int]]:
    runs, start = [], 0
    for index in range(1, len(groups) + 1):
        if index == len(groups) or groups[index] != groups[index - 1]:
            runs.append((start, index))
            start = index
    return runs


def _reference_windows(groups, window, mode):
    """(frames to label, window start, window end, anchor in doubled coordinates), by loops."""
    for start, end in _group_runs(groups):
        if mode == CENTRED:
            for index in range(start, end):
                low = max(start, index - window // 2)
                high = min(end, index + (window - 1) // 2 + 1)
                yield [index], low, high, 2 * index
        else:
            for low in range(start, end, window):
                high = min(low + window, end)
                yield list(range(low, high)), low, high, low + high - 1


def reference_smooth_labels(labels, window, mode, groups) -> list[int]:
    """The vote and its tie rule written the slow, obvious way."""
    result = list(labels)
    for targets, low, high, anchor in _reference_windows(groups, window, mode):
        votes = Counter(label for label in labels[low:high] if label != -1)
        if not votes:
            winner = -1
        else:
            top = max(votes.values())

            def closeness(label):
                distance = min(abs(2 * position - anchor) for position in range(low, high)
                               if labels[position] == label)
                return distance, label

            winner = min((label for label, count in votes.items() if count == top), key=closeness)
        for index in targets:
            result[index] = winner
    return result


def reference_smooth_probabilities(probabilities, window, mode, groups) -> list[int]:
    result = [0] * len(probabilities)
    for targets, low, high, _ in _reference_windows(groups, window, mode):
        means = [sum(row[label] for row in probabilities[low:high]) / (high - low)
                 for label in range(len(probabilities[0]))]
        winner = means.index(max(means))  # first maximum: the lower id
        for index in targets:
            result[index] = winner
    return result


def random_groups(rng: np.random.Generator, size: int) -> list[str]:
    cuts = np.sort(rng.choice(np.arange(1, size), size=min(size - 1, int(rng.integers(0, 5))),
                              replace=False)) if size > 1 else []
    lengths = np.diff(np.concatenate([[0], cuts, [size]])).astype(int)
    names = rng.permutation([f"video{index}" for index in range(len(lengths))])
    return [str(name) for name, length in zip(names, lengths) for _ in range(length)]


def test_labels_match_the_brute_force_reference():
    rng = np.random.default_rng(0)
    for case in range(400):
        size = int(rng.integers(0, 70))
        # Few classes make ties common, so the tie rule is exercised.
        classes = rng.choice(8, size=int(rng.integers(1, 5)), replace=False)
        labels = rng.choice(classes, size=size)
        labels[rng.random(size) < rng.random() * 0.4] = -1
        groups = random_groups(rng, size)
        window = int(rng.integers(1, 16))
        mode = CENTRED if case % 2 else BLOCK
        expected = reference_smooth_labels(labels.tolist(), window, mode, groups)
        actual = smooth_labels(labels, window, mode, groups=np.array(groups)).tolist()
        assert actual == expected, (case, labels.tolist(), groups, window, mode)


def test_probabilities_match_the_brute_force_reference():
    rng = np.random.default_rng(1)
    for case in range(300):
        size = int(rng.integers(0, 50))
        num_classes = int(rng.integers(2, 9))
        # Multiples of 1/8 add up exactly in float64, so ties are exact and the lower id must win.
        probabilities = rng.integers(0, 3, size=(size, num_classes)) / 8.0
        groups = random_groups(rng, size)
        window = int(rng.integers(1, 16))
        mode = CENTRED if case % 2 else BLOCK
        expected = reference_smooth_probabilities(probabilities.tolist(), window, mode, groups)
        actual = smooth_probabilities(probabilities, window, mode, groups=groups).tolist()
        assert actual == expected, (case, window, mode)


def test_smooth_by_video_restores_the_original_order():
    rng = np.random.default_rng(2)
    videos = np.repeat(["b_left", "a", "c", "b_right"], [30, 25, 1, 40])
    # Frame numbers with gaps (missing crops); the window counts rows, not frame numbers.
    frames = np.concatenate([np.sort(rng.choice(100, size=count, replace=False))
                             for count in (30, 25, 1, 40)])
    labels = rng.integers(-1, 8, videos.size)
    order = rng.permutation(videos.size)
    for mode in (CENTRED, BLOCK):
        in_order = smooth_labels(labels, 5, mode, groups=videos)
        shuffled = smooth_by_video(videos[order], frames[order], labels[order], 5, mode)
        np.testing.assert_array_equal(shuffled, in_order[order])
        probabilities = rng.random((videos.size, 8))
        np.testing.assert_array_equal(
            smooth_by_video(videos[order], frames[order], probabilities[order], 5, mode),
            smooth_probabilities(probabilities, 5, mode, groups=videos)[order])


def test_smooth_by_video_sorts_frames_numerically_and_rejects_repeats():
    # In frame order (9, 10, 11) the labels read [1 2 1] and the vote gives 1 everywhere; in text
    # order ("10", "11", "9") they would read [2 1 1] and frame 10 would keep its 2.
    assert smooth_by_video(["v", "v", "v"], [10, 9, 11], [2, 1, 1], 3).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="video 'v' lists frame 3 more than once"):
        smooth_by_video(["v", "w", "v"], [3, 3, 3], [0, 1, 2], 3)
    with pytest.raises(ValueError, match="one row per frame"):
        smooth_by_video(["v", "v"], [1, 2, 3], [0, 1, 2], 3)


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    groups = torch.tensor([1, 1, 1, 2, 2, 2])
    assert smooth_labels(labels, 5, groups=groups).tolist() == [0, 0, 0, 1, 1, 1]
    assert smooth_probabilities(torch.eye(3)[[0, 0, 2]], 3).tolist() == [0, 0, 0]


@pytest.mark.slow
def test_speed_on_two_million_frames(capsys):
    rng = np.random.default_rng(4)
    size = 2_000_000
    # Runs of a few frames, like per-frame predictions, over 500 videos of 4,000 frames.
    labels = np.repeat(rng.integers(-1, 8, size // 4), 4)
    groups = np.repeat(np.arange(500), size // 500)
    smooth_labels(labels, 10, groups=groups)  # warm-up: first-touch page faults are not the method's cost
    lines = []
    for mode, window in ((CENTRED, 10), (CENTRED, 30), (BLOCK, 10)):
        started = time.perf_counter()
        result = smooth_labels(labels, window, mode, groups=groups)
        elapsed = time.perf_counter() - started
        assert result.shape == labels.shape
        lines.append(f"smooth_labels {mode} window {window}: {size / elapsed / 1e6:.1f}M frames/s")
    probabilities = rng.random((size, 8)).astype(np.float32)
    started = time.perf_counter()
    smooth_probabilities(probabilities, 10, CENTRED, groups=groups)
    lines.append(f"smooth_probabilities centred window 10: "
                 f"{size / (time.perf_counter() - started) / 1e6:.1f}M frames/s")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
