"""The data recipe on tiny shard folders: counts, partition, order, determinism, re-runs, errors."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.data import schema, shards, split

PER_CLASS = 6
AFFWILD2_TRAIN = [12, 9, 8, 3, 15, 10, 8, 7]  # Fear is short of PER_CLASS
AFFECTNET_TRAIN = [6, 5, 4, 4, 9, 4, 4]
EXPW_TRAIN = [3, 2, 0, 1, 8, 4, 2]  # with AffectNet: Disgust (4) and Fear (5) are short
EXPECTED_LABELED = {
    "affwild2": {0: 6, 1: 6, 2: 6, 3: 3, 4: 6, 5: 6, 6: 6, 7: 6},
    "affectnet_expw": {0: 6, 1: 6, 2: 4, 3: 5, 4: 6, 5: 6, 6: 6},
}
EXPECTED_SHORTFALLS = {
    split.Shortfall("affwild2", 3, PER_CLASS, 3),
    split.Shortfall("affectnet_expw", 2, PER_CLASS, 4),
    split.Shortfall("affectnet_expw", 3, PER_CLASS, 5),
}


def image_of(sample_id: str) -> bytes:
    return f"image:{sample_id}".encode()


def make_row(sample_id: str, source: str, split_name: str, label: int, video: str | None = None,
             frame: int | None = None, identity: int | None = None) -> dict:
    return {schema.SAMPLE_ID: sample_id, schema.IMAGE: image_of(sample_id), schema.LABEL: label,
            schema.SOURCE: source, schema.SPLIT: split_name, schema.VIDEO: video,
            schema.FRAME: frame, schema.IDENTITY: identity, schema.HEIGHT: 112, schema.WIDTH: 112}


def write_source(root: str, source: str, rows: list[dict], rows_per_write: int = 7,
                 max_file_bytes: int = 1200) -> str:
    """A shard folder as ingest leaves it; small writes and files so every source spans files."""
    folder = os.path.join(root, source)
    writer = shards.ShardWriter(folder, f"{shards.PART_PREFIX}00000", max_file_bytes)
    for start in range(0, len(rows), rows_per_write):
        chunk = rows[start:start + rows_per_write]
        writer.write(schema.columns_to_table({name: [row[name] for row in chunk]
                                              for name in schema.SHARD_SCHEMA.names}))
    shards.Manifest(source=source, files=writer.close(), skipped=[]).save(folder)
    return folder


def affwild2_rows(shuffled: bool) -> list[dict]:
    generator = np.random.default_rng(0)
    train_labels = [label for label, count in enumerate(AFFWILD2_TRAIN) for _ in range(count)]
    train_labels += [schema.NO_LABEL] * 10
    train_labels = generator.permutation(train_labels).tolist()
    rows = []
    for position, label in enumerate(train_labels):
        video, frame = f"train{position % 4}", position // 4 + 1
        rows.append(make_row(schema.affwild2_sample_id(video, frame), schema.AFFWILD2, schema.TRAIN,
                             label, video, frame))
    for video in ("valA", "valB", "valC"):
        for frame in range(1, 21):
            label = int(generator.integers(schema.NO_LABEL, schema.NUM_CLASSES))
            rows.append(make_row(schema.affwild2_sample_id(video, frame), schema.AFFWILD2,
                                 schema.VALIDATION, label, video, frame))
    if shuffled:
        rows = [rows[position] for position in generator.permutation(len(rows))]
    return rows


def labeled_rows(source: str, counts: list[int], prefix: str = "") -> list[dict]:
    return [make_row(f"{source}/{prefix}{label}-{number:03d}", source, schema.TRAIN, label)
            for label, count in enumerate(counts) for number in range(count)]


def build_root(root: str, shuffled: bool = True, sources: tuple[str, ...] = schema.SOURCES,
               extra_affectnet: list[dict] | None = None) -> str:
    if schema.AFFWILD2 in sources:
        write_source(root, schema.AFFWILD2, affwild2_rows(shuffled))
    if schema.AFFECTNET in sources:
        rows = labeled_rows(schema.AFFECTNET, AFFECTNET_TRAIN)
        rows += [make_row(f"{schema.AFFECTNET}/val-{number}", schema.AFFECTNET, schema.VALIDATION,
                          number % 7) for number in range(10)]
        write_source(root, schema.AFFECTNET, rows + (extra_affectnet or []))
    if schema.EXPW in sources:
        rows = labeled_rows(schema.EXPW, EXPW_TRAIN)
        # ExpW maps to no Other: should such a row appear it stays unlabeled, never an Other pick.
        rows += [make_row(f"{schema.EXPW}/odd-{number}", schema.EXPW, schema.TRAIN, 7)
                 for number in range(2)]
        write_source(root, schema.EXPW, rows)
    if schema.MS1MV2 in sources:
        write_source(root, schema.MS1MV2, [
            make_row(schema.ms1mv2_sample_id(key), schema.MS1MV2, schema.TRAIN, schema.NO_LABEL,
                     identity=key % 5) for key in range(1, 31)
        ])
    return root


def read_folder(folder: str) -> pa.Table:
    return pa.concat_tables([table for _, table in shards.read_tables(folder)])


def all_source_rows(root: str) -> pa.Table:
    return pa.concat_tables([read_folder(os.path.join(root, source)) for source in schema.SOURCES
                             if os.path.isdir(os.path.join(root, source))])


def picks_by_group_class(out: str) -> dict[tuple[str, int], set[str]]:
    labeled = read_folder(os.path.join(out, split.LABELED)).to_pylist()
    picks: dict[tuple[str, int], set[str]] = {}
    for row in labeled:
        group = "affwild2" if row[schema.SOURCE] == schema.AFFWILD2 else "affectnet_expw"
        picks.setdefault((group, row[schema.LABEL]), set()).add(row[schema.SAMPLE_ID])
    return picks


def unlabeled_ids(out: str) -> list[str]:
    pool = split.load_unlabeled_pool(out)
    ids = []
    for uri in pool.file_uris:
        table = pq.read_table(uri)
        ids += table[schema.SAMPLE_ID].filter(split.unlabeled_mask(table, pool.excluded_ids)).to_pylist()
    assert len(ids) == pool.rows
    return ids


@pytest.fixture(scope="module")
def shards_root(tmp_path_factory) -> str:
    return build_root(str(tmp_path_factory.mktemp("shards")))


@pytest.fixture(scope="module")
def made(shards_root, tmp_path_factory) -> tuple[str, split.SplitSummary]:
    out = str(tmp_path_factory.mktemp("split"))
    return out, split.make_split(shards_root, out, PER_CLASS, seed=3)


def test_fixture_spans_several_files_per_source(shards_root):
    for source in schema.SOURCES:
        assert len(shards.Manifest.load(os.path.join(shards_root, source)).files) > 1


def test_exact_counts_per_group_and_class(made):
    out, summary = made
    assert summary.labeled == EXPECTED_LABELED
    counted: dict[str, dict[int, int]] = {}
    for (group, label), ids in picks_by_group_class(out).items():
        counted.setdefault(group, {})[label] = len(ids)
    assert {group: dict(sorted(counts.items())) for group, counts in counted.items()} == {
        group: {label: rows for label, rows in counts.items() if rows}
        for group, counts in EXPECTED_LABELED.items()
    }
    assert sum(summary.labeled_by_source.values()) == summary.labeled_rows


def test_other_comes_only_from_affwild2(made):
    out, _ = made
    labeled = read_folder(os.path.join(out, split.LABELED))
    other = labeled.filter(pc.equal(labeled[schema.LABEL], split.OTHER))
    assert other.num_rows == PER_CLASS
    assert set(other[schema.SOURCE].to_pylist()) == {schema.AFFWILD2}
    assert {f"{schema.EXPW}/odd-0", f"{schema.EXPW}/odd-1"} <= set(unlabeled_ids(out))


def test_shortfalls_recorded_never_upsampled(made):
    _, summary = made
    assert set(summary.shortfalls) == EXPECTED_SHORTFALLS
    assert "shortfalls" in summary.summary()


def test_labeled_validation_unlabeled_partition_all_rows(made, shards_root):
    out, summary = made
    everything = all_source_rows(shards_root)
    labeled = read_folder(os.path.join(out, split.LABELED))
    validation = read_folder(os.path.join(out, split.VALIDATION))
    labeled_ids = labeled[schema.SAMPLE_ID].to_pylist()
    validation_ids = validation[schema.SAMPLE_ID].to_pylist()
    pool_ids = unlabeled_ids(out)
    for ids in (labeled_ids, validation_ids, pool_ids):
        assert len(ids) == len(set(ids))
    assert not set(labeled_ids) & set(validation_ids)
    assert not set(labeled_ids) & set(pool_ids)
    assert not set(validation_ids) & set(pool_ids)
    assert set(labeled_ids) | set(validation_ids) | set(pool_ids) == set(everything[schema.SAMPLE_ID].to_pylist())
    assert len(labeled_ids) + len(validation_ids) + len(pool_ids) == everything.num_rows
    assert set(split.load_unlabeled_pool(out).excluded_ids.to_pylist()) == set(labeled_ids)
    # Materialised rows carry their own image bytes.
    for table in (labeled, validation):
        assert table[schema.IMAGE].to_pylist() == [image_of(i) for i in table[schema.SAMPLE_ID].to_pylist()]
    # What the pool holds per source: MS1MV2 whole, Aff-Wild2 train -1 frames, AffectNet validation.
    assert summary.unlabeled[schema.MS1MV2] == 30
    expected_affwild2 = sum(AFFWILD2_TRAIN) + 10 - sum(EXPECTED_LABELED["affwild2"].values())
    assert summary.unlabeled[schema.AFFWILD2] == expected_affwild2
    assert summary.unlabeled_rows == len(pool_ids)
    assert {f"{schema.AFFECTNET}/val-{number}" for number in range(10)} <= set(pool_ids)


def test_validation_is_all_affwild2_validation_in_video_frame_order(made, shards_root):
    out, summary = made
    validation = read_folder(os.path.join(out, split.VALIDATION))
    keys = list(zip(validation[schema.VIDEO].to_pylist(), validation[schema.FRAME].to_pylist()))
    assert keys == sorted(keys)
    assert validation.num_rows == 60
    assert set(validation[schema.SOURCE].to_pylist()) == {schema.AFFWILD2}
    assert set(validation[schema.SPLIT].to_pylist()) == {schema.VALIDATION}
    labels = validation[schema.LABEL].to_pylist()
    assert summary.validation == {label: labels.count(label)
                                  for label in range(schema.NO_LABEL, schema.NUM_CLASSES)}
    assert summary.validation[schema.NO_LABEL] > 0


def test_validation_order_from_unshuffled_shards(tmp_path):
    root = build_root(str(tmp_path / "shards"), shuffled=False, sources=(schema.AFFWILD2,))
    split.make_split(root, str(tmp_path / "split"), PER_CLASS, seed=0)
    validation = read_folder(str(tmp_path / "split" / split.VALIDATION))
    keys = list(zip(validation[schema.VIDEO].to_pylist(), validation[schema.FRAME].to_pylist()))
    assert keys == sorted(keys) and len(keys) == 60


def test_ordered_clusters_merge_only_interleaved_files():
    table = pa.table({split.FILE_INDEX: pa.array([0, 0, 2, 1, 2, 3, 3, 4, 5, 4], pa.int32())})
    assert split._ordered_clusters(table) == [[0], [2, 1], [3], [4, 5]]


def test_same_seed_same_selection_other_seed_differs(made, shards_root, tmp_path):
    out, summary = made
    again = split.make_split(shards_root, str(tmp_path / "again"), PER_CLASS, seed=3)
    assert picks_by_group_class(str(tmp_path / "again")) == picks_by_group_class(out)
    assert again.labeled == summary.labeled and again.unlabeled == summary.unlabeled
    split.make_split(shards_root, str(tmp_path / "other"), PER_CLASS, seed=4)
    assert picks_by_group_class(str(tmp_path / "other")) != picks_by_group_class(out)


def test_adding_rows_of_one_class_keeps_every_other_draw(made, tmp_path):
    out, _ = made
    happiness = 4
    extra = [make_row(f"{schema.AFFECTNET}/extra-{number}", schema.AFFECTNET, schema.TRAIN, happiness)
             for number in range(20)]
    root = build_root(str(tmp_path / "shards"), extra_affectnet=extra)
    split.make_split(root, str(tmp_path / "split"), PER_CLASS, seed=3)
    before, after = picks_by_group_class(out), picks_by_group_class(str(tmp_path / "split"))
    assert before.keys() == after.keys()
    changed = ("affectnet_expw", happiness)
    assert {key: value for key, value in before.items() if key != changed} == \
        {key: value for key, value in after.items() if key != changed}


def test_missing_affwild2_is_a_clear_error(tmp_path):
    root = build_root(str(tmp_path / "shards"), sources=(schema.AFFECTNET, schema.MS1MV2))
    with pytest.raises(FileNotFoundError, match="affwild2.*required"):
        split.make_split(root, str(tmp_path / "split"), PER_CLASS, seed=0)


def test_folder_without_manifest_is_an_error(tmp_path):
    root = build_root(str(tmp_path / "shards"), sources=(schema.AFFWILD2,))
    os.makedirs(os.path.join(root, schema.EXPW))
    with pytest.raises(shards.IncompleteOutput, match="expw"):
        split.make_split(root, str(tmp_path / "split"), PER_CLASS, seed=0)


def test_absent_optional_sources_leave_their_group_short(tmp_path):
    root = build_root(str(tmp_path / "shards"), sources=(schema.AFFWILD2,))
    summary = split.make_split(root, str(tmp_path / "split"), PER_CLASS, seed=0)
    assert summary.labeled["affwild2"] == EXPECTED_LABELED["affwild2"]
    assert summary.labeled["affectnet_expw"] == {label: 0 for label in range(7)}
    assert set(summary.unlabeled) == {schema.AFFWILD2}
    assert set(summary.sources) == {schema.AFFWILD2}


def test_rerun_is_safe_and_removes_stale_parts(shards_root, tmp_path):
    out = str(tmp_path / "split")
    first = split.make_split(shards_root, out, PER_CLASS, seed=5, max_file_bytes=600)
    labeled_folder = os.path.join(out, split.LABELED)
    assert len(shards.Manifest.load(labeled_folder).files) > 1
    stray = os.path.join(labeled_folder, f"{shards.PART_PREFIX}99999-00.parquet")
    with open(stray, "wb") as handle:
        handle.write(b"left by a crashed run")
    second = split.make_split(shards_root, out, PER_CLASS, seed=5)
    assert first.labeled == second.labeled and first.validation == second.validation
    for name in (split.LABELED, split.VALIDATION):
        folder = os.path.join(out, name)
        manifest = shards.Manifest.load(folder)
        parts = sorted(entry for entry in os.listdir(folder) if entry.startswith(shards.PART_PREFIX))
        assert parts == sorted(entry.path for entry in manifest.files)
        ids = read_folder(folder)[schema.SAMPLE_ID].to_pylist()
        assert len(ids) == len(set(ids)) == manifest.rows
    assert split.load_split(out) == second


def test_interrupted_split_is_not_mistaken_for_complete(made, tmp_path):
    out, summary = made
    assert split.load_split(out) == summary
    with pytest.raises(shards.IncompleteOutput, match="_split.json"):
        split.load_split(str(tmp_path))
    with pytest.raises(shards.IncompleteOutput):
        split.load_unlabeled_pool(str(tmp_path))


def test_summary_table_names_every_class(made):
    _, summary = made
    text = summary.summary()
    for name in schema.CLASS_NAMES:
        assert name in text
    assert "ms1mv2 30" in text


def test_unlabeled_mask_rule():
    table = pa.table({
        schema.SAMPLE_ID: ["a", "b", "c", "d"],
        schema.SOURCE: pa.array([schema.AFFWILD2, schema.AFFWILD2, schema.AFFECTNET,
                                 schema.MS1MV2]).dictionary_encode(),
        schema.SPLIT: [schema.TRAIN, schema.VALIDATION, schema.VALIDATION, schema.TRAIN],
    })
    excluded = pa.chunked_array([["a"], ["zzz"]])
    mask = split.unlabeled_mask(table, excluded)
    assert isinstance(mask, pa.BooleanArray)
    assert mask.to_pylist() == [False, False, True, True]


@pytest.mark.parametrize("per_class, seed", [(0, 0), (5, -1), (2.5, 0)])
def test_bad_arguments(shards_root, tmp_path, per_class, seed):
    with pytest.raises(ValueError):
        split.make_split(shards_root, str(tmp_path), per_class, seed)


def test_a_split_copied_with_its_shards_to_another_place_finds_them_there(tmp_path):
    first, second = tmp_path / "machine-a", tmp_path / "machine-b"
    root = build_root(str(first / "data" / "shards"), sources=(schema.AFFWILD2,))
    split.make_split(root, str(first / "data" / "split"), PER_CLASS, seed=0)
    expected = unlabeled_ids(str(first / "data" / "split"))
    # The split alone copied elsewhere: the shards are still where it recorded them.
    split_only = tmp_path / "elsewhere" / "split"
    shutil.copytree(first / "data" / "split", split_only)
    assert split.load_split(str(split_only)).shards_root == root
    # Both moved together and the original deleted: found relative to the split.
    shutil.copytree(first, second)
    shutil.rmtree(first)
    moved = str(second / "data" / "split")
    assert split.load_split(moved).shards_root == str(second / "data" / "shards")
    assert unlabeled_ids(moved) == expected
    with pytest.raises(FileNotFoundError, match="neither at .*elsewhere.* nor at .*machine-a"):
        split.load_split(str(split_only))
