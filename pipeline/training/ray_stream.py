"""The unlabeled pool as a Ray Data stream: the pool's shard files read in a fresh order each pass,
pool rows kept, decoded and cropped in `map_batches` (`PoolViews`), split across Ray Train workers;
each worker consumes its split through one long-lived iterator (`StreamedUnlabeled`).

A pass over a 1.94M pool spans many epochs, so the iterator is never restarted at an epoch: it
runs to the end of its pass, and only then does the next pass begin (on every rank at the same
step, because the split is `equal` and every batch has the same size).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray.data
from ray.data import FileShuffleConfig

from pipeline import schema, split, storage
from pipeline.config import ConfigError
from pipeline.training.config import DataConfig, TrainConfig
from pipeline.training.inputs import PREPARED_OK, PREPARED_PIXELS, PoolViews, UnlabeledSource
from pipeline.views import WeakView

POOL_COLUMNS = [schema.SAMPLE_ID, schema.IMAGE, schema.SOURCE, schema.SPLIT]
DATASET_NAME = "unlabeled"


def uses_ray_data(config: TrainConfig) -> bool:
    """Whether the unlabeled pool streams through Ray Data for this config ("auto": on Ray Train)."""
    reader = config.data.unlabeled_reader
    if reader == "auto":
        reader = "ray_data" if config.scaling.num_workers > 0 else "in_process"
    method = config.method_class()
    return (reader == "ray_data" and method.views.unlabeled and config.data.use_unlabeled
            and config.data.unlabeled_ratio > 0)


def unlabeled_per_step(config: TrainConfig) -> int:
    return config.data.labeled_batch * config.data.unlabeled_ratio


def unlabeled_dataset(config: TrainConfig) -> ray.data.Dataset:
    """The lazily executed pool stream of `config`'s split: uint8 `pixels` (N, S, S, 3) after the
    weak geometry and a `decoded` flag per row."""
    pool = split.load_unlabeled_pool(config.data.split)
    if not pool.file_uris:
        raise ConfigError(f"data.split: {config.data.split} has an empty unlabeled pool")
    return pool_dataset(pool.file_uris, pool.excluded_ids, config.data, config.run.seed)


def pool_dataset(file_uris: list[str], excluded_ids: Any, data: DataConfig, seed: int
                 ) -> ray.data.Dataset:
    """Shard files (local or s3://, one filesystem) -> the stream of `PoolViews` batches."""
    filesystem, _ = storage.filesystem(file_uris[0])
    paths = [storage.filesystem(uri)[1] for uri in file_uris]
    dataset = ray.data.read_parquet(
        paths, filesystem=filesystem,
        # A new file order every pass, streamed: randomize_block_order would hold the whole pool.
        shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=True)).select_columns(POOL_COLUMNS)
    views = PoolViews(data, excluded_ids, seed)
    return dataset.map_batches(views, batch_format="pyarrow", batch_size=data.decode_batch,
                               num_cpus=data.decode_cpus)


class StreamedUnlabeled(UnlabeledSource):
    """One worker's share of the pool stream, `batch_size` rows at a time, across epochs.

    Rows are shuffled within `shuffle_buffer` on top of the per-pass file order. Resume is at a
    pass boundary: Ray Data cannot seek inside a pass, so a restored worker starts the pass after
    the one it was in (the single-process reader resumes exactly; see `UnlabeledStream`)."""

    def __init__(self, shard: Any, batch_size: int, shuffle_buffer: int, seed: int, rank: int,
                 prefetch_batches: int = 2) -> None:
        self.shard = shard  # ray.data.DataIterator (a Ray Train split, or dataset.iterator())
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.prefetch_batches = prefetch_batches
        self.pass_number = 0
        self.batches = 0  # taken in this pass
        self._iterator = None

    def _start_pass(self) -> None:
        shuffle = max(self.shuffle_buffer, self.batch_size) if self.shuffle_buffer else None
        self._iterator = iter(self.shard.iter_batches(
            batch_size=self.batch_size, batch_format="numpy", drop_last=True,
            prefetch_batches=self.prefetch_batches, local_shuffle_buffer_size=shuffle,
            local_shuffle_seed=(self.seed * 1_000_003 + self.pass_number) * 1_009 + self.rank
            if shuffle else None))
        self.batches = 0

    def next_batch(self) -> dict[str, np.ndarray]:
        while True:
            if self._iterator is None:
                self._start_pass()
            try:
                batch = next(self._iterator)
            except StopIteration:
                if self.batches == 0:
                    raise ValueError(f"rank {self.rank}: its share of the unlabeled pool holds fewer "
                                     f"than {self.batch_size} rows (one step's worth); use fewer "
                                     "workers or a smaller data.unlabeled_ratio") from None
                self.pass_number += 1
                self._iterator = None
                continue
            self.batches += 1
            return batch

    def take_prepared(self, count: int, weak_view: WeakView, rng: np.random.Generator
                      ) -> tuple[np.ndarray, int]:
        if count != self.batch_size:
            raise ValueError(f"the stream was built for {self.batch_size} images a step, asked for {count}")
        batch = self.next_batch()
        decoded = batch[PREPARED_OK].astype(bool)
        return batch[PREPARED_PIXELS][decoded], int((~decoded).sum())

    def state_dict(self) -> dict[str, int]:
        return {"pass_number": self.pass_number, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        started = int(state.get("batches", state.get("emitted", 0))) > 0
        self.pass_number = int(state["pass_number"]) + int(started)
        self.batches = 0
        self._iterator = None


def streamed_unlabeled(config: TrainConfig, shard: Any, rank: int) -> StreamedUnlabeled:
    return StreamedUnlabeled(shard, unlabeled_per_step(config), config.data.shuffle_buffer,
                             config.run.seed, rank)
