"""Class-balanced sampling of the labeled set, redrawn every epoch and different on every rank.

Pure numpy; follows torch's Sampler protocol (`set_epoch`, `__iter__`, `__len__`) without torch.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from pipeline.data import schema


class ClassBalancedSampler:
    """Indices into `labels` with an equal quota per present class; labels -1 are never drawn.

    `samples_per_epoch` is per rank: each Ray Train worker draws its own sample from the whole
    (unsplit) labeled set, seeded by (seed, epoch, rank).
    """

    def __init__(self, labels: np.ndarray, samples_per_epoch: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_classes: int = schema.NUM_CLASSES) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        _check_count("num_classes", num_classes, minimum=1)
        _check_count("samples_per_epoch", samples_per_epoch, minimum=1)
        _check_count("seed", seed, minimum=0)
        _check_count("world_size", world_size, minimum=1)
        _check_count("rank", rank, minimum=0)
        if rank >= world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        invalid = (labels < schema.NO_LABEL) | (labels >= num_classes)
        if invalid.any():
            raise ValueError(
                f"labels must lie in {schema.NO_LABEL}..{num_classes - 1}; found "
                f"{np.unique(labels[invalid])[:10].tolist()} ({int(invalid.sum())} items)"
            )
        self._items_by_class = {label: np.flatnonzero(labels == label) for label in range(num_classes)}
        self.classes: tuple[int, ...] = tuple(
            label for label, items in self._items_by_class.items() if items.size
        )
        self.missing_classes: tuple[int, ...] = tuple(
            label for label, items in self._items_by_class.items() if not items.size
        )
        if not self.classes:
            raise ValueError(f"no class has items: all {labels.size} labels are {schema.NO_LABEL} "
                             "or the label vector is empty")
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.num_classes = int(num_classes)
        self.epoch = 0

    def class_quotas(self, epoch: int) -> dict[int, int]:
        """Items drawn per present class: equal shares, the remainder rotating with the epoch."""
        share, remainder = divmod(self.samples_per_epoch, len(self.classes))
        favoured = {self.classes[(epoch + offset) % len(self.classes)] for offset in range(remainder)}
        return {label: share + (label in favoured) for label in self.classes}

    def indices(self, epoch: int) -> np.ndarray:
        _check_count("epoch", epoch, minimum=0)
        generator = np.random.default_rng([self.seed, epoch, self.rank])
        draws = []
        for label, quota in self.class_quotas(epoch).items():
            items = self._items_by_class[label]
            repeats = -(-quota // items.size)
            # Each row is an independent permutation: every item comes once before any repeats.
            permutations = generator.permuted(np.tile(items, (repeats, 1)), axis=1)
            draws.append(permutations.ravel()[:quota])
        result = np.concatenate(draws).astype(np.int64, copy=False)
        generator.shuffle(result)
        return result

    def set_epoch(self, epoch: int) -> None:
        _check_count("epoch", epoch, minimum=0)
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch).tolist())

    def __len__(self) -> int:
        return self.samples_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore epoch and seed; the rank stays this worker's own.

        A checkpoint is usually saved by rank 0 and restored on every rank: taking its rank would
        give every worker the same sample.
        """
        epoch, seed = state["epoch"], state["seed"]
        _check_count("epoch", epoch, minimum=0)
        _check_count("seed", seed, minimum=0)
        self.epoch = int(epoch)
        self.seed = int(seed)


def _check_count(name: str, value: Any, minimum: int) -> None:
    is_integer = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not is_integer or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
