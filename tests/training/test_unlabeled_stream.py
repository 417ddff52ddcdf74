"""The single-process unlabeled stream over several workers: over one pass the ranks' rows are
disjoint and together are the whole pool, also with more workers than pool files (they then split
the rows of every file instead of reading the same files twice)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipeline.data import schema, split
from pipeline.training.data import UnlabeledStream

from conftest import build_tiny_split

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    return build_tiny_split(tmp_path_factory.mktemp("stream"))


def pool_ids(split_dir: str) -> list[str]:
    pool = split.load_unlabeled_pool(split_dir)
    ids = []
    for uri in pool.file_uris:
        table = pq.read_table(uri, columns=[schema.SAMPLE_ID, schema.SOURCE, schema.SPLIT])
        ids += table.filter(split.unlabeled_mask(table, pool.excluded_ids))[schema.SAMPLE_ID].to_pylist()
    return ids


def one_pass(split_dir: str, rank: int, world_size: int) -> list[str]:
    stream = UnlabeledStream(split_dir, seed=3, shuffle_buffer=16, rank=rank, world_size=world_size)
    seen = []
    while True:
        *_, sample_ids = stream.take(1)
        if stream.pass_number:  # that row opened the next pass
            return seen
        seen += sample_ids


@pytest.mark.parametrize("extra_workers", [-1, 1])  # fewer workers than files; more workers than files
def test_each_pool_row_reaches_exactly_one_worker_per_pass(tiny_split, extra_workers):
    files = len(split.load_unlabeled_pool(tiny_split).file_uris)
    world_size = max(2, files + extra_workers)
    assert (world_size > files) == (extra_workers > 0)
    shares = [one_pass(tiny_split, rank, world_size) for rank in range(world_size)]
    everything = [sample_id for share in shares for sample_id in share]
    assert len(everything) == len(set(everything))  # no row twice
    assert sorted(everything) == sorted(pool_ids(tiny_split))  # none left out
    assert all(shares)
