"""The input path of a training step: CPU decode + weak geometry (uint8), then weak/strong views
made on the device (uint8 crosses to the GPU, a quarter of float32's bytes, and the heavy colour work runs batched
there; BENCHMARKS.md, "Views").
The unlabeled CPU part runs in this process or, on Ray Train, in Ray Data (`PoolViews`).
"""

from __future__ import annotations

import abc
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.core import devices, views
from pipeline.data import schema, split
from pipeline.methods.base import TrainBatch, Views
from pipeline.training.config import DataConfig
from pipeline.training.data import ImageTable, UnlabeledStream


@dataclass
class PreparedUnlabeled:
    """A step's unlabeled images after decode and weak geometry (uint8 NHWC, decoded rows only),
    with what the split hid about each: its label (-1: none known) and source index. The labels
    only measure the pseudo labels; they never reach the method."""

    pixels: np.ndarray
    hidden_labels: np.ndarray
    sources: np.ndarray
    undecodable_ids: list[str]
    """Sample ids of the rows drawn for the step that did not decode (dropped from `pixels`)."""
    sample_ids: list[str]
    """Sample ids of the decoded rows, in the order of `pixels` (for observers and audits)."""
    pass_number: int
    """The pass over the pool the rows were drawn in (the in-process stream: that of the last row)."""

    @property
    def undecodable(self) -> int:
        return len(self.undecodable_ids)


@dataclass
class CpuBatch:
    """One step's images after decode and geometry, still uint8 NHWC on the CPU."""

    labeled: np.ndarray
    labels: np.ndarray
    unlabeled: PreparedUnlabeled | None
    undecodable_ids: list[str]
    """Sample ids of the step's labeled and unlabeled rows that did not decode."""
    host: dict[str, torch.Tensor]
    """The arrays as host tensors for the copy to the device (pinned for a GPU), made by the
    prefetch thread: labeled, labels, and with unlabeled rows unlabeled, hidden_labels, sources."""


@dataclass
class HiddenLabels:
    """The hidden labels and source indices of a step's unlabeled rows, on the device, aligned
    with `TrainBatch.unlabeled_weak`."""

    labels: torch.Tensor
    sources: torch.Tensor


def make_views(config: DataConfig) -> tuple[views.WeakView, views.StrongView]:
    crop = config.image_size if config.resize else None
    weak = views.WeakViewConfig(
        resize=config.resize or config.image_size, crop=crop, brightness=config.colour_jitter,
        contrast=config.colour_jitter, saturation=config.colour_jitter,
        hue=min(0.5, config.colour_jitter / 4),
    )
    strong = views.StrongViewConfig(weak=weak, num_ops=config.randaugment_ops,
                                    magnitude=float(config.randaugment_magnitude),
                                    erasing_probability=config.random_erasing)
    return views.WeakView(weak), views.StrongView(strong)


def evaluation_tensor(images: list[bytes], data: DataConfig, device: torch.device
                      ) -> tuple[torch.Tensor, np.ndarray]:
    """The deterministic evaluation view of encoded images (resize, centre crop when training
    cropped, normalise; no augmentation) on `device`, and which of them decoded. Validation,
    threshold scoring and batch inference all use it."""
    decoded, ok = views.decode_resize(images, data.resize or data.image_size)
    if data.resize:
        decoded = views.centre_crop(decoded, data.image_size)
    weak = make_views(data)[0].config
    tensor = torch.from_numpy(decoded).to(device)
    return views.to_float(tensor, weak.mean, weak.std, weak.channels_last), ok


class UndecodableImages(ValueError):
    """Too many of the images drawn for training did not decode: the run stops (see DecodeGuard)."""


class DecodeGuard:
    """Counts the images a worker drew for training and those that did not decode, and fails the
    run once more than `max_fraction` of them failed: undecodable rows are dropped from batches,
    so a pool that stopped decoding would otherwise turn an SSL run into supervised training,
    visible only as an empty acceptance rate. `check` runs after every step once `min_images` were
    drawn (a few bad images early on must not end a run) and at each epoch's end whatever the count.
    """

    def __init__(self, max_fraction: float, min_images: int = 1000, examples: int = 10) -> None:
        self.max_fraction = max_fraction
        self.min_images = min_images
        self.attempted = 0
        self.failed = 0
        self.examples: list[str] = []
        self._keep = examples

    def add(self, decoded: int, failed_ids: list[str]) -> None:
        self.attempted += decoded + len(failed_ids)
        self.failed += len(failed_ids)
        self.examples += failed_ids[:max(0, self._keep - len(self.examples))]
        if self.attempted >= self.min_images:
            self.check()

    def check(self) -> None:
        if self.failed and self.failed > self.max_fraction * self.attempted:
            raise UndecodableImages(
                f"{self.failed:,} of {self.attempted:,} images drawn for training did not decode "
                f"({self.failed / self.attempted:.1%}, more than data.max_undecodable_fraction="
                f"{self.max_fraction:g}); for example: {', '.join(self.examples)}. Check the shards "
                "(jobs.ingest --full-decode skips such records with their reason) or raise the limit.")


class UnlabeledSource(abc.ABC):
    """Where a step's unlabeled images come from, already decoded and cropped (uint8 NHWC): read
    and decoded in this process (`DecodedStream`), or streamed from Ray Data workers that did the
    decode and geometry (`pipeline.training.ray_train.StreamedUnlabeled`)."""

    @abc.abstractmethod
    def take_prepared(self, count: int, weak_view: views.WeakView, rng: np.random.Generator
                      ) -> PreparedUnlabeled:
        """`count` rows after decode and weak geometry; undecodable ones are dropped and counted."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, int]) -> None: ...

    def close(self) -> None:
        """Release what the source holds open (threads, iterators); it is not used again."""


class DecodedStream(UnlabeledSource):
    """An `UnlabeledStream` of image bytes decoded in this process (the single-process path)."""

    def __init__(self, stream: UnlabeledStream) -> None:
        self.stream = stream

    def take_prepared(self, count: int, weak_view: views.WeakView, rng: np.random.Generator
                      ) -> PreparedUnlabeled:
        encoded, hidden_labels, sources, sample_ids = self.stream.take(count)
        images, ok = weak_view.decode(encoded)
        return PreparedUnlabeled(weak_view.geometry(images[ok], rng), hidden_labels[ok], sources[ok],
                                 [sample_id for sample_id, good in zip(sample_ids, ok) if not good],
                                 [sample_id for sample_id, good in zip(sample_ids, ok) if good],
                                 self.stream.pass_number)

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)


PREPARED_PIXELS = "pixels"
PREPARED_OK = "decoded"
PREPARED_HIDDEN_LABEL = "hidden_label"
PREPARED_SOURCE = "source_index"
PREPARED_SAMPLE_ID = "sample_id"
"""Every row's sample id: a worker names the rows that did not decode, and observers can audit
which rows each step drew."""


class PoolViews:
    """One batch of unlabeled-pool rows -> their weak-geometry pixels: keep the pool's rows
    (`split.unlabeled_mask`, optional source filter), decode, crop. Pure; Ray Data runs it in
    `map_batches` so the training process never decodes unlabeled images.

    Undecodable rows stay in the output with `decoded` False (all-zero pixels) so each worker can
    count them; rows outside the pool are dropped here."""

    def __init__(self, data: DataConfig, excluded_ids: pa.Array, seed: int) -> None:
        self.weak_view, _ = make_views(data)
        self.excluded_ids = excluded_ids
        self.sources = list(data.unlabeled_sources)
        self.seed = seed

    def pool_rows(self, table: pa.Table) -> pa.Table:
        mask = split.unlabeled_mask(table, self.excluded_ids)
        if self.sources:
            mask = pc.and_(mask, pc.is_in(table[schema.SOURCE], value_set=pa.array(self.sources)))
        return table.filter(mask)

    def __call__(self, table: pa.Table) -> dict[str, Any]:
        table = self.pool_rows(table)
        size = self.weak_view.config.output_size
        if table.num_rows == 0:
            return {PREPARED_PIXELS: np.zeros((0, size, size, 3), np.uint8),
                    PREPARED_OK: np.zeros(0, bool), PREPARED_HIDDEN_LABEL: np.zeros(0, np.int64),
                    PREPARED_SOURCE: np.zeros(0, np.int64), PREPARED_SAMPLE_ID: np.zeros(0, object)}
        # Random crops seeded by the batch's first id: reproducible for a given block, different
        # between blocks, with no state shared between Ray Data tasks.
        first = str(table[schema.SAMPLE_ID][0].as_py()).encode()
        rng = np.random.default_rng([self.seed, zlib.crc32(first)])
        decoded, ok = self.weak_view.decode(table[schema.IMAGE].to_pylist())
        pixels = np.zeros((table.num_rows, size, size, 3), np.uint8)
        if ok.any():
            pixels[ok] = self.weak_view.geometry(decoded[ok], rng)
        sample_ids = np.array([str(sample_id) for sample_id in table[schema.SAMPLE_ID].to_pylist()],
                              dtype=object)
        return {PREPARED_PIXELS: pixels, PREPARED_OK: ok,
                PREPARED_HIDDEN_LABEL: table[schema.LABEL].to_numpy().astype(np.int64),
                PREPARED_SOURCE: schema.source_indices(table[schema.SOURCE].to_pylist()),
                PREPARED_SAMPLE_ID: sample_ids}


class InputPipeline:
    """Draws, decodes and crops the next step's batch in a background thread while the current
    step trains (JPEG decoding releases the GIL), then builds the views on the device."""

    def __init__(self, config: DataConfig, needs: Views, labeled: ImageTable,
                 unlabeled: UnlabeledSource | None, device: torch.device, seed: int) -> None:
        self.config = config
        self.needs = needs
        self.labeled = labeled
        self.unlabeled = unlabeled if needs.unlabeled and config.use_unlabeled else None
        self.device = device
        self.weak_view, self.strong_view = make_views(config)
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: Future | None = None
        self._pending_indices: np.ndarray | None = None
        self.current_unlabeled: PreparedUnlabeled | None = None
        """The unlabeled rows of the batch `next` returned last (the one training now): what a
        step observer reads to audit the stream; None without unlabeled rows."""

    @property
    def unlabeled_per_step(self) -> int:
        return self.config.labeled_batch * self.config.unlabeled_ratio if self.unlabeled else 0

    def _prepare(self, indices: np.ndarray) -> CpuBatch:
        decoded, ok = self.weak_view.decode(self.labeled.take_images(indices))
        labeled = self.weak_view.geometry(decoded[ok], self.rng)
        labels = self.labeled.labels[indices][ok]
        unlabeled = None
        undecodable_ids = [self.labeled.sample_ids[index] for index in indices[~ok].tolist()]
        if self.unlabeled_per_step:
            unlabeled = self.unlabeled.take_prepared(self.unlabeled_per_step, self.weak_view, self.rng)
            undecodable_ids += unlabeled.undecodable_ids
        host = {"labeled": labeled, "labels": labels}
        if unlabeled is not None and len(unlabeled.pixels):
            host.update(unlabeled=unlabeled.pixels, hidden_labels=unlabeled.hidden_labels,
                        sources=unlabeled.sources)
        host = {name: devices.host_tensor(array, self.device) for name, array in host.items()}
        return CpuBatch(labeled, labels, unlabeled, undecodable_ids, host)

    def prefetch(self, indices: np.ndarray) -> None:
        self._pending = self._pool.submit(self._prepare, indices)
        self._pending_indices = indices

    def next(self, indices: np.ndarray, following: np.ndarray | None
             ) -> tuple[TrainBatch, list[str], HiddenLabels | None]:
        """The batch for `indices` on the device, the sample ids of its rows that did not decode
        and the hidden labels of its unlabeled rows; starts preparing `following` meanwhile."""
        if self._pending is not None and self._pending_indices is indices:
            cpu = self._pending.result()
        else:
            cpu = self._prepare(indices)
        self._pending = None
        self.current_unlabeled = cpu.unlabeled
        if following is not None:
            self.prefetch(following)
        hidden = None
        if cpu.unlabeled is not None and len(cpu.unlabeled.pixels):
            hidden = HiddenLabels(self._send(cpu, "hidden_labels"), self._send(cpu, "sources"))
        return self.to_device(cpu), cpu.undecodable_ids, hidden

    def _send(self, cpu: CpuBatch, name: str) -> torch.Tensor:
        """One of the batch's host arrays on the device, queued without waiting (see core.devices)."""
        return devices.to_device(cpu.host[name], self.device)

    def to_device(self, cpu: CpuBatch) -> TrainBatch:
        labeled = self._send(cpu, "labeled")
        # The views draw from this CPU generator on every device (their parameters cross in one
        # small copy per view), so a run repeats and resumes exactly wherever it trains.
        generator = self.generator
        batch = TrainBatch(labeled_weak=self.weak_view(labeled, generator), labels=self._send(cpu, "labels"))
        if self.needs.labeled_strong:
            batch.labeled_strong = self.strong_view(labeled, generator)
        if cpu.unlabeled is not None and len(cpu.unlabeled.pixels):
            unlabeled = self._send(cpu, "unlabeled")
            batch.unlabeled_weak = self.weak_view(unlabeled, generator)
            if self.needs.unlabeled_strong:
                batch.unlabeled_strong = self.strong_view(unlabeled, generator)
        return batch

    def evaluation_images(self, images: list[bytes]) -> tuple[torch.Tensor, np.ndarray]:
        return evaluation_tensor(images, self.config, self.device)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.unlabeled is not None:
            self.unlabeled.close()
