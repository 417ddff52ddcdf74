"""Training data read straight from a split (no Ray): the labeled and validation sets in memory as
encoded bytes, and the unlabeled pool as an endless, shuffled stream over the source shards.

Images stay JPEG bytes until a batch is drawn, so a 120k-image labeled set costs its file size
in memory, not 120k decoded frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data import schema, shards, split, storage


@dataclass
class ImageTable:
    """Rows of a shard folder held in memory: image bytes and the metadata training needs."""

    images: pa.BinaryArray
    labels: np.ndarray
    sample_ids: list[str]
    videos: np.ndarray
    frames: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take_images(self, indices: np.ndarray) -> list[bytes]:
        return self.images.take(pa.array(indices, pa.int64())).to_pylist()

    def concat(self, other: "ImageTable") -> "ImageTable":
        return ImageTable(images=pa.concat_arrays([self.images, other.images]),
                          labels=np.concatenate([self.labels, other.labels]),
                          sample_ids=self.sample_ids + other.sample_ids,
                          videos=np.concatenate([self.videos, other.videos]),
                          frames=np.concatenate([self.frames, other.frames]))

    @classmethod
    def from_table(cls, table: pa.Table) -> "ImageTable":
        table = table.combine_chunks()
        videos = table[schema.VIDEO].to_numpy(zero_copy_only=False)
        frames = table[schema.FRAME].fill_null(0).to_numpy()
        return cls(
            images=table[schema.IMAGE].chunk(0) if table.num_rows else pa.array([], pa.binary()),
            labels=table[schema.LABEL].to_numpy().astype(np.int64),
            sample_ids=table[schema.SAMPLE_ID].to_pylist(),
            videos=np.asarray([video if video is not None else "" for video in videos], dtype=object),
            frames=frames.astype(np.int64),
        )


def read_shard_folder(folder: str) -> ImageTable:
    """Every row of a complete shard folder (refuses one without a manifest), in file order."""
    manifest = shards.Manifest.load(folder)
    tables = []
    for uri in manifest.file_uris(folder):
        fs, path = storage.filesystem(uri)
        tables.append(pq.read_table(path, filesystem=fs))
    table = pa.concat_tables(tables) if tables else schema.SHARD_SCHEMA.empty_table()
    return ImageTable.from_table(table)


def read_labeled(split_dir: str) -> ImageTable:
    split.load_split(split_dir)  # refuses a split that did not finish
    table = read_shard_folder(storage.join(split_dir, split.LABELED))
    if len(table) == 0:
        raise ValueError(f"{split_dir}: the labeled set is empty")
    return table


def read_validation(split_dir: str) -> ImageTable:
    return read_shard_folder(storage.join(split_dir, split.VALIDATION))


PoolRow = tuple[bytes, int, int, str]
"""One unlabeled-pool row as the stream hands it out: image bytes, hidden label, source index,
sample id (to name the row if it does not decode)."""


class UnlabeledStream:
    """An endless stream of unlabeled image bytes over the pool's source shards.

    Each pass visits the pool's files in a fresh seeded order (this rank's share of them when
    several workers read), filters each record batch to the pool with `split.unlabeled_mask`, and
    shuffles within blocks of `shuffle_buffer` rows. The sequence is a pure function of
    (seed, pass, rank), so the checkpointed position is (pass, images handed out) and a resumed
    stream replays the pass up to there without decoding: it continues exactly.
    """

    def __init__(self, split_dir: str, seed: int, shuffle_buffer: int = 4096,
                 sources: list[str] | None = None, rank: int = 0, world_size: int = 1,
                 read_rows: int = 1024) -> None:
        self.pool = split.load_unlabeled_pool(split_dir)
        if not self.pool.file_uris:
            raise ValueError(f"{split_dir}: the unlabeled pool is empty")
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.sources = list(sources or [])
        self.rank = rank
        self.world_size = world_size
        self.read_rows = read_rows
        self.pass_number = 0
        self.emitted = 0  # images handed out in this pass: the exact resume position
        self._skip = 0
        self._iterator: Iterator[PoolRow] | None = None

    def _files_for_pass(self, pass_number: int) -> tuple[list[str], bool]:
        """This rank's files for the pass, and whether it must keep only its share of their rows:
        with fewer files than workers every rank reads every file and keeps every world_size-th
        pool row (rank-th first), so no row reaches two workers and none is left out."""
        order = np.random.default_rng([self.seed, pass_number]).permutation(len(self.pool.file_uris))
        files = [self.pool.file_uris[index] for index in order]
        if len(files) >= self.world_size:
            return files[self.rank::self.world_size], False
        return files, True

    def _record_batches(self, pass_number: int) -> Iterator[pa.Table]:
        columns = [schema.SAMPLE_ID, schema.IMAGE, schema.SOURCE, schema.SPLIT, schema.LABEL]
        files, split_rows = self._files_for_pass(pass_number)
        position = 0  # pool rows seen in this pass before the current batch (row splitting)
        for uri in files:
            fs, path = storage.filesystem(uri)
            with fs.open(path, "rb") as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=self.read_rows,
                                                                 columns=columns):
                    table = pa.Table.from_batches([batch])
                    mask = split.unlabeled_mask(table, self.pool.excluded_ids)
                    if self.sources:
                        mask = pc.and_(mask, pc.is_in(table[schema.SOURCE],
                                                      value_set=pa.array(self.sources)))
                    table = table.filter(mask)
                    if split_rows:
                        mine = (np.arange(position, position + table.num_rows) % self.world_size) == self.rank
                        position += table.num_rows
                        table = table.filter(pa.array(mine))
                    yield table

    def _pass_rows(self, pass_number: int) -> Iterator[PoolRow]:
        rng = np.random.default_rng([self.seed, pass_number, self.rank, 1])
        buffer: list[PoolRow] = []
        for table in self._record_batches(pass_number):
            buffer.extend(zip(table[schema.IMAGE].to_pylist(), table[schema.LABEL].to_pylist(),
                              schema.source_indices(table[schema.SOURCE].to_pylist()).tolist(),
                              table[schema.SAMPLE_ID].to_pylist()))
            if len(buffer) >= self.shuffle_buffer:
                for index in rng.permutation(len(buffer)):
                    yield buffer[index]
                buffer = []
        for index in rng.permutation(len(buffer)):
            yield buffer[index]

    def _rows(self) -> Iterator[PoolRow]:
        while True:
            produced = 0
            for row in self._pass_rows(self.pass_number):
                produced += 1
                if produced <= self._skip:
                    continue  # replaying up to the resumed position
                self.emitted = produced
                yield row
            if produced == 0:
                raise ValueError("the unlabeled pool has no row for this worker and filter")
            self.pass_number += 1
            self.emitted = 0
            self._skip = 0

    def take(self, count: int) -> tuple[list[bytes], np.ndarray, np.ndarray, list[str]]:
        """The next `count` rows: their image bytes, hidden labels (-1: none known), source
        indices (`schema.SOURCES`) and sample ids. The labels are for measuring pseudo labels,
        never training."""
        if self._iterator is None:
            self._iterator = self._rows()
        rows = [next(self._iterator) for _ in range(count)]
        return ([row[0] for row in rows], np.array([row[1] for row in rows], np.int64),
                np.array([row[2] for row in rows], np.int64), [row[3] for row in rows])

    def state_dict(self) -> dict[str, int]:
        return {"pass_number": self.pass_number, "emitted": self.emitted}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "emitted" not in state:
            # A Ray Data stream's state (pass, batches): no exact position, start the next pass.
            started = int(state.get("batches", 0)) > 0
            state = {"pass_number": int(state["pass_number"]) + int(started), "emitted": 0}
        self.pass_number = int(state["pass_number"])
        self.emitted = self._skip = int(state["emitted"])
        self._iterator = None
