"""The settings of a batch-inference pool (`jobs.infer`, `jobs.pseudolabel`, the temporal feature
pass): typed, checked on construction; `ray_inference` turns them into a Ray Data actor pool."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import config as typed


@dataclass
class InferenceConfig:
    batch_size: int = 128
    """Images per model call in each actor."""
    actors: int = 1
    """Size of the actor pool (each holds one copy of the model)."""
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    """GPUs per actor on GPU clusters (fractions share one GPU between actors)."""
    threads: int = 1
    """torch intra-op threads per actor."""
    device: str = "auto"
    """auto (CUDA when the actor has a GPU), cpu or cuda."""

    def __post_init__(self) -> None:
        typed.check(self.batch_size >= 1, "inference.batch_size", "must be at least 1")
        typed.check(self.actors >= 1, "inference.actors", "must be at least 1")
        typed.check(self.cpus_per_actor > 0, "inference.cpus_per_actor", "must be positive")
        typed.check(self.gpus_per_actor >= 0, "inference.gpus_per_actor", "must be >= 0")
        typed.check(self.device in ("auto", "cpu", "cuda"), "inference.device", "auto, cpu or cuda")
