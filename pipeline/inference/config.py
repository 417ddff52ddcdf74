"""The settings of a batch-inference pool (`jobs.infer`, `jobs.pseudolabel`, the temporal feature
pass): typed, checked on construction; `ray_inference` turns them into a Ray Data actor pool."""

from __future__ import annotations

import dataclasses
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
    """auto (GPU actors when the cluster has GPUs, else CPU), cpu or cuda (GPU actors)."""
    resource_wait_seconds: float = 900.0
    """On a cluster (RAY_ADDRESS set) that lacks the pool's CPUs or GPUs, how long to wait for the
    autoscaler to add them before failing; a local Ray cannot grow and fails at once."""

    def __post_init__(self) -> None:
        typed.check(self.batch_size >= 1, "inference.batch_size", "must be at least 1")
        typed.check(self.actors >= 1, "inference.actors", "must be at least 1")
        typed.check(self.cpus_per_actor > 0, "inference.cpus_per_actor", "must be positive")
        typed.check(self.gpus_per_actor >= 0, "inference.gpus_per_actor", "must be >= 0")
        typed.check(self.device in ("auto", "cpu", "cuda"), "inference.device", "auto, cpu or cuda")
        typed.check(self.resource_wait_seconds >= 0, "inference.resource_wait_seconds", "must be >= 0")
        typed.check(not (self.device == "cpu" and self.gpus_per_actor > 0), "inference.gpus_per_actor",
                    "must be 0 with device cpu (the GPUs would be reserved and left idle)")


def with_accelerators(settings: InferenceConfig, cluster_gpus: float) -> InferenceConfig:
    """The pool with its device decided: Ray hides every GPU from an actor that asks for none, so a
    model meant for a GPU needs GPU actors. `cuda` or GPUs per actor > 0 means GPU actors (one GPU
    each unless a fraction was given) on CUDA; `auto` means that too when the cluster has GPUs now
    (on a cluster whose GPU nodes are scaled to zero, ask for `cuda`), and CPU actors otherwise."""
    if settings.device == "cpu":
        return settings
    if settings.device == "cuda" or settings.gpus_per_actor > 0 or cluster_gpus > 0:
        return dataclasses.replace(settings, device="cuda", gpus_per_actor=settings.gpus_per_actor or 1.0)
    return dataclasses.replace(settings, device="cpu")


def pool_shortfall(settings: InferenceConfig, resources: dict[str, float]) -> str | None:
    """What the cluster (`ray.cluster_resources()`) lacks to run the pool, None when it fits: CPUs
    for every actor plus one for the read tasks feeding them (Ray Data does not take CPUs back from
    an actor pool), and the GPUs the actors ask for."""
    cpus = settings.actors * settings.cpus_per_actor
    gpus = settings.actors * settings.gpus_per_actor
    short = []
    if cpus >= resources.get("CPU", 0.0):
        short.append(f"{settings.actors} actors x {settings.cpus_per_actor:g} CPUs = {cpus:g} CPUs plus one "
                     f"for the read tasks, the cluster has {resources.get('CPU', 0.0):g}")
    if gpus > resources.get("GPU", 0.0) + 1e-9:
        short.append(f"{settings.actors} actors x {settings.gpus_per_actor:g} GPUs = {gpus:g} GPUs, "
                     f"the cluster has {resources.get('GPU', 0.0):g}")
    return "; ".join(short) or None
