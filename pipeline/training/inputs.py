"""The input path of a training step: CPU decode + weak geometry (uint8), then weak/strong views
made on the device (PERF.md: uint8 crosses to the GPU, the heavy colour work runs batched there).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import views
from pipeline.methods.base import TrainBatch, Views
from pipeline.training.config import DataConfig
from pipeline.training.data import ImageTable, UnlabeledStream


@dataclass
class CpuBatch:
    """One step's images after decode and geometry, still uint8 NHWC on the CPU."""

    labeled: np.ndarray
    labels: np.ndarray
    unlabeled: np.ndarray | None
    undecodable: int


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


class InputPipeline:
    """Draws, decodes and crops the next step's batch in a background thread while the current
    step trains (JPEG decoding releases the GIL), then builds the views on the device."""

    def __init__(self, config: DataConfig, needs: Views, labeled: ImageTable,
                 unlabeled: UnlabeledStream | None, device: torch.device, seed: int) -> None:
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

    @property
    def unlabeled_per_step(self) -> int:
        return self.config.labeled_batch * self.config.unlabeled_ratio if self.unlabeled else 0

    def _prepare(self, indices: np.ndarray) -> CpuBatch:
        decoded, ok = self.weak_view.decode(self.labeled.take_images(indices))
        labeled = self.weak_view.geometry(decoded[ok], self.rng)
        labels = self.labeled.labels[indices][ok]
        unlabeled = None
        undecodable = int((~ok).sum())
        if self.unlabeled_per_step:
            images, unlabeled_ok = self.weak_view.decode(self.unlabeled.take(self.unlabeled_per_step))
            unlabeled = self.weak_view.geometry(images[unlabeled_ok], self.rng)
            undecodable += int((~unlabeled_ok).sum())
        return CpuBatch(labeled, labels, unlabeled, undecodable)

    def prefetch(self, indices: np.ndarray) -> None:
        self._pending = self._pool.submit(self._prepare, indices)
        self._pending_indices = indices

    def next(self, indices: np.ndarray, following: np.ndarray | None) -> tuple[TrainBatch, int]:
        """The batch for `indices` on the device; starts preparing `following` meanwhile."""
        if self._pending is not None and self._pending_indices is indices:
            cpu = self._pending.result()
        else:
            cpu = self._prepare(indices)
        self._pending = None
        if following is not None:
            self.prefetch(following)
        return self.to_device(cpu), cpu.undecodable

    def to_device(self, cpu: CpuBatch) -> TrainBatch:
        labeled = torch.from_numpy(cpu.labeled).to(self.device, non_blocking=True)
        generator = self.generator if self.device.type == "cpu" else None
        batch = TrainBatch(
            labeled_weak=self.weak_view(labeled, generator),
            labels=torch.from_numpy(cpu.labels).to(self.device),
        )
        if self.needs.labeled_strong:
            batch.labeled_strong = self.strong_view(labeled, generator)
        if cpu.unlabeled is not None and len(cpu.unlabeled):
            unlabeled = torch.from_numpy(cpu.unlabeled).to(self.device, non_blocking=True)
            batch.unlabeled_weak = self.weak_view(unlabeled, generator)
            if self.needs.unlabeled_strong:
                batch.unlabeled_strong = self.strong_view(unlabeled, generator)
        return batch

    def evaluation_images(self, images: list[bytes]) -> tuple[torch.Tensor, np.ndarray]:
        """Deterministic view for evaluation: resize (and centre crop), no augmentation."""
        decoded, ok = views.decode_resize(images, self.config.resize or self.config.image_size)
        if self.config.resize:
            decoded = views.centre_crop(decoded, self.config.image_size)
        tensor = torch.from_numpy(decoded).to(self.device)
        weak = self.weak_view.config
        return views.to_float(tensor, weak.mean, weak.std, weak.channels_last), ok

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
