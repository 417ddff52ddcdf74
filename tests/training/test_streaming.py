"""The unlabeled pool through Ray Data: `PoolViews` (pure) and `StreamedUnlabeled` / the pool
dataset on a local Ray (the Ray Train path itself is in test_distributed.py)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import schema, split
from pipeline.training.config import DataConfig, load_config
from pipeline.training.inputs import (PREPARED_HIDDEN_LABEL, PREPARED_OK, PREPARED_PIXELS, PREPARED_SAMPLE_ID,
                                      PREPARED_SOURCE, PoolViews)

from conftest import build_tiny_split, make_jpeg


def pool_table(ids, sources, splits, images, labels=None) -> pa.Table:
    labels = labels if labels is not None else [schema.NO_LABEL] * len(ids)
    return pa.table({schema.SAMPLE_ID: ids, schema.IMAGE: pa.array(images, pa.binary()),
                     schema.SOURCE: sources, schema.SPLIT: splits, schema.LABEL: pa.array(labels, pa.int8())})


def test_pool_views_keep_pool_rows_and_flag_undecodable_ones():
    table = pool_table(
        ["a", "b", "c", "d", "e"],
        [schema.MS1MV2, schema.MS1MV2, schema.AFFWILD2, schema.AFFWILD2, schema.EXPW],
        ["train", "train", "validation", "train", "train"],
        [make_jpeg(1), b"not a jpeg", make_jpeg(2), make_jpeg(3), make_jpeg(4)],
        labels=[-1, -1, 3, 4, 6])
    views = PoolViews(DataConfig(image_size=32), pa.array(["d"]), seed=0)
    output = views(table)
    # c: Aff-Wild2 validation, d: excluded (labeled); b stays, flagged undecodable.
    assert output[PREPARED_PIXELS].shape == (3, 32, 32, 3)
    assert output[PREPARED_PIXELS].dtype == np.uint8
    assert output[PREPARED_OK].tolist() == [True, False, True]
    # What the split hid rides along for measuring pseudo labels: a, b (MS1MV2, none) and e.
    assert output[PREPARED_HIDDEN_LABEL].tolist() == [-1, -1, 6]
    assert output[PREPARED_SOURCE].tolist() == [schema.SOURCES.index(schema.MS1MV2)] * 2 + [
        schema.SOURCES.index(schema.EXPW)]
    assert not output[PREPARED_PIXELS][1].any() and output[PREPARED_PIXELS][0].any()
    assert output[PREPARED_SAMPLE_ID].tolist() == ["a", "b", "e"]  # every row named, "b" to report it
    only_expw = PoolViews(DataConfig(image_size=32, unlabeled_sources=[schema.EXPW]), pa.array(["d"]), 0)
    assert only_expw(table)[PREPARED_OK].tolist() == [True]
    # The crops are a pure function of the batch: the same batch gives the same pixels.
    assert np.array_equal(views(table)[PREPARED_PIXELS], output[PREPARED_PIXELS])
    empty = views(table.slice(2, 2))
    assert empty[PREPARED_PIXELS].shape == (0, 32, 32, 3) and empty[PREPARED_OK].shape == (0,)


@pytest.mark.ray
def test_stream_runs_whole_passes_and_resumes_at_a_pass_boundary(local_ray):
    from pipeline.training.ray_train import StreamedUnlabeled

    items = [{PREPARED_PIXELS: np.full((4, 4, 3), index, np.uint8), PREPARED_OK: index != 3,
              PREPARED_HIDDEN_LABEL: index % 8, PREPARED_SOURCE: index % 2,
              PREPARED_SAMPLE_ID: f"ms1mv2/{index}"} for index in range(10)]
    dataset = local_ray.data.from_items(items)
    stream = StreamedUnlabeled(dataset.iterator(), batch_size=4, shuffle_buffer=0, seed=0, rank=0)
    seen, failed = [], []
    undecodable = 0
    for _ in range(2):  # one pass: 10 rows -> two whole batches (the partial one is dropped)
        prepared = stream.take_prepared(4, None, None)
        seen += [int(image[0, 0, 0]) for image in prepared.pixels]
        # Hidden labels and sources stay aligned with the pixels after the undecodable row is dropped.
        assert prepared.hidden_labels.tolist() == [value % 8 for value in seen[-len(prepared.pixels):]]
        assert prepared.sources.tolist() == [value % 2 for value in seen[-len(prepared.pixels):]]
        undecodable += prepared.undecodable
        failed += prepared.undecodable_ids
        # The ids of the decoded rows, aligned with the pixels, and the pass they came from.
        assert prepared.sample_ids == [f"ms1mv2/{value}" for value in seen[-len(prepared.pixels):]]
        assert prepared.pass_number == 0
    assert stream.state_dict() == {"pass_number": 0, "batches": 2}
    assert failed == ["ms1mv2/3"]  # the worker can name what it dropped
    assert len(seen) + undecodable == 8 and undecodable == 1 and 3 not in seen
    assert len(set(seen)) == len(seen)
    stream.take_prepared(4, None, None)  # the next pass begins
    assert stream.state_dict() == {"pass_number": 1, "batches": 1}
    # Closing a stream in mid-pass stops the threads that read ahead for it.
    assert any(thread.name == "iter_threaded" for thread in threading.enumerate())
    stream.close()
    deadline = time.monotonic() + 10  # they see the close at their next wake-up
    while any(thread.name == "iter_threaded" for thread in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(thread.name == "iter_threaded" for thread in threading.enumerate())

    restored = StreamedUnlabeled(dataset.iterator(), 4, 0, seed=0, rank=0)
    restored.load_state_dict(stream.state_dict())
    assert restored.state_dict() == {"pass_number": 2, "batches": 0}  # mid-pass: the next one
    restored.load_state_dict({"pass_number": 5, "batches": 0})
    assert restored.pass_number == 5
    with pytest.raises(ValueError, match="4 images a step"):
        restored.take_prepared(3, None, None)
    too_big = StreamedUnlabeled(dataset.iterator(), batch_size=16, shuffle_buffer=0, seed=0, rank=0)
    with pytest.raises(ValueError, match="fewer than 16 rows"):
        too_big.next_batch()


@pytest.mark.ray
def test_pool_dataset_streams_exactly_the_pool(local_ray, tmp_path):
    from pipeline.training.ray_train import StreamedUnlabeled, unlabeled_dataset

    split_dir = build_tiny_split(tmp_path)
    config = load_config(base={"method": "dtm", "data": {"split": split_dir, "image_size": 24,
                                                          "labeled_batch": 4, "unlabeled_ratio": 2}})
    pool = split.load_unlabeled_pool(split_dir)
    expected = sum(int(np.asarray(split.unlabeled_mask(pq.read_table(uri), pool.excluded_ids)).sum())
                   for uri in pool.file_uris)
    assert expected > 0
    stream = StreamedUnlabeled(unlabeled_dataset(config).iterator(), batch_size=8, shuffle_buffer=32,
                               seed=0, rank=0)
    total = 0
    while stream.pass_number == 0:
        batch = stream.next_batch()
        if stream.pass_number > 0:
            break
        assert batch[PREPARED_PIXELS].shape == (8, 24, 24, 3)
        total += 8
    assert expected - 8 < total <= expected  # one whole pass, only the last partial batch dropped
    stream.close()


@pytest.mark.ray
def test_a_stream_started_at_a_later_pass_does_not_replay_the_first_pass_file_order(local_ray, tmp_path):
    """Ray Data numbers a stream's executions from zero, and a restarted worker group (or a re-run)
    gets a new stream: seeded from the run's seed alone, its first pass would replay pass 0's file
    order. `pool_dataset(first_pass=...)` seeds it from the pass it starts at."""
    from ray.data import DataContext

    from pipeline.training.ray_train import pool_dataset

    uris = []
    for number in range(12):
        uri = str(tmp_path / f"part-{number:02d}.parquet")
        pq.write_table(pool_table([f"ms1mv2:{number:02d}-{row}" for row in range(2)], [schema.MS1MV2] * 2,
                                  [schema.TRAIN] * 2, [make_jpeg(number * 2 + row) for row in range(2)]), uri)
        uris.append(uri)
    data = DataConfig(image_size=16, decode_batch=2)
    context = DataContext.get_current()
    saved = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # output in file order: the order is visible

    def stream(first_pass: int):
        return pool_dataset(uris, pa.array([], pa.string()), data, seed=7, first_pass=first_pass)

    def file_order(dataset) -> list[str]:
        ids = [str(value) for batch in dataset.iter_batches(batch_format="numpy", batch_size=None)
               for value in batch[PREPARED_SAMPLE_ID]]
        return list(dict.fromkeys(value.split(":")[1].split("-")[0] for value in ids))

    try:
        fresh = stream(0)
        first, second = file_order(fresh), file_order(fresh)  # passes 0 and 1 of one stream
        assert sorted(first) == sorted(second) == [f"{number:02d}" for number in range(12)]
        assert first != second
        assert file_order(stream(0)) == first  # the trap: a new stream replays pass 0
        resumed = file_order(stream(1))
        assert resumed != first and resumed == file_order(stream(1))  # its own order, reproducible
    finally:
        context.execution_options.preserve_order = saved
