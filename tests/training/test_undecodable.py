"""Undecodable images are dropped from training batches only up to `data.max_undecodable_fraction`:
past it the run fails, naming sample ids and counts (a pool that stopped decoding must not turn an
SSL run into supervised training unnoticed)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import schema, split
from pipeline.training.config import DataConfig, load_config
from pipeline.training.inputs import (PREPARED_SAMPLE_ID, PREPARED_OK, DecodeGuard, PoolViews,
                                      UndecodableImages)
from pipeline.training.loop import METRICS_LINES, Trainer

from conftest import build_tiny_split, make_jpeg


def test_the_guard_waits_for_enough_images_then_fails_naming_examples():
    guard = DecodeGuard(max_fraction=0.05, min_images=100, examples=3)
    guard.add(10, ["ms1mv2:1", "ms1mv2:2"])  # 2 of 12 failed: too few images drawn to judge
    guard.add(88, [])  # 2 of 100: under the limit
    with pytest.raises(UndecodableImages, match=r"6 of 104 images .*0\.05.* ms1mv2:1, ms1mv2:2, ms1mv2:3\."):
        guard.add(0, ["ms1mv2:3", "ms1mv2:4", "ms1mv2:5", "ms1mv2:6"])


def test_the_limit_is_a_share_of_the_images_drawn_and_the_epoch_end_always_checks():
    guard = DecodeGuard(max_fraction=0.05, min_images=100)
    guard.add(95, ["a"] * 5)  # exactly 5 %: allowed
    with pytest.raises(UndecodableImages, match="6 of 101"):
        guard.add(0, ["b"])
    few = DecodeGuard(max_fraction=0.05, min_images=1000)
    few.add(3, ["x"])  # under min_images: no verdict during the epoch ...
    with pytest.raises(UndecodableImages, match="1 of 4"):
        few.check()  # ... but at its end
    DecodeGuard(max_fraction=0.0).check()  # nothing drawn, nothing failed


def test_pool_views_name_the_rows_that_did_not_decode():
    table = pa.table({
        schema.SAMPLE_ID: ["ms1mv2:1", "ms1mv2:2", "ms1mv2:3"],
        schema.IMAGE: pa.array([make_jpeg(), b"\xff\xd8 not a jpeg", make_jpeg()], pa.binary()),
        schema.SOURCE: [schema.MS1MV2] * 3, schema.SPLIT: ["train"] * 3,
        schema.LABEL: pa.array([schema.NO_LABEL] * 3, pa.int8())})
    output = PoolViews(DataConfig(image_size=32), pa.array([], pa.string()), seed=0)(table)
    assert output[PREPARED_OK].tolist() == [True, False, True]
    assert output[PREPARED_SAMPLE_ID].tolist() == ["ms1mv2:1", "ms1mv2:2", "ms1mv2:3"]


def break_pool_images(split_dir: str, source: str, every: int) -> int:
    """Overwrite every `every`-th image of `source`'s pool files with bytes that do not decode,
    as a damaged copy of the shards would hold; returns how many rows were broken."""
    pool = split.load_unlabeled_pool(split_dir)
    broken = 0
    for uri in pool.file_uris:
        if f"/{source}/" not in uri:
            continue
        table = pq.read_table(uri)
        images = table[schema.IMAGE].to_pylist()
        for index in range(0, len(images), every):
            images[index] = b"\xff\xd8\xff\xe0 truncated"
            broken += 1
        table = table.set_column(table.schema.get_field_index(schema.IMAGE), schema.IMAGE,
                                 pa.array(images, pa.binary()))
        pq.write_table(table, uri)
    return broken


@pytest.mark.slow
def test_training_fails_when_the_pool_stops_decoding_and_runs_below_the_limit(tmp_path):
    split_dir = build_tiny_split(tmp_path)
    assert break_pool_images(split_dir, schema.MS1MV2, every=1) > 0

    def config(limit: float, name: str):
        return load_config(base={
            "method": "dtm", "model": {"backbone": "test_resnet", "channels_last": False},
            "data": {"split": split_dir, "image_size": 32, "labeled_batch": 8, "unlabeled_ratio": 2,
                     "shuffle_buffer": 32, "unlabeled_sources": [schema.MS1MV2],
                     "max_undecodable_fraction": limit},
            "evaluation": {"windows": [5], "batch_size": 64},
            "run": {"name": name, "storage": str(tmp_path / "runs"), "epochs": 1, "steps_per_epoch": 2}})

    with pytest.raises(UndecodableImages, match=r"32 of 48 images drawn .* ms1mv2/\d+, "):
        Trainer(config(0.01, "strict")).fit()
    # With the limit lifted the same run trains on the labeled images alone and says so.
    Trainer(config(1.0, "lenient")).fit()
    record = json.loads((tmp_path / "runs" / "lenient" / METRICS_LINES).read_text().splitlines()[-1])
    assert record["undecodable_images"] == 32
    assert record["pseudo_label_acceptance_rate"] is None
