"""Workers as threads of one test process, with an in-process all-reduce: for tests that compare
several workers against one process without starting Ray or a process group."""

from __future__ import annotations

import threading

import torch

from pipeline.methods.base import Collectives


class ThreadGroup:
    """An in-process all-reduce for workers running in threads: each puts its tensor in its slot,
    all wait, each sums the slots in rank order (so every worker gets the same bits), all wait."""

    def __init__(self, world_size: int) -> None:
        self.slots: list[torch.Tensor | None] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.means: list[tuple[int, torch.Tensor, torch.Tensor]] = []


class ThreadCollectives(Collectives):
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group = group
        self.rank = rank
        self.world_size = len(group.slots)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.group.slots[self.rank] = tensor.detach().clone()
        self.group.barrier.wait()
        total = self.group.slots[0].clone()
        for other in self.group.slots[1:]:
            total += other
        self.group.barrier.wait()
        return total

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        mean = self.all_reduce_sum(tensor) / self.world_size
        self.group.means.append((self.rank, tensor.detach().clone(), mean))
        return mean
